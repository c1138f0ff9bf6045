"""``bif-fast demo``: an end-to-end BIF on a problem whose answer is known in closed form.

A linear regression with squared loss ``l_i(w) = ½ (x_iᵀ w - y_i)²`` trained to its least-squares
solution w* has a Gaussian local posterior ``N(w*, Σ)`` with ``Σ = (nbeta·H + γ I)⁻¹`` and
``H = XᵀX / n`` the Hessian of the mean loss. Writing ``r_i = x_iᵀ w* - y_i`` and
``s_ij = x_iᵀ Σ x_j``, the loss covariance, and so the BIF, is exact:

    Cov(l_i, l_j) = r_i r_j s_ij + s_ij² / 2,        BIF(i, j) = -Cov(l_i, l_j)

The demo draws exact posterior samples, streams the per-sample train and query losses into a
``RunningCrossCovariance`` k draws at a time, and compares the estimate with the closed form.
(Once ``compute_bif`` lands, the draws come from SGLD chains on a small language model instead.)
"""

from __future__ import annotations

import sys
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


# ----------------------------------------------------------------------------------------------
# The language-model demo: per-token BIF of a tiny GPT-NeoX trained here on text that ships with Python.
# ----------------------------------------------------------------------------------------------

DEMO_QUERIES = [
    "Simple is better than complex.",
    "Errors should never pass silently.",
    "Flat is better than dense.",
    "The module provides a simple interface.",
]


def demo_corpus(max_passages: int = 48, max_len: int = 64) -> list[str]:
    """Training passages from text every Python ships: the Zen of Python, then stdlib docstrings."""
    import codecs
    import contextlib
    import importlib
    import io
    import itertools

    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen on first import
        import this

    zen = codecs.decode(this.s, "rot13").splitlines()[2:]
    passages = [line.strip() for line in zen if line.strip()]
    names = ("json", "argparse", "csv", "logging", "random", "textwrap", "heapq", "bisect", "statistics",
             "fractions", "calendar", "difflib", "shutil", "string", "glob", "fnmatch", "queue", "sched")  # fmt: skip
    for module in (importlib.import_module(n) for n in names):
        text = " ".join((module.__doc__ or "").split())
        for sentence in text.replace(";", ".").split(". "):
            sentence = sentence.strip().rstrip(".") + "."
            prose = sum(ch.isalpha() or ch in " ,.'-" for ch in sentence) >= 0.95 * len(sentence)
            if 16 <= len(sentence) <= max_len and prose and sentence[0].isupper():
                passages.append(sentence)
    seen: dict[str, None] = {}
    for p in passages:
        seen.setdefault(p[:max_len], None)
    return list(itertools.islice(seen, max_passages))


def encode_bytes(texts: list[str], max_len: int = 64) -> dict[str, torch.Tensor]:
    """Byte-level tokens (ids 0..255), right-padded, with an attention mask."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    mask = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, t in enumerate(texts):
        b = list(t.encode("utf-8")[:max_len])
        ids[i, : len(b)] = torch.tensor(b)
        mask[i, : len(b)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, enc: dict[str, torch.Tensor]):
        self.enc = enc

    def __len__(self) -> int:
        return self.enc["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.enc.items()}


def train_tiny_lm(texts: list[str], *, steps: int = 600, seed: int = 0, log: bool = True):
    """A 2-layer byte-level GPT-NeoX, trained from scratch on ``texts`` (about a minute on 2 CPU cores)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config)
    enc = encode_bytes(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(texts), (16,), generator=g)
        ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 150 == 0 or step == steps - 1):
            print(f"  train step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def run_lm_demo(
    *,
    out_dir: str = "bif_fast_report",
    model=None,
    train_texts: list[str] | None = None,
    query_texts: list[str] | None = None,
    tokenize=None,
    num_chains: int = 2,
    num_draws: int = 100,
    train_steps: int = 600,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Train (or take) a causal LM, compute the per-token BIF of its training passages on the queries,
    print a top-k table and write a self-contained HTML report. Returns a summary dict."""
    from bif_fast.api import compute_bif
    from bif_fast.config import BIFConfig, SGLDConfig
    from bif_fast.losses import causal_lm
    from bif_fast.report import write_report

    say = (lambda *a: None) if quiet else print
    train_texts = train_texts or demo_corpus()
    query_texts = query_texts or DEMO_QUERIES
    tokenize = tokenize or encode_bytes
    t0 = time.perf_counter()
    if model is None:
        say(f"bif_fast demo: training a byte-level GPT-NeoX on {len(train_texts)} passages of Python's own text")
        model = train_tiny_lm(train_texts, steps=train_steps, seed=seed, log=not quiet)
    t_train = time.perf_counter() - t0
    train = _DictDataset(tokenize(train_texts))
    query = _DictDataset(tokenize(query_texts))
    n_tokens = int(train.enc["attention_mask"][:, 1:].sum())
    # The paper's language-model setting: RMSprop-SGLD on the attention weights only.
    params = [p for n, p in model.named_parameters() if "attention" in n]
    cfg = BIFConfig(
        sgld=SGLDConfig(lr=1e-4, nbeta=float(n_tokens), localization=300.0, precondition="rmsprop"),
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=20, num_steps_bw_draws=2,
        batch_size=16, eval_batch_size=64, seed=seed, progress=not quiet and sys.stderr.isatty(),
    )  # fmt: skip
    say(f"computing the per-token BIF: {num_chains} chains x {num_draws} draws, RMSprop-SGLD on attention weights")
    t1 = time.perf_counter()
    res = compute_bif(model, train, query, loss_fn=causal_lm(model), config=cfg, per_token=True, params=params)
    t_bif = time.perf_counter() - t1
    path = write_report(res, train_texts, query_texts, out_dir)
    summary = _print_topk(res, train_texts, query_texts, say)
    summary.update(seconds_train=t_train, seconds_bif=t_bif, report=str(path), n_train_tokens=res.bif.shape[0],
                   n_query_tokens=res.bif.shape[1], diverged=res.diagnostics["diverged"])  # fmt: skip
    say(f"report: {path}   (train {t_train:.0f} s, BIF {t_bif:.0f} s, {res.bif.shape[0]} x {res.bif.shape[1]} tokens)")
    return summary


def passage_scores(res, n_train: int, n_query: int) -> torch.Tensor:
    """`[n_train_passages, n_query]`: the normalised per-token BIF averaged over each passage's and each
    query's token pairs (negative = the passage's losses move with the query's: a proponent). The mean,
    not the sum, so long passages are not favoured for their length."""
    rows = res.train_index[:, 0]
    cols = res.query_index[:, 0]
    m = res.bif_normalized.double().cpu()
    by_row = torch.zeros(n_train, m.shape[1], dtype=m.dtype).index_add_(0, rows, m)
    total = torch.zeros(n_train, n_query, dtype=m.dtype).index_add_(1, cols, by_row)
    n_rows = torch.bincount(rows, minlength=n_train).clamp_min(1).double()
    n_cols = torch.bincount(cols, minlength=n_query).clamp_min(1).double()
    return total / n_rows[:, None] / n_cols[None, :]


def _print_topk(res, train_texts, query_texts, say, k: int = 3) -> dict:
    scores = passage_scores(res, len(train_texts), len(query_texts))
    hits = 0
    for j, q in enumerate(query_texts):
        order = torch.argsort(scores[:, j])[:k]  # most negative first: proponents
        say(f"\nquery {j}: {q!r}")
        for rank, i in enumerate(order.tolist()):
            say(f"  {rank + 1}. {scores[i, j]:+.3f}  {train_texts[i]!r}")
        hits += int(q in train_texts and train_texts[int(order[0])] == q)
    return {"top1_exact_matches": hits, "scores": scores}
