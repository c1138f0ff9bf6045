"""The model around a BIF run: what is sampled, what is frozen, and the exact restore afterwards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import torch

from bif_fast.engine.sharded import fsdp_modules, is_sharded

__all__ = ["ModelState"]


class ModelState:
    """Snapshot of a model's weights, gradients, buffers and train/eval flags, restored exactly on exit.

    Inside the ``with`` block the parameters outside ``sampled`` are frozen (``requires_grad`` off, so no
    gradient is computed or left behind for them), and ``eval_mode`` / ``own_mode`` switch the model
    between evaluation (loss evaluations) and its own configuration (SGLD steps), restoring every
    submodule's own flag and skipping switches to the mode it is already in. When no module overrides
    ``train()``, the flags are set directly: ``Module.__setattr__`` on every submodule twice per draw is a
    measurable cost for small models.

    Examples:
        >>> with ModelState(model, list(model.parameters())) as state:  # doctest: +SKIP
        ...     state.eval_mode(); ...
    """

    def __init__(self, model: torch.nn.Module, sampled: Sequence[torch.Tensor]):
        self.model = model
        ids = {id(p) for p in sampled}
        # A packed weight moves to the sampler's storage and leaves the original here untouched; a weight
        # stepped in place (a large one, an FSDP piece) gets w* put back by whoever steps it (``restore_with``).
        self._sampled = [(p, None if is_sharded(p) else p.data, p.grad) for p in sampled]
        self._restorers: list[Callable[[], None]] = []
        self._fsdp = fsdp_modules(model) if any(is_sharded(p) for p in sampled) else []
        self._frozen = [(p, p.grad) for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._flags = [(m, m.training) for m in model.modules()]
        self._direct = all(type(m).train is torch.nn.Module.train and "training" in vars(m) for m, _ in self._flags)
        self._mode: str | None = None

    def __enter__(self) -> ModelState:
        for p, _ in self._frozen:
            p.requires_grad_(False)
        return self

    def restore_with(self, restore: Callable[[], None]) -> None:
        """Call ``restore`` on exit, before the weights are put back (it puts back what was updated in place)."""
        self._restorers.append(restore)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with torch.no_grad():
            self.reshard()
            for restore in self._restorers:
                restore()
            for p, data, grad in self._sampled:
                if data is not None:
                    p.data = data
                p.grad = grad
            self.reset_buffers()
            for p, grad in self._frozen:
                p.requires_grad_(True)
                p.grad = grad
        self.own_mode()

    def reshard(self) -> None:
        """An FSDP model's gathered weights freed, so that its next forward gathers the pieces as they are now
        (``engine.sharded``); nothing for any other model."""
        for module in self._fsdp:
            module.reshard()

    @property
    def modes_agree(self) -> bool:
        """Whether the model computes the same in its own mode as in eval mode, as far as can be known: every
        submodule is in eval mode already, or is a torch.nn module whose forward ignores the flag (so a
        full-batch SGLD forward also gives the evaluation's losses)."""
        return all(not training or _mode_free(m) for m, training in self._flags)

    def reset_buffers(self) -> None:
        """Put every buffer back at its value at entry (each chain starts from the same model)."""
        with torch.no_grad():
            for b, saved in self._buffers:
                b.copy_(saved)

    def eval_mode(self) -> None:
        """Every submodule in eval mode."""
        if self._mode != "eval":
            if self._direct:
                for m, _ in self._flags:
                    vars(m)["training"] = False
            else:
                self.model.eval()
            self._mode = "eval"

    def own_mode(self) -> None:
        """Every submodule in the mode it had at entry."""
        if self._mode != "own":
            for m, training in self._flags:
                if self._direct:
                    vars(m)["training"] = training
                else:
                    m.training = training
            self._mode = "own"


# torch.nn modules whose forward does not read ``self.training`` (dropout, batch and instance norms, RNNs
# with dropout and any user module may, so they are not listed).
_MODE_FREE = (
    torch.nn.Linear, torch.nn.Bilinear, torch.nn.Identity, torch.nn.Embedding, torch.nn.EmbeddingBag,
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.Flatten, torch.nn.Unflatten,
    torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict,
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d, torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AvgPool1d,
    torch.nn.AvgPool2d, torch.nn.AvgPool3d, torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d,
    torch.nn.AdaptiveAvgPool3d, torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
    torch.nn.ReLU, torch.nn.GELU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.SiLU, torch.nn.LeakyReLU, torch.nn.ELU,
    torch.nn.Softplus, torch.nn.Softmax, torch.nn.LogSoftmax, torch.nn.Mish, torch.nn.Hardtanh, torch.nn.ReLU6,
)  # fmt: skip


def _mode_free(module: torch.nn.Module) -> bool:
    """A torch.nn module of the list (a user subclass may read the flag in its own forward)."""
    return isinstance(module, _MODE_FREE) and type(module).__module__.startswith("torch.")
