"""The model around a BIF run: what is sampled, what is frozen, and the exact restore afterwards."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch

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
        self._sampled = [(p, p.data, p.grad) for p in sampled]
        self._frozen = [(p, p.grad) for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._flags = [(m, m.training) for m in model.modules()]
        self._direct = all(type(m).train is torch.nn.Module.train and "training" in vars(m) for m, _ in self._flags)
        self._mode: str | None = None

    def __enter__(self) -> ModelState:
        for p, _ in self._frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with torch.no_grad():
            for p, data, grad in self._sampled:
                p.data = data
                p.grad = grad
            self.reset_buffers()
            for p, grad in self._frozen:
                p.requires_grad_(True)
                p.grad = grad
        self.own_mode()

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
