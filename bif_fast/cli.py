"""``bif-fast run | report | top``: the BIF of a local Hugging Face causal LM over two text files.

``run`` loads a model folder (with its tokenizer), reads the training and query examples (one per line, or
JSON Lines with a ``text`` field), computes the BIF (per sequence, or per token with ``--per-token``) with
the calibrated defaults or a JSON / YAML file of ``BIFConfig`` fields, and writes ``--out DIR``: the result
as ``BIFResult.save`` writes it, ``texts.json`` (the examples and their tokens) and ``index.html`` (the
report). The folder is built under a temporary name and renamed when complete, so a failed run leaves
nothing. ``report DIR`` renders the report of a saved run again; ``top DIR --query I`` prints a query's
top and bottom training examples.

Scores are printed as the posterior correlation of the losses, ``-bif_normalized``: positive for a
proponent (a training example whose loss moves with the query's, so that upweighting it lowers the query's
loss), negative for an opponent.

Bad input (a missing or empty file, a model folder without a tokenizer, an unknown config field, a pattern
that selects no weight) raises ``CLIError``; the command line prints its one-line message and exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "add_commands", "read_examples", "run_command"]

TEXTS_FILE = "texts.json"
# What a Hugging Face folder holds its tokenizer in (fast, BPE, SentencePiece and WordPiece kinds); without one
# AutoTokenizer may still build something from the model's config that cannot encode the texts.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt")


class CLIError(Exception):
    """A problem with what the command was given, reported as one line (exit code 2)."""


def add_commands(sub: Any) -> None:
    """The ``run``, ``report`` and ``top`` subcommands, added to ``sub`` (what ``add_subparsers`` returns)."""
    run = sub.add_parser("run", help="the BIF of a local Hugging Face causal LM over a training and a query file",
                         description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder with its tokenizer")
    run.add_argument("--train", required=True, help="training examples: one per line, or JSON Lines with 'text'")
    run.add_argument("--query", required=True, help="query examples, in the same format")
    run.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    run.add_argument("--per-token", action="store_true", help="a token x token BIF (default: per sequence)")
    run.add_argument("--config", help="a JSON or YAML file of BIFConfig fields (default: calibrated defaults)")
    run.add_argument("--params", help="sample only the weights whose names match these comma-separated glob "
                                      "patterns, e.g. '*attention*,*mlp*' (default: every weight)")
    run.add_argument("--budget", type=float, default=30.0, help="seconds for calibration and sampling together "
                                                                   "when there is no --config (default 30)")
    run.add_argument("--max-length", type=int, default=256, help="tokens per example, longer ones are cut")
    run.add_argument("--device", help="where the model runs (default: cuda if there is a GPU, else cpu)")
    run.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                     help="the weights' dtype (auto: as saved in the folder; default float32)")
    run.add_argument("-k", type=int, default=3, help="training examples printed per query (default 3)")
    report = sub.add_parser("report", help="render the HTML report of a saved run again")
    report.add_argument("dir", help="a folder written by `bif-fast run`")
    top = sub.add_parser("top", help="print a query's top and bottom training examples from a saved run")
    top.add_argument("dir", help="a folder written by `bif-fast run`")
    top.add_argument("--query", type=int, required=True, help="query index (0-based)")
    top.add_argument("-k", type=int, default=5, help="examples of each kind (default 5)")


def read_examples(path: str, what: str) -> list[str]:
    """The examples of a text file: one per non-empty line, or (``.jsonl``, or every line a JSON object) the
    ``text`` field of each line.

    Raises:
        CLIError: the file is missing, unreadable, empty, or a JSON line has no string ``text``.
    """
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--{what} {path}: no such file")
    try:
        lines = [line.rstrip("\n\r") for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--{what} {path}: cannot read it as UTF-8 text ({e})") from e
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise CLIError(f"--{what} {path}: no examples (the file is empty)")
    if p.suffix != ".jsonl" and not all(line.lstrip().startswith("{") for _, line in numbered):
        return [line for _, line in numbered]
    out = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"--{what} {path}: line {number} is not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CLIError(f"--{what} {path}: line {number} has no string 'text' field")
        out.append(record["text"])
    return out


def _read_config(path: str | None):
    from bif_fast.config import BIFConfig

    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            fields = yaml.safe_load(p.read_text(encoding="utf-8"))
        else:
            fields = json.loads(p.read_text(encoding="utf-8"))
    except ImportError as e:
        raise CLIError(f"--config {path}: a YAML config needs PyYAML (pip install pyyaml), or use JSON") from e
    except Exception as e:
        raise CLIError(f"--config {path}: cannot parse it ({type(e).__name__}: {e})") from e
    if not isinstance(fields, dict):
        raise CLIError(f"--config {path}: expected a mapping of BIFConfig fields, got {type(fields).__name__}")
    try:
        return BIFConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--config {path}: {e}") from e


def _load_model(folder: str, dtype: str = "float32", device: str | None = None):
    p = Path(folder)
    if not (p / "config.json").is_file():
        raise CLIError(f"--model {folder}: not a Hugging Face model folder (no config.json)")
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", module="transformers")
    hf_logging.set_verbosity_error()  # its load-time progress bars and notices would bury our one-line errors
    hf_logging.disable_progress_bar()
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise CLIError(f"--model {folder}: no usable tokenizer in the folder (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CLIError(f"--model {folder}: no usable tokenizer in the folder ({type(e).__name__})") from e
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch_dtype).eval()
    except Exception as e:
        raise CLIError(f"--model {folder}: cannot load the model ({type(e).__name__}: {e})") from e
    try:
        model = model.to(device)
    except Exception as e:
        raise CLIError(f"--device {device}: cannot put the model there ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"--model {folder}: the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _select_params(model, patterns: str | None) -> list | None:
    """The weights whose names match one of the comma-separated glob ``patterns`` (None: every weight)."""
    if patterns is None:
        return None
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    named = list(model.named_parameters())
    chosen = [p for name, p in named if any(fnmatch.fnmatchcase(name, w) for w in wanted)]
    if not chosen:
        examples = ", ".join(name for name, _ in named[:4])
        raise CLIError(f"--params {patterns!r} selects no weight (names look like: {examples}, ...)")
    return chosen


def _encode(tokenizer, texts: list[str], max_length: int):
    """``TensorDataset(input_ids, attention_mask)`` of ``texts`` and each example's tokens as strings."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] < 2:
        raise CLIError("every example is a single token: a causal LM's loss needs at least two")
    kept = [[t for t, m in zip(row.tolist(), mrow.tolist(), strict=True) if m] for row, mrow in zip(ids, mask,
                                                                                                   strict=True)]
    flat = iter(tokenizer.batch_decode([[t] for row in kept for t in row]))  # one call: a fast tokenizer's loop
    pieces = [[next(flat) for _ in row] for row in kept]
    return torch.utils.data.TensorDataset(ids, mask), pieces


class _SequenceLoss:
    """Per-sequence loss: the mean next-token NLL over a sequence's positions that count."""

    def __init__(self, token_loss):
        self.token_loss = token_loss

    def __call__(self, model, batch):
        out = self.token_loss(model, batch)
        mask = self.token_loss.loss_mask(batch).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp_min(1)


def _fresh_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {path}: exists and is not an empty folder (nothing was overwritten)")
    return out


def run_command(args: argparse.Namespace) -> int:
    """``bif-fast run``: see the module docstring."""
    import bif_fast
    from bif_fast.losses import causal_lm

    out = _fresh_out(args.out)
    train_texts, query_texts = read_examples(args.train, "train"), read_examples(args.query, "query")
    config = _read_config(args.config)
    model, tokenizer = _load_model(args.model, args.dtype, args.device)
    params = _select_params(model, args.params)
    train, train_tokens = _encode(tokenizer, train_texts, args.max_length)
    query, query_tokens = _encode(tokenizer, query_texts, args.max_length)
    token_loss = causal_lm(model)
    loss_fn = token_loss if args.per_token else _SequenceLoss(token_loss)
    kind = "per token" if args.per_token else "per sequence"
    print(f"bif-fast: {len(train_texts)} training and {len(query_texts)} query examples, {kind}", file=sys.stderr)
    if config is None:
        print("bif-fast: calibrating the sampler (no --config)", file=sys.stderr)
        config = bif_fast.calibrate(model, train, query, loss_fn=loss_fn, per_token=args.per_token, params=params,
                                    budget_seconds=args.budget)  # fmt: skip
    config = dataclasses.replace(config, progress=True)
    res = bif_fast.compute_bif(model, train, query, loss_fn=loss_fn, config=config, per_token=args.per_token,
                               params=params)  # fmt: skip
    texts = {"train": train_texts, "query": query_texts, "train_tokens": train_tokens, "query_tokens": query_tokens,
             "per_token": args.per_token, "model": str(args.model)}  # fmt: skip
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        res.save(tmp)
        (tmp / TEXTS_FILE).write_text(json.dumps(texts))
        _write_report(res, texts, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for j in range(len(query_texts)):
        _print_top(res, texts, j, args.k, bottom=False)
    print(f"bif-fast: wrote {out} (open {out / 'index.html'}); diverged chains: "
          f"{sum(res.diagnostics.get('diverged', []))}", file=sys.stderr)  # fmt: skip
    return 0


def _write_report(res, texts: dict[str, Any], folder: Path) -> Path:
    from bif_fast.report import write_report

    if texts["per_token"]:
        return write_report(res, texts["train_tokens"], texts["query_tokens"], folder)
    return write_report(res, texts["train"], texts["query"], folder)


def _load_saved(folder: str):
    from bif_fast.result import BIFResult

    p = Path(folder)
    if not (p / TEXTS_FILE).is_file():
        raise CLIError(f"{folder}: not a folder written by `bif-fast run` (no {TEXTS_FILE})")
    try:
        texts = json.loads((p / TEXTS_FILE).read_text(encoding="utf-8"))
        res = BIFResult.load(p)
    except Exception as e:
        raise CLIError(f"{folder}: the saved run is damaged ({type(e).__name__}: {e})") from e
    return res, texts


def sequence_scores(res) -> Any:
    """``[n_train, n_query]`` posterior correlations per example (per token: the mean over its token pairs)."""
    if res.train_index is None:
        return -res.bif_normalized.double().cpu()
    return -res.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean").double().cpu()


def _print_top(res, texts: dict[str, Any], j: int, k: int, *, bottom: bool) -> None:
    import torch

    scores = sequence_scores(res)[:, j]
    k = min(k, scores.numel())
    print(f"query {j}: {_clip(texts['query'][j])}")
    kinds = [("proponents", True)] + ([("opponents", False)] if bottom else [])
    for label, largest in kinds:
        values, rows = torch.topk(scores, k, largest=largest)
        print(f"  {label} (posterior correlation):")
        for v, i in zip(values.tolist(), rows.tolist(), strict=True):
            print(f"    {v:+.3f}  [{i}] {_clip(texts['train'][i])}")


def _clip(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def report_command(args: argparse.Namespace) -> int:
    res, texts = _load_saved(args.dir)
    print(f"bif-fast: wrote {_write_report(res, texts, Path(args.dir))}")
    return 0


def top_command(args: argparse.Namespace) -> int:
    res, texts = _load_saved(args.dir)
    if not 0 <= args.query < len(texts["query"]):
        raise CLIError(f"--query {args.query}: the run has queries 0..{len(texts['query']) - 1}")
    if args.k < 1:
        raise CLIError(f"-k {args.k}: must be at least 1")
    _print_top(res, texts, args.query, args.k, bottom=True)
    return 0
