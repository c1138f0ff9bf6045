"""bif_fast.losses.causal_lm on a tiny randomly initialised GPT-NeoX (no download)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bif_fast.losses import causal_lm

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _tiny_neox(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.GPTNeoXForCausalLM(config).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


def _reference(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits  # the model's own [B, T, V] logits
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="none")
    return ref.reshape(targets.shape), targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_the_loss_from_the_models_own_logits(backend):
    model = _tiny_neox()
    ids, mask = _batch()
    loss_fn = causal_lm(model, backend=backend)
    out = loss_fn(model, {"input_ids": ids, "attention_mask": mask})
    ref, targets = _reference(model, ids, mask)
    assert out.shape == (3, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (out[targets == -100] == 0).all() and (out[targets != -100] > 0).all()


def _tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_other_architectures(arch):
    model = _tiny(arch)
    ids, mask = _batch()
    out = causal_lm(model, backend="torch")(model, {"input_ids": ids, "attention_mask": mask})
    ref, _ = _reference(model, ids, mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_batch_formats_and_gradients():
    model = _tiny_neox()
    ids, mask = _batch()
    loss_fn = causal_lm(model, backend="torch")
    as_dict = loss_fn(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(loss_fn(model, (ids, mask)), as_dict)
    no_mask = loss_fn(model, ids)
    ref, _ = _reference(model, ids, torch.ones_like(ids))
    torch.testing.assert_close(no_mask.double(), ref, rtol=1e-5, atol=1e-5)
    # The mean of the same loss drives SGLD: it must reach every parameter, the lm_head included.
    as_dict.mean().backward()
    head = model.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p is not head)


def test_unsupported_models_and_batches_raise():
    with pytest.raises(ValueError, match="needs a Hugging Face causal LM"):
        causal_lm(torch.nn.Linear(3, 3))
    model = _tiny_neox()
    loss_fn = causal_lm(model)
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        loss_fn(model, {"ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="T >= 2"):
        loss_fn(model, torch.zeros(2, 1, dtype=torch.long))


def test_a_confident_token_whose_loss_is_exactly_zero_stays_a_unit():
    """Units are the declared (non-padding) targets, whatever their loss: greedy continuations of a model with
    a sharpened lm_head have float32 losses of exactly 0, and compute_bif keeps every one of them."""
    from bif_fast import BIFConfig, SGLDConfig, compute_bif

    model = _tiny_neox()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(400.0)
        ids = torch.randint(0, 97, (4, 1), generator=torch.Generator().manual_seed(2))
        for _ in range(7):  # greedy: every target is the argmax, with a margin far beyond float32's resolution
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    loss_fn = causal_lm(model, backend="torch")
    batch = {"input_ids": ids, "attention_mask": mask}
    losses = loss_fn(model, batch).detach()
    assert torch.equal(loss_fn.loss_mask(batch), mask[:, 1:].bool())
    assert int((losses[mask[:, 1:].bool()] == 0).sum()) >= 5  # confident tokens: float32 loss exactly 0
    data = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)]
    cfg = BIFConfig(sgld=SGLDConfig(lr=1e-9, nbeta=10.0), num_chains=2, num_draws=3, batch_size=2)
    res = compute_bif(model, data, data, loss_fn=loss_fn, config=cfg, per_token=True)
    want = int(mask[:, 1:].sum())
    assert res.bif.shape == (want, want) and res.diagnostics["n_train_units"] == want
    kept = {tuple(r) for r in res.train_index.tolist()}
    assert kept == {(i, t) for i in range(4) for t in range(7) if mask[i, t + 1]}
