#!/usr/bin/env bash
# One prepared GPU session (device tool): build the extension for the GPU, run the CUDA tests and the
# kernel benchmarks, and leave every log and CSV under $OUT. Run from the repository root:
#   bash benchmarks/gpu_check.sh            (the device tool sets $OUT)
# Budget: ~7 minutes on an H200; every step has its own timeout so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" | tee -a "$OUT/$name.log"; tail -n 25 "$OUT/$name.log"; }

{ nvidia-smi; python -c "import torch, triton, sys; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -n 3
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" BIF_FAST_BUILD_EXT=1 BIF_FAST_BUILD_CUDA=1
step build 300 pip install -e . --no-build-isolation -v
step info 60 python -m bif_fast info
# CUDA tests (real kernels on the GPU) plus the CPU suite with the extension required.
BIF_FAST_REQUIRE_EXT=1 step tests_cuda 300 python -m pytest -q -x -m cuda tests
step compile_check 120 python -m bif_fast.tools.compile_check --arch 90
step bench_sgld_update 300 python benchmarks/bench_sgld_update.py --device cuda --steps 20 --repeats 3
step bench_cross_entropy 300 python benchmarks/bench_cross_entropy.py --device cuda --repeats 3 --inner 5
step bench_running_cov 240 python benchmarks/bench_running_cov.py --device cuda --repeats 3
step bench_chain_batch 120 python benchmarks/bench_chain_batch.py --device cuda --repeats 3 --draws 50
step bench_full_batch_sampler 150 python benchmarks/bench_full_batch_sampler.py --device cuda --repeats 3 --draws 100
# Issue 12's scaling figures: Pythia-410M-shaped, bf16, per token, 400 x 150 training tokens x 18 queries.
step bench_pythia 240 python benchmarks/bench_distributed.py --pythia 410m --device cuda --draws 8
BIF_FAST_COV_FUSED=1 step bench_running_cov_fused 240 python benchmarks/bench_running_cov.py --device cuda --repeats 3 --providers bif_fast,devinterp-style
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
echo "results in $OUT"
