"""``SGLD``: a ``torch.optim.Optimizer`` that samples the localised posterior with one launch per step.

Layout (``layout=``): small parameters (biases, norms: under ``IN_PLACE_MIN_NUMEL`` elements) are packed into
flat buffers, one per run of consecutive parameters of a dtype; each parameter and its ``.grad`` become views
into them, so a step is one ``sgld_update_`` launch per run instead of one small kernel per tensor. Large
parameters are updated in place, in the model's own storage, one launch each: the sampler then holds no
copy of their weights, only the fp32 master (for bf16/fp16), w* and the sampler state, and the gradient
exists only between a backward and the step (``zero_grad`` frees it). The layout changes no number: every
element's update and noise are those of the packed chain.

Canonical flattening (which fixes each element's noise): parameters are grouped by dtype in order
of first appearance, and within a dtype taken in the order given, each flattened row-major. For the
usual single-dtype model this is just the given order. Splitting a tensor into consecutive pieces
does not change any element's index, so it does not change the noise.

Low-precision parameters (bf16/fp16) keep an fp32 master copy in the optimizer; the model's tensors
receive the rounded master after every step. fp32 parameters are their own master.

FSDP2 parameters (``DTensor`` shards, ``bif_fast.engine.sharded``) are always in place: each rank updates its
local piece, in the storage FSDP gathers from, one launch per parameter, with the noise of each
element keyed by its index in the unsharded canonical flattening, so the chain does not depend on the
sharding. Their distance and divergence flag are reduced over the mesh's process group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from bif_fast._backend import Backend, resolve_backend
from bif_fast.config import SGLDConfig
from bif_fast.engine.mass import LowRankMass, init_mass_velocity_, mass_step_
from bif_fast.engine.sharded import any_sharded, is_sharded, local_piece, sharded_group
from bif_fast.ops import init_sampler_state_, sgld_update_resolved_

__all__ = ["IN_PLACE_MIN_NUMEL", "SGLD", "Layout", "load_sampler_state_"]

Layout = Literal["auto", "packed", "in_place"]
# ``layout="auto"`` updates parameters of at least this many elements in place: below it a packed copy costs
# little memory and saves a launch per tensor, above it the copy is what keeps a large model from fitting.
IN_PLACE_MIN_NUMEL = 1 << 16


@dataclass
class _Segment:
    """A run of parameters of one dtype, packed, or one parameter updated in place (``local_shape`` set)."""

    dtype: torch.dtype
    offset: int  # canonical index of the first element
    params: list[torch.Tensor]
    starts: list[int]  # start of each param within the segment
    flat_param: torch.Tensor  # [N] in dtype; the params are views into it
    flat_grad: torch.Tensor | None  # [N] in dtype; packed: the grads are views into it; in place: the current grad
    master: torch.Tensor  # [N] fp32 (the same tensor as flat_param when dtype is fp32)
    anchor: torch.Tensor  # [N] in dtype: w*
    state: torch.Tensor | None  # [N] fp32 RMSprop V / BAOAB velocity
    grad_views: list[torch.Tensor] = field(default_factory=list)  # each param's grad: a view of flat_grad
    local_shape: torch.Size | None = None  # in place: the parameter's (a DTensor's: its local piece's) shape


class SGLD(torch.optim.Optimizer):
    """Localised SGLD, RMSprop-SGLD or BAOAB (kinetic Langevin) sampler anchored at the current weights.

    ``step()`` expects ``p.grad`` to hold the gradient of the *mean* minibatch loss. The anchor w* is
    the value of the parameters at construction. The noise is a pure function of
    ``(seed, chain, step, element)``, so a chain is reproducible on any device and backend.

    Args:
        params (Iterable[Tensor]): the parameters to sample (e.g. only attention weights); the rest of
            the model is untouched. Duplicates (tied weights) are taken once.
        config (SGLDConfig | None): hyperparameters. Default: ``SGLDConfig()``.
        seed (int): noise key. Default: 0.
        chain (int): chain index (a separate noise stream). Default: 0.
        backend (str): ``auto`` | ``triton`` | ``torch``. Default: ``auto``.
        mass (LowRankMass | None): the low-rank mass of ``config.mass="curvature"`` (required then, over the
            canonical flattening of fp32 parameters; ``bif_fast.engine.mass``). Default: None.
        layout (str): ``auto`` (parameters of at least ``IN_PLACE_MIN_NUMEL`` elements in place, the rest
            packed) | ``packed`` (every parameter packed; the curvature mass needs it) | ``in_place`` (every
            contiguous parameter in place; sharded parameters always are). Default: ``auto``.

    Raises:
        ValueError: no parameters, non-float or non-leaf parameters, parameters on several devices, or a layout
            the parameters or the mass cannot take.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGLD(model.parameters(), SGLDConfig(lr=1e-3, nbeta=10.0), seed=0, chain=0)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.diverged
        False
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        config: SGLDConfig | None = None,
        *,
        seed: int = 0,
        chain: int = 0,
        backend: Backend = "auto",
        mass: LowRankMass | None = None,
        layout: Layout = "auto",
    ) -> None:
        config = SGLDConfig() if config is None else config
        if not isinstance(config, SGLDConfig):
            raise ValueError(f"config must be an SGLDConfig, got {type(config).__name__}")
        for name, value, bits in (("seed", seed, 64), ("chain", chain, 32)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
                raise ValueError(f"{name} must be an int in [0, 2^{bits}), got {value!r}")
        unique: list[torch.Tensor] = []
        seen: set[int] = set()
        for p in params:
            if isinstance(p, dict):
                raise ValueError("SGLD takes one list of parameters, not parameter groups")
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError("SGLD got an empty parameter list")
        for i, p in enumerate(unique):
            if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
                raise ValueError(f"parameter {i} must be a floating-point tensor")
            if not p.is_leaf:
                raise ValueError(f"parameter {i} is not a leaf tensor")
        devices = {p.device for p in unique}
        if len(devices) != 1:
            raise ValueError(f"all sampled parameters must be on one device, got {sorted(map(str, devices))}")
        super().__init__(unique, {"config": config})
        self.config = config
        self.seed = seed
        self.chain = chain
        self.backend = backend
        self.device = unique[0].device
        self.resolved_backend = resolve_backend("sgld_update", self.device, backend)
        self.num_steps = 0
        self.diverged_flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._group = sharded_group(unique) if any_sharded(unique) else None
        self._segments = self._lay_out(unique, layout, mass is not None)
        self.mass = self._check_mass(mass)
        self._noise = torch.empty(self.numel, device=self.device) if self.mass is not None else None
        self._init_state()

    def _lay_out(self, params: list[torch.Tensor], layout: Layout, has_mass: bool) -> list[_Segment]:
        """The segments in canonical order: by dtype, then as given; runs of packed parameters and single
        parameters in place, each segment's offset the canonical index of its first element."""
        if layout not in ("auto", "packed", "in_place"):
            raise ValueError(f"layout must be 'auto', 'packed' or 'in_place', got {layout!r}")
        if self._group is not None:
            if layout == "packed":
                raise ValueError("sharded (FSDP) parameters are updated in place; layout='packed' cannot hold them")
            return self._pieces(params)
        if has_mass and layout == "in_place":
            raise ValueError("a curvature mass acts on one packed buffer; it needs layout='auto' or 'packed'")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        segments: list[_Segment] = []
        offset = 0
        for dtype, group in by_dtype.items():
            run: list[torch.Tensor] = []
            for p in group + [None]:  # None closes the last run
                if p is not None and not _stays_in_place(p, layout, has_mass):
                    run.append(p)
                    continue
                if run:
                    segments.append(self._pack(dtype, run, offset))
                    offset += segments[-1].master.numel()
                    run = []
                if p is not None:
                    segments.append(self._in_place(p, offset))
                    offset += p.numel()
        return segments

    def _pack(self, dtype: torch.dtype, group: list[torch.Tensor], offset: int) -> _Segment:
        """One packed segment: the parameters (and their grads) re-pointed to views of new flat buffers."""
        starts, total = [], 0
        for p in group:
            starts.append(total)
            total += p.numel()
        flat_param = torch.empty(total, dtype=dtype, device=self.device)
        flat_grad = torch.zeros(total, dtype=dtype, device=self.device)
        with torch.no_grad():
            for p, s in zip(group, starts, strict=True):
                flat_param[s : s + p.numel()].copy_(p.reshape(-1))
                p.data = flat_param[s : s + p.numel()].view_as(p)
                if p.grad is not None:
                    flat_grad[s : s + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = flat_grad[s : s + p.numel()].view_as(p)
        master = flat_param if dtype == torch.float32 else flat_param.float()
        return _Segment(dtype, offset, group, starts, flat_param, flat_grad, master, flat_param.clone(), None,
                        [p.grad for p in group])  # fmt: skip

    def _in_place(self, p: torch.Tensor, offset: int, local: torch.Tensor | None = None) -> _Segment:
        """One parameter updated in its own storage (of a DTensor: its ``local`` piece): the segment holds a
        view of it, w* and (bf16/fp16) a master."""
        local = p.data if local is None else local
        flat = local.view(-1)
        master = flat if p.dtype == torch.float32 else flat.float()
        return _Segment(p.dtype, offset, [p], [0], flat, None, master, flat.clone(), None, [], local.shape)

    def _pieces(self, params: list[torch.Tensor]) -> list[_Segment]:
        """One segment per sharded parameter: its local piece, updated in place (``sharded`` module)."""
        by_dtype: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append((i, p))
        segments, offset = [], 0
        for group in by_dtype.values():
            for i, p in group:
                piece = local_piece(p, i)
                segments.append(self._in_place(p, offset + piece.start, piece.local))
                offset += p.numel()
        return segments

    def _check_mass(self, mass: LowRankMass | None) -> LowRankMass | None:
        if (mass is not None) != (self.config.mass == "curvature"):
            raise ValueError("SGLD needs a LowRankMass exactly when config.mass='curvature'")
        if mass is None:
            return None
        if self._group is not None:
            raise ValueError("a curvature mass does not combine with sharded (FSDP) parameters")
        if len(self._segments) != 1 or self._segments[0].dtype != torch.float32:
            raise ValueError("a curvature mass needs fp32 sampled parameters (one dtype)")
        if mass.basis.shape[0] != self.numel:
            raise ValueError(f"the mass covers {mass.basis.shape[0]} weights, the sampler {self.numel}")
        return mass.to(self.device)

    def _init_state(self) -> None:
        for seg in self._segments:
            if seg.state is None and self.config.needs_state:
                seg.state = torch.empty_like(seg.master)
            init_sampler_state_(seg.state, self.config, seed=self.seed, chain=self.chain, offset=seg.offset,
                                backend=self.resolved_backend)  # fmt: skip
            if self.mass is not None:
                init_mass_velocity_(seg.state, self.mass)

    @property
    def params(self) -> list[torch.Tensor]:
        """The sampled parameters in the canonical order (by dtype, then as given; duplicates once)."""
        return [p for seg in self._segments for p in seg.params]

    @property
    def in_place(self) -> bool:
        """Whether some parameter is updated in its own storage (``put_back`` then restores it; packed
        parameters are restored by pointing them back at their original storage)."""
        return any(seg.local_shape is not None for seg in self._segments)

    @property
    def numel(self) -> int:
        """Number of sampled scalars held here (of sharded parameters: this rank's pieces)."""
        return sum(seg.master.numel() for seg in self._segments)

    @property
    def total_numel(self) -> int:
        """Number of sampled scalars over every rank (``numel`` unless the parameters are sharded)."""
        if self._group is None:
            return self.numel
        return sum(seg.params[0].numel() for seg in self._segments)

    @property
    def diverged(self) -> bool:
        """Whether any step produced a NaN or Inf (reads one flag from the device; with sharded parameters
        on any rank, a collective every rank must enter)."""
        if self._group is not None:
            flag = self.diverged_flag.clone()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
            return bool(flag.item())
        return bool(self.diverged_flag.item())

    def _gather_grads(self, seg: _Segment) -> None:
        """Re-attach grads that were replaced (``set_to_none``, user code) to the flat buffer; a parameter in
        place hands its current gradient to the segment (of a DTensor: the local piece, which FSDP assigns anew
        every backward; an unused parameter's is zero: the prior and the noise still act)."""
        if seg.local_shape is not None:
            g = seg.params[0].grad
            if g is None:
                seg.flat_grad = torch.zeros_like(seg.flat_param)
            else:
                local = g.to_local() if is_sharded(g) else g
                if local.dtype == seg.dtype and local.is_contiguous():
                    seg.flat_grad = local.view(-1)
                else:
                    seg.flat_grad = local.reshape(-1).to(seg.dtype).contiguous()
            return
        for p, view in zip(seg.params, seg.grad_views, strict=True):
            g = p.grad
            if g is view:  # the usual case: backward accumulated into the view in place
                continue
            with torch.no_grad():
                if g is None:
                    view.zero_()  # an unused parameter: zero gradient, prior and noise still act
                elif g.data_ptr() != view.data_ptr() or g.shape != p.shape or g.stride() != view.stride():
                    view.copy_(g.reshape(p.shape))
            p.grad = view

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One sampler step for all parameters (one kernel launch per parameter dtype)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.raw_step()
        return loss

    @torch.no_grad()
    def raw_step(self) -> None:
        """One sampler step, without the closure and torch.optim's per-call hook dispatch of ``step()``
        (which a small model pays for at every step)."""
        for seg in self._segments:
            self._gather_grads(seg)
            if self.mass is not None:
                mass_step_(self.resolved_backend, seg.master, seg.flat_grad, seg.anchor, seg.state, config=self.config,
                           mass=self.mass, seed=self.seed, chain=self.chain, step=self.num_steps, noise=self._noise,
                           out=None, diverged=self.diverged_flag)  # fmt: skip
                continue
            sgld_update_resolved_(
                self.resolved_backend,
                seg.master,
                seg.flat_grad,
                seg.anchor,
                seg.state,
                config=self.config,
                seed=self.seed,
                chain=self.chain,
                step=self.num_steps,
                offset=seg.offset,
                noise=None,
                out=None if seg.master is seg.flat_param else seg.flat_param,
                diverged=self.diverged_flag,
            )
        self.num_steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Packed gradients zeroed in place (they stay views into the flat buffer); those of parameters in
        place freed (the next backward allocates them, so no gradient is held between steps).
        ``set_to_none`` is ignored."""
        self.release_grads()
        for seg in self._segments:
            if seg.local_shape is not None:
                continue
            seg.flat_grad.zero_()
            for p, view in zip(seg.params, seg.grad_views, strict=True):
                if p.grad is not view:
                    p.grad = view

    def release_grads(self) -> None:
        """The gradients of parameters in place freed (as ``zero_grad`` does), packed ones left as they are:
        called after a step, so that no gradient of a large weight is held while the model is evaluated."""
        for seg in self._segments:
            if seg.local_shape is not None:
                seg.params[0].grad = None
                seg.flat_grad = None

    @torch.no_grad()
    def reset(self, *, chain: int | None = None) -> None:
        """Put the parameters back at w* exactly and restart the chain (optionally as another chain)."""
        if chain is not None:
            self.chain = chain
        self.put_back()
        self.num_steps = 0
        self.diverged_flag.zero_()
        self._init_state()

    @torch.no_grad()
    def put_back(self) -> None:
        """Every sampled weight back at w* exactly (the chain's position is lost; ``reset`` restarts it)."""
        for seg in self._segments:
            seg.flat_param.copy_(seg.anchor)
            if seg.master is not seg.flat_param:
                seg.master.copy_(seg.anchor)

    def flat_grads(self) -> list[torch.Tensor]:
        """The packed gradient buffer of each dtype segment, every parameter's current gradient in it (e.g.
        to reduce it across processes before ``raw_step``)."""
        for seg in self._segments:
            self._gather_grads(seg)
        return [seg.flat_grad for seg in self._segments]

    def sampler_state(self) -> dict[str, torch.Tensor]:
        """The chain's position mid-run (live references): each dtype segment's weights, fp32 master and
        sampler state, the divergence flag and the step counter (which keys the noise of the next step)."""
        out = {"num_steps": torch.tensor(self.num_steps, dtype=torch.int64), "diverged": self.diverged_flag}
        for i, seg in enumerate(self._segments):
            out[f"seg{i}.param"] = seg.flat_param
            if seg.master is not seg.flat_param:
                out[f"seg{i}.master"] = seg.master
            if seg.state is not None:
                out[f"seg{i}.state"] = seg.state
        return out

    @torch.no_grad()
    def load_sampler_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue a chain from ``sampler_state()`` (of this optimizer's chain and shapes).

        Raises:
            ValueError: a buffer is missing or has another shape.
        """
        self.num_steps = load_sampler_state_(self.sampler_state(), state)

    def distance(self) -> torch.Tensor:
        """``||w - w*||`` over the sampled parameters (fp32 masters), a 0-d tensor read without a host sync
        (with sharded parameters: over every rank's pieces, a collective)."""
        segs = self._segments
        if self._group is not None:
            total = sum((seg.master - seg.anchor.float()).square().sum() for seg in segs).reshape(1)
            torch.distributed.all_reduce(total, group=self._group)
            return total[0].sqrt()
        if len(segs) == 1 and segs[0].anchor.dtype == torch.float32:
            return torch.dist(segs[0].master, segs[0].anchor)
        return sum((seg.master - seg.anchor.float()).square().sum() for seg in segs).sqrt()

    def _view_of(self, p: torch.Tensor, buffer: str) -> torch.Tensor:
        for seg in self._segments:
            for q, s in zip(seg.params, seg.starts, strict=True):
                if q is p and seg.local_shape is not None:
                    return getattr(seg, buffer).view(seg.local_shape)
                if q is p:
                    return getattr(seg, buffer)[s : s + p.numel()].view_as(p)
        raise ValueError("p is not sampled by this optimizer")

    def anchor_of(self, p: torch.Tensor) -> torch.Tensor:
        """w* of parameter ``p`` (a view into the optimizer's anchor buffer; of a DTensor, its local piece's)."""
        return self._view_of(p, "anchor")

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master value of parameter ``p`` (``p`` itself when it is fp32)."""
        return self._view_of(p, "master")


def _stays_in_place(p: torch.Tensor, layout: Layout, has_mass: bool) -> bool:
    """Whether ``layout`` updates ``p`` in its own storage (which must be one contiguous run)."""
    if has_mass or layout == "packed" or not p.is_contiguous():
        return False
    return layout == "in_place" or p.numel() >= IN_PLACE_MIN_NUMEL


@torch.no_grad()
def load_sampler_state_(current: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> int:
    """Copy ``state`` into the live buffers ``current`` (both as ``sampler_state()`` gives them); returns the
    step counter to continue from.

    Raises:
        ValueError: a buffer is missing or has another shape (nothing is half-copied: all are checked first).
    """
    for name, dst in current.items():
        src = state.get(name)
        if src is None or src.shape != dst.shape:
            raise ValueError(f"sampler state {name!r}: expected shape {list(dst.shape)}, got "
                             f"{None if src is None else list(src.shape)}")  # fmt: skip
    for name, dst in current.items():
        if name != "num_steps":
            dst.copy_(state[name])
    return int(state["num_steps"])
