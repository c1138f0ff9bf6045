"""Graph capture of batched chains (``bif_fast.engine.capture``): the decompositions and the graph clean-up
against ATen in float64, the cache's replay and its fallbacks, and compute_bif with capture on against
capture off, the closed-form Gaussian BIF, and an interrupted run's resumption."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.data import TensorDataset

from bif_fast import BIFConfig, SGLDConfig, compute_bif
from bif_fast.engine import batched
from bif_fast.engine.capture import SMALL_SOFTMAX, GraphCache, decompositions, simplify
from bif_fast.engine.chains import CAPTURE_MIN_STEPS, capture_off_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chain_batch import _ce, _mlp_problem  # noqa: E402

aten = torch.ops.aten


def _targets(graph: torch.fx.GraphModule) -> list:
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("op", ["log_softmax", "softmax"])
@pytest.mark.parametrize(("shape", "dim"),
                         [((7, 5), -1), ((3, 11, 2), 1), ((13, 3), 0), ((5, 2, 1), -1), ((4, 17), -1)])  # fmt: skip
def test_decompositions_match_aten_forward_and_backward_in_float64(op, shape, dim):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    f = getattr(torch, op)

    def fwd_bwd(x, up):
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = f(leaf, dim)
            (dx,) = torch.autograd.grad(y, leaf, up)
        return y.detach(), dx

    graph = make_fx(fwd_bwd, decomposition_table=decompositions())(x, up)
    want = fwd_bwd(x, up)
    got = graph(x, up)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    kernel = aten._log_softmax.default if op == "log_softmax" else aten._softmax.default
    decomposed = shape[dim] < SMALL_SOFTMAX
    assert (kernel not in _targets(graph)) == decomposed  # dimensions of 16 or more keep ATen's kernel


@pytest.mark.parametrize(("device", "dtype"),
                         [("meta", torch.float64), ("cpu", torch.bfloat16), ("cpu", torch.float16)])  # fmt: skip
def test_decompositions_leave_other_devices_and_16_bit_dtypes_to_aten(device, dtype):
    x = torch.randn(4, 3, dtype=dtype, device=device)
    graph = make_fx(lambda x: torch.log_softmax(x, -1), decomposition_table=decompositions())(x)
    assert aten._log_softmax.default in _targets(graph)


def _vmapped_linear(x: torch.Tensor):
    """A batched Linear-Tanh-Linear under vmap (weights stacked over 3 chains), its gradient by autograd."""

    def one(w1, b1, w2, b2):
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    def fn(w1, b1, w2, b2):
        leaves = [t.detach().requires_grad_(True) for t in (w1, b1, w2, b2)]
        with torch.enable_grad():
            out = torch.func.vmap(one)(*leaves)
            grads = torch.autograd.grad(out.square().sum(), leaves)
        return out.detach(), grads

    return fn


def test_simplify_drops_identities_fuses_biases_and_keeps_the_values():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 7, 5), (3, 7), (3, 2, 7), (3, 2))]
    fn = _vmapped_linear(x)
    graph = make_fx(fn)(*params)
    before = _targets(graph)
    removed = simplify(graph)
    after = _targets(graph)
    assert aten.detach.default in before and aten.detach.default not in after
    assert removed > 0 and after.count(aten.baddbmm.default) == 2  # both biases added inside their products
    want = fn(*params)
    with torch.no_grad():
        got = graph(*params)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=1e-13)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_simplify_keeps_a_16_bit_bias_add_apart():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, generator=g).bfloat16()
    params = [torch.randn(s, generator=g).bfloat16() for s in ((3, 7, 5), (3, 7), (3, 2, 7), (3, 2))]
    graph = make_fx(_vmapped_linear(x))(*params)
    simplify(graph)
    assert aten.baddbmm.default not in _targets(graph) and aten.detach.default not in _targets(graph)


def test_simplify_leaves_a_product_used_twice_alone():
    def fn(a, b, bias):
        mm = torch.bmm(a, b)
        return mm + bias, mm * 2

    a, b, bias = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 1, 5)
    graph = make_fx(fn)(a, b, bias)
    simplify(graph)
    assert aten.baddbmm.default not in _targets(graph)
    for got, want in zip(graph(a, b, bias), fn(a, b, bias), strict=True):
        torch.testing.assert_close(got, want)


class _Counted:
    """``x * scale`` that counts its calls; ``drift`` changes the scale at every call (a function that is
    not the same pure function at every call, which a graph cannot replay)."""

    def __init__(self, drift: float = 0.0, fail_at: int | None = None):
        self.calls, self.drift, self.fail_at = 0, drift, fail_at

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("cannot trace this")
        return torch.log_softmax(x * (1.0 + self.drift * self.calls), -1)


def test_graph_cache_replays_for_the_same_batch_object_only():
    fn, cache = _Counted(), GraphCache(None)
    x = torch.randn(6, 4)
    first = cache.call("f", x, (), fn, x)
    assert fn.calls == 2  # the eager call it is checked against, and the trace
    for _ in range(3):
        torch.testing.assert_close(cache.call("f", x, (), fn, x), first, rtol=0, atol=0)
    assert fn.calls == 2 and cache.status()["replays"] == 3
    y = x.clone()  # equal contents, another object: traced anew
    cache.call("f", y, (), fn, y)
    assert fn.calls == 4 and cache.status()["graphs"] == 2
    cache.call("f", x, ("another key",), fn, x)
    assert cache.status()["graphs"] == 3 and cache.status()["enabled"]


@pytest.mark.parametrize(("fn", "why"), [(_Counted(drift=0.1), "differs"), (_Counted(fail_at=2), "cannot trace this")])
def test_graph_cache_falls_back_to_eager_calls_and_says_why(fn, why):
    cache = GraphCache(None)
    x = torch.randn(5, 3)
    out = cache.call("f", x, (), fn, x)
    torch.testing.assert_close(out, torch.log_softmax(x * (1.0 + fn.drift), -1))  # the eager (first) call's
    status = cache.status()
    assert not status["enabled"] and why in status["reason"] and status["graphs"] == 0
    calls = fn.calls
    cache.call("f", x, (), fn, x)
    assert fn.calls == calls + 1  # eager from then on


def test_graph_cache_checks_a_new_graph_away_from_the_point_it_was_traced_at():
    """A graph that mixes up the chains (here: the traced call, the cache's second, reads row 0 for every
    row, as a faulty rewrite would) agrees with the eager call at w*, where the rows are equal, and is
    caught at the perturbed point."""
    calls = [0]

    def rows(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return (x[:1].expand_as(x) if calls[0] == 2 else x).exp()

    x = torch.ones(3, 4)
    spread = lambda args: (args[0] + torch.arange(3.0)[:, None],)  # noqa: E731
    cache = GraphCache(None)
    torch.testing.assert_close(cache.call("f", x, (), rows, x, perturbed=spread), x.exp())
    status = cache.status()
    assert not status["enabled"] and "at perturbed weights" in status["reason"]
    calls[0] = 0
    lenient = GraphCache(None)  # without the perturbed check the faulty graph is kept
    lenient.call("f", x, (), rows, x)
    assert lenient.status()["enabled"]


def test_data_dependent_control_flow_is_not_traced():
    def branchy(x: torch.Tensor) -> torch.Tensor:
        return x.exp() if bool(x.sum() > 0) else -x

    cache, x = GraphCache(None), torch.rand(4, 2)
    torch.testing.assert_close(cache.call("f", x, (), branchy, x), x.exp())
    assert not cache.status()["enabled"] and "data-dependent" in cache.status()["reason"]


def test_capture_off_runs_every_call_eagerly():
    fn, cache = _Counted(), GraphCache("BIFConfig.capture=False")
    x = torch.randn(3, 2)
    for _ in range(3):
        cache.call("f", x, (), fn, x)
    assert fn.calls == 3 and cache.status() == {"enabled": False, "reason": "BIFConfig.capture=False", "graphs": 0,
                                                "replays": 0, "trace_seconds": 0.0}  # fmt: skip


def test_auto_captures_from_the_stated_number_of_steps():
    base = BIFConfig(num_draws=CAPTURE_MIN_STEPS, batch_size="full")
    assert capture_off_reason(base) is None
    assert "fewer than" in capture_off_reason(dataclasses.replace(base, num_draws=CAPTURE_MIN_STEPS - 1))
    assert capture_off_reason(dataclasses.replace(base, num_draws=CAPTURE_MIN_STEPS - 1, capture=True)) is None
    assert capture_off_reason(dataclasses.replace(base, capture=False)) == "BIFConfig.capture=False"
    with pytest.raises(ValueError, match="capture"):
        BIFConfig(capture="yes")


def _config(**kw) -> BIFConfig:
    sgld = SGLDConfig(lr=2e-3, nbeta=30.0, localization=30.0, sampler="baoab", friction=4.0)
    base = dict(sgld=sgld, num_chains=5, num_draws=40, batch_size="full", chain_batch=3, eval_batch_size=16, seed=2)
    return BIFConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_captured_run_equals_the_eager_run_up_to_rounding(dtype):
    """Five chains in groups of three and two (a graph per chain count), three training batches of 16,
    cross-entropy over three classes (the decomposed log-softmax)."""
    model, train, query = _mlp_problem(dtype)
    on = compute_bif(model, train, query, loss_fn=_ce, config=_config(capture=True))
    off = compute_bif(model, train, query, loss_fn=_ce, config=_config(capture=False))
    cap = on.diagnostics["capture"]
    assert cap["enabled"] and cap["reason"] is None and cap["graphs"] >= 4 and cap["replays"] > 5 * 40
    assert off.diagnostics["capture"]["reason"] == "BIFConfig.capture=False"
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = float(off.bif.abs().max())
    torch.testing.assert_close(on.bif.double(), off.bif.double(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(torch.tensor(on.diagnostics["chain_mean_train_loss"]),
                               torch.tensor(off.diagnostics["chain_mean_train_loss"]), rtol=tol, atol=0)  # fmt: skip


def test_captured_per_token_run_equals_the_eager_run():
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(9, 6, 3, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    train, query = TensorDataset(x[:6], y[:6]), TensorDataset(x[6:], y[6:])

    def loss(model, batch):
        x, y = batch
        return 0.5 * (model(x).squeeze(-1) - y).square()

    cfg = _config(num_chains=4, chain_batch=4)
    on = compute_bif(model, train, query, loss_fn=loss, config=dataclasses.replace(cfg, capture=True), per_token=True)
    off = compute_bif(model, train, query, loss_fn=loss, config=dataclasses.replace(cfg, capture=False), per_token=True)
    assert on.diagnostics["capture"]["enabled"] and on.bif.shape == (36, 18)
    torch.testing.assert_close(on.bif, off.bif, rtol=1e-10, atol=1e-12 * float(off.bif.abs().max()))


def test_sequential_chains_say_they_do_not_capture():
    model, train, query = _mlp_problem(torch.float32)
    res = compute_bif(model, train, query, loss_fn=_ce, config=_config(chain_batch=1, capture=True))
    assert res.diagnostics["capture"] == {"enabled": False, "reason": "chains run one by one"}


def test_every_gradient_element_is_written_by_the_replayed_graph():
    model, train, _ = _mlp_problem(torch.float32)
    params = list(model.parameters())
    batch = batched.ChainBatch(model, params, _ce, _config().sgld, seed=0, size=3, backend="torch", per_token=False,
                               capture_off=None)  # fmt: skip
    batch.reset([0, 1, 2])
    with torch.no_grad():
        batch.param.add_(0.01 * torch.randn(batch.param.shape, generator=torch.Generator().manual_seed(1)))
    data = [train.tensors]
    eager = batched.ChainBatch(model, params, _ce, _config().sgld, seed=0, size=3, backend="torch",
                               per_token=False)  # fmt: skip
    eager.reset([0, 1, 2])
    eager.param.copy_(batch.param)
    want_losses = eager.full_gradient(data, 47)[0]
    want = eager.grad.clone()
    for _ in range(2):  # the traced call, then a replay
        batch.grad.fill_(float("nan"))
        losses = batch.full_gradient(data, 47)[0]
        assert bool(torch.isfinite(batch.grad).all())
        torch.testing.assert_close(batch.grad, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert batch.graphs.status()["replays"] == 1


def test_captured_run_matches_the_closed_form_gaussian_bif():
    """A linear model under squared loss: the localised posterior is Gaussian, N(w*, (nbeta H + loc)^-1), and
    BIF(i, j) = -(r_i r_j s_ij + s_ij^2 / 2) with s = X Sigma X^T (BAOAB's position marginal is exact)."""
    g = torch.Generator().manual_seed(0)
    n, d = 48, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)

    def sq(model, batch):
        x, y = batch
        return 0.5 * (model(x).squeeze(1) - y).square()

    nbeta, loc = 40.0, 10.0
    h = x.T @ x / n
    sigma = torch.linalg.inv(nbeta * h + loc * torch.eye(d, dtype=torch.float64))
    a = float(torch.linalg.eigvalsh(nbeta * h + loc * torch.eye(d, dtype=torch.float64)).max())
    sgld = SGLDConfig(lr=0.5 * 2 / a**0.5, nbeta=nbeta, localization=loc, sampler="baoab", friction=2 * loc**0.5)
    cfg = BIFConfig(sgld=sgld, num_chains=8, num_draws=3000, batch_size="full", chain_batch=8, capture=True, seed=1)
    data = TensorDataset(x, y)
    res = compute_bif(model, data, data, loss_fn=sq, config=cfg)
    assert res.diagnostics["capture"]["enabled"]
    r = (x @ model.weight.detach().T).squeeze(1) - y
    s = x @ sigma @ x.T
    exact = -(r[:, None] * r[None, :] * s + 0.5 * s.square())
    err = float((res.bif - exact).norm() / exact.norm())
    assert err < 0.08, err


def test_an_interrupted_captured_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, monkeypatch):
    """The loss function runs only while tracing, so the run is interrupted inside the sampler update."""
    monkeypatch.setenv("BIF_FAST_CHECKPOINT_SECONDS", "0")
    model, train, query = _mlp_problem(torch.float32)
    cfg = _config(capture=True, draws_per_update=4)
    whole = compute_bif(model, train, query, loss_fn=_ce, config=cfg)
    update, calls = batched.ChainBatch.update, [0]

    def crashing(self):
        calls[0] += 1
        if calls[0] == 60:  # inside the second group's chains (the first has 39 steps)
            raise RuntimeError("interrupted")
        update(self)

    monkeypatch.setattr(batched.ChainBatch, "update", crashing)
    with pytest.raises(RuntimeError, match="interrupted"):
        compute_bif(model, train, query, loss_fn=_ce, config=cfg, checkpoint=tmp_path)
    monkeypatch.setattr(batched.ChainBatch, "update", update)
    resumed = compute_bif(model, train, query, loss_fn=_ce, config=cfg, checkpoint=tmp_path)
    assert resumed.diagnostics["capture"]["enabled"]
    assert torch.equal(whole.bif, resumed.bif) and torch.equal(whole.stderr, resumed.stderr)


@pytest.mark.cuda
def test_captured_run_on_cuda_equals_the_eager_run():
    """On a GPU the graphs keep ATen's softmax kernels (the decomposition is for CPU) and still replay."""
    model, train, query = _mlp_problem(torch.float32)
    model = model.cuda()
    train, query = (TensorDataset(*(t.cuda() for t in ds.tensors)) for ds in (train, query))
    on = compute_bif(model, train, query, loss_fn=_ce, config=_config(capture=True))
    off = compute_bif(model, train, query, loss_fn=_ce, config=_config(capture=False))
    assert on.diagnostics["capture"]["enabled"] and on.bif.is_cuda
    torch.testing.assert_close(on.bif, off.bif, rtol=1e-4, atol=1e-4 * float(off.bif.abs().max()))
