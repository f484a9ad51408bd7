#!/usr/bin/env bash
# Issue 8 measurements on a lent GPU, in parts that each end well inside the 10-minute call limit.
# Each part prints its tables and also writes them to $OUT/<part>.txt (the device tool returns $OUT).
#
#   bash benchmarks/gpu/fetch_wheels.sh                     # here, once: monai + ignite wheels in .whl/
#   device run, carry [".whl"], command:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu/run.sh check throughput
#   then:  ... bash benchmarks/gpu/run.sh scale      and   ... bash benchmarks/gpu/run.sh loader inference
#
# Parts: check (GPU facts + the CUDA-only tests), throughput (batch 32, all engine configurations),
# scale (larger batches for the best configurations), loader, inference (sliding window, LiTS bundle).
# QUICK=1 runs every part at toy sizes on the CPU (a dry run of this script, used in tests).
# BUDGET=seconds: no new configuration starts after that many seconds of a throughput/scale part
# (defaults 300 / 360, so that `check throughput` fits one 10-minute call).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/dira3d_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
PY="${PYTHON:-python3}"
status=0

part() {  # part NAME COMMAND...: run, tee into $OUT/NAME.txt, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$OUT/$name.txt"
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name exited with $rc" | tee -a "$OUT/$name.txt"; status=1; }
}

if [ "${QUICK:-0}" = 1 ]; then
    DEV=(--device cpu); PT_SIZE=(--patch 16 16 8 --width 0.125 --iters 2 --warmup 1 --num-classes 4 --matmul-size 256)
    LD_SIZE=(--volumes 2 --volume-shape 32 32 16 --patch 16 16 8 --batch 2 --batches 2 --workers 0)
    SW_SIZE=(--volume 64 64 32 --width 0.125); B32=(2); BIG=(4); CONFIGS=fp32; BEST=fp32
else
    DEV=(--device cuda); PT_SIZE=(--patch 64 64 32 --width 1 --iters 30 --warmup 8)
    LD_SIZE=(--volumes 32 --volume-shape 192 192 96 --batch 32 --batches 40 --workers 0 4 8)
    SW_SIZE=(--volume 512 512 300); B32=(32); BIG=(64 96)
    CONFIGS=fp32,bf16,bf16+cl,bf16+cl+cudnn,bf16+cl+cudnn+compile
    BEST=bf16+cl+cudnn,bf16+cl+cudnn+compile
fi

for what in "$@"; do
    case $what in
    check)
        part check nvidia-smi
        part check "$PY" -c "import torch, monai, ignite; print(torch.__version__, torch.version.cuda, monai.__version__, ignite.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
        part check "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu or compile or stall" \
            tests/test_engine_performance.py tests/test_transforms_static.py tests/test_transforms.py ;;
    throughput)
        part throughput "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" --batch-sizes "${B32[@]}" \
            --configs "$CONFIGS" --time-budget "${BUDGET:-300}" --out "$OUT/throughput.md" ;;
    scale)
        part scale "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" --batch-sizes "${BIG[@]}" \
            --configs "$BEST" --no-plain --time-budget "${BUDGET:-360}" --out "$OUT/scale.md" ;;
    loader)
        part loader "$PY" benchmarks/loader_throughput.py "${DEV[@]}" "${LD_SIZE[@]}" ;;
    inference)
        part inference "$PY" benchmarks/sliding_window.py "${DEV[@]}" "${SW_SIZE[@]}" --sw-batch-sizes 4 16 ;;
    *)
        echo "unknown part '$what'; use check, throughput, scale, loader, inference" >&2; status=2 ;;
    esac
done
exit $status
