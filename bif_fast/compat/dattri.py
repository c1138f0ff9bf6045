"""A dattri 0.3.0 attributor that computes the local BIF with ``bif_fast.compute_bif``.

Use it where a dattri attributor goes::

    from dattri.task import AttributionTask
    from bif_fast.compat.dattri import BIFAttributor

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    attributor = BIFAttributor(task, device="cpu")      # config=None: the calibrated defaults
    attributor.cache(full_train_loader)                 # calibrates on the full training set
    scores = attributor.attribute(train_loader, test_loader)   # [n_train, n_test]

What it computes, in dattri's terms:

* ``task.original_loss_func(params, data)`` (``torch.func`` style, one example with a leading batch
  dimension of 1, as dattri's own attributors call it) is the training loss ``l_i``: it drives the sampler
  (the posterior is localised at the loaded checkpoint and tempered by the full training set's loss) and
  gives the rows. The task's target function (the loss when the task has none) gives the columns: the
  observable ``phi_j`` of each test example.
* ``scores[i, j] = Cov(l_i, phi_j)`` over the posterior draws: the negative of ``BIFResult.bif``, so that
  a positive score means training example i *helps* test example j (lowers its target), dattri's
  convention (``dattri.metric.lds`` compares scores with the negated retrained test losses).
  ``normalized=True`` gives the correlation instead.
* Several checkpoints: each gets its own posterior (and calibration) and the scores are averaged, as
  dattri averages over checkpoints.
* ``cache(full_train_dataloader)`` loads every checkpoint and, with ``config=None``, runs
  ``bif_fast.calibrate`` on the full training set; ``attribute`` then samples. Without ``cache``,
  ``attribute`` treats its ``train_dataloader`` as the full training set (with dattri's warning).
* ``attribute`` refuses shuffling dataloaders (their order defines the axes of the result: dattri only
  warns, but a shuffled order makes the scores silently wrong). The full training loader may shuffle.
* ``per_token=True``: the loss and target functions return one loss per position (``[T]`` for an
  example) and the result is the token x token matrix ``[n_train * T, n_test * T']``, rows example-major.

dattri is an optional dependency (``pip install bif_fast[dattri]``); importing this module without it
raises an ImportError that says so.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

try:
    from dattri.algorithm.base import BaseAttributor
    from dattri.task import AttributionTask
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("bif_fast.compat.dattri needs dattri 0.3.0: pip install 'bif_fast[dattri]'") from e

from bif_fast.api import compute_bif
from bif_fast.calibration import calibrate
from bif_fast.config import BIFConfig

__all__ = ["BIFAttributor"]


class _TaskLoss:
    """``compute_bif``'s ``loss_fn(model, batch)`` from dattri's per-example ``f(params, data)``.

    ``batch`` is a list of tensors ``[B, ...]``; each example is passed to ``f`` as a tuple of ``[1, ...]``
    tensors with the model's current parameters (the sampler's, inside ``compute_bif``), all examples at
    once under ``vmap``. A batch with one extra trailing entry (the query marker) is a test batch and gets
    the target function.
    """

    def __init__(self, loss: Callable, target: Callable, fields: int):
        self.loss, self.target, self.fields = loss, target, fields

    def __call__(self, model: torch.nn.Module, batch: list) -> torch.Tensor:
        func = self.loss
        if len(batch) == self.fields + 1:  # the query marker
            func, batch = self.target, batch[: self.fields]
        params = dict(model.named_parameters())

        def one(*example: torch.Tensor) -> torch.Tensor:
            return func(params, tuple(t.unsqueeze(0) for t in example))

        return torch.func.vmap(one)(*batch)


def _materialise(loader: DataLoader, device: str, name: str) -> list[torch.Tensor]:
    """Every field of ``loader``'s batches concatenated in order: the examples as ``[n, ...]`` tensors."""
    fields: list[list[torch.Tensor]] | None = None
    for batch in loader:
        items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if not all(isinstance(t, torch.Tensor) for t in items):
            raise ValueError(f"{name} must yield tensors (or tuples of tensors), as dattri's attributors need")
        if fields is None:
            fields = [[] for _ in items]
        if len(items) != len(fields):
            raise ValueError(f"{name} yields batches with {len(items)} fields after {len(fields)}")
        for acc, t in zip(fields, items, strict=True):
            acc.append(t.to(device))
    if not fields:
        raise ValueError(f"{name} is empty")
    return [torch.cat(acc) for acc in fields]


def _refuse_shuffle(loader: DataLoader, name: str) -> None:
    if not isinstance(loader, DataLoader):
        raise ValueError(f"{name} must be a torch DataLoader, got {type(loader).__name__}")
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(f"{name} shuffles: its order defines the axes of the scores, so it must not shuffle")


class BIFAttributor(BaseAttributor):
    """The local Bayesian influence function as a dattri attributor (module docstring).

    Args:
        task (AttributionTask): the model, its checkpoint(s), the per-example loss and the target function.
        config (BIFConfig | None): sampler settings, used as given for every checkpoint. Default (None): the
            calibrated defaults, chosen per checkpoint in ``cache`` (``bif_fast.calibrate``).
        device (str): where the model and the data are put. Default: ``"cpu"``.
        per_token (bool): per-position losses and a token x token result. Default: False.
        normalized (bool): scores as correlations instead of covariances. Default: False.
        budget_seconds (float): the calibrated defaults' wall-time budget per checkpoint (calibration and
            sampling). Default: 30.

    Attributes:
        results (list[BIFResult]): the last ``attribute`` call's result per checkpoint (diagnostics,
            standard errors, the calibration's choices).
    """

    def __init__(self, task: AttributionTask, config: BIFConfig | None = None, device: str = "cpu",
                 per_token: bool = False, *, normalized: bool = False,
                 budget_seconds: float = 30.0) -> None:  # fmt: skip
        if not isinstance(task, AttributionTask):
            raise ValueError(f"task must be a dattri AttributionTask, got {type(task).__name__}")
        if config is not None and not isinstance(config, BIFConfig):
            raise ValueError(f"config must be a BIFConfig or None, got {type(config).__name__}")
        self.task, self.config, self.device = task, config, device
        self.per_token, self.normalized, self.budget_seconds = per_token, normalized, budget_seconds
        self.full_train: list[torch.Tensor] | None = None
        self.configs: list[BIFConfig | None] = []
        self.results: list = []

    # -- dattri's interface ------------------------------------------------------------------------

    def cache(self, full_train_dataloader: DataLoader) -> None:
        """Take the full training set (the posterior's data) and, with ``config=None``, calibrate the
        sampler for every checkpoint on it."""
        if not isinstance(full_train_dataloader, DataLoader):
            raise ValueError(f"full_train_dataloader must be a DataLoader, got {type(full_train_dataloader).__name__}")
        self.full_train = _materialise(full_train_dataloader, self.device, "full_train_dataloader")
        self.configs = [self._calibrate(i) for i in range(len(self.task.get_checkpoints()))]

    def attribute(self, train_dataloader: DataLoader, test_dataloader: DataLoader) -> torch.Tensor:
        """Scores ``[n_train, n_test]`` (per token: ``[n_train * T, n_test * T']``) averaged over the
        task's checkpoints; positive where the training example lowers the test example's target."""
        _refuse_shuffle(train_dataloader, "train_dataloader")
        _refuse_shuffle(test_dataloader, "test_dataloader")
        train = _materialise(train_dataloader, self.device, "train_dataloader")
        test = _materialise(test_dataloader, self.device, "test_dataloader")
        if self.full_train is None:
            warnings.warn("BIFAttributor.cache was not called: the train_dataloader is taken as the full "
                          "training set", stacklevel=2)  # fmt: skip
            self.cache(train_dataloader)
        scores, self.results = None, []
        for ckpt in range(len(self.task.get_checkpoints())):
            res = self._run(ckpt, train, test)
            self.results.append(res)
            s = -(res.bif_normalized if self.normalized else res.bif).to(torch.float32)
            scores = s if scores is None else scores + s
        return scores / len(self.results)

    # -- internals ---------------------------------------------------------------------------------

    def _model(self, ckpt: int) -> torch.nn.Module:
        """The task's model with checkpoint ``ckpt`` loaded (the task's load function), on the device."""
        self.task.get_param(ckpt)  # loads checkpoint ckpt into task.model unless it is the one loaded
        return self.task.model.to(self.device)

    def _loss(self, fields: int) -> _TaskLoss:
        return _TaskLoss(self.task.original_loss_func, self.task.original_target_func, fields)

    def _calibrate(self, ckpt: int) -> BIFConfig | None:
        if self.config is not None:
            return None
        model = self._model(ckpt)
        data = TensorDataset(*self.full_train)
        return calibrate(model, data, loss_fn=self._loss(len(self.full_train)), per_token=self.per_token,
                         budget_seconds=self.budget_seconds)  # fmt: skip

    def _run(self, ckpt: int, train: list[torch.Tensor], test: list[torch.Tensor]) -> Any:
        """``compute_bif`` at checkpoint ``ckpt``: rows ``train``, columns ``test`` (marked as queries),
        the posterior over the full training set."""
        assert self.full_train is not None
        config = self.config if self.config is not None else self.configs[ckpt]
        fields = len(self.full_train)
        if len(train) != fields or len(test) != fields:
            raise ValueError(f"the train and test batches must have the full training set's {fields} fields, "
                             f"got {len(train)} and {len(test)}")  # fmt: skip
        marker = torch.zeros(test[0].shape[0], dtype=torch.bool, device=test[0].device)
        query = TensorDataset(*test, marker)
        sgld_data = None
        if not _same_examples(train, self.full_train):
            # Rows that are not the full set: the sampler's full-batch gradient still comes from the full set.
            n = self.full_train[0].shape[0]
            sgld_data = DataLoader(TensorDataset(*self.full_train), batch_size=n, shuffle=False)
            if config.batch_size == "full":
                config = dataclasses.replace(config, batch_size=n)
        return compute_bif(self._model(ckpt), TensorDataset(*train), query, loss_fn=self._loss(fields), config=config,
                           per_token=self.per_token, sgld_data=sgld_data)  # fmt: skip


def _same_examples(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and bool(torch.equal(x, y)) for x, y in zip(a, b, strict=True))
