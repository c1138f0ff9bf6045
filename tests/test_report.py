"""The HTML report: its trust verdicts follow their stated rules, scores are posterior correlations
(proponents positive), and the loss traces are drawn one per chain with labelled axes."""

from __future__ import annotations

import re

import pytest
import torch

from bif_fast import BIFConfig, SGLDConfig, compute_bif
from bif_fast.report import diagnostics_rows, write_report
from tests.test_api import _linear_problem, _sq_loss


def _rows(**kw):
    d = {"diverged": [False, False], "escaped": {}, "num_chains_used": 2, "num_draws_used": 100,
         "chain_mean_train_loss": [[1.0 + 0.01 * ((i * 7) % 5) for i in range(50)]] * 2}  # fmt: skip
    d.update(kw.pop("diagnostics", {}))
    bif = kw.pop("bif", torch.ones(4, 3))
    stderr = kw.pop("stderr", torch.full((4, 3), 0.05))
    return {check: (value, verdict, ok) for check, value, verdict, ok in diagnostics_rows(d, bif, stderr)}


def test_trust_verdicts_follow_their_rules():
    good = _rows()
    assert all(ok for _, _, ok in good.values()), good
    assert good["Monte-Carlo error / size of the BIF"][1] == "precise"
    assert good["Sampler settings"] == ("given by the caller", "no calibration ran", True)
    ramp = [[1.0 + 0.01 * i for i in range(50)]] * 2
    assert not _rows(diagnostics={"chain_mean_train_loss": ramp})["Loss traces settled after the start"][2]
    short = _rows(diagnostics={"chain_mean_train_loss": [[1.0, 1.1, 1.0]]})
    assert short["Loss traces settled after the start"] == ("too few draws", "cannot tell from so few draws", False)
    assert not _rows(diagnostics={"diverged": [True, False]})["Diverged chains (non-finite weights)"][2]
    escaped = _rows(diagnostics={"escaped": {"1": "loss rose 40 spreads"}})["Chains that left w*'s basin"]
    assert not escaped[2] and "loss rose 40 spreads" in escaped[1]
    assert _rows(stderr=torch.full((4, 3), 0.2))["Monte-Carlo error / size of the BIF"][:2] == (
        "0.20", "good enough to rank the strongest examples")
    noisy = _rows(stderr=torch.full((4, 3), 0.5))["Monte-Carlo error / size of the BIF"]
    assert noisy[1].startswith("noisy") and not noisy[2]
    assert not _rows(stderr=None)["Monte-Carlo error"][2]
    cal = {"nbeta": {"value": 2.0e5, "rule": "200 x sequences"}, "damping": {"value": 0.003, "rule": "probe"},
           "sampler": {"lr": 0.01, "friction": 3.0, "rule": "BAOAB"}, "length": {"chains": 8, "draws": 300,
                                                                                "rule": "budget"}}  # fmt: skip
    rows = _rows(diagnostics={"calibration": cal})
    assert rows["Calibrated: Inverse temperature nbeta"] == ("2e+05", "200 x sequences", True)
    assert rows["Calibrated: run length"][0] == "8 chains x 300 draws"


def test_report_ranks_by_posterior_correlation_with_a_trust_table_and_labelled_traces(tmp_path):
    model, train, query, *_ = _linear_problem()
    cfg = BIFConfig(sgld=SGLDConfig(lr=0.03, nbeta=30.0, localization=5.0), num_chains=3, num_draws=60,
                    batch_size=24, seed=0)  # fmt: skip
    res = compute_bif(model, train, query, loss_fn=_sq_loss, config=cfg)
    texts = [f"train example {i}" for i in range(res.bif.shape[0])]
    page = write_report(res, texts, [f"query {j}" for j in range(res.bif.shape[1])], tmp_path, k=3).read_text()
    corr = -res.bif_normalized.double()
    first = re.search(r"<h3>query 0:.*?<ol><li><span class='score'>([+-][0-9.]+)</span> <code>train example (\d+)<",
                      page)  # fmt: skip
    best = int(corr[:, 0].argmax())
    assert int(first.group(2)) == best and float(first.group(1)) == round(float(corr[best, 0]), 3)
    assert float(first.group(1)) > 0  # the strongest proponent shows as positive
    assert "<table id='diagnostics'>" in page and "Diverged chains" in page and "Monte-Carlo error" in page
    assert page.count('<polyline class="trace"') == 3
    assert ">draw</text>" in page and ">mean training loss</text>" in page
    assert "nan" not in page.lower()


def synthetic_token_result(n_train: int = 7, n_query: int = 3, seed: int = 0):
    """A per-token BIFResult of random correlations over texts of varied lengths (some positions left out,
    as padding and ignored tokens are), with the texts: (result, train_texts, query_texts)."""
    from bif_fast import BIFResult

    g = torch.Generator().manual_seed(seed)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "dog ", "ran "]
    texts = [["".join(words[int(w)] for w in torch.randint(0, 8, (int(n),), generator=g)).strip()
              for n in torch.randint(2, 6, (count,), generator=g)] for count in (n_train, n_query)]  # fmt: skip

    def index(side):  # the loss at position t predicts character t + 1; every third position is left out
        return torch.tensor([[s, t] for s, text in enumerate(side) for t in range(len(text) - 1) if (s + t) % 3],
                            dtype=torch.long)  # fmt: skip

    tidx, qidx = index(texts[0]), index(texts[1])
    corr = torch.rand(len(tidx), len(qidx), generator=g, dtype=torch.float64) * 2 - 1
    res = BIFResult(bif=-corr * 0.01, bif_normalized=-corr, stderr=None, diagnostics={}, config=BIFConfig(),
                    per_token=True, train_index=tidx, query_index=qidx)  # fmt: skip
    return res, texts[0], texts[1]


def test_explorer_blocks_are_the_matrix_and_top_tokens_the_columns_best():
    import base64

    from bif_fast.report import explorer_data

    res, train, query = synthetic_token_result()
    corr = -res.bif_normalized
    data = explorer_data(res, train, query, passages=2, top_tokens=4)
    scores = -res.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean")
    assert data["train"] == [list(t) for t in train] and data["note"] == ""
    for j, blocks in enumerate(data["blocks"]):
        chosen = [b["i"] for b in blocks]
        order = torch.argsort(scores[:, j], descending=True).tolist()
        assert chosen == order[:2] + order[::-1][:2]  # two proponents, then two opponents, strongest first
        cols = (res.query_index[:, 0] == j).nonzero().squeeze(1)
        for b in blocks:
            rows = (res.train_index[:, 0] == b["i"]).nonzero().squeeze(1)
            block = corr[rows][:, cols]
            assert b["rows"] == res.train_index[rows, 1].tolist() and b["cols"] == res.query_index[cols, 1].tolist()
            cells = torch.frombuffer(bytearray(base64.b64decode(b["data"])), dtype=torch.int8).double()
            assert cells.numel() == block.numel()
            torch.testing.assert_close(cells.view_as(block) / 127 * b["scale"], block, atol=b["scale"] / 250, rtol=0)
            torch.testing.assert_close(torch.tensor(b["rowSum"], dtype=torch.float64), block.sum(1), atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(b["colSum"], dtype=torch.float64), block.sum(0), atol=1e-4, rtol=0)
        q = data["queries"][j]
        assert q["positions"] == res.query_index[cols, 1].tolist()
        for c, top in zip(cols.tolist(), q["top"], strict=True):
            best = torch.topk(corr[:, c], 4)
            assert [[int(res.train_index[r, 0]), int(res.train_index[r, 1])] for r in best.indices] == \
                [t[:2] for t in top]  # fmt: skip
            assert [t[2] for t in top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_explorer_caps_its_blocks_and_says_so(tmp_path):
    from bif_fast.report import explorer_data

    res, train, query = synthetic_token_result(n_train=12, n_query=4)
    full = explorer_data(res, train, query, passages=5)
    cells = sum(len(b["rows"]) * len(b["cols"]) for blocks in full["blocks"] for b in blocks)
    capped = explorer_data(res, train, query, passages=5, max_cells=cells // 3)
    kept = sum(len(b["rows"]) * len(b["cols"]) for blocks in capped["blocks"] for b in blocks)
    assert kept <= cells // 3 and "passages per query" in capped["note"]
    page = write_report(res, train, query, tmp_path).read_text()
    assert '<script type="application/json" id="bif-data">' in page and "id='explorer-note'" not in page
