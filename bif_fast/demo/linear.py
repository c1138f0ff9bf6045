"""``bif-fast demo --linear``: a BIF on a problem whose answer is known in closed form.

A linear regression with squared loss ``l_i(w) = ½ (x_iᵀ w - y_i)²`` trained to its least-squares
solution w* has a Gaussian local posterior ``N(w*, Σ)`` with ``Σ = (nbeta·H + γ I)⁻¹`` and
``H = XᵀX / n`` the Hessian of the mean loss. Writing ``r_i = x_iᵀ w* - y_i`` and
``s_ij = x_iᵀ Σ x_j``, the loss covariance, and so the BIF, is exact:

    Cov(l_i, l_j) = r_i r_j s_ij + s_ij² / 2,        BIF(i, j) = -Cov(l_i, l_j)

The demo draws exact posterior samples, streams the per-sample train and query losses into a
``RunningCrossCovariance`` k draws at a time, and compares the estimate with the closed form
(``bif-fast demo --linear``; the main job is the language-model demo in ``bif_fast.demo.lm``).
"""

from __future__ import annotations

import time

import torch

from bif_fast.ops import RunningCrossCovariance


def linear_gaussian_problem(
    n_train: int = 400, n_query: int = 12, dim: int = 8, nbeta: float = 50.0, localization: float = 1.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A trained linear regression and its exact local-posterior loss covariance (float64)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.randn(n_train + n_query, dim, generator=g, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n_train + n_query, generator=g, dtype=torch.float64)
    x_tr, y_tr = x[:n_train], y[:n_train]
    w_star = torch.linalg.lstsq(x_tr, y_tr.unsqueeze(1)).solution.squeeze(1)
    hessian = x_tr.T @ x_tr / n_train
    precision = nbeta * hessian + localization * torch.eye(dim, dtype=torch.float64)
    sigma = torch.linalg.inv(precision)
    resid = x @ w_star - y
    s = x[:n_train] @ sigma @ x[n_train:].T  # [n_train, n_query]
    cov = resid[:n_train, None] * resid[None, n_train:] * s + 0.5 * s.square()
    return {"x": x, "y": y, "w_star": w_star, "sigma": sigma, "cov": cov, "n_train": torch.tensor(n_train)}


def run_demo(draws: int = 20_000, k: int = 64, seed: int = 0, top: int = 3, quiet: bool = False) -> dict[str, float]:
    """Estimate the BIF of the linear-Gaussian problem from exact posterior draws.

    Returns:
        A dict with the relative error of the estimate, the Monte-Carlo scale of that error, and timings.
    """
    prob = linear_gaussian_problem(seed=seed)
    x, y, w_star = prob["x"], prob["y"], prob["w_star"]
    n_train = int(prob["n_train"])
    n_query = x.shape[0] - n_train
    chol = torch.linalg.cholesky(prob["sigma"])
    g = torch.Generator().manual_seed(seed + 1)
    acc = RunningCrossCovariance(n_train, n_query)
    t0 = time.perf_counter()
    done = 0
    while done < draws:
        kk = min(k, draws - done)
        w = w_star + torch.randn(kk, w_star.numel(), generator=g, dtype=torch.float64) @ chol.T  # [k, dim]
        losses = 0.5 * (w @ x.T - y).square()  # [k, n_train + n_query]
        acc.update(losses[:, :n_train], losses[:, n_train:])
        done += kk
    seconds = time.perf_counter() - t0
    bif = -acc.covariance()
    exact = -prob["cov"]
    rel_err = float((bif - exact).abs().max() / exact.abs().max())
    # Scale of the Monte-Carlo error of a covariance estimate: sqrt(var_x var_y / draws).
    mc_scale = float((acc.var_x[:, None] * acc.var_y[None, :]).sqrt().max() / draws**0.5 / exact.abs().max())
    if not quiet:
        print(f"bif_fast demo: exact-posterior BIF of a linear regression ({n_train} train, {n_query} query points)")
        print(f"  {draws} draws streamed {k} at a time into RunningCrossCovariance[{acc.backend}] in {seconds:.2f} s")
        print(f"  max |BIF - closed form| / max |closed form| = {rel_err:.3e}  (Monte-Carlo scale {mc_scale:.1e})")
        corr = -acc.correlation()
        print(f"  top {top} training points by normalised BIF (most negative = losses move together):")
        print(f"  {'query':>5}  {'train idx':>10} {'BIF_norm':>9} {'BIF':>11} {'exact BIF':>11}")
        for j in range(min(4, n_query)):
            idx = torch.argsort(corr[:, j])[:top]
            for r, i in enumerate(idx.tolist()):
                q = f"{j:>5}" if r == 0 else " " * 5
                print(f"  {q}  {i:>10} {corr[i, j]:9.3f} {bif[i, j]:11.4e} {exact[i, j]:11.4e}")
    return {"rel_err": rel_err, "mc_scale": mc_scale, "seconds": seconds}
