"""EK-FAC influence through kronfluence 1.0.1 (an optional benchmark dependency), in the harness's convention.

kronfluence's pairwise scores are ``[n_query, n_train]`` with positive = helpful (including the training
point lowers the query loss), so the harness's score (the predicted loss change) is their negated
transpose. Its Fisher is of the data loss only; the objective's weight decay is not part of it, so the
damping values tried include the weight decay itself.
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch

from benchmarks.lds.methods import Attribution
from benchmarks.lds.settings import Setting

__all__ = ["ekfac_scores"]


def ekfac_scores(setting: Setting, model: torch.nn.Module, dampings: tuple[float | None, ...] | None = None) -> list[
        Attribution]:  # fmt: skip
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            x, y = batch
            out = model(x)
            # The true Fisher: targets drawn from the model's own predictive distribution (categorical for
            # logits, unit-variance Gaussian for the squared loss's prediction).
            if sample and setting.likelihood == "categorical":
                with torch.no_grad():
                    probs = torch.softmax(out.detach().reshape(-1, out.shape[-1]), -1)
                    y = torch.multinomial(probs, 1).view(y.shape)
            elif sample:
                with torch.no_grad():
                    y = out.detach().reshape(y.shape) + torch.randn_like(y)
            return setting.loss(out, y).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            x, y = batch
            return setting.loss(model(x), y).sum()

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    dampings = (1e-8, None, setting.weight_decay) if dampings is None else dampings
    m = prepare_model(_copy(model), _Task())
    train = torch.utils.data.TensorDataset(setting.x_train, setting.y_train)
    query = torch.utils.data.TensorDataset(setting.x_query, setting.y_query)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="lds", model=m, task=_Task(), cpu=True, disable_tqdm=True, output_dir=tmp)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=len(train),
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)  # fmt: skip
        fit = time.perf_counter() - t0
        for damping in dampings:
            t1 = time.perf_counter()
            name = f"s{len(out)}"
            analyzer.compute_pairwise_scores(scores_name=name, factors_name="ekfac", query_dataset=query,
                                             train_dataset=train, per_device_query_batch_size=len(query),
                                             per_device_train_batch_size=len(train),
                                             score_args=ScoreArguments(damping_factor=damping),
                                             overwrite_output_dir=True)  # fmt: skip
            scores = analyzer.load_pairwise_scores(name)["all_modules"]  # [n_query, n_train], positive = helpful
            label = "heuristic" if damping is None else f"{damping:g}"
            # Factor fitting: one pass for the covariances, one for the eigenvalue correction (per-example grads).
            evals = 2 * setting.n_train + setting.n_train + query.tensors[0].shape[0]
            out.append(Attribution(f"EK-FAC (kronfluence, damping {label})", -scores.T.double(),
                                   fit + time.perf_counter() - t1, evals, {"damping": damping}))  # fmt: skip
    return out


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
