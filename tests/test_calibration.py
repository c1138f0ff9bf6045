"""``bif_fast.calibrate`` and ``compute_bif(config=None)`` on the Gaussian oracle (ridge regression, whose
localised posterior and BIF have closed forms), the re-fit probe's score, and the back-off of a diverging
pilot."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from torch.utils.data import TensorDataset

import bif_fast.calibration as calibration
from bif_fast import calibrate, compute_bif
from bif_fast.engine.probe import RefitProbe, extrapolated_score, probe_noise_fractions, probe_score, probe_score_and_se

WD = 0.05


def _ridge(seed: int = 0, n: int = 80, d: int = 6):
    """w* minimises mean 1/2 (x w - y)^2 + WD/2 |w|^2; the loss_fn is the data term only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 30, d, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.7, 0.5, 0.3],
                                                                                   dtype=torch.float64)[:d]  # fmt: skip
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n + 30, generator=g,
                                                                                  dtype=torch.float64)  # fmt: skip
    h = x[:n].T @ x[:n] / n
    w_star = torch.linalg.solve(h + WD * torch.eye(d, dtype=torch.float64), x[:n].T @ y[:n] / n)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star.float()[None])
    train = TensorDataset(x[:n].float(), y[:n].float())
    query = TensorDataset(x[n:].float(), y[n:].float())
    return model, train, query, x, y, w_star, h


def _sq(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(1) - y).square()


@pytest.fixture
def short_runs(monkeypatch):
    """Calibrated runs of a few hundred draws, so the tests take seconds (the rules are unchanged)."""
    monkeypatch.setattr(calibration, "MAX_DRAWS", 400)
    monkeypatch.setattr(calibration, "REFITS", 8)
    monkeypatch.setattr(calibration, "REFIT_STEPS", 40)


def test_calibrate_reads_the_curvature_the_weight_decay_and_the_stable_step_off_the_oracle(short_runs):
    model, train, query, x, y, w_star, h = _ridge()
    w_before = model.weight.detach().clone()
    cfg = calibrate(model, train, query, loss_fn=_sq, budget_seconds=5.0)
    cal = cfg.calibration
    evals = torch.linalg.eigvalsh(h).flip(0)
    assert cal["curvature"]["lam_max"] == pytest.approx(float(evals[0]), rel=2e-3)
    assert cal["curvature"]["implied_weight_decay"]["value"] == pytest.approx(WD, rel=1e-3)
    sgld = cfg.sgld
    assert sgld.sampler == "baoab" and sgld.mass == "curvature" and cfg.batch_size == "full"
    assert sgld.weight_decay == pytest.approx(sgld.nbeta * WD, rel=1e-3)
    damping = cal["damping"]["value"]
    assert sgld.localization == pytest.approx(damping * sgld.nbeta)
    assert any(damping == pytest.approx(f * float(evals[0]), rel=1e-3) for f in calibration.DAMPINGS)
    # The stable step: 0.8 x 2 / sqrt(a_ref), a_ref the (k+1)-th curvature of the potential (k = d - 1 here).
    rank = sgld.mass_rank
    shrink = cal["sampler"]["step_shrink"]
    a_ref = sgld.nbeta * (float(evals[rank]) + WD) + sgld.localization
    assert sgld.lr * math.sqrt(a_ref) / 2 == pytest.approx(0.8 * shrink, rel=5e-3)
    assert sgld.friction == pytest.approx(2 * math.sqrt(sgld.nbeta * (WD + damping)), rel=1e-3)
    assert calibration.MIN_DRAWS <= cfg.num_draws <= 400 and cfg.num_chains == calibration.FINAL_CHAINS
    assert {"candidates", "probe", "length", "nbeta", "seconds"} <= set(cal)
    # Its own cost in per-sequence gradients, from the record: every Hessian-vector product's two full batches
    # and the weight decay's one, the re-fits, each pilot's chain-steps and the speed trial's.
    n, trial = len(train), cal["length"]["speed_trial"]
    pilot_steps = len(cal["candidates"]) * calibration.PILOT_CHAINS * (cal["probe"]["pilot_draws"] - 1)
    full_batches = 2 * cal["curvature"]["hvps"] + 1 + pilot_steps + calibration.FINAL_CHAINS * (trial["draws"] - 1)
    assert cal["gradient_evaluations"] == n * full_batches + cal["probe"]["gradient_evaluations"]
    assert cal["probe"]["gradient_evaluations"] == calibration.REFITS * cal["probe"]["steps"] * n
    # The length comes from a speed trial of the final run's own shape (all its chains at once here).
    trial = cal["length"]["speed_trial"]
    assert trial["chain_batch"] == calibration.FINAL_CHAINS
    assert calibration.MIN_TRIAL_DRAWS <= trial["draws"] <= calibration.MAX_TRIAL_DRAWS
    per_step = trial["loop_seconds"] / (calibration.FINAL_CHAINS * (trial["draws"] - 1))
    assert cal["length"]["seconds_per_chain_step"] == pytest.approx(per_step)
    # The sampling may run for the time its draws were planned for (and at least 1.5 x 100 draws' worth).
    planned = cal["length"]["seconds_left"] - cal["length"]["seconds_per_run"]
    floor = calibration.LIMIT_SLACK * per_step * calibration.FINAL_CHAINS * calibration.MIN_DRAWS
    assert cfg.time_limit == pytest.approx(max(planned, floor)) and cfg.time_limit <= 5.0
    tried = sorted({c["damping"] for c in cal["candidates"]})
    assert all("probe_lds" in c for c in cal["candidates"]) and len(tried) == len(calibration.DAMPINGS)
    assert tried[-1] / tried[0] == pytest.approx(calibration.DAMPINGS[-1] / calibration.DAMPINGS[0])  # both ends
    assert torch.equal(model.weight.detach(), w_before)


def test_the_calibrated_bif_matches_the_closed_form_of_its_posterior(short_runs):
    """For ridge regression the calibrated potential nbeta L + nbeta WD/2 |w|^2 + loc/2 |w - w*|^2 is Gaussian
    around w* with covariance (nbeta (H + WD) + loc)^-1: the BIF of the calibrated config has a closed form."""
    model, train, query, x, y, w_star, h = _ridge()
    cfg = calibrate(model, train, query, loss_fn=_sq, budget_seconds=5.0)
    cfg = dataclasses.replace(cfg, num_draws=1500, time_limit=None)
    res = compute_bif(model, train, query, loss_fn=_sq, config=cfg)
    s = cfg.sgld
    d = h.shape[0]
    sigma = torch.linalg.inv(s.nbeta * h + (s.weight_decay + s.localization) * torch.eye(d, dtype=torch.float64))
    r = x @ w_star.double() - y
    n = len(train)
    cross = x[:n] @ sigma @ x[n:].T
    exact = -(r[:n, None] * r[None, n:] * cross + 0.5 * cross.square())
    err = float((res.bif.double() - exact).norm() / exact.norm())
    assert err < 0.1, err


def test_compute_bif_without_config_uses_the_calibration_and_records_it(short_runs):
    model, train, query, *_ = _ridge()
    res = compute_bif(model, train, query, loss_fn=_sq)
    cal = res.diagnostics["calibration"]
    assert res.config.calibration is cal and res.config.sgld.mass == "curvature"
    assert res.diagnostics["forward_reuse"] and not any(res.diagnostics["diverged"])
    # The same settings given explicitly give the same BIF: the mass is rebuilt from the config by the same
    # seeded Lanczos (float32 rounding of its products lets the chains drift apart by ~1e-7 of the scale).
    again = compute_bif(model, train, query, loss_fn=_sq, config=res.config)
    assert torch.allclose(again.bif, res.bif, rtol=1e-4, atol=1e-6 * float(res.bif.abs().max()))
    with pytest.raises(ValueError, match="sgld_data"):
        compute_bif(model, train, query, loss_fn=_sq, sgld_data=train)


def test_a_diverging_pilot_is_retried_at_half_the_step_and_said(short_runs, monkeypatch, caplog):
    monkeypatch.setattr(calibration, "SAFETY", 1.9)  # above BAOAB's stability limit of 2 / sqrt(a_ref)
    model, train, query, *_ = _ridge()
    with caplog.at_level(logging.WARNING, logger="bif_fast"):
        cfg = calibrate(model, train, query, loss_fn=_sq, budget_seconds=5.0)
    rows = cfg.calibration["candidates"]
    first = next(i for i, r in enumerate(rows) if r["diverged"])
    assert rows[first]["step_shrink"] == 1.0
    later = [r for r in rows[first + 1 :] if r["nbeta"] == rows[first]["nbeta"]]
    assert len(later) >= 2 and all(r["step_shrink"] <= 0.5 and not r["diverged"] for r in later)  # kept smaller
    # The final chains run many pilots' worth of steps: their step backs off once more from the one that held.
    assert cfg.calibration["sampler"]["step_shrink"] == 0.5 * calibration.FINAL_BACKOFF
    assert cfg.calibration["sampler"]["final_backoff"] == calibration.FINAL_BACKOFF
    assert "halving the step" in caplog.text


def test_probe_score_is_the_mean_spearman_of_predicted_and_observed_changes():
    g = torch.Generator().manual_seed(0)
    kept = torch.rand(10, 7, generator=g)  # (continuous: no tied predictions)
    bif = torch.randn(7, 3, generator=g, dtype=torch.float64)
    pred = kept.double() @ bif
    # Observed changes that are a monotone function of the prediction: a perfect rank correlation.
    probe = RefitProbe(kept, pred.pow(3) + 2.0, 0.0, 0)
    assert probe_score(bif, probe) == pytest.approx(1.0)
    assert probe_score(-bif, probe) == pytest.approx(-1.0)  # the sign convention of compute_bif matters
    # Against a worked example: query 0 reversed, query 1 exact, query 2 one swap of five.
    kept = torch.eye(5)
    bif = torch.tensor([[1.0, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 5], [5, 5, 4]], dtype=torch.float64)
    delta = torch.tensor([[5.0, 1, 1], [4, 2, 2], [3, 3, 3], [2, 4, 4], [1, 5, 5]])
    assert probe_score(bif, RefitProbe(kept, delta, 0.0, 0)) == pytest.approx((-1 + 1 + 0.9) / 3)


def test_probe_standard_error_is_the_jackknife_over_re_fits():
    g = torch.Generator().manual_seed(1)
    kept = torch.rand(12, 9, generator=g)
    bif = torch.randn(9, 4, generator=g, dtype=torch.float64)
    exact = RefitProbe(kept, kept.double() @ bif, 0.0, 0)
    assert probe_score_and_se(bif, exact) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    delta = torch.randn(12, 4, generator=g, dtype=torch.float64)
    score, se = probe_score_and_se(bif, RefitProbe(kept, delta, 0.0, 0))
    loo = []
    for i in range(12):
        keep = torch.arange(12) != i
        loo.append(probe_score(bif, RefitProbe(kept[keep], delta[keep], 0.0, 0)))
    loo = torch.tensor(loo, dtype=torch.float64)
    assert score == pytest.approx(probe_score(bif, RefitProbe(kept, delta, 0.0, 0)))
    assert se == pytest.approx(float((11 / 12 * (loo - loo.mean()).square().sum()).sqrt()), rel=1e-9)
    assert 0.05 < se < 0.6  # twelve re-fits of noise: a wide score


def test_probe_noise_fractions_measure_the_halves_disagreement():
    g = torch.Generator().manual_seed(2)
    kept = torch.rand(4000, 6, generator=g)
    signal = torch.randn(6, 3, generator=g, dtype=torch.float64)
    delta = kept.double() @ signal + 0.5 * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    probe = RefitProbe(kept, delta, 0.0, 0)
    corr, frac = probe_noise_fractions(signal, signal, probe)  # identical halves: no noise
    assert torch.equal(frac, torch.zeros(3, dtype=torch.float64))
    assert float(corr.mean()) == pytest.approx(probe_score(signal, probe))
    # Halves signal +- noise: the pool is the signal, and its noise variance a quarter of the difference's.
    noise = 0.7 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    corr, frac = probe_noise_fractions(signal + noise, signal - noise, probe)
    pn, ps = kept.double() @ noise, kept.double() @ signal
    assert torch.allclose(frac, pn.var(0) / ps.var(0), rtol=1e-9)
    assert float(corr.mean()) == pytest.approx(probe_score(signal, probe))


def test_extrapolated_score_carries_the_correlation_to_more_draws():
    """Halves with independent noise of a known size: the score extrapolated to ``gain`` times the draws
    matches the score of a BIF whose noise is ``gain`` times smaller in variance (Spearman of Gaussian
    predictions follows the Pearson attenuation closely); no gain leaves the score as it is; a fraction at or
    above 1 (all noise) takes the cap."""
    g = torch.Generator().manual_seed(3)
    k, n, p, gain = 3000, 40, 300, 8.0
    kept = torch.rand(k, n, generator=g)
    signal = torch.randn(n, p, generator=g, dtype=torch.float64)
    clean = kept.double() @ signal
    delta = clean + 0.5 * clean.std() * torch.randn(k, p, generator=g, dtype=torch.float64)
    probe = RefitProbe(kept, delta, 0.0, 0)
    ea, eb = (1.5 * torch.randn(n, p, generator=g, dtype=torch.float64) for _ in range(2))
    corr, frac = probe_noise_fractions(signal + ea, signal + eb, probe)
    score, c = extrapolated_score(corr, frac, gain, max_noise_ratio=100.0)
    cov = torch.cov(kept.double().T)  # of the re-fits' kept weights: the predictions' spread is s^T cov s
    pool_noise = float(cov.trace()) * 1.5**2 / 2  # expected, for the pool's noise of variance 1.5^2 / 2
    f = float((pool_noise / (torch.einsum("iu,ij,ju->u", signal, cov, signal) + pool_noise)).mean())
    # The pool's noise share, from the halves alone (a ratio of two noisy variances: ~10% high here).
    assert c == pytest.approx(f / (1 - f), rel=0.2)
    assert score > float(corr.mean()) + 0.1
    longer = probe_score(signal + 1.5 / math.sqrt(2 * gain) * torch.randn(n, p, generator=g, dtype=torch.float64),
                         probe)  # fmt: skip
    assert score == pytest.approx(longer, abs=0.03)
    assert extrapolated_score(corr, frac, 1.0, max_noise_ratio=100.0)[0] == pytest.approx(float(corr.mean()))
    assert extrapolated_score(corr, torch.ones(p), gain, max_noise_ratio=3.0)[1] == 3.0


def test_an_uninformative_probe_falls_back_to_the_largest_damping(short_runs, monkeypatch, caplog):
    """Re-fits whose query changes are noise, unrelated to the halves: no candidate beats chance, and the
    calibration takes the largest damping it tried (the least Monte-Carlo noise) and says so."""
    real = calibration.refit_probe

    def noise_probe(*args, **kwargs):
        probe = real(*args, **kwargs)
        g = torch.Generator().manual_seed(7)
        return RefitProbe(probe.kept, torch.randn(probe.delta.shape, generator=g, dtype=torch.float64),
                          probe.seconds, probe.gradient_evaluations)  # fmt: skip

    monkeypatch.setattr(calibration, "refit_probe", noise_probe)
    model, train, query, *_ = _ridge()
    with caplog.at_level(logging.INFO, logger="bif_fast"):
        cfg = calibrate(model, train, query, loss_fn=_sq, budget_seconds=5.0)
    cal = cfg.calibration
    tried = [c["damping"] for c in cal["candidates"] if c["nbeta"] == cfg.sgld.nbeta and not c["diverged"]]
    assert cal["damping"]["probe_informative"] is False and cal["damping"]["value"] == max(tried)
    assert "chance" in caplog.text
    monkeypatch.setattr(calibration, "refit_probe", real)  # the real probe sees the ridge's re-fits
    assert calibrate(model, train, query, loss_fn=_sq, budget_seconds=5.0).calibration["damping"]["probe_informative"]


def test_calibrate_rejects_bad_arguments():
    model, train, query, *_ = _ridge()
    with pytest.raises(ValueError, match="budget_seconds"):
        calibrate(model, train, query, loss_fn=_sq, budget_seconds=0)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, TensorDataset(torch.zeros(0, 6), torch.zeros(0)), query, loss_fn=_sq)


def test_calibrate_falls_back_to_unit_mass_for_low_precision_weights(short_runs):
    model, train, query, *_ = _ridge()
    model = model.to(torch.bfloat16)
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    train = TensorDataset(*map(bf16, train.tensors))
    query = TensorDataset(*map(bf16, query.tensors))
    cfg = calibrate(model, train, query, loss_fn=_sq, budget_seconds=3.0)
    assert cfg.sgld.mass == "identity" and cfg.calibration["curvature"]["mass_rank"] == 0
    assert cfg.sgld.sampler == "baoab" and cfg.sgld.lr > 0
