"""Compile-only check of the Triton kernels for a GPU target, with no GPU present.

    TRITON_INTERPRET=0 python -m bif_fast.tools.compile_check [--arch 90]

Lowers every kernel of ``bif_fast/kernels/`` to PTX and cubin for the target (default sm_90, the H200),
which catches codegen errors the CPU interpreter cannot see. Prints one line per kernel and exits
non-zero on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from bif_fast._backend import triton_interpret

# (name, @triton.jit kernel, signature: argument -> Triton type, constexprs: name -> value, num_warps)
Case = tuple[str, Any, dict[str, str], dict[str, Any], int]


def _targets(arch: int) -> Any:
    """The ``GPUTarget`` of an NVIDIA architecture such as 90 (sm_90), warp size 32."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _sgld_cases() -> Iterator[Case]:
    from bif_fast.kernels import sgld_update as k
    from bif_fast.reference.sgld_update import SAMPLER_CODES

    scalars = {n: "fp32" for n in (
        "half_lr", "lr", "nbeta", "localization", "weight_decay", "noise_level", "noise_scale", "alpha",
        "one_minus_alpha", "eps", "kick", "fric_c", "fric_noise", "bbox",
    )}  # fmt: skip
    for sampler in sorted(set(SAMPLER_CODES.values())):
        for out_dtype, g_dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
            sig = {
                "w_ptr": "*fp32", "g_ptr": f"*{g_dtype}", "a_ptr": f"*{out_dtype}", "s_ptr": "*fp32",
                "noise_ptr": "*fp32", "out_ptr": f"*{out_dtype}", "flag_ptr": "*i32",
                "numel": "i64", "offset": "i64", "seed": "i64", "chain": "i64", "step": "i64", **scalars,
            }  # fmt: skip
            consts = {"SAMPLER": sampler, "HAS_NOISE": False, "HAS_OUT": out_dtype != "fp32", "HAS_BBOX": sampler == 0,
                      "BLOCK_G": 256}  # fmt: skip
            yield f"sgld_update[sampler={sampler},{out_dtype}]", k._sgld_update_fwd_kernel, sig, consts, 4
    sig = {"out_ptr": "*fp32", "numel": "i64", "offset": "i64", "seed": "i64", "chain": "i64", "step": "i64"}
    yield "philox_normal", k._philox_normal_kernel, sig, {"BLOCK_G": 256}, 4


def _ce_cases() -> Iterator[Case]:
    from bif_fast.kernels import cross_entropy as k

    for dtype in ("bf16", "fp16", "fp32"):
        sig = {
            "h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "t_ptr": "*i64", "loss_ptr": "*fp32",
            "lse_ptr": "*fp32", "N": "i64", "V": "i64", "H": "i64", "stride_hn": "i64", "stride_wv": "i64",
            "ignore_index": "i64",
        }  # fmt: skip
        consts = {"HAS_BIAS": True, "UPCAST": dtype == "fp32", "BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}
        yield f"per_token_ce[{dtype}]", k._per_token_ce_fwd_kernel, sig, consts, 8
        sig = {"z_ptr": f"*{dtype}", "t_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i64", "V": "i64",
               "stride_zn": "i64", "ignore_index": "i64"}  # fmt: skip
        yield f"ce_from_logits[{dtype}]", k._ce_from_logits_fwd_kernel, sig, {"BLOCK_N": 4, "BLOCK_V": 1024}, 4


def _compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], target: Any, num_warps: int = 4) -> Any:
    import triton
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if triton_interpret():
        print("TRITON_INTERPRET=1 is set: compile checks need the real compiler; unset it", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    target = _targets(args.arch)
    failures = 0
    cases = [*_sgld_cases(), *_ce_cases()]
    for name, fn, sig, consts, warps in cases:
        try:
            kernel = _compile(fn, sig, consts, target, warps)
            size = len(kernel.asm.get("cubin", b""))
            print(f"{name}: sm_{args.arch} OK (cubin {size} bytes)")
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"{name}: sm_{args.arch} FAILED: {exc!r}"[:2000])
    if failures == 0:
        print(f"all kernels: sm_{args.arch} OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
