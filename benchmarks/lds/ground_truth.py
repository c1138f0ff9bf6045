"""Ground truth of the retraining benchmark, cached: K subsets (each training point kept with probability
alpha), the query losses of the model retrained on each, and the reference model trained on all points.

The cache (``benchmarks/lds/cache/<setting>.pt``) records how it was made (setting description, K, alpha,
seed); a cache made otherwise is rebuilt, never silently reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.lds.settings import Setting, train_to_minimum

__all__ = ["GroundTruth", "ground_truth"]

CACHE = Path(__file__).resolve().parent / "cache"


class GroundTruth(dict):
    """``masks`` `[K, n_train]` bool, ``retrained`` `[K, n_query]` float64, ``w_star`` (state dict of the
    reference model), ``grad_norms`` `[K]` and ``w_star_grad_norm`` (stationarity of each fit)."""


def ground_truth(setting: Setting, *, k: int = 100, alpha: float = 0.5, seed: int = 0, rebuild: bool = False,
                 log=print) -> GroundTruth:  # fmt: skip
    key = {"description": setting.description, "k": k, "alpha": alpha, "seed": seed}
    path = CACHE / f"{setting.name}.pt"
    if path.exists() and not rebuild:
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return GroundTruth(cached)
        log(f"{path.name}: made with {cached.get('key')}, not {key}: rebuilding")
    t0 = time.perf_counter()
    model, gnorm = train_to_minimum(setting)
    log(f"{setting.name}: reference model, objective gradient norm {gnorm:.2e} ({time.perf_counter() - t0:.1f} s)")
    masks = torch.rand(k, setting.n_train, generator=torch.Generator().manual_seed(seed)) < alpha
    retrained, norms = [], []
    for i in range(k):
        sub, norm = train_to_minimum(setting, masks[i])
        with torch.no_grad():
            retrained.append(setting.loss(sub(setting.x_query), setting.y_query))
        norms.append(norm)
        if (i + 1) % 10 == 0:
            log(f"  retrained {i + 1}/{k} ({time.perf_counter() - t0:.0f} s, max gradient norm {max(norms):.1e})")
    out = GroundTruth(key=key, masks=masks, retrained=torch.stack(retrained), grad_norms=torch.tensor(norms),
                      w_star={k_: v.clone() for k_, v in model.state_dict().items()}, w_star_grad_norm=gnorm,
                      seconds=time.perf_counter() - t0)  # fmt: skip
    CACHE.mkdir(exist_ok=True)
    torch.save(dict(out), path)
    return out
