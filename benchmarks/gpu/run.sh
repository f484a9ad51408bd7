#!/usr/bin/env bash
# Issue 8 measurements on a lent GPU, in parts that each end well inside the 10-minute call limit.
# Each part prints its tables and also writes them to $OUT/<part>.txt (the device tool returns $OUT).
#
#   bash benchmarks/gpu/fetch_wheels.sh                     # here, once: monai + ignite wheels in .whl/
#   device run, carry [".whl"], command (a 15-minute lease: one call):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu/run.sh lease
#
# Parts: check (GPU facts + the CUDA-only tests), throughput (batch 32, all engine configurations),
# scale (larger batches for the best configurations), loader, inference (sliding window, LiTS bundle).
# lease: what matters for issue 8 in ONE call that ends by DEADLINE seconds (default 540), for a lease
# of 15 device minutes: facts, the first-convolution variants, a profile of the step, throughput at
# batch 64 for the compiled configurations with and without cuDNN autotuning and the GEMM weight
# gradient (next to a plain loop at bf16 + channels-last + compile), the loader (against the step
# rate just measured), inference; each step is cut by `timeout` so that a slow compile cannot eat
# the rest, and its output is in $OUT already. Run `check` (the CUDA-only tests, ~15 s) in the same
# call when time allows.
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
START=$SECONDS

left() {  # seconds left before DEADLINE, less a reserve $1 for the steps after this one
    echo $(( ${DEADLINE:-540} - (SECONDS - START) - ${1:-0} ))
}

capped() {  # capped NAME SECONDS COMMAND...: like part, killed after SECONDS (skipped when <= 10)
    local name=$1 secs=$2; shift 2
    if [ "$secs" -le 10 ]; then echo "=== $name: skipped, no time left" | tee -a "$OUT/$name.txt"; return; fi
    part "$name" timeout -k 10 "$secs" "$@"
}

best_rate() {  # the best patches/s among the rows printed so far (550 if none)
    "$PY" - "$OUT" <<'PYEOF'
import ast, pathlib, sys
best = 0.0
for f in pathlib.Path(sys.argv[1]).glob("*.txt"):
    for line in f.read_text().splitlines():
        if line.startswith("row: "):
            best = max(best, float(ast.literal_eval(line[5:]).get("patches/s") or 0.0))
print(f"{best:.1f}" if best else "550")
PYEOF
}

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
    SW_SIZE=(--volume 64 64 32 --width 0.125); B32=(2); BIG=(4); CONFIGS=fp32; BEST=fp32; LEASE_CONFIGS=fp32
    PF_SIZE=(--quick); FC_SIZE=(--quick); PLAIN=fp32
else
    DEV=(--device cuda); PT_SIZE=(--patch 64 64 32 --width 1 --iters 30 --warmup 8)
    LD_SIZE=(--volumes 32 --volume-shape 192 192 96 --batch 32 --batches 40 --workers 0 4 8)
    PF_SIZE=(--batch 32 --config bf16+cl+cudnn); FC_SIZE=(--batch 32 96)
    LEASE_CONFIGS=bf16+cl+compile,bf16+cl+cudnn+compile,bf16+cl+gemmwg+compile; PLAIN=bf16+cl+compile
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
    lease)
        part facts nvidia-smi -L
        part facts "$PY" -c "import torch, monai, ignite; print(torch.__version__, torch.version.cuda, monai.__version__, ignite.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
        capped first_conv 40 "$PY" benchmarks/first_conv.py "${DEV[@]}" "${FC_SIZE[@]}"
        capped profile 45 "$PY" benchmarks/profile_step.py "${DEV[@]}" "${PF_SIZE[@]}"
        cap=$(left 100)  # no configuration starts in the last 90 s of the cap: a compile takes ~60-90 s on an H100
        capped throughput "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" \
            --batch-sizes "${BIG[0]}" --configs "$LEASE_CONFIGS" --plain-config "$PLAIN" --time-budget "$(( cap > 100 ? cap - 90 : 10 ))" \
            --out "$OUT/throughput.md"
        rate=$(best_rate)
        capped loader 45 "$PY" benchmarks/loader_throughput.py "${DEV[@]}" "${LD_SIZE[@]}" --loaders dataloader \
            --pipelines loader,loader+device_distortion --step-rate "$rate"
        capped inference "$(( $(left 0) < 40 ? $(left 0) : 40 ))" "$PY" benchmarks/sliding_window.py "${DEV[@]}" \
            "${SW_SIZE[@]}" --sw-batch-sizes 16 ;;
    *)
        echo "unknown part '$what'; use check, throughput, scale, loader, inference, lease" >&2; status=2 ;;
    esac
done
exit $status
