"""Command line (``bif-fast`` or ``python -m bif_fast``): ``info`` reports versions and active backends, ``demo``
runs the main job, ``run`` / ``report`` / ``top`` compute and read the BIF of a Hugging Face model over two
text files (``bif_fast.cli``)."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def _info() -> int:
    import torch

    import bif_fast
    from bif_fast import _backend, _ext

    print(f"bif_fast {bif_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    print(f"triton {triton_version}  TRITON_INTERPRET={'1' if _backend.triton_interpret() else '0'}")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch: {cuda}, {devices} CUDA device(s)")
    if _ext.HAS_EXT:
        print(f"bif_fast._C: loaded ({'with' if _ext.ext_has_cuda() else 'without'} CUDA kernels)")
    else:
        print(f"bif_fast._C: not available: {_ext.EXT_IMPORT_ERROR}")
    print("backend picked by 'auto':")
    for op, row in bif_fast.available_backends().items():
        print(f"  {op:<14} cpu: {row['cpu']}")
        print(f"  {'':<14} cuda: {row['cuda']}")
    return 0


def _linear_demo(seed: int) -> int:
    from bif_fast.demo import run_demo

    res = run_demo(seed=seed)
    # The estimate must sit within a few Monte-Carlo standard errors of the closed form.
    if not res["rel_err"] <= 10 * res["mc_scale"]:
        print(f"FAILED: error {res['rel_err']:.2e} exceeds 10x the Monte-Carlo scale {res['mc_scale']:.1e}")
        return 1
    return 0


def _read_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"bif-fast demo: {path} has no non-empty lines")
    return lines


def _demo(args: argparse.Namespace) -> int:
    import logging
    import warnings

    if args.linear:
        return _linear_demo(args.seed)
    if importlib.util.find_spec("transformers") is None:
        print("bif-fast demo: the language-model demo needs `transformers` (pip install transformers);")
        print("running the closed-form linear-regression check instead.\n")
        return _linear_demo(args.seed)
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from bif_fast.demo import run_lm_demo

    model = tokenize = None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

        def tokenize(texts):
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    summary = run_lm_demo(
        out_dir=args.out, model=model, train_texts=_read_lines(args.train_file),
        query_texts=_read_lines(args.query_file), tokenize=tokenize, num_chains=args.chains,
        num_draws=args.draws, train_steps=args.train_steps, seed=args.seed,
    )  # fmt: skip
    if all(summary["diverged"]):
        print("FAILED: every chain diverged")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bif-fast", description="bif_fast: local Bayesian influence functions")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print versions and which backend each op uses, and why")
    demo = sub.add_parser(
        "demo",
        help="per-token BIF of a tiny language model trained here (or your own), with an HTML report",
        description="Trains a byte-level GPT-NeoX on text that ships with Python (about a minute on CPU), "
        "computes the per-token BIF of its training passages on a few queries, prints the top proponents "
        "and writes a self-contained HTML report. --model/--train-file/--query-file run it on your own.",
    )
    demo.add_argument("--out", default="bif_fast_report", help="report folder (default: ./bif_fast_report)")
    demo.add_argument("--chains", type=int, help="chains (default: as calibrated)")
    demo.add_argument("--draws", type=int, help="draws per chain (default: as calibrated)")
    demo.add_argument("--train-steps", type=int, default=600, help="training steps of the tiny model")
    demo.add_argument("--model", help="a local Hugging Face causal-LM folder (with its tokenizer)")
    demo.add_argument("--train-file", help="training passages, one per line")
    demo.add_argument("--query-file", help="query texts, one per line")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--linear", action="store_true", help="the closed-form linear-regression check instead")
    from bif_fast import cli
    from bif_fast.result import BIFError

    cli.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return _info()
    if args.command == "demo":
        return _demo(args)
    commands = {"run": cli.run_command, "report": cli.report_command, "top": cli.top_command}
    if args.command in commands:
        try:
            return commands[args.command](args)
        except cli.CLIError as e:
            print(f"bif-fast {args.command}: {e}", file=sys.stderr)
            return 2
        except BIFError as e:  # the run itself failed (e.g. every chain diverged): said in one line, no output
            print(f"bif-fast {args.command}: {e}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
