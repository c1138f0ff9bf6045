"""compute_bif end to end: the closed-form Gaussian oracle, invariances, divergence, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bif_fast import BIFConfig, BIFError, BIFResult, SGLDConfig, compute_bif

D, N_TRAIN, N_QUERY = 3, 24, 8
NBETA, LOC, LR = 30.0, 5.0, 0.03


def _linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_QUERY, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64) + 0.3 * torch.randn(N_TRAIN + N_QUERY, generator=g,
                                                                                    dtype=torch.float64)  # fmt: skip
    w_star = torch.linalg.lstsq(x[:N_TRAIN], y[:N_TRAIN, None]).solution.squeeze(1)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star.float()[None])
    train = TensorDataset(x[:N_TRAIN].float(), y[:N_TRAIN].float())
    query = TensorDataset(x[N_TRAIN:].float(), y[N_TRAIN:].float())
    return model, train, query, x, y, w_star


def _sq_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(1) - y).square()


def _exact_loss_cov(x, y, w_star):
    """Cov(l_i, l_j) under the stationary law of full-batch plain SGLD (a Gaussian around w*)."""
    hessian = x[:N_TRAIN].T @ x[:N_TRAIN] / N_TRAIN
    lam, vec = torch.linalg.eigh(NBETA * hessian + LOC * torch.eye(D, dtype=torch.float64))
    sigma = vec @ torch.diag(1.0 / (lam * (1 - LR * lam / 4))) @ vec.T
    r = x @ w_star - y
    s = x[:N_TRAIN] @ sigma @ x[N_TRAIN:].T
    return r[:N_TRAIN, None] * r[None, N_TRAIN:] * s + 0.5 * s.square(), sigma, lam


def _config(draws: int, chains: int = 4, **kw) -> BIFConfig:
    sgld = SGLDConfig(lr=LR, nbeta=NBETA, localization=LOC)
    return BIFConfig(sgld=sgld, num_chains=chains, num_draws=draws, num_steps_bw_draws=3, num_burnin_steps=200,
                     batch_size=N_TRAIN, eval_batch_size=64, seed=0, **kw)  # fmt: skip


def test_matches_the_closed_form_gaussian_bif_and_converges():
    model, train, query, x, y, w_star = _linear_problem()
    exact_cov, _, lam = _exact_loss_cov(x, y, w_star)
    exact = -exact_cov
    big = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(1000))
    n = big.diagnostics["num_draws_used"]
    assert n == 4000 and big.diagnostics["diverged"] == [False] * 4
    # Monte-Carlo scale of each covariance entry, inflated for the chain's autocorrelation: the slowest
    # mode decorrelates by (1 - lr λ_min / 2)^(2·3) between draws (squared for the quadratic term).
    rho = (1 - LR * float(lam.min()) / 2) ** 3
    n_eff = n * (1 - rho) / (1 + rho)
    var_i = torch.diagonal(_exact_var(x, y, w_star))
    se = ((var_i[:N_TRAIN, None] * var_i[None, N_TRAIN:] + exact_cov.square()) / n_eff).sqrt()
    z = (big.bif - exact).abs() / se
    assert z.max() < 5, f"BIF off by {z.max():.1f} Monte-Carlo standard errors"
    # The test has the power to see the discretisation: the continuous-time law (lr -> 0) is rejected.
    hessian = x[:N_TRAIN].T @ x[:N_TRAIN] / N_TRAIN
    s_cont = x[:N_TRAIN] @ torch.linalg.inv(NBETA * hessian + LOC * torch.eye(D, dtype=torch.float64)) @ x[N_TRAIN:].T
    r = x @ w_star - y
    continuous = -(r[:N_TRAIN, None] * r[None, N_TRAIN:] * s_cont + 0.5 * s_cont.square())
    assert ((big.bif - continuous).abs() / se).max() > 10
    # The batch-means standard error is of the same order as that scale.
    ratio = (big.stderr / se).median()
    assert 0.2 < ratio < 5
    small = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(60))
    err = lambda r: float((r.bif - exact).norm() / exact.norm())  # noqa: E731
    assert err(big) < err(small)
    assert err(big) < 0.1


def _exact_var(x, y, w_star):
    """Var of every loss (train and query) under the same Gaussian, for the Monte-Carlo scale."""
    _, sigma, _ = _exact_loss_cov(x, y, w_star)
    r = x @ w_star - y
    s = x @ sigma @ x.T
    return r[:, None] * r[None, :] * s + 0.5 * s.square()


def test_same_seed_same_result_and_model_left_exactly_at_w_star():
    model, train, query, *_ = _linear_problem()
    model.train()
    w_star = model.weight.detach().clone()
    storage = model.weight.data_ptr()
    cfg = _config(30, chains=2)
    a = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    b = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    assert torch.equal(a.bif, b.bif) and torch.equal(a.stderr, b.stderr)
    assert torch.equal(model.weight, w_star) and model.weight.data_ptr() == storage
    assert model.training and model.weight.grad is None
    c = compute_bif(model, train, query, loss_fn=_sq_loss, config=dataclasses.replace(cfg, seed=1))
    assert not torch.equal(a.bif, c.bif)


def test_chain_results_do_not_depend_on_how_many_chains_run():
    """Chain c is seeded by its index: the first chain of a 1-chain and of a 3-chain run is the same chain,
    bit for bit when both run one by one, and up to rounding when the three run batched."""
    model, train, query, *_ = _linear_problem()
    one = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(20, chains=1))
    three = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(20, chains=3, chain_batch=1))
    batched = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(20, chains=3, chain_batch=3))
    assert one.diagnostics["chain_batch"] == three.diagnostics["chain_batch"] == 1
    assert batched.diagnostics["chain_batch"] == 3
    t1, t3 = one.diagnostics["chain_mean_train_loss"], three.diagnostics["chain_mean_train_loss"]
    assert t1[0] == t3[0]
    assert t3[1] != t3[0]
    torch.testing.assert_close(torch.tensor(batched.diagnostics["chain_mean_train_loss"]), torch.tensor(t3),
                               rtol=1e-5, atol=0.0)  # fmt: skip


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.lin(x))))


def test_buffers_and_mode_restored_and_losses_evaluated_in_eval_mode():
    _, train, query, *_ = _linear_problem()
    torch.manual_seed(0)
    model = _BatchNormNet().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen_modes = []

    def loss_fn(m, batch):
        seen_modes.append((torch.is_grad_enabled(), m.training))
        return _sq_loss(m, batch)

    cfg = _config(5, chains=2)
    compute_bif(model, train, query, loss_fn=loss_fn, config=cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert model.training
    # Evaluations (no grad) ran in eval mode; SGLD gradients (grad) in the model's own (train) mode.
    assert {mode for grad, mode in seen_modes if not grad} == {False}
    assert {mode for grad, mode in seen_modes if grad} == {True}


def test_diverged_chain_is_reported_and_left_out():
    model, train, query, *_ = _linear_problem()
    calls = {"grad": 0}

    def loss_fn(m, batch):
        out = _sq_loss(m, batch)
        if torch.is_grad_enabled():
            calls["grad"] += 1
            if calls["grad"] == 300:  # in chain 1 (each chain takes 200 + 3 × 19 = 257 steps)
                out = out * float("nan")
        return out

    # One chain at a time, so the call count says which chain gets the NaN (batched: tests/test_chain_batch.py).
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=_config(20, chains=3, chain_batch=1))
    assert res.diagnostics["diverged"] == [False, True, False]
    assert res.diagnostics["num_draws_used"] == 40
    assert torch.isfinite(res.bif).all() and torch.isfinite(res.stderr).all()


def test_every_chain_diverging_raises_with_diagnostics():
    model, train, query, *_ = _linear_problem()
    w_star = model.weight.detach().clone()
    cfg = dataclasses.replace(_config(5, chains=2), sgld=SGLDConfig(lr=10.0, nbeta=1e8, localization=0.0))
    with pytest.raises(BIFError, match="every chain diverged") as info:
        compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    assert info.value.diagnostics["diverged"] == [True, True]
    # The model is back at w* exactly, with no gradient left behind: still usable.
    assert torch.equal(model.weight.detach(), w_star) and model.weight.grad is None


def _per_token_problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 5, D, generator=g)  # 10 sequences of 5 positions
    y = torch.randn(10, 5, generator=g)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.4, -0.8, 0.2]]))
    return model, TensorDataset(x[:7], y[:7]), TensorDataset(x[7:], y[7:])


def _token_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).square()  # [B, T]


def _seq_mean_loss(model, batch):
    return _token_loss(model, batch).mean(dim=1)  # [B]


def test_per_token_sums_equal_the_sequence_level_bif():
    model, train, query = _per_token_problem()
    cfg = dataclasses.replace(_config(40, chains=2), batch_size=7)
    tok = compute_bif(model, train, query, loss_fn=_token_loss, config=cfg, per_token=True)
    seq = compute_bif(model, train, query, loss_fn=_seq_mean_loss, config=cfg)
    assert tok.bif.shape == (35, 15) and tok.train_index.shape == (35, 2)
    assert tok.train_index[6].tolist() == [1, 1] and tok.query_index[-1].tolist() == [2, 4]
    # Cov(mean_t l_it, mean_s phi_js) = (1/T²) Σ_ts Cov(l_it, phi_js); the chains are the same chains.
    torch.testing.assert_close(tok.sequence_bif() / 25, seq.bif, rtol=1e-4, atol=1e-9)


def test_per_token_evaluation_batches_are_capped_in_tokens():
    """eval_max_tokens: per token, a batch holds at most that many loss positions (here 11 // 5 = 2
    sequences instead of eval_batch_size=64); the BIF is the uncapped one up to summation order."""
    model, train, query = _per_token_problem()
    cfg = dataclasses.replace(_config(12, chains=2), batch_size=7)
    capped = compute_bif(model, train, query, loss_fn=_token_loss, per_token=True,
                         config=dataclasses.replace(cfg, eval_max_tokens=11))  # fmt: skip
    whole = compute_bif(model, train, query, loss_fn=_token_loss, per_token=True,
                        config=dataclasses.replace(cfg, eval_max_tokens=None))  # fmt: skip
    auto = compute_bif(model, train, query, loss_fn=_token_loss, per_token=True, config=cfg)
    assert capped.diagnostics["eval_batch_size"] == {"train": 2, "query": 2}
    # Item-collated datasets are probed the same way; a DataLoader's own batches are kept as given.
    items = compute_bif(model, _ItemDataset(train), _ItemDataset(query), loss_fn=_token_loss, per_token=True,
                        sgld_data=train, config=dataclasses.replace(cfg, eval_max_tokens=11))  # fmt: skip
    assert items.diagnostics["eval_batch_size"] == {"train": 2, "query": 2}
    torch.testing.assert_close(items.bif, capped.bif, rtol=1e-6, atol=1e-12)
    loaders = compute_bif(model, DataLoader(train, batch_size=3), DataLoader(query, batch_size=3), per_token=True,
                          loss_fn=_token_loss, sgld_data=train,
                          config=dataclasses.replace(cfg, eval_max_tokens=11))  # fmt: skip
    assert loaders.diagnostics["eval_batch_size"] == {"train": 3, "query": 3}
    torch.testing.assert_close(loaders.bif, capped.bif, rtol=1e-5, atol=1e-9)
    assert whole.diagnostics["eval_batch_size"] == auto.diagnostics["eval_batch_size"] == {"train": 64, "query": 64}
    torch.testing.assert_close(capped.bif, whole.bif, rtol=1e-5, atol=1e-9)
    assert torch.equal(capped.train_index, whole.train_index) and torch.equal(capped.query_index, whole.query_index)
    # A cap below one sequence still evaluates one sequence at a time; per sample the cap does not apply.
    one = compute_bif(model, train, query, loss_fn=_token_loss, per_token=True,
                      config=dataclasses.replace(cfg, num_draws=2, eval_max_tokens=1))  # fmt: skip
    assert one.diagnostics["eval_batch_size"] == {"train": 1, "query": 1}
    seq = compute_bif(model, train, query, loss_fn=_seq_mean_loss,
                      config=dataclasses.replace(cfg, num_draws=2, eval_max_tokens=1))  # fmt: skip
    assert seq.diagnostics["eval_batch_size"] == {"train": 64, "query": 64}


def test_per_token_aggregates_are_sums_of_token_blocks():
    """aggregate(): every sequence-level reduction of the per-token BIF against an explicit loop over the
    (sequence, position) index, including the EK-FAC-style one (training token x query sequence)."""
    model, train, query = _per_token_problem()
    cfg = dataclasses.replace(_config(8, chains=1), batch_size=7)
    tok = compute_bif(model, train, query, loss_fn=_token_loss, config=cfg, per_token=True)
    b = tok.bif.double()
    ti, qi = tok.train_index, tok.query_index
    n_seq, q_seq = int(ti[:, 0].max()) + 1, int(qi[:, 0].max()) + 1
    want_ts = torch.full((b.shape[0], q_seq), float("nan"), dtype=torch.float64)
    for j in range(q_seq):
        want_ts[:, j] = b[:, qi[:, 0] == j].sum(1)
    want_ss = torch.stack([want_ts[ti[:, 0] == i].sum(0) for i in range(n_seq)])
    want_st = torch.stack([b[ti[:, 0] == i].sum(0) for i in range(n_seq)])
    tol = {"rtol": 1e-5, "atol": 1e-6 * float(b.abs().max())}  # float32 sums of up to 25 terms
    torch.testing.assert_close(tok.aggregate().double(), want_ts, **tol)
    torch.testing.assert_close(tok.aggregate(train="sequence", query="sequence").double(), want_ss, **tol)
    torch.testing.assert_close(tok.aggregate(train="sequence", query="token").double(), want_st, **tol)
    assert torch.equal(tok.sequence_bif(), tok.aggregate(train="sequence", query="sequence"))
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        tok.aggregate(query="sentence")
    seq = compute_bif(model, train, query, loss_fn=_seq_mean_loss, config=dataclasses.replace(cfg, num_draws=2))
    with pytest.raises(ValueError, match="per-token result"):
        seq.aggregate()


def _padded_token_loss(m, batch):
    """The last two positions are padding: declared by the mask, and their losses are garbage (not 0)."""
    out = _token_loss(m, batch)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, -2:] = False
    return out.masked_fill(~mask, 123.0), mask


class _MaskMethodLoss:
    """The other declaration: a ``loss_mask(batch)`` method, as ``bif_fast.losses.causal_lm`` has."""

    def __call__(self, m, batch):
        out = _token_loss(m, batch)
        out[:, -2:] = 0.0
        return out

    def loss_mask(self, batch):
        mask = torch.ones(batch[1].shape, dtype=torch.bool)
        mask[:, -2:] = False
        return mask


@pytest.mark.parametrize("loss_fn", [_padded_token_loss, _MaskMethodLoss()], ids=["tuple", "method"])
def test_per_token_declared_ignored_positions_are_left_out(loss_fn):
    model, train, query = _per_token_problem()
    cfg = dataclasses.replace(_config(10, chains=2), batch_size=7)
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg, per_token=True)
    assert res.bif.shape == (7 * 3, 3 * 3)
    assert res.train_index[:, 1].max() == 2
    # The kept units are the same units of the unmasked run: the same chains (the SGLD loss is the mean over
    # the declared positions, so compare against a run whose loss only has those positions).
    short = compute_bif(model, _first_positions(train, 3), _first_positions(query, 3), loss_fn=_token_loss,
                        config=cfg, per_token=True)  # fmt: skip
    torch.testing.assert_close(res.bif, short.bif, rtol=1e-5, atol=1e-9)


def _first_positions(data: TensorDataset, t: int) -> TensorDataset:
    return TensorDataset(*(x[:, :t] for x in data.tensors))


def test_per_token_a_zero_loss_is_a_unit():
    """Units come from what is declared ignored, never from the loss value: a position whose loss is
    exactly 0 at w* (a confidently predicted token) stays a row and a column."""
    model, train, query = _per_token_problem()

    def loss_fn(m, batch):
        out = _token_loss(m, batch)
        return out - out.detach()[:, :1] * torch.tensor([1.0, 0, 0, 0, 0])  # position 0: exactly 0 at w*

    cfg = dataclasses.replace(_config(10, chains=2), batch_size=7)
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg, per_token=True)
    assert res.bif.shape == (7 * 5, 3 * 5)
    assert res.train_index[0].tolist() == [0, 0] and res.query_index[0].tolist() == [0, 0]


def test_per_token_bad_masks_raise():
    model, train, query = _per_token_problem()
    cfg = dataclasses.replace(_config(4, chains=2), batch_size=7)
    for bad, match in ((lambda m, b: (_token_loss(m, b), torch.ones(3)), "loss mask"),
                       (lambda m, b: (_token_loss(m, b), torch.zeros_like(_token_loss(m, b), dtype=torch.bool)),
                        "no units")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            compute_bif(model, train, query, loss_fn=bad, config=cfg, per_token=True)


def test_save_load_round_trip(tmp_path):
    model, train, query, *_ = _linear_problem()
    res = compute_bif(model, train, query, loss_fn=_sq_loss, config=_config(10, chains=2))
    res.save(tmp_path / "run")
    back = BIFResult.load(tmp_path / "run")
    # The tensor-name list is class data, not a constructor argument or part of equality.
    assert "tensor_names" not in {f.name for f in dataclasses.fields(BIFResult)}
    assert torch.equal(back.bif, res.bif) and torch.equal(back.stderr, res.stderr)
    assert back.config == res.config and back.diagnostics == res.diagnostics
    vals, idx = back.topk(3)
    assert vals.shape == idx.shape == (3, N_QUERY)
    assert torch.equal(vals[0], back.bif_normalized.max(dim=0).values)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train": TensorDataset(torch.zeros(0, D), torch.zeros(0))}, "train is empty"),
        ({"loss_fn": lambda m, b: _sq_loss(m, b)[:, None].expand(-1, 2)}, "\\[B\\] per-sample losses"),
        ({"loss_fn": lambda m, b: _sq_loss(m, b)[:-1]}, "returned"),
        ({"loss_fn": lambda m, b: _sq_loss(m, b) * float("inf")}, "non-finite losses at w\\*"),
        ({"config": {"num_draws": 5}}, "config must be a BIFConfig"),
        ({"params": []}, "no parameters to sample"),
    ],
)
def test_bad_input_raises(change, match):
    model, train, query, *_ = _linear_problem()
    kwargs = {"train": train, "query": query, "loss_fn": _sq_loss, "config": _config(3, chains=1)}
    kwargs.update(change)
    w = model.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        compute_bif(model, kwargs.pop("train"), kwargs.pop("query"), **kwargs)
    assert torch.equal(model.weight.detach(), w)


def test_shuffling_loader_is_rejected():
    model, train, query, *_ = _linear_problem()
    with pytest.raises(ValueError, match="must not shuffle"):
        compute_bif(model, DataLoader(train, shuffle=True), query, loss_fn=_sq_loss, config=_config(3, chains=1))


@pytest.mark.parametrize("field,value", [("num_chains", 0), ("num_draws", 0), ("num_steps_bw_draws", 0),
                                         ("batch_size", 0), ("cov_dtype", "float16"), ("eval_max_tokens", 0),
                                         ("eval_max_tokens", "all"), ("eval_max_tokens", True)])  # fmt: skip
def test_invalid_bif_config(field, value):
    with pytest.raises(ValueError, match=f"BIFConfig.{field}"):
        BIFConfig(**{field: value})


def test_parameters_outside_params_get_no_gradient_and_stay_put():
    _, train, query, *_ = _linear_problem()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    head = [p.detach().clone() for p in model[2].parameters()]

    def loss_fn(m, batch):
        x, y = batch
        return 0.5 * (m(x).squeeze(1) - y).square()

    compute_bif(model, train, query, loss_fn=loss_fn, config=_config(5, chains=1), params=list(model[0].parameters()))
    for p, h in zip(model[2].parameters(), head, strict=True):
        assert torch.equal(p.detach(), h) and p.grad is None and p.requires_grad


def test_mixed_submodule_modes_are_kept_for_sgld_and_restored():
    """A train-mode model with a frozen (eval-mode) BatchNorm: SGLD steps see exactly that configuration."""
    _, train, query, *_ = _linear_problem()
    torch.manual_seed(0)
    model = _BatchNormNet().train()
    model.bn.eval()
    seen = set()

    def loss_fn(m, batch):
        if torch.is_grad_enabled():
            seen.add((m.training, m.bn.training, m.drop.training))
        return _sq_loss(m, batch)

    cfg = dataclasses.replace(_config(4, chains=2), sgld=SGLDConfig(lr=1e-3, nbeta=NBETA, localization=LOC))
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg)
    assert res.diagnostics["diverged"] == [False, False]
    assert seen == {(True, False, True)}
    assert model.training and not model.bn.training and model.drop.training


class _ItemDataset(torch.utils.data.Dataset):
    """The same items as a TensorDataset, but collated item by item by a DataLoader."""

    def __init__(self, ds: TensorDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_tensor_dataset_fast_paths_equal_item_collation():
    """TensorDatasets are sliced directly (evaluation batches) and indexed on the device (SGLD minibatches);
    the evaluation batches must be exactly what a DataLoader collates from the items."""
    model, train, query, *_ = _linear_problem()
    cfg = dataclasses.replace(_config(6, chains=2), eval_batch_size=5)  # 24 = 4 x 5 + 4: a short last batch
    fast = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg, sgld_data=_ItemDataset(train))
    slow = compute_bif(model, _ItemDataset(train), _ItemDataset(query), loss_fn=_sq_loss, config=cfg,
                       sgld_data=_ItemDataset(train))  # fmt: skip
    assert torch.equal(fast.bif, slow.bif) and torch.equal(fast.stderr, slow.stderr)


def test_float32_accumulators_match_float64():
    """cov_dtype='float32' halves the n x p state; blocks are still centred in float64, so the BIF matches
    the float64 run to float32 rounding (the same chains: only the accumulator differs)."""
    model, train, query, *_ = _linear_problem()
    cfg = _config(30, chains=3, cov_dtype="float64")
    f64 = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    f32 = compute_bif(model, train, query, loss_fn=_sq_loss, config=dataclasses.replace(cfg, cov_dtype="float32"))
    assert f32.bif.dtype == f32.bif_normalized.dtype == f32.stderr.dtype == torch.float32
    assert f64.bif.dtype == f64.stderr.dtype == torch.float64
    scale = float(f64.bif.abs().max())
    assert float((f32.bif.double() - f64.bif).abs().max()) <= 1e-5 * scale
    assert float((f32.bif_normalized.double() - f64.bif_normalized).abs().max()) <= 1e-5
    assert float((f32.stderr.double() - f64.stderr).abs().max()) <= 1e-4 * float(f64.stderr.abs().max())
    # 'auto' (the default) follows the losses: float32 here.
    auto = compute_bif(model, train, query, loss_fn=_sq_loss, config=dataclasses.replace(cfg, cov_dtype="auto"))
    assert auto.bif.dtype == torch.float32 and auto.diagnostics["cov_dtype"] == "float32"
    assert torch.equal(auto.bif, f32.bif)


def test_float64_losses_stay_float64():
    """A float64 model's losses are not rounded to float32: with 'auto' the whole pipeline is float64, so
    the BIF is shift-invariant to float64 rounding (a loss offset of 1e3 would leave only ~4 float32
    digits of the fluctuations, which are ~1e-3 here)."""
    model, train, query, x, y, _ = _linear_problem()
    model = model.double()
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    query = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    cfg = _config(30, chains=2)
    plain = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    shifted = compute_bif(model, train, query, loss_fn=lambda m, b: _sq_loss(m, b) + 1e3, config=cfg)
    assert plain.bif.dtype == torch.float64 and plain.diagnostics["cov_dtype"] == "float64"
    scale = float(plain.bif.abs().max())
    assert float((shifted.bif - plain.bif).abs().max()) <= 1e-7 * scale
    assert float((shifted.bif_normalized - plain.bif_normalized).abs().max()) <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_stderr_is_the_spread_of_the_per_chain_covariances(dtype):
    """Pool against numpy-style references: the pooled covariance of the surviving chains' draws, and the
    standard error std(per-chain covariances, ddof=1) / sqrt(chains). Covariances ~10 that differ by ~1e-3
    between chains: sums of squares in float32 would cancel to noise, Welford over chains does not."""
    from bif_fast.engine.pool import Pool
    from bif_fast.ops import RunningCrossCovariance

    g = torch.Generator().manual_seed(5)
    n, p, draws, chains = 7, 5, 40, 4
    cfg = BIFConfig(num_chains=chains, num_draws=draws, cov_dtype="float32" if dtype == torch.float32 else "float64")
    pool = Pool(n, p, "cpu", dtype, cfg)
    kept_x, kept_y, covs = [], [], []
    z = torch.randn(draws, 1, generator=g, dtype=torch.float64)  # shared: the chains' covariances are close
    for c in range(chains):
        x = 3.0 * z + 0.05 * torch.randn(draws, n, generator=g, dtype=torch.float64) + 100.0
        y = 3.0 * z + 0.05 * torch.randn(draws, p, generator=g, dtype=torch.float64) - 50.0
        acc = RunningCrossCovariance(n, p, dtype=dtype)
        acc.update(x, y)
        diverged = c == 2
        if not diverged:
            kept_x.append(x)
            kept_y.append(y)
            xc, yc = x - x.mean(0), y - y.mean(0)
            covs.append(xc.T @ yc / (draws - 1))
        pool.add(c, acc, diverged, 0.0)
    assert pool.diverged == [False, False, True, False] and pool.survivors == 3
    xs, ys = torch.cat(kept_x), torch.cat(kept_y)
    want_cov = (xs - xs.mean(0)).T @ (ys - ys.mean(0)) / (xs.shape[0] - 1)
    covs = torch.stack(covs)
    want_se = covs.std(0, unbiased=True) / 3**0.5
    assert want_se.max() < 1e-2 * want_cov.abs().min()  # the regime where E[c^2] - E[c]^2 cancels
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    got_cov = pool.pooled.covariance().double()
    assert float((got_cov - want_cov).abs().max()) <= tol * float(want_cov.abs().max())
    se = pool.stderr()
    assert se.dtype == dtype
    assert float(((se.double() - want_se) / want_se).abs().max()) <= (1e-9 if dtype == torch.float64 else 2e-3)
    # Batch means need the same number of draws in every chain: otherwise no standard error, said so.
    odd = Pool(n, p, "cpu", dtype, cfg)
    for c, k in enumerate((draws, draws - 1)):
        acc = RunningCrossCovariance(n, p, dtype=dtype)
        acc.update(
            torch.randn(k, n, generator=g, dtype=torch.float64), torch.randn(k, p, generator=g, dtype=torch.float64)
        )
        odd.add(c, acc, False, 0.0)
    assert odd.stderr() is None and odd.pooled.count == 2 * draws - 1


def test_outputs_are_built_when_only_the_pooled_accumulator_is_alive(monkeypatch):
    """Peak memory: by the time the n x p outputs are built, every per-chain accumulator has been freed
    (the result takes over the pooled co-moment, plus one new matrix for the correlation), whichever kind the
    chains kept (their own co-moment, or their draws)."""
    import gc
    import weakref

    from bif_fast.engine import pool
    from bif_fast.ops import RunningCrossCovariance

    live: list[weakref.ref] = []
    alive_at_output: list[int] = []

    class Tracked(RunningCrossCovariance):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            live.append(weakref.ref(self))

        def correlation(self):
            gc.collect()
            alive_at_output.append(sum(r() is not None for r in live))
            return super().correlation()

    class TrackedTraces(pool.ChainTraces):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            live.append(weakref.ref(self))

    monkeypatch.setattr(pool, "RunningCrossCovariance", Tracked)
    monkeypatch.setattr(pool, "ChainTraces", TrackedTraces)
    model, train, query, *_ = _linear_problem()
    for draws, state in ((5, "traces"), (200, "co-moment")):
        for chain_batch in (1, 3):
            live.clear()
            res = compute_bif(model, train, query, loss_fn=_sq_loss,
                              config=_config(draws, chains=3, chain_batch=chain_batch))  # fmt: skip
            assert res.diagnostics["chain_state"] == state
            assert len(live) == 1 + chain_batch and alive_at_output[-1] == 1


def test_chains_keeping_their_draws_give_the_co_moment_result(monkeypatch):
    """The two kinds of per-chain state (engine.pool.ChainTraces folded in row blocks, or a co-moment of its
    own merged by Chan) give the same BIF and standard error, to rounding."""
    from bif_fast.engine import pool

    def force(state):
        monkeypatch.setattr(pool.Pool, "chain_state", property(lambda self: state, lambda self, v: None), raising=False)

    model, train, query, *_ = _linear_problem()
    config = _config(40, chains=4)
    force("traces")
    folded = compute_bif(model, train, query, loss_fn=_sq_loss, config=config)
    assert folded.diagnostics["chain_state"] == "traces"
    monkeypatch.setattr(pool, "FOLD_BLOCK_BYTES", 3 * 8 * N_QUERY)  # row blocks of 3 rows: their edges show
    blocked = compute_bif(model, train, query, loss_fn=_sq_loss, config=config)
    force("co-moment")
    merged = compute_bif(model, train, query, loss_fn=_sq_loss, config=config)
    assert merged.diagnostics["chain_state"] == "co-moment"
    for res in (folded, blocked):
        torch.testing.assert_close(res.bif, merged.bif, rtol=1e-5, atol=1e-7 * float(merged.bif.abs().max()))
        torch.testing.assert_close(res.stderr, merged.stderr, rtol=1e-4, atol=1e-7 * float(merged.bif.abs().max()))
        torch.testing.assert_close(res.bif_normalized, merged.bif_normalized, rtol=1e-5, atol=1e-6)


def test_lag1_estimator_removes_the_step_size_bias():
    """SGLD's stationary law inflates stiff directions by 1 / (1 - lr a / 4); the lag-1 symmetrised covariance
    1/2 [C(0) + 1/2 (C(1) + C(-1))] undoes that exactly for observables linear in the weights. For the squared
    losses here (linear part r_i x_i.d plus quadratic part (x_i.d)^2 / 2), its exact expectation follows from the
    stationary covariance S and the one-step map A = I - lr/2 P: C(tau)_ij = r_i r_j s_ij + s_ij^2 / 2 with
    s = x_i S A^T x_j (tau = 1) or x_i A S x_j (tau = -1). The estimate must match that expectation within
    Monte-Carlo error, its linear part must be the continuous-time (lr -> 0) one, and it must land far nearer
    the continuous-time BIF than the plain estimate."""
    model, train, query, x, y, w_star = _linear_problem()
    _, sigma_d, _ = _exact_loss_cov(x, y, w_star)
    hessian = x[:N_TRAIN].T @ x[:N_TRAIN] / N_TRAIN
    precision = NBETA * hessian + LOC * torch.eye(D, dtype=torch.float64)
    step = torch.eye(D, dtype=torch.float64) - LR / 2 * precision
    r = x @ w_star - y
    xt, xq, rr = x[:N_TRAIN], x[N_TRAIN:], r[:N_TRAIN, None] * r[None, N_TRAIN:]
    s_cont, s0 = xt @ torch.linalg.inv(precision) @ xq.T, xt @ sigma_d @ xq.T
    s_plus, s_minus = xt @ sigma_d @ step.T @ xq.T, xt @ step @ sigma_d @ xq.T
    cov = lambda s_: rr * s_ + 0.5 * s_.square()  # noqa: E731
    exact_lag1 = -0.5 * (cov(s0) + 0.5 * (cov(s_plus) + cov(s_minus)))
    # The linear part of the lag-1 expectation is the continuous-time law, exactly.
    torch.testing.assert_close(0.5 * (s0 + 0.5 * (s_plus + s_minus)), s_cont, rtol=1e-10, atol=1e-14)
    continuous = -cov(s_cont)
    cfg = dataclasses.replace(_config(3000), num_steps_bw_draws=1)  # consecutive steps: the lag is one step
    plain = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    lag1 = compute_bif(model, train, query, loss_fn=_sq_loss, config=dataclasses.replace(cfg, estimator="lag1"))
    assert lag1.diagnostics["estimator"] == "lag1" and lag1.diagnostics["num_draws_used"] == 4 * 2999
    err = lambda res, ref: float((res.bif - ref).norm() / ref.norm())  # noqa: E731
    mc = err(plain, -cov(s0))  # the Monte-Carlo error level: the plain estimate against its own exact law
    assert err(lag1, exact_lag1) < 2.5 * mc, (err(lag1, exact_lag1), mc)
    assert err(lag1, continuous) < 0.3 * err(plain, continuous), (err(lag1, continuous), err(plain, continuous))
    # The standard error follows the covariance's 1/4.
    assert torch.isfinite(lag1.stderr).all() and 0.2 < float((lag1.stderr / plain.stderr).median()) < 5
    with pytest.raises(ValueError, match="estimator"):
        BIFConfig(estimator="lag2")
    with pytest.raises(ValueError, match="num_steps_bw_draws"):
        BIFConfig(estimator="lag1", num_steps_bw_draws=2)


def test_per_token_sampling_holds_two_n_by_p_matrices(monkeypatch):
    """With the standard error on, a per-token run's n x p state while sampling is the pool and m2 (the running
    chains keep their draws, folded in at their end), not a third per-chain co-moment."""
    import gc
    import warnings

    from bif_fast.engine import pool

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 12, D, generator=g), torch.randn(16, 12, generator=g)
    train, query = TensorDataset(x[:12], y[:12]), TensorDataset(x[12:], y[12:])
    model = torch.nn.Linear(D, 1, bias=False)
    n, p = 12 * 12, 4 * 12
    seen: list[int] = []

    def n_by_p_alive() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated module objects warns
            warnings.simplefilter("ignore")
            storages = {t.untyped_storage().data_ptr() for t in gc.get_objects()
                        if isinstance(t, torch.Tensor) and t.numel() >= n * p}  # fmt: skip
        return len(storages)

    update = pool.ChainTraces.update

    def spying_update(self, *a, **kw):
        seen.append(n_by_p_alive())
        return update(self, *a, **kw)

    monkeypatch.setattr(pool.ChainTraces, "update", spying_update)
    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-3, nbeta=20.0, localization=50.0), num_chains=3, num_draws=20,
                    batch_size=4, draws_per_update=5, seed=0)  # fmt: skip
    res = compute_bif(model, train, query, loss_fn=_token_loss, config=cfg, per_token=True)
    assert res.diagnostics["chain_state"] == "traces" and res.stderr is not None
    assert len(seen) == 3 * 4 and max(seen) == 2, seen


def test_large_bf16_weights_are_sampled_in_place_with_only_master_and_w_star_beside(monkeypatch):
    """A bf16 model whose sampled weights are large: while sampling, what is alive beyond the model is the
    fp32 master and w* of the sampled weights (6 B each; the gradient is freed after every step), against
    10 B when they are packed (the packed copy, the gradient buffer, w*, the master). Both layouts give the
    same result bit for bit, and the model ends at w* in its own storage."""
    import gc
    import warnings

    import bif_fast.sampler as sampler_module

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 256, generator=g), torch.randn(12, 4, generator=g)
    train, query = TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:])
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4)).to(torch.bfloat16)
    sampled = [model[0].weight]  # 131072 elements: in place under the default threshold
    w_star = {k: v.detach().clone() for k, v in model.state_dict().items()}
    storages = {k: v.data_ptr() for k, v in model.state_dict().items()}
    seen: list[float] = []
    calls = [0]

    def held_beyond_model() -> float:
        gc.collect()
        model_storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *w_star.values()]}
        with warnings.catch_warnings():  # isinstance on deprecated module objects warns
            warnings.simplefilter("ignore")
            live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= 1 << 16}  # fmt: skip
        return sum(b for ptr, b in live.items() if ptr not in model_storage) / sampled[0].numel()

    def loss_fn(m, batch):
        calls[0] += 1
        if calls[0] % 3 == 0:  # gc.get_objects is slow; every third call sees steps and evaluations alike
            seen.append(held_beyond_model())
        return (m(batch[0].to(torch.bfloat16)).float() - batch[1]).square().mean(1)

    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-4, nbeta=20.0, localization=100.0), num_chains=2, num_draws=6,
                    batch_size=4, seed=0, chain_batch=1)  # fmt: skip
    results = {}
    for layout, threshold in (("in_place", sampler_module.IN_PLACE_MIN_NUMEL), ("packed", 1 << 40)):
        monkeypatch.setattr(sampler_module, "IN_PLACE_MIN_NUMEL", threshold)
        seen.clear()
        results[layout] = compute_bif(model, train, query, loss_fn=loss_fn, config=cfg, params=sampled)
        for k, v in model.state_dict().items():
            assert torch.equal(v, w_star[k]) and v.data_ptr() == storages[k], k
        assert model[0].weight.grad is None
        results[layout + " bytes"] = max(seen)
    assert 6.0 <= results["in_place bytes"] <= 6.1, results["in_place bytes"]
    assert 10.0 <= results["packed bytes"] <= 10.1, results["packed bytes"]
    assert torch.equal(results["in_place"].bif, results["packed"].bif)
    assert torch.equal(results["in_place"].stderr, results["packed"].stderr)
