#!/usr/bin/env bash
# Issue 8 measurements on a lent GPU, in parts that each end well inside the 10-minute call limit.
# Each part prints its tables and also writes them to $OUT/<part>.txt (the device tool returns $OUT).
#
#   bash benchmarks/gpu/fetch_wheels.sh                     # here, once: monai + ignite wheels in .whl/
#   device run, carry [".whl"], command (a 15-minute lease: one call):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && DEADLINE=540 bash benchmarks/gpu/run.sh lease
#
# Parts: check (GPU facts + the CUDA-only tests), throughput (batch 32, all engine configurations),
# scale (larger batches for the best configurations), loader, inference (sliding window, LiTS bundle),
# first_conv (the 1-channel layers per variant), layers (every convolution of the model, timed alone).
# lease: what matters for issue 8 in ONE call that ends by DEADLINE seconds (default 540), for a lease
# of 15 device minutes, most important first; each step is cut by `timeout` so that a slow compile
# cannot eat the rest, and its output is in $OUT already:
#   facts; the CUDA tests of the layer options against cuDNN;
#   ab: compiled A/B at batch 64 in one process, the bundle's performance.json setting
#       (bf16+cl+gemmwg+splitcat+compile since the third lease) against the same with gemmhead and
#       prefetch (each within the spread on 2026-11-26; together once more);
#   profile: the fastest A/B row, compiled, with aten::copy_ per input shape and its callers: where the
#       153 ms step goes after splitcat (its 60 s cap was too short for a fresh process on the third
#       lease; now up to 150 s);
#   scale: the fastest row at batch 8 (the bundle's default batch_size, the patent's), 16 and 96 (426/s at 96 on
#       the third lease);
#   plain: the plain PyTorch loop at bf16 + channels-last + compile, if time is left.
# followup: the per-layer convolution table (conv_layers.py), batch 64 vs 128, and inductor's
# max-autotune (the second call of 2026-11-26; its figures are in docs/benchmarks.md).
# The loader, inference and first_conv were measured on 2026-11-26 and are separate parts now.
# verify (the fourth lease, 2026-11-28; DEADLINE as for lease): facts; the CUDA tests (-k on_cuda ...); the figure of
#   performance.json's configuration at batch 64 (a regression check against 417-418); the pretraining bundle end to
#   end with a resume (benchmarks/gpu/bundle_run.py on the visual-word folder WORDS, default .gpu_e2e/vw when it
#   exists, else a synthetic one; carry it); the profile of that configuration with the callers of aten::copy_.
# finetune (for the next lease, not run on a GPU yet; cut at FT_CAP seconds, default 420): the LiTS and LUNA16
#   fine-tuning bundles end to end on CUDA (benchmarks/gpu/finetune_run.py: synthetic LiTS-layout data it writes itself
#   with numpy + nibabel, the default network for 2 epochs, the same command to 3 epochs (refused: fine-tuning has no
#   resume), that rerun with --overwrite from a pretrained checkpoint, batch inference with inference.json on raw test
#   scans; then luna16_nodule_fpr on candidate cubes, 2 epochs, and its inference.json on the test cubes; checks exit
#   codes, metrics.json, TensorBoard, the predictions). The checkpoint is PRETRAINED, default the
#   best.pt of `verify`'s pretraining run when this call ran it first (/tmp/dira3d_bundle_run/run/models/best.pt),
#   else a stand-in of that form; the run folder is FT_RUN (default /tmp/dira3d_finetune_run), its logs go to $OUT.
#   Needs no SimpleITK (inference then reads NIfTI with MONAI's NibabelReader) nor fire (monai.bundle.run is then called
#   without `python -m monai.bundle`'s command line); the output says so.
# kind (a first call on a kind of GPU not measured before: the H200, 2026-11-28; DEADLINE as for lease): facts; the CUDA
#   tests; performance.json's configuration at batch 64 and 96 (the H100's 414-418 and 426); then `finetune` with the
#   time left (FT_CAP seconds are kept for it, default 240).
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

fastest() {  # fastest FILE BASE: the config of FILE's fastest row (BASE when it has none)
    "$PY" - "$1" "$2" <<'PYEOF'
import ast, pathlib, sys
path, base = pathlib.Path(sys.argv[1]), sys.argv[2]
rates = {}
if path.exists():
    for line in path.read_text().splitlines():
        if line.startswith("row: "):
            try:
                row = ast.literal_eval(line[5:])
                rates[row["config"]] = float(row.get("patches/s") or 0.0)
            except (ValueError, SyntaxError, KeyError, TypeError):  # a row cut short: not a result
                continue
print(max(rates, key=rates.get) if rates and max(rates.values()) > 0 else base)
PYEOF
}

part() {  # part NAME COMMAND...: run, tee into $OUT/NAME.txt, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$OUT/$name.txt"
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name exited with $rc" | tee -a "$OUT/$name.txt"; status=1; }
}

facts_and_cuda_tests() {  # what the machine is, and the tests that only run on CUDA (-k on_cuda ...)
    part facts nvidia-smi -L
    part facts "$PY" -c "import torch, monai, ignite; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), monai.__version__, ignite.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
    capped cuda_tests 100 "$PY" -m pytest -q -p no:cacheprovider -k "on_cuda or cuda_matches_cpu or cuda_step_runs" \
        tests/test_image_convs.py tests/test_engine_prefetch.py tests/test_transforms_static.py tests/test_transforms.py \
        tests/test_engine_performance.py tests/test_engine_reference.py tests/test_checkpoint.py \
        tests/test_on_cuda_paths.py
}

if [ "${QUICK:-0}" = 1 ]; then
    DEV=(--device cpu); PT_SIZE=(--patch 16 16 8 --width 0.125 --iters 2 --warmup 1 --num-classes 4 --matmul-size 256)
    LD_SIZE=(--volumes 2 --volume-shape 32 32 16 --patch 16 16 8 --batch 2 --batches 2 --workers 0)
    SW_SIZE=(--volume 64 64 32 --width 0.125); B32=(2); BIG=(4); CONFIGS=fp32; BEST=fp32
    PF_SIZE=(--quick); PF_EXTRA=(--quick); FC_SIZE=(--quick); PLAIN=fp32; AB_SIZE=("${PT_SIZE[@]}")
    AB_BASE=fp32+gemmwg+splitcat; AB_CONFIGS=fp32+gemmwg+splitcat,fp32+gemmwg+splitcat+gemmhead+prefetch; BIG2=(6 8)
    CL_SIZE=(--quick); FOLLOW=fp32+gemmwg; FOLLOW_MAX=fp32+gemmwg; BATCHES=(2 4); BR_ARGS=(--quick)
    FT_ARGS=(--quick)  # a PRETRAINED given is used; no default (another run's /tmp/dira3d_bundle_run may be changing)
    [ -n "${PRETRAINED:-}" ] && FT_ARGS+=(--pretrained "$PRETRAINED")
else
    DEV=(--device cuda); PT_SIZE=(--patch 64 64 32 --width 1 --iters 30 --warmup 8)
    LD_SIZE=(--volumes 32 --volume-shape 192 192 96 --batch 32 --batches 40 --workers 0 4 8)
    PF_SIZE=(--batch 32 --config bf16+cl+cudnn); PF_EXTRA=(--rows 40); FC_SIZE=(--batch 64)
    AB_SIZE=("${PT_SIZE[@]}")
    AB_BASE=bf16+cl+gemmwg+splitcat+compile; BIG2=(8 16 96)
    AB_CONFIGS=$AB_BASE,bf16+cl+gemmwg+splitcat+gemmhead+compile+prefetch
    PLAIN=bf16+cl+compile
    CL_SIZE=(--batch 64); FOLLOW=bf16+cl+gemmwg+compile; FOLLOW_MAX=bf16+cl+gemmwg+compile-max; BATCHES=(64 128)
    SW_SIZE=(--volume 512 512 300); B32=(32); BIG=(64 96)
    BR_ARGS=(--config performance.json --batch 64 --pairs 2560)
    [ -f "${WORDS:-.gpu_e2e/vw}/visual_words.json" ] && BR_ARGS+=(--words "${WORDS:-.gpu_e2e/vw}")
    FT_ARGS=()
    [ -f "${PRETRAINED:-/tmp/dira3d_bundle_run/run/models/best.pt}" ] && \
        FT_ARGS+=(--pretrained "${PRETRAINED:-/tmp/dira3d_bundle_run/run/models/best.pt}")
    CONFIGS=fp32,bf16,bf16+cl,bf16+cl+cudnn,bf16+cl+cudnn+compile
    BEST=bf16+cl+cudnn,bf16+cl+cudnn+compile
fi

for what in "$@"; do
    case $what in
    check)
        part check nvidia-smi
        part check "$PY" -c "import torch, monai, ignite; print(torch.__version__, torch.version.cuda, monai.__version__, ignite.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
        part check "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu or compile or stall" \
            tests/test_engine_performance.py tests/test_transforms_static.py tests/test_transforms.py tests/test_image_convs.py ;;
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
        capped cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider -k on_cuda tests/test_image_convs.py \
            tests/test_engine_prefetch.py
        cap=$(left 300)  # keep up to 150 s for the profile, ~120 s for the batch sizes, the rest for the plain loop
        capped ab "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${AB_SIZE[@]}" --batch-sizes "${BIG[0]}" \
            --configs "$AB_CONFIGS" --no-plain --time-budget "$(( cap > 100 ? cap - 70 : 10 ))" --out "$OUT/ab.md"
        best=$(fastest "$OUT/ab.txt" "$AB_BASE")
        echo "=== fastest A/B row: $best" | tee -a "$OUT/ab.txt"
        capped profile "$(( $(left 210) < 150 ? $(left 210) : 150 ))" "$PY" benchmarks/profile_step.py "${DEV[@]}" \
            "${PF_EXTRA[@]}" --batch "${BIG[0]}" --config "$best" --warmup 3 --by-shape aten::copy_ --callers 4
        cap=$(left 60)
        capped scale "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" --batch-sizes "${BIG2[@]}" \
            --configs "$best" --no-plain --time-budget "$(( cap > 100 ? cap - 70 : 10 ))" --out "$OUT/scale.md"
        capped plain "$(left 0)" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" \
            --batch-sizes "${BIG[0]}" --configs "" --plain-config "$PLAIN" ;;
    verify)
        facts_and_cuda_tests
        cap=$(left 320)  # keep ~200 s for the bundle, the rest for the profile
        capped ab "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${AB_SIZE[@]}" --batch-sizes "${BIG[0]}" \
            --configs "$AB_BASE,$AB_BASE+det" --no-plain --time-budget "$(( cap > 100 ? cap - 70 : 10 ))" --out "$OUT/ab.md"
        capped bundle "$(( $(left 100) < 220 ? $(left 100) : 220 ))" "$PY" benchmarks/gpu/bundle_run.py "${BR_ARGS[@]}" \
            --out /tmp/dira3d_bundle_run --log-dir "$OUT"
        capped profile "$(left 0)" "$PY" benchmarks/profile_step.py "${DEV[@]}" \
            "${PF_EXTRA[@]}" --batch "${BIG[0]}" --config "$AB_BASE" --warmup 3 --by-shape aten::copy_ --callers 4 ;;
    kind)
        facts_and_cuda_tests
        cap=$(left "${FT_CAP:-240}")
        capped ab "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${AB_SIZE[@]}" --batch-sizes "${BIG[@]}" \
            --configs "$AB_BASE" --no-plain --time-budget "$(( cap > 100 ? cap - 80 : 10 ))" --out "$OUT/ab.md"
        capped finetune "$(left 0)" "$PY" benchmarks/gpu/finetune_run.py "${FT_ARGS[@]}" \
            --out "${FT_RUN:-/tmp/dira3d_finetune_run}" --log-dir "$OUT" ;;
    finetune)
        capped finetune "${FT_CAP:-420}" "$PY" benchmarks/gpu/finetune_run.py "${FT_ARGS[@]}" \
            --out "${FT_RUN:-/tmp/dira3d_finetune_run}" --log-dir "$OUT" ;;
    first_conv)
        part first_conv "$PY" benchmarks/first_conv.py "${DEV[@]}" "${FC_SIZE[@]}" ;;
    layers)
        part layers "$PY" benchmarks/conv_layers.py "${DEV[@]}" "${CL_SIZE[@]}" ;;
    followup)
        part facts nvidia-smi -L
        capped layers 100 "$PY" benchmarks/conv_layers.py "${DEV[@]}" "${CL_SIZE[@]}"
        cap=$(left 120)
        capped batches "$cap" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" \
            --batch-sizes "${BATCHES[@]}" --configs "$FOLLOW" --no-plain --time-budget "$(( cap > 100 ? cap - 90 : 10 ))" \
            --out "$OUT/batches.md"
        capped autotune "$(left 0)" "$PY" benchmarks/pretrain_throughput.py "${DEV[@]}" "${PT_SIZE[@]}" \
            --batch-sizes "${BATCHES[0]}" --configs "$FOLLOW_MAX" --no-plain --out "$OUT/autotune.md" ;;
    *)
        echo "unknown part '$what'; use check, throughput, scale, loader, inference, first_conv, layers, lease, followup, verify, finetune, kind" >&2; status=2 ;;
    esac
done
exit $status
