"""Ready-made per-sample / per-token loss callables: ``loss_fn(model, batch) -> Tensor``.

``compute_bif`` evaluates a ``loss_fn`` at every draw for every training and query unit, and uses the
mean of the same ``loss_fn`` over an SGLD minibatch as the sampler's loss, so these are differentiable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bif_fast._backend import Backend
from bif_fast.ops import per_token_cross_entropy

__all__ = ["CausalLMLoss", "causal_lm"]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a causal-LM batch needs 'input_ids', got keys {sorted(batch)}")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ValueError(f"cannot read input_ids from a batch of type {type(batch).__name__}")


def _check_supported(model: torch.nn.Module) -> None:
    for name in ("get_output_embeddings", "base_model"):
        if not hasattr(model, name):
            raise ValueError(
                f"causal_lm needs a Hugging Face causal LM (with {name}); got {type(model).__name__}. "
                "For other models write a loss_fn(model, batch) -> [B, T] yourself."
            )
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap is not None or (scale is not None and scale != 1):
        raise NotImplementedError(
            f"{type(model).__name__} transforms its logits (softcapping/scaling) after the lm_head; "
            "the fused loss does not implement that yet"
        )


class CausalLMLoss:
    """``loss_fn(model, batch) -> Tensor[B, T-1]``: per-token next-token NLL of a Hugging Face causal LM, with
    ``loss_mask(batch)``, the declared positions that count (``compute_bif`` takes its units from it).
    Made by ``causal_lm``."""

    def __init__(self, ignore_index: int, backend: Backend):
        self.ignore_index = ignore_index
        self.backend = backend

    def targets(self, batch: Any) -> torch.Tensor:
        """`[B, T-1]` next-token targets: the inputs shifted by one, padding set to ``ignore_index``."""
        input_ids, attention_mask = _unpack(batch)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [B, T] with T >= 2, got {list(input_ids.shape)}")
        targets = input_ids[:, 1:].clone()
        if attention_mask is not None:
            targets[attention_mask[:, 1:] == 0] = self.ignore_index
        return targets

    def loss_mask(self, batch: Any) -> torch.Tensor:
        """`[B, T-1]` bool: true where the target is not ignored (padding is; a confident token is not)."""
        return self.targets(batch) != self.ignore_index

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        _check_supported(model)
        input_ids, attention_mask = _unpack(batch)
        targets = self.targets(batch)
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return per_token_cross_entropy(
            hidden[:, :-1], head.weight.to(hidden.dtype), targets,
            bias=None if bias is None else bias.to(hidden.dtype), ignore_index=self.ignore_index,
            backend=self.backend,
        )  # fmt: skip


def causal_lm(
    model: torch.nn.Module | None = None, *, ignore_index: int = -100, backend: Backend = "auto"
) -> CausalLMLoss:
    """Per-token next-token NLL of a Hugging Face causal LM, without materialising its logits.

    The returned ``loss_fn(model, batch)`` runs the model's base (``model.base_model``: GPT-NeoX/Pythia,
    GPT-2, Llama-style) to its last hidden state and applies ``per_token_cross_entropy`` with the output
    embedding, so the ``[B, T, V]`` logits never exist. Targets are the inputs shifted by one; a target
    that is padding (``attention_mask == 0``) is ignored: its loss is 0, as in Hugging Face's own loss,
    and ``loss_fn.loss_mask(batch)`` declares it, so ``compute_bif`` leaves it out of the units whatever
    the loss values.

    Args:
        model (nn.Module | None): checked up front for support when given (optional).
        ignore_index (int): the value marking ignored positions. Default: -100.
        backend (str): ``auto`` | ``triton`` | ``torch`` for the fused loss.

    Returns:
        ``loss_fn(model, batch) -> Tensor[B, T-1]`` fp32, where ``batch`` is a tensor of input ids, a
        mapping with ``input_ids`` (and optionally ``attention_mask``), or a tuple ``(input_ids, mask)``.

    Examples:
        >>> from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # doctest: +SKIP
        >>> lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64))  # doctest: +SKIP
        >>> causal_lm(lm)(lm, torch.randint(0, 97, (2, 9))).shape  # doctest: +SKIP
        torch.Size([2, 8])
    """
    if model is not None:
        _check_supported(model)
    return CausalLMLoss(ignore_index, backend)
