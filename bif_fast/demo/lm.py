"""``bif-fast demo``: the per-token BIF of a tiny GPT-NeoX trained here on text that ships with Python.

The model is trained from scratch on the Zen of Python and stdlib docstrings; the per-token BIF of its
training passages on a few queries is printed as a top-k table and written as an HTML report.
"""

from __future__ import annotations

import dataclasses
import time

import torch

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
    config=None,
    num_chains: int | None = None,
    num_draws: int | None = None,
    train_steps: int = 600,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Train (or take) a causal LM, compute the per-token BIF of its training passages on the queries (attention
    weights sampled, as in the paper's language-model runs), print a top-k table and write a self-contained
    HTML report. Returns a summary dict.

    The sampler settings are ``compute_bif``'s calibrated defaults (``config=None``); ``num_chains`` /
    ``num_draws`` override the calibrated run's length, and an explicit ``config`` is used as given."""
    from bif_fast.api import compute_bif
    from bif_fast.calibration import calibrate
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
    loss_fn = causal_lm(model)
    params = [p for n, p in model.named_parameters() if "attention" in n]
    t1 = time.perf_counter()
    if config is None and (num_chains is not None or num_draws is not None):
        config = calibrate(model, train, query, loss_fn=loss_fn, per_token=True, params=params, seed=seed)
        config = dataclasses.replace(config, num_chains=num_chains or config.num_chains,
                                     num_draws=num_draws or config.num_draws, time_limit=None)  # fmt: skip
    how = "calibrated settings (bif_fast.calibrate)" if config is None or config.calibration else "the given config"
    say(f"computing the per-token BIF of the attention weights with {how}")
    res = compute_bif(model, train, query, loss_fn=loss_fn, config=config, per_token=True, params=params)
    t_bif = time.perf_counter() - t1
    _say_calibration(res, say)
    path = write_report(res, train_texts, query_texts, out_dir)
    summary = _print_topk(res, train_texts, query_texts, say)
    summary.update(seconds_train=t_train, seconds_bif=t_bif, report=str(path), n_train_tokens=res.bif.shape[0],
                   n_query_tokens=res.bif.shape[1], diverged=res.diagnostics["diverged"])  # fmt: skip
    say(f"report: {path}   (train {t_train:.0f} s, BIF {t_bif:.0f} s, {res.bif.shape[0]} x {res.bif.shape[1]} tokens)")
    return summary


def _say_calibration(res, say) -> None:
    cal = res.diagnostics.get("calibration")
    if not cal:
        return
    sgld, cfg = res.config.sgld, res.config
    why = "" if cal["damping"].get("probe_informative", True) else " (the re-fit probe could not tell the " \
        "candidates apart: the largest damping, the least Monte-Carlo noise)"
    say(f"calibrated in {cal['seconds']:.0f} s: BAOAB with a rank-{cal['sampler']['mass_rank']} curvature mass, "
        f"nbeta {sgld.nbeta:.3g}, damping {cal['damping']['value']:.3g}{why}, step {sgld.lr:.3g}, "
        f"{cfg.num_chains} chains x {cfg.num_draws} draws")  # fmt: skip


def passage_scores(res) -> torch.Tensor:
    """`[n_train_passages, n_query]`: the normalised per-token BIF averaged over each passage's and each
    query's token pairs (negative = the passage's losses move with the query's: a proponent)."""
    return res.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean").double().cpu()


def _print_topk(res, train_texts, query_texts, say, k: int = 3) -> dict:
    scores = passage_scores(res)
    hits = 0
    for j, q in enumerate(query_texts):
        order = torch.argsort(scores[:, j])[:k]  # most negative first: proponents
        say(f"\nquery {j}: {q!r}  (top proponents, posterior correlation = -normalised BIF)")
        for rank, i in enumerate(order.tolist()):
            say(f"  {rank + 1}. {-scores[i, j]:+.3f}  {train_texts[i]!r}")
        hits += int(q in train_texts and train_texts[int(order[0])] == q)
    return {"top1_exact_matches": hits, "scores": scores}
