#!/usr/bin/env bash
# One command for a session lent a GPU for a few minutes: the GPU tests (pytest -m gpu), the MFU of
# the 1b preset (bf16, seq 2048) with the fused kernels, with PyTorch's own and with eager ones (speed
# and peak memory side by side), and the DDP step on NCCL with one rank. Each part writes
# OUT/<part>.json; the end is a markdown table to paste into BENCHMARKS.md (also OUT/summary.md).
#
#   bash benchmarks/gpu_suite.sh [OUT]            # GPU; OUT defaults to gpu_results/<date-time>
#   bash benchmarks/gpu_suite.sh --smoke [OUT]    # CPU, tiny sizes: checks the suite itself (< 2 min)
#   Z2ALL_GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh [OUT]
#
# Every part runs under `timeout` with the budget written beside it; the budgets add up to 460 s, so
# the whole suite ends within 8 minutes whatever hangs. A part that fails or times out is recorded
# (exit code, time, the tail of OUT/<part>.log) and the suite goes on. Run from a checkout with the
# test extras installed (pip install -e ".[test]"). Exit status: 0 when every part passed or was
# skipped, 1 otherwise; the table says which.
set -uo pipefail

smoke=${Z2ALL_GPU_SUITE_SMOKE:-0}
if [ "${1:-}" = "--smoke" ]; then
    smoke=1
    shift
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/gpu_results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
if compgen -G "$out/*.json" >/dev/null; then
    echo "gpu_suite.sh: error: $out already holds results: give a new folder" >&2
    exit 2
fi
cd "$repo" || exit 2

failed=0
record_flags=()
if [ "$smoke" = 1 ]; then
    record_flags=(--smoke)
fi

# run_part NAME BUDGET_S WHAT COMMAND...: COMMAND's stdout to OUT/NAME.stdout, stderr to OUT/NAME.log,
# then gpu_summary.py turns them into OUT/NAME.json.
run_part() {
    local name=$1 budget=$2 what=$3
    shift 3
    local start=$SECONDS rc=0
    echo "== $name (budget ${budget} s): $*" >&2
    timeout --kill-after=10 "$budget" "$@" >"$out/$name.stdout" 2>"$out/$name.log" || rc=$?
    python benchmarks/gpu_summary.py record "$out" "$name" --what "$what" --rc "$rc" \
        --seconds $((SECONDS - start)) --budget "$budget" "${record_flags[@]}" -- "$@" || failed=1
}

# Kernel sets for Z2ALL_KERNELS (z2all/model/kernels): the fused backends are "auto" (the best that
# imports here); "torch" is what a machine without flash-attn/apex/xformers/liger-kernel runs.
torch_kernels=attention=sdpa,rms_norm=torch,rotary=eager,swiglu=eager,cross_entropy=torch_chunked
eager_kernels=attention=eager,rms_norm=eager,rotary=eager,swiglu=eager,cross_entropy=eager

if [ "$smoke" = 1 ]; then
    mfu=(python benchmarks/bench_mfu.py --device cpu --preset tiny --seq 64 --batch 2 --vocab 512 --warmup 1 --steps 2)
    tests=(python -m pytest -q -p no:cacheprovider -m gpu tests/model/test_kernels.py)
    ddp=(python benchmarks/bench_ddp_step.py --device cpu --world-size 1 --layers 2 --width 64 --batch 8 --rounds 1 --steps 2)
    loop=(python benchmarks/bench_ddp_step.py --mode train_loop --device cpu --world-size 1 --rounds 1 --steps 3 --warmup 1 --seq 32)
    what_mfu="MFU step, tiny preset, seq 64, CPU (smoke)"
else
    mfu=(python benchmarks/bench_mfu.py --preset 1b --seq 2048)
    tests=(python -m pytest -q -p no:cacheprovider -m gpu)
    ddp=(python benchmarks/bench_ddp_step.py --device cuda --world-size 1)
    loop=(python benchmarks/bench_ddp_step.py --mode train_loop --device cuda --world-size 1)
    what_mfu="MFU, ~1B preset, seq 2048, bf16 autocast, micro-batch 4"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    fi
fi

run_part env 20 "machine: versions, devices, kernel libraries" python -m z2all.env --json
run_part gpu_tests 120 "GPU tests (pytest -m gpu)" "${tests[@]}" --junitxml="$out/gpu_tests.xml"
run_part mfu_fused 70 "$what_mfu, fused kernels (auto)" "${mfu[@]}"
run_part mfu_torch 60 "$what_mfu, PyTorch-only kernels" env Z2ALL_KERNELS="$torch_kernels" "${mfu[@]}"
run_part mfu_eager 70 "$what_mfu, eager kernels" env Z2ALL_KERNELS="$eager_kernels" "${mfu[@]}"
run_part ddp_mlp 45 "DDP step, residual MLP, 1 rank: z2all DDP vs torch DDP" "${ddp[@]}"
run_part ddp_train_loop 75 "training step, tiny preset, 1 rank: --ddp_impl=z2all vs torch" "${loop[@]}"

python benchmarks/gpu_summary.py table "$out" || failed=1
echo "gpu_suite.sh: ${SECONDS} s; results in $out" >&2
exit "$failed"
