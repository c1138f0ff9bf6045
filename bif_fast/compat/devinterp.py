"""devinterp 2.0.1's ``bif()`` on top of ``bif_fast.compute_bif``.

Switch by changing one import::

    # from devinterp.slt.bif import bif
    from bif_fast.compat.devinterp import bif

    ds = bif(model, dataset, {"train": train_ds, "query": (query_ds, 1)}, lr=1e-4, n_beta=30.0,
             localization=100.0, num_chains=4, num_draws=200, batch_size=8)
    ds["influences"]  # +Corr (or +Cov), as devinterp returns it

What devinterp's ``bif()`` computes, and so what this function computes:

* ``dataset`` (items with an ``"input_ids"`` sequence, all of one length L) only feeds the SGLD
  minibatches. Each observable ``name -> dataset`` or ``name -> (dataset, batches_per_draw)``
  contributes ``batch_size * batches_per_draw`` sequences, chosen once by
  ``random.Random(obs_seed).sample(range(len(dataset)), n)`` (the same sequences, in the same order,
  as devinterp). The observables are concatenated in sorted order of their identifiers (the name
  with every character other than a letter, digit or ``_`` replaced by ``_``) into N sequences.
* There is no train/query split: the result is the joint, symmetric matrix of every observable
  sequence against every other (the same N sequences along ``batch_1`` and ``batch_2``), with the
  **sign of devinterp**: ``+Corr`` (or ``+Cov`` with ``compute_covariance=True``) of the losses over
  all draws of all chains pooled ("stack"), ddof = 1. ``bif_fast``'s ``BIFResult`` holds
  ``-Cov`` / ``-Corr``; the sign is flipped here.
* ``correlation_method="token"``: ``influences[i, j, t, s] = Corr(l[i, t], l[j, s])`` over the
  T = L - 1 next-token losses, dims ``(batch_1, batch_2, target_position, target_position_T)`` with
  ``target_position`` = 1..T; ``average_tokenwise_bif=True`` averages over ``(t, s)`` to ``(N, N)``.
  ``correlation_method="sequence"``: the correlation of the per-sequence *mean* token losses,
  dims ``(batch_1, batch_2)``.
* The returned ``xarray.Dataset`` has ``influences`` (float32) and ``input_ids``
  (int64, dims ``(batch, position)``), exactly as devinterp's.

Argument mapping (devinterp -> bif_fast):

* ``lr`` -> ``SGLDConfig.lr`` (must be > 0); ``n_beta`` -> ``SGLDConfig.nbeta`` (must be > 0; the same
  parametrisation: it multiplies the gradient of the *mean* minibatch loss).
* ``localization`` (devinterp's default 0.0) -> ``SGLDConfig.localization``; ``llc_weight_decay`` ->
  ``SGLDConfig.weight_decay``; ``noise_level`` -> ``SGLDConfig.noise_level``; ``bounding_box_size`` ->
  ``SGLDConfig.bounding_box_size`` (must be None or > 0).
* ``sampling_method="sgmcmc_sgld"`` -> ``SGLDConfig(sampler="sgld", precondition="none")``;
  ``"rmsprop_sgld"`` -> ``precondition="rmsprop"``, with ``rmsprop_alpha`` /
  ``sampling_method_kwargs["alpha"]`` -> ``SGLDConfig.rmsprop_alpha`` and ``rmsprop_eps`` /
  ``sampling_method_kwargs["eps"]`` -> ``SGLDConfig.rmsprop_eps`` (defaults 0.99 and 0.1 in both).
* ``num_chains``, ``num_draws``, ``num_steps_bw_draws`` -> the ``BIFConfig`` fields of the same name;
  ``num_burnin_steps`` -> ``BIFConfig.num_burnin_steps = num_burnin_steps + 1`` (see below).
* ``batch_size`` -> the SGLD micro-batch and the observable evaluation batch (``eval_batch_size``);
  ``gradient_accumulation_steps`` G -> ``BIFConfig.batch_size = G * batch_size``, each step being G
  consecutive micro-batches, as in devinterp.
* ``init_seed`` -> ``BIFConfig.seed`` (must be >= 0) and the minibatch order.
* ``shuffle``, ``match_sampling_input_ids_across_chains`` -> reproduced exactly: every chain replays
  the first epoch of the ``DataLoader(dataset, batch_size, shuffle, drop_last=True)`` whose generator
  is seeded with ``init_seed`` (``init_seed + chain`` when not matched), so each SGLD step sees the
  same sequences as in devinterp.
* ``param_masks`` -> ``compute_bif(params=...)``: only the named parameters are sampled; the others
  are frozen (``requires_grad`` off) for the call. Element masks must be all ones.
* ``loss_fn(model, input_ids) -> [B, L-1]`` -> wrapped into ``compute_bif``'s ``loss_fn(model, batch)``:
  per token (``per_token=True``) for ``"token"``, the mean over tokens per sequence for ``"sequence"``
  (the SGLD loss is the minibatch mean over all tokens either way, as in devinterp).
* ``device`` -> the model is moved there for the call (default: CUDA if available) and moved back.
* ``correlation_method``, ``compute_covariance``, ``average_tokenwise_bif`` -> read off
  ``BIFResult.bif`` / ``bif_normalized`` (negated and reshaped).

The schedule matches devinterp's: devinterp takes a draw *after* the SGLD step
``num_burnin_steps + d * num_steps_bw_draws`` (0-based), while ``compute_bif`` draws *before* stepping,
so one extra burn-in step aligns them. The update rules of SGLD and RMSprop-SGLD (drift
``nbeta * grad(mean loss) + weight_decay * w + localization * (w - w*)``, RMSprop on the raw gradient)
are the same; only the random numbers differ, so results agree within Monte-Carlo error, not bitwise.

Accepted but without effect on the result (as in devinterp, where they only place or block the work,
or fill the sample store that ``bif()`` does not return): ``bif_batch_size``, ``bif_device``,
``num_init_loss_batches``, ``sampling_method_kwargs["sketch_seed"]``.

Not supported (raise ``NotImplementedError`` naming the argument): ``reduce_chain_dimension_method=
"mean"``, ``init_noise``, ``output_path`` (bif_fast stores no samples, so there is no zarr store and no
cache), ``save_metrics=True``, element masks in ``param_masks`` that are not all ones,
``sampling_method_kwargs["sketch_dim"]``, ``add_grad_correction=True`` (devinterp raises too).

Deliberate differences:

* Observables are evaluated in eval mode (``compute_bif`` evaluates rows and columns in separate
  passes, so a stochastic forward pass would make them disagree); devinterp evaluates them in training
  mode. SGLD steps run in training mode in both. Models without dropout or batch norm are unaffected.
* A chain whose loss or weights become non-finite is left out of the pooled estimate (with a warning);
  devinterp stops such a chain and correlates its unwritten draws (the sample store's fill values).
* The default loss is the same next-token cross-entropy, in fp32: for a Hugging Face causal LM that
  ``bif_fast.losses.causal_lm`` supports it is computed fused (no ``[B, T, V]`` logits), otherwise from
  the logits. Covariances are accumulated in float64 and returned as float32.
* A correlation involving a loss that bif_fast deems constant (sample std within 16 ulps of its mean)
  is NaN, as devinterp's 0/0; devinterp only gets NaN for exactly constant float32 losses.
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from bif_fast._backend import Backend
from bif_fast.api import compute_bif
from bif_fast.config import BIFConfig, SGLDConfig
from bif_fast.losses import causal_lm

__all__ = ["bif", "observable_id"]

CorrelationMethod = Literal["token", "sequence"]
ChainReductionMethod = Literal["stack", "mean"]
SamplingMethod = Literal["sgmcmc_sgld", "rmsprop_sgld"]
DevinterpLossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]

# Keys devinterp's sample() passes to the sampler itself; repeating them in sampling_method_kwargs is an error there.
_SET_BY_SAMPLE = ("nbeta", "lr", "localization", "noise_level", "weight_decay", "bounding_box_size", "save_metrics")


def observable_id(name: str) -> str:
    """The identifier devinterp derives from an observable's name (which also fixes the concatenation order).

    Examples:
        >>> observable_id("pile-github 2")
        'pile_github_2'
        >>> observable_id("1st")
        '_1st'
    """
    ident = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    if ident[:1].isdigit():
        ident = "_" + ident
    return ident or "_"


def _ids_of(item: Any, where: str) -> torch.Tensor:
    try:
        ids = item["input_ids"]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{where}: every item must have an 'input_ids' entry") from e
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{where}: 'input_ids' must be a 1-D integer sequence, got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


class _InputIds(Dataset):
    """A dataset's ``input_ids`` as int64 tensors."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _ids_of(self.source[i], "dataset")


class _ReplayedEpochs:
    """SGLD minibatches as devinterp draws them, for each chain by its index (a ``ChainMinibatches``).

    devinterp builds, per chain, ``DataLoader(dataset, batch_size, shuffle, generator, drop_last=True)``
    and cycles its *first* epoch (``itertools.cycle`` replays it). Each step takes ``accumulation``
    consecutive micro-batches. Chain c's generator is seeded with ``seed + c`` when ``per_chain``, else
    with ``seed``; ``compute_bif`` passes c explicitly, so the stream does not depend on how often (or in
    which order) chains are started.
    """

    def __init__(self, dataset: Dataset, batch_size: int, accumulation: int, *, shuffle: bool, seed: int,
                 per_chain: bool):  # fmt: skip
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation
        self.shuffle, self.seed, self.per_chain = shuffle, seed, per_chain

    def _first_epoch(self, seed: int) -> list[list[int]]:
        # The same DataLoader devinterp builds, over indices: its first epoch is what devinterp replays.
        loader = DataLoader(range(len(self.dataset)), batch_size=self.batch_size, shuffle=self.shuffle,
                            generator=torch.Generator().manual_seed(seed), drop_last=True)  # fmt: skip
        return [batch.tolist() for batch in loader]

    def indices(self, chain: int) -> Iterator[list[int]]:
        """Chain ``chain``'s endless minibatch indices."""
        micro = self._first_epoch(self.seed + (chain if self.per_chain else 0))
        k = 0
        while True:
            step: list[int] = []
            for _ in range(self.accumulation):
                step.extend(micro[k])
                k = (k + 1) % len(micro)
            yield step

    def minibatches(self, chain: int) -> Iterator[torch.Tensor]:
        """Chain ``chain``'s endless minibatches, ``[accumulation * batch_size, L]`` input ids."""
        for step in self.indices(chain):
            yield torch.stack([self.dataset[i] for i in step])


def _is_transformer_lens(model: torch.nn.Module) -> bool:
    return hasattr(model, "cfg") and hasattr(model.cfg, "n_heads")


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    if _is_transformer_lens(model):
        return model(input_ids, return_type="logits")
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return model(input_ids, return_dict=False, use_cache=False)[0]
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def _next_token_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]`` next-token cross-entropy from the model's logits, in fp32."""
    logp = torch.log_softmax(_logits(model, input_ids)[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _default_loss(model: torch.nn.Module) -> DevinterpLossFn:
    try:
        fused = causal_lm(model)
    except (ValueError, NotImplementedError):
        return _next_token_nll
    return fused


def _wrap_loss(fn: DevinterpLossFn, per_token: bool) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """devinterp's ``loss_fn(model, input_ids) -> [B, L-1]`` as a ``compute_bif`` ``loss_fn(model, batch)``."""

    def loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        out = fn(model, input_ids)
        want = (input_ids.shape[0], input_ids.shape[1] - 1)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss_fn must return per-token loss of shape {want}, got {got}")
        out = out.float()
        # Per token, every position is a unit (the wrapper declares no mask), as in devinterp.
        return out if per_token else out.mean(dim=1)

    return loss


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _sampler_options(
    sampling_method: str,
    sampling_method_kwargs: Mapping[str, Any] | None,
    rmsprop_eps: float | None,
    rmsprop_alpha: float | None,
) -> dict[str, Any]:
    """Validate devinterp's sampler choice and options; return the SGLDConfig fields they set."""
    if sampling_method not in ("sgmcmc_sgld", "rmsprop_sgld"):
        raise ValueError(f"sampling_method must be 'sgmcmc_sgld' or 'rmsprop_sgld', got {sampling_method!r}")
    opts = dict(sampling_method_kwargs or {})
    for key, value in (("eps", rmsprop_eps), ("alpha", rmsprop_alpha)):
        if value is None:
            continue
        if sampling_method != "rmsprop_sgld":
            raise ValueError(f"rmsprop_{key} can only be set when sampling_method='rmsprop_sgld', "
                             f"got sampling_method={sampling_method!r}")  # fmt: skip
        if key in opts:
            raise ValueError(f"rmsprop_{key} is set both as an argument and in sampling_method_kwargs[{key!r}]")
        opts[key] = value
    fields: dict[str, Any] = {"sampler": "sgld", "precondition": "none"}
    if sampling_method == "rmsprop_sgld":
        fields["precondition"] = "rmsprop"
    for key, value in opts.items():
        if key in _SET_BY_SAMPLE:
            raise ValueError(f"sampling_method_kwargs[{key!r}] is set by bif() itself; pass it as an argument")
        if key == "sketch_dim":
            if value is not None:
                raise NotImplementedError("sampling_method_kwargs['sketch_dim']: update sketches are not supported")
        elif key == "sketch_seed":
            pass  # only meaningful with sketch_dim
        elif key == "mask":
            raise NotImplementedError("sampling_method_kwargs['mask'] is not supported; use param_masks")
        elif sampling_method == "rmsprop_sgld" and key == "alpha":
            fields["rmsprop_alpha"] = value
        elif sampling_method == "rmsprop_sgld" and key == "eps":
            fields["rmsprop_eps"] = value
        elif sampling_method == "rmsprop_sgld" and key == "add_grad_correction":
            if value:
                raise NotImplementedError("sampling_method_kwargs['add_grad_correction']=True (devinterp does not "
                                          "implement it either)")  # fmt: skip
        else:
            raise ValueError(f"sampling_method_kwargs[{key!r}] is not an option of sampling_method={sampling_method!r}")
    return fields


def _sampled_params(model: torch.nn.Module, param_masks: Mapping[str, torch.Tensor | None] | None) -> list[str]:
    """Names of the parameters to sample (devinterp's ``param_masks``: absent names are frozen)."""
    named = dict(model.named_parameters())
    if param_masks is None:
        return list(named)
    if not isinstance(param_masks, Mapping):
        raise ValueError(f"param_masks must map parameter names to masks or None, got {type(param_masks).__name__}")
    for name, mask in param_masks.items():
        if name not in named:
            raise ValueError(f"param_masks names {name!r}, which is not a parameter of the model")
        if mask is None:
            continue
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(named[name].shape):
            raise ValueError(f"param_masks[{name!r}] has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(named[name].shape)}")  # fmt: skip
        if not bool((mask == 1).all()):
            raise NotImplementedError(
                f"param_masks[{name!r}] restricts sampling to some elements; bif_fast samples whole parameters "
                "(pass None, or leave the parameter out of param_masks to freeze it)"
            )
    return list(param_masks)


def _observables(
    observables: Mapping[str, Any], batch_size: int, batches_per_draw: int, obs_seed: int
) -> tuple[list[str], torch.Tensor]:
    """devinterp's observable sequences: ``(ids in concatenation order, [N, L] input_ids)``."""
    if not isinstance(observables, Mapping) or not observables:
        raise ValueError("observables must be a non-empty dict of name -> dataset or (dataset, batches_per_draw)")
    chosen: dict[str, torch.Tensor] = {}
    for name, spec in observables.items():
        obs_ds, bpd = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
        _check_int(f"batches_per_draw of observable {name!r}", bpd, 1)
        ident = observable_id(str(name))
        if ident in chosen:
            raise ValueError(f"observables {name!r} and another one share the identifier {ident!r}")
        n = batch_size * bpd
        if len(obs_ds) < n:
            raise ValueError(f"observable {name!r} has {len(obs_ds)} sequences; it needs batch_size * batches_per_draw "
                             f"= {n}")  # fmt: skip
        index = random.Random(obs_seed).sample(range(len(obs_ds)), n)
        rows = [_ids_of(obs_ds[i], f"observable {name!r}") for i in index]
        if len({r.numel() for r in rows}) != 1:
            raise ValueError(f"observable {name!r}: all sequences must have the same length")
        chosen[ident] = torch.stack(rows)
    order = sorted(chosen)
    lengths = {chosen[k].shape[1] for k in order}
    if len(lengths) != 1:
        raise ValueError(f"all observables must have the same sequence length, got {sorted(lengths)}")
    return order, torch.cat([chosen[k] for k in order])


def bif(
    model: torch.nn.Module,
    dataset: Any,
    observables: Mapping[str, Any],
    *,
    lr: float,
    n_beta: float,
    param_masks: Mapping[str, torch.Tensor | None] | None = None,
    correlation_method: CorrelationMethod = "token",
    reduce_chain_dimension_method: ChainReductionMethod = "stack",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
    bif_batch_size: int = 32,
    bif_device: str | torch.device | None = None,
    loss_fn: DevinterpLossFn | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    batch_size: int = 32,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    num_init_loss_batches: int = 32,
    init_seed: int = 100,
    batches_per_draw: int = 3,
    obs_seed: int = 1337,
    gradient_accumulation_steps: int = 1,
    localization: float = 0.0,
    noise_level: float = 1.0,
    llc_weight_decay: float = 0.0,
    bounding_box_size: float | None = None,
    sampling_method: SamplingMethod = "sgmcmc_sgld",
    sampling_method_kwargs: dict[str, Any] | None = None,
    rmsprop_eps: float | None = None,
    rmsprop_alpha: float | None = None,
    shuffle: bool = True,
    match_sampling_input_ids_across_chains: bool = True,
    init_noise: float | None = None,
    device: str | None = None,
    save_metrics: bool = False,
    output_path: Any = None,
    backend: Backend = "auto",
) -> Any:
    """devinterp 2.0.1's ``bif()``: sample with SGLD and return the BIF of the observables, via ``compute_bif``.

    Same arguments, defaults and result as ``devinterp.slt.bif.bif`` (whose ``**kwargs`` for ``sample()``
    are explicit keywords here); see the module docstring for the mapping and the few differences.

    Args:
        model (nn.Module): language model; its current weights are w*. Left as it was.
        dataset (Dataset): items with ``"input_ids"`` (length L >= 2); the SGLD minibatches.
        observables (dict): name -> dataset, or name -> ``(dataset, batches_per_draw)``.
        lr (float): SGLD step size (> 0).
        n_beta (float): inverse temperature times dataset size (> 0), ``SGLDConfig.nbeta``.
        param_masks (dict | None): parameter name -> None (or an all-ones mask); only these are sampled.
        correlation_method (str): ``"token"`` or ``"sequence"``.
        reduce_chain_dimension_method (str): ``"stack"`` (pool all chains' draws); ``"mean"`` is not supported.
        average_tokenwise_bif (bool): token mode: average over the two token axes.
        compute_covariance (bool): ``+Cov`` instead of ``+Corr``.
        bif_batch_size (int): accepted; no effect (devinterp's block size).
        bif_device (str | device | None): accepted; no effect (the covariance lives on the sampling device).
        loss_fn (callable | None): ``loss_fn(model, input_ids [B, L]) -> [B, L-1]`` per-token loss.
            Default: next-token cross-entropy.
        num_chains (int), num_draws (int): chains, and draws per chain.
        batch_size (int): SGLD micro-batch size and observable batch size.
        num_burnin_steps (int), num_steps_bw_draws (int): devinterp's draw schedule.
        num_init_loss_batches (int): accepted; no effect on the result.
        init_seed (int): seed of the noise and of the minibatch order (>= 0).
        batches_per_draw (int): default number of batches per observable.
        obs_seed (int): seed of the choice of observable sequences.
        gradient_accumulation_steps (int): micro-batches per SGLD step.
        localization (float), noise_level (float), llc_weight_decay (float), bounding_box_size (float | None):
            sampler hyperparameters (``SGLDConfig.localization`` / ``noise_level`` / ``weight_decay`` /
            ``bounding_box_size``).
        sampling_method (str): ``"sgmcmc_sgld"`` or ``"rmsprop_sgld"``.
        sampling_method_kwargs (dict | None): rmsprop's ``alpha`` / ``eps`` (``add_grad_correction=False``).
        rmsprop_eps (float | None), rmsprop_alpha (float | None): shorthands (rmsprop only).
        shuffle (bool): shuffle the SGLD data (first epoch, replayed).
        match_sampling_input_ids_across_chains (bool): every chain sees the same minibatches.
        init_noise (float | None): not supported (must be None or 0).
        device (str | None): where to run. Default: CUDA if available, else CPU.
        save_metrics (bool): not supported (must be False).
        output_path (path | None): not supported (must be None).
        backend (str): bif_fast sampler backend (``auto`` | ``triton`` | ``ext`` | ``torch``); not a devinterp argument.

    Returns:
        xarray.Dataset with ``influences`` (float32; ``(batch_1, batch_2, target_position,
        target_position_T)``, or ``(batch_1, batch_2)`` for ``"sequence"`` or averaged) and ``input_ids``
        (int64, ``(batch, position)``). Its attrs add ``engine="bif_fast"``, ``num_chains_used`` and
        ``num_draws_used`` (diverged chains are left out).

    Raises:
        NotImplementedError: a devinterp option bif_fast does not support (named in the message).
        ValueError: invalid arguments or data.
        ImportError: xarray is not installed.
        bif_fast.BIFError: every chain diverged.
    """
    _check_options(correlation_method=correlation_method, reduce_chain_dimension_method=reduce_chain_dimension_method,
                   init_noise=init_noise, output_path=output_path, save_metrics=save_metrics, num_chains=num_chains,
                   num_draws=num_draws, batch_size=batch_size, num_burnin_steps=num_burnin_steps,
                   num_steps_bw_draws=num_steps_bw_draws, num_init_loss_batches=num_init_loss_batches,
                   batches_per_draw=batches_per_draw, gradient_accumulation_steps=gradient_accumulation_steps,
                   bif_batch_size=bif_batch_size, init_seed=init_seed, obs_seed=obs_seed, lr=lr, n_beta=n_beta,
                   bounding_box_size=bounding_box_size)  # fmt: skip
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sgld_fields = _sampler_options(sampling_method, sampling_method_kwargs, rmsprop_eps, rmsprop_alpha)
    sgld = SGLDConfig(lr=float(lr), nbeta=float(n_beta), localization=float(localization),
                      weight_decay=float(llc_weight_decay), noise_level=float(noise_level),
                      bounding_box_size=None if bounding_box_size is None else float(bounding_box_size),
                      **sgld_fields)  # fmt: skip
    config = BIFConfig(sgld=sgld, num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps + 1,
                       num_steps_bw_draws=num_steps_bw_draws, batch_size=batch_size * gradient_accumulation_steps,
                       eval_batch_size=batch_size, seed=init_seed, compute_stderr=False)  # fmt: skip
    names = _sampled_params(model, param_masks)
    if len(dataset) < batch_size:
        raise ValueError(f"dataset has {len(dataset)} sequences, fewer than batch_size={batch_size} "
                         "(devinterp drops the last partial batch, so it would have none)")  # fmt: skip
    seq_len = _ids_of(dataset[0], "dataset").numel()
    if seq_len < 2:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {seq_len})")
    _, obs_ids = _observables(observables, batch_size, batches_per_draw, obs_seed)
    if obs_ids.shape[1] != seq_len:
        raise ValueError(f"observables have sequences of length {obs_ids.shape[1]}, the dataset {seq_len}")
    try:
        import xarray as xr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("bif_fast.compat.devinterp returns an xarray.Dataset: install xarray") from e

    per_token = correlation_method == "token"
    target = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    sgld_batches = _ReplayedEpochs(_InputIds(dataset), batch_size, gradient_accumulation_steps, shuffle=shuffle,
                                   seed=init_seed, per_chain=not match_sampling_input_ids_across_chains)  # fmt: skip
    obs_loader = DataLoader(obs_ids, batch_size=batch_size, shuffle=False)

    fn = loss_fn if loss_fn is not None else _default_loss(model)
    result = _run_in_training_mode(model, names, target, obs_loader, loss_fn=_wrap_loss(fn, per_token), config=config,
                                   per_token=per_token, sgld_data=sgld_batches, backend=backend)  # fmt: skip
    out = _as_dataset(xr, result, obs_ids, per_token, compute_covariance, average_tokenwise_bif)
    diag = result.diagnostics
    if any(diag["diverged"]):
        warnings.warn(f"bif_fast: {sum(diag['diverged'])} of {num_chains} chains diverged and were left out",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    out.attrs.update(engine="bif_fast", num_chains_used=diag["num_chains_used"], num_draws_used=diag["num_draws_used"])
    return out


def _check_options(*, correlation_method, reduce_chain_dimension_method, init_noise, output_path, save_metrics,
                   num_chains, num_draws, batch_size, num_burnin_steps, num_steps_bw_draws, num_init_loss_batches,
                   batches_per_draw, gradient_accumulation_steps, bif_batch_size, init_seed, obs_seed, lr, n_beta,
                   bounding_box_size) -> None:  # fmt: skip
    """Validate every devinterp option before any work (unsupported ones raise NotImplementedError)."""
    if correlation_method not in ("token", "sequence"):
        raise ValueError(f"Unknown correlation method: {correlation_method!r} (expected 'token' or 'sequence')")
    if reduce_chain_dimension_method == "mean":
        raise NotImplementedError(
            "reduce_chain_dimension_method='mean' (averaging the chains' loss traces before correlating) is not "
            "supported; bif_fast pools all draws of all chains, i.e. 'stack'"
        )
    if reduce_chain_dimension_method != "stack":
        raise ValueError(f"Unknown reduce_chain_dimension_method: {reduce_chain_dimension_method!r}")
    if init_noise:
        raise NotImplementedError("init_noise: chains start at w* in bif_fast; perturbed starts are not supported")
    if output_path is not None:
        raise NotImplementedError("output_path: bif_fast keeps no per-draw samples, so there is no zarr store to "
                                  "write or reuse; pass output_path=None")  # fmt: skip
    if save_metrics:
        raise NotImplementedError("save_metrics=True: per-step SGLD metrics are not recorded (compute_bif's "
                                  "diagnostics have per-draw loss and distance traces)")  # fmt: skip
    minimum = {"num_chains": (num_chains, 1), "num_draws": (num_draws, 1), "batch_size": (batch_size, 1),
               "num_burnin_steps": (num_burnin_steps, 0), "num_steps_bw_draws": (num_steps_bw_draws, 1),
               "num_init_loss_batches": (num_init_loss_batches, 1), "batches_per_draw": (batches_per_draw, 1),
               "gradient_accumulation_steps": (gradient_accumulation_steps, 1), "bif_batch_size": (bif_batch_size, 1),
               "init_seed": (init_seed, 0)}  # fmt: skip
    for name, (value, low) in minimum.items():
        _check_int(name, value, low)
    _check_int("obs_seed", obs_seed, -(2**63))
    for name, value in (("lr", lr), ("n_beta", n_beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(f"{name} must be a finite number > 0 for bif_fast, got {value!r}")
    if bounding_box_size is not None and not (isinstance(bounding_box_size, (int, float)) and bounding_box_size > 0):
        raise ValueError(f"bounding_box_size must be None or > 0 for bif_fast, got {bounding_box_size!r}")


def _run_in_training_mode(model: torch.nn.Module, names: list[str], target: torch.device, obs_loader: DataLoader,
                          **kwargs: Any) -> Any:  # fmt: skip
    """``compute_bif`` on the model moved to ``target``, in training mode, with only ``names`` sampled."""
    params = list(model.parameters())
    orig_device = params[0].device if params else target
    was_training = model.training
    keep = set(names)
    frozen = [p for n, p in model.named_parameters() if n not in keep and p.requires_grad]
    try:
        if any(p.device != target for p in params):
            _move(model, target)
        for p in frozen:
            p.requires_grad_(False)
        sampled = [p for n, p in model.named_parameters() if n in keep and p.requires_grad]
        model.train()  # devinterp takes its SGLD steps in training mode
        return compute_bif(model, obs_loader, obs_loader, params=sampled, **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if any(p.device != orig_device for p in model.parameters()):
            _move(model, orig_device)
        model.train(was_training)


def _as_dataset(xr: Any, result: Any, obs_ids: torch.Tensor, per_token: bool, compute_covariance: bool,
                average_tokenwise_bif: bool) -> Any:  # fmt: skip
    """devinterp's layout and sign: ``influences`` (float32, +Corr / +Cov) and ``input_ids``."""
    n_seq, n_tok = obs_ids.shape[0], obs_ids.shape[1] - 1
    n_units = n_seq * n_tok if per_token else n_seq
    if tuple(result.bif.shape) != (n_units, n_units):  # pragma: no cover - an internal invariant
        raise RuntimeError(f"compute_bif returned {tuple(result.bif.shape)}, expected {n_units} units")
    # One float32 copy (devinterp returns float32), negated in place: bif_fast holds -Cov / -Corr.
    mat = (result.bif if compute_covariance else result.bif_normalized).to(torch.float32, copy=True).neg_()
    if not compute_covariance:
        constant = result.bif_normalized.diagonal() == 0  # bif_fast's zero-variance rule gives 0; devinterp 0/0
        mat[constant, :] = math.nan
        mat[:, constant] = math.nan
    coords: dict[str, Any] = {"batch_1": torch.arange(n_seq).numpy(), "batch_2": torch.arange(n_seq).numpy()}
    dims: tuple[str, ...] = ("batch_1", "batch_2")
    if per_token:
        mat = mat.view(n_seq, n_tok, n_seq, n_tok).permute(0, 2, 1, 3)  # units are (sequence, token), row-major
        if average_tokenwise_bif:
            mat = mat.mean(dim=(-1, -2), dtype=torch.float64).float()
        else:
            dims += ("target_position", "target_position_T")
            coords["target_position"] = torch.arange(1, n_tok + 1).numpy()
            coords["target_position_T"] = torch.arange(1, n_tok + 1).numpy()
    out = xr.DataArray(mat.cpu().contiguous().numpy(), name="influences", dims=dims, coords=coords).to_dataset()
    out["input_ids"] = xr.DataArray(obs_ids.numpy(), dims=("batch", "position"))
    return out


def _move(model: torch.nn.Module, device: torch.device) -> None:
    if _is_transformer_lens(model):
        model.to(device, print_details=False)
    else:
        model.to(device)
