"""Command line: ``python -m bif_fast info`` (or ``bif-fast info``) reports versions and active backends."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bif-fast", description="bif_fast: local Bayesian influence functions")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print versions and which backend each op uses, and why")
    demo = sub.add_parser("demo", help="end-to-end BIF on a problem with a closed-form answer")
    demo.add_argument("--draws", type=int, default=20_000)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return _info()
    if args.command == "demo":
        from bif_fast.demo import run_demo

        res = run_demo(draws=args.draws, seed=args.seed)
        # The estimate must sit within a few Monte-Carlo standard errors of the closed form.
        if not res["rel_err"] <= 10 * res["mc_scale"]:
            print(f"FAILED: error {res['rel_err']:.2e} exceeds 10x the Monte-Carlo scale {res['mc_scale']:.1e}")
            return 1
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
