"""A chain batch's repeated calls replayed as traced graphs of ATen ops.

With full-batch gradients a run calls the same two functions thousands of times on the same batches: the
vmapped forward and backward of the training loss, and the vmapped forward of the evaluation batches;
only the chains' weights change. On small models most of such a call is framework overhead (vmap's
wrapping of every op, ``functional_call``'s swapping of the parameters, the autograd graph and engine),
not arithmetic. ``GraphCache`` traces each (function, batch, chain count, train/eval mode) once with
``make_fx`` into the ATen ops those layers end up running, and replays that straight-line graph on the
next calls: the same ops in the same order, so the same numbers, without the layers above them. Before
replay the graph drops the nodes that are identities without autograd (``detach``, views to the shape
they already have, vmap's multiplications by 1) and adds a batched ``linear``'s bias inside its ``bmm``
(``baddbmm``: one pass over the output fewer); the rewrites that round differently (the decompositions,
the fused bias) are made in float32 and float64 only.

While tracing, CPU ``(log_)softmax`` over a dimension of fewer than ``SMALL_SOFTMAX`` elements (and its
backward) is decomposed into max / exp / sum / log: ATen's CPU kernel for such a dimension (a classifier's
class dimension) ran 4-5x slower than those four ops on 2 threads (``benchmarks/bench_full_batch_sampler.py``
records the effect). The decomposition rounds differently from the kernel, within float32 rounding.

Every graph is checked once, on its first call, against the eager call (outputs within
``TOLERANCE_EPS`` of their dtype's epsilon, at most ``MAX_TOLERANCE``, relative to each output's largest
magnitude); a graph that fails to trace or to match turns capture off for the whole batch and the eager
calls run from then on, with the reason in ``status()``. Once a graph passes, its output is used from the
first call on, so a run and its resumption from a checkpoint take the same path at every step.

What a graph assumes, and the chain batch guarantees: the function is the same pure function of its
tensor inputs at every call (vmap already rules out data-dependent control flow; anything else the model
reads, such as unsampled parameters and buffers, stays as it was at trace time), and the batches are the
same objects with the same contents (full-batch steps and the evaluation batches of a run are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["MAX_TOLERANCE", "SMALL_SOFTMAX", "TOLERANCE_EPS", "GraphCache", "decompositions", "simplify"]

logger = logging.getLogger("bif_fast")

SMALL_SOFTMAX = 16  # below this many elements in the reduced dimension, CPU (log_)softmax is decomposed
TOLERANCE_EPS = 1000.0  # a graph's outputs may differ from the eager call's by this many epsilons (relative),
MAX_TOLERANCE = 1e-2  # and at most by this (a bfloat16 graph runs the eager ops unchanged: rounding noise only)
_EXACT_DTYPES = (torch.float32, torch.float64)  # rewrites that round differently are kept to these dtypes


def _small_cpu(x: torch.Tensor, dim: int) -> bool:
    """A float32/float64 CPU tensor whose dimension ``dim`` is smaller than ``SMALL_SOFTMAX`` (16-bit
    dtypes keep ATen's kernel, which accumulates in float32)."""
    return x.device.type == "cpu" and x.dtype in _EXACT_DTYPES and x.dim() > 0 and x.shape[dim] < SMALL_SOFTMAX


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> Any:
    if half_to_float or not _small_cpu(x, dim):
        return NotImplemented
    shifted = x - x.amax(dim, keepdim=True)
    return shifted - shifted.exp().sum(dim, keepdim=True).log()


def _log_softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> Any:
    if not _small_cpu(out, dim) or grad.dtype != input_dtype:
        return NotImplemented
    return grad - out.exp() * grad.sum(dim, keepdim=True)


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> Any:
    if half_to_float or not _small_cpu(x, dim):
        return NotImplemented
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def _softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype) -> Any:
    if not _small_cpu(out, dim) or grad.dtype != input_dtype:
        return NotImplemented
    return out * (grad - (grad * out).sum(dim, keepdim=True))


def decompositions() -> dict:
    """The decomposition table used while tracing (each entry declines, returning ``NotImplemented``,
    where the ATen kernel is the faster one: other devices, dimensions of ``SMALL_SOFTMAX`` or more)."""
    aten = torch.ops.aten
    return {aten._log_softmax.default: _log_softmax, aten._log_softmax_backward_data.default: _log_softmax_backward,
            aten._softmax.default: _softmax, aten._softmax_backward_data.default: _softmax_backward}  # fmt: skip


def _val(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a traced node stands for, or None (a constant, a non-tensor result)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node: Any) -> tuple | None:
    val = _val(node)
    return None if val is None else tuple(val.shape)


def _dtype(node: Any) -> torch.dtype | None:
    val = _val(node)
    return None if val is None else val.dtype


def _is_identity(node: torch.fx.Node) -> bool:
    """A node whose result equals its first argument when replayed without autograd: ``detach``, ``alias``,
    a view, reshape or expand to the shape it already has, a multiplication by 1 that keeps the dtype (what
    vmap's batched ``linear`` leaves around its bias)."""
    aten = torch.ops.aten
    src = node.args[0] if node.args else None
    if node.op != "call_function" or not isinstance(src, torch.fx.Node) or _shape(src) is None:
        return False
    if node.target in (aten.detach.default, aten.alias.default):
        return True
    if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default):
        return _shape(node) == _shape(src)
    if node.target is aten.mul.Scalar:
        return node.args[1] == 1 and _dtype(node) == _dtype(src)
    return False


def _fuse_bias(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """``add(bias, bmm(a, b))`` (either order, the product used nowhere else) as ``baddbmm(bias, a, b)``:
    one pass over the output fewer (a batched ``linear``'s bias under vmap)."""
    aten = torch.ops.aten
    if node.target is not aten.add.Tensor or node.kwargs or len(node.args) != 2:
        return False
    for mm, bias in (node.args, node.args[::-1]):
        if not (isinstance(mm, torch.fx.Node) and mm.target is aten.bmm.default and len(mm.users) == 1):
            continue
        if not isinstance(bias, torch.fx.Node) or _shape(bias) is None or _shape(node) != _shape(mm):
            continue
        if len(_shape(bias)) > 3 or _dtype(mm) not in _EXACT_DTYPES or not _dtype(bias) == _dtype(node) == _dtype(mm):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(aten.baddbmm.default, (bias, *mm.args))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(mm)
        return True
    return False


def simplify(module: torch.fx.GraphModule) -> int:
    """Drop the identity nodes of a traced graph and fuse batched biases into their products, in place;
    returns the number of nodes removed. Only for replay under ``torch.no_grad()``."""
    graph, before = module.graph, len(module.graph.nodes)
    for node in list(graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        _fuse_bias(graph, node)
    graph.lint()
    module.recompile()
    return before - len(graph.nodes)


def _mismatch(got: Any, want: Any) -> str | None:
    """Why ``got`` (a graph's outputs) is not ``want`` (the eager call's), or None when they agree."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        return "the graph's outputs have another structure"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i} has another shape or dtype"
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return f"output {i} differs"
            continue
        if not torch.equal(g.isnan(), w.isnan()) or not torch.equal(g.isinf() & (g > 0), w.isinf() & (w > 0)):
            return f"output {i} has NaN/Inf elsewhere"
        finite = w.isfinite()
        if not bool(finite.any()):
            continue
        scale = float(w[finite].abs().max())
        err = float((g[finite] - w[finite]).abs().max())
        if not err <= min(TOLERANCE_EPS * torch.finfo(w.dtype).eps, MAX_TOLERANCE) * max(scale, 1e-30):
            return f"output {i} differs by {err:.3g} (scale {scale:.3g})"
    return None


class GraphCache:
    """Traced graphs of a chain batch's calls, each checked against the eager call once.

    Args:
        off (str | None): None traces and replays; a reason runs every call eagerly and is reported.
    """

    def __init__(self, off: str | None):
        self.enabled = off is None
        self.reason = off
        self.graphs: dict[tuple, tuple[Any, Callable[..., Any]]] = {}
        self.trace_seconds = 0.0
        self.replays = 0

    def call(self, kind: str, batch: Any, key: tuple, fn: Callable[..., Any], *args: Any,
             perturbed: Callable[[tuple], tuple] | None = None) -> Any:  # fmt: skip
        """``fn(*args)``, through the graph of (``kind``, ``batch``, ``key``) where capture is on.

        ``batch`` is the batch object ``fn`` reads (among ``args`` or not): a graph is reused only for that
        very object. ``key`` holds what else the graph bakes in (e.g. the chain count, the model's mode).
        ``perturbed(args)``: other arguments the new graph is checked at as well (a chain batch's first call
        comes at w*, where every chain's weights are the same: a graph that mixed up the chains would pass
        there; fixed, so the check decides alike in every run).
        """
        if not self.enabled:
            return fn(*args)
        entry = self.graphs.get((kind, id(batch), *key))
        if entry is not None and entry[0] is batch:
            self.replays += 1
            with torch.no_grad():
                return entry[1](*args)
        return self._trace(kind, batch, key, fn, args, perturbed)

    def _trace(self, kind: str, batch: Any, key: tuple, fn: Callable[..., Any], args: tuple,
               perturbed: Callable[[tuple], tuple] | None) -> Any:  # fmt: skip
        from torch.fx.experimental.proxy_tensor import make_fx

        want = fn(*args)
        t0 = time.perf_counter()
        try:
            # a plain function of exactly the call's arguments (make_fx miscounts a bound method's)
            graph = make_fx(lambda *a: fn(*a), decomposition_table=decompositions(), tracing_mode="real")(*args)
            simplify(graph)
            with torch.no_grad():
                got = graph(*args)
            why = _mismatch(got, want)
            if why is None and perturbed is not None:
                other = perturbed(args)
                with torch.no_grad():
                    why = _mismatch(graph(*other), fn(*other))
                why = None if why is None else f"at perturbed weights, {why}"
        except Exception as exc:  # a model make_fx cannot trace runs eagerly, as it did before
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.trace_seconds += time.perf_counter() - t0
        if why is not None:
            self.disable(f"{kind}: {why}")
            return want
        self.graphs[(kind, id(batch), *key)] = (batch, graph)
        return got

    def disable(self, reason: str) -> None:
        """Turn capture off for good (eager calls from now on) and say why."""
        self.enabled, self.reason = False, reason
        self.graphs.clear()
        logger.info("bif_fast: graph capture off (%s)", reason)

    def status(self) -> dict[str, Any]:
        """For ``diagnostics["capture"]``: on or off (and why), graphs traced, replays, seconds spent tracing."""
        return {"enabled": self.enabled, "reason": self.reason, "graphs": len(self.graphs), "replays": self.replays,
                "trace_seconds": self.trace_seconds}  # fmt: skip
