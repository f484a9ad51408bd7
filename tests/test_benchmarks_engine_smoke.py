"""Smoke tests of the engine benchmarks: each ``--quick`` run exits 0 and prints its table.

The rows' numbers are machine-dependent; what is checked is the table's header, one row per
requested configuration with a positive rate, and (pretraining) the ratio to the plain loop.

The ``--quick`` runs call the script's ``main`` in this process (a fresh ``python`` spent most of its seconds
importing torch and MONAI again). The scripts as commands (``__main__``, exit status) are still run: by the dry
runs of ``benchmarks/gpu/run.sh`` at the end of this file (pretrain_throughput, profile_step, conv_layers,
sliding_window), by the usage-error run of loader_throughput, and first_conv's smoke test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process runs too, also outside pytest-xdist


def run_script(repo_root: Path, script: str, *args: str) -> list[str]:
    """``python benchmarks/<script> --quick *args`` as a command: it exits 0; its stdout lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / script), "--quick", *args],
                            capture_output=True, text=True, timeout=300, cwd=repo_root, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.splitlines()


def run(repo_root: Path, script: str, *args: str, capsys) -> list[str]:
    """``benchmarks/<script> --quick *args`` in this process (on one torch thread, as the commands ran with
    OMP_NUM_THREADS=1: see ``pytestmark``): its ``main`` returns 0; its stdout lines."""
    module = load_benchmark(repo_root, script.removesuffix(".py"))
    capsys.readouterr()
    code = module.main(["--quick", *args])
    out, err = capsys.readouterr()
    assert code == 0, out[-2000:] + err[-2000:]
    return out.splitlines()


def table(lines: list[str], first_column: str) -> tuple[list[str], list[list[str]]]:
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    header = lines[start].split()
    rows = [line.split() for line in lines[start + 1 :] if len(line.split()) == len(header)]
    return header, rows


def test_pretrain_throughput_quick(repo_root: Path, capsys) -> None:
    # fp32 and fp32+channels-last: the bf16 rows of --quick are slow on CPUs without bf16 units
    lines = run(repo_root, "pretrain_throughput.py", "--configs", "fp32,fp32+cl", "--iters", "1", "--warmup", "1",
                capsys=capsys)
    header, rows = table(lines, "config")
    assert header == ["config", "batch", "patches/s", "data_ms", "g_step_ms", "d_step_ms", "step_ms", "peak_MiB",
                      "mfu_%", "vs_plain", "syncs/it", "note"]
    assert [r[0] for r in rows] == ["fp32", "fp32+cl"] and all(float(r[2]) > 0 and float(r[9]) > 0 for r in rows)
    assert all(float(r[10]) >= 0 and r[11] == "-" for r in rows)  # syncs counted; no failure note
    assert any(line.startswith("measured matmul rate: fp32") for line in lines)
    assert any("TFLOP per patch" in line for line in lines) and any(line.startswith("ratio: ") for line in lines)


def load_benchmark(repo_root: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, repo_root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_det_token_runs_the_engine_with_cudnn_deterministic_and_puts_it_back(repo_root: Path, monkeypatch) -> None:
    """`det`: cuDNN's deterministic algorithms, as MONAI's set_determinism sets them in the bundles' initialize (the
    benchmark itself never did): an A/B of what that costs the bundle."""
    import torch

    module = load_benchmark(repo_root, "pretrain_throughput")
    assert module.parse_config("bf16+det").deterministic and not module.parse_config("bf16").deterministic
    seen = []
    monkeypatch.setattr(module, "_run_engine", lambda *a: seen.append(torch.backends.cudnn.deterministic) or {})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    for name in ("bf16+det", "bf16"):
        module.run_engine(module.parse_config(name), None, 2, None, torch.device("cpu"))
    assert seen == [True, False] and torch.backends.cudnn.deterministic is False


def test_pretrain_config_names_parse(repo_root: Path) -> None:
    module = load_benchmark(repo_root, "pretrain_throughput")
    config = module.parse_config("bf16+cl+compile")
    assert (config.amp, config.channels_last, config.compile, config.fused) == ("bf16", True, True, True)
    assert config.compile_mode is None and config.cudnn_benchmark is False
    assert module.parse_config("fp32+plainopt").fused is False
    tuned = module.parse_config("bf16+cudnn+compile-max")
    assert tuned.cudnn_benchmark and tuned.compile and tuned.compile_mode == "max-autotune-no-cudagraphs"
    assert module.parse_config("bf16+compile-ro").compile_mode == "reduce-overhead"
    assert module.parse_config("bf16+cl+gemmwg").gemm_weight_grad and not tuned.gemm_weight_grad
    padded = module.parse_config("bf16+cl+padch")
    assert padded.pad_channels and padded.trainer_kwargs()["pad_channels"] and not tuned.pad_channels
    assert module.parse_config("bf16+subset").static_distortion is False and tuned.static_distortion is None
    assert module.parse_config("bf16+gemmup").trainer_kwargs()["gemm_upconv"] and not tuned.gemm_upconv
    assert module.parse_config("bf16+splitcat").trainer_kwargs()["split_concat"] and not tuned.split_concat
    assert module.parse_config("bf16+cl+gemmhead").trainer_kwargs()["gemm_head"] and not tuned.gemm_head
    assert module.parse_config("bf16+cl+prefetch").trainer_kwargs()["prefetch"] and not tuned.prefetch
    forced = module.parse_config("bf16+cl+forcecl+compile").trainer_kwargs()
    assert forced["compile_channels_last"] and forced["compile"] and not tuned.compile_channels_last
    with pytest.raises(ValueError, match="gemmwg and padch"):
        module.parse_config("bf16+gemmwg+padch")
    with pytest.raises(ValueError, match="gemmhead and padch"):
        module.parse_config("bf16+gemmhead+padch")
    with pytest.raises(ValueError, match="forcecl without a compile token"):
        module.parse_config("bf16+cl+forcecl")
    with pytest.raises(ValueError, match="turbo"):
        module.parse_config("fp32+turbo")


def test_conv_layers_quick_times_every_convolution_of_the_model(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "conv_layers.py", capsys=capsys)
    rows = [line.split() for line in lines if line.split()[:1] in (["unet"], ["head"], ["adversary"])]
    layers = {(r[0], r[1]) for r in rows}
    # U-Net: 8 encoder convolutions, 3 levels of (up, conv1, conv2), the 1x1 head; head: 1; adversary: 5
    assert len([key for key in layers if key[0] == "unet"]) == 8 + 9 + 1 and len(layers) == 18 + 1 + 5
    split = {r[1] for r in rows if r[2] == "split"}
    assert split == {f"decoder.levels.{i}.convs.conv1.conv" for i in range(3)}  # only the concatenation's readers
    assert {r[1] for r in rows if r[2] == "gemm"} == {"decoder.head"}  # only the 1x1 output head
    assert any("every layer in its fastest variant" in line for line in lines)


def test_conv_layers_reference_is_a_whole_model_variant(repo_root: Path, capsys) -> None:
    # 'split' times only the 3 concatenated layers: it can be neither the only variant (no timing for
    # the other layers) nor the reference the shares and the totals are taken in
    module = load_benchmark(repo_root, "conv_layers")
    assert module.main(["--quick", "--variants", "split"]) == 2
    assert "add cl, cl+cudnn or ncdhw" in capsys.readouterr().err
    assert module.main(["--quick", "--variants", "split,cl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("all layers in 'cl': ") for line in lines)
    shares = [line.split() for line in lines if line.split()[:1] in (["unet"], ["head"], ["adversary"])]
    assert all((row[-1] != "-") == (row[2] == "cl") for row in shares)  # every layer's share, in 'cl'


def test_conv_layers_counts_flops_like_the_model_counter(repo_root: Path) -> None:
    import torch

    module = load_benchmark(repo_root, "conv_layers")
    conv = torch.nn.Conv3d(4, 6, 3, stride=2, padding=1)
    layer = module.Layer("n", "c", conv, (2, 4, 8, 8, 6), True)
    assert layer.flops() == 2 * 2 * (4 * 4 * 3) * 6 * 4 * 27  # batch, output voxels, out, in, taps
    assert layer.backward_flops() == 2 * layer.flops()
    up = module.Layer("n", "u", torch.nn.ConvTranspose3d(4, 4, 2, stride=2), (2, 4, 3, 3, 3), False)
    assert up.flops() == 2 * 2 * 27 * 4 * 4 * 8 and up.backward_flops() == up.flops()


def test_loader_throughput_quick(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "loader_throughput.py", capsys=capsys)
    header, rows = table(lines, "pipeline")
    verdict = next(line for line in lines if line.startswith("loader alone, best row"))
    best = max(float(r[5]) for r in rows if r[0] == "loader")
    stated = float(verdict.split("): ")[1].split(" patches/s")[0])
    assert stated == pytest.approx(best, rel=0.01) and "x a step consuming 550 patches/s" in verdict
    assert header == ["pipeline", "loader", "workers", "batch", "batches/s", "patches/s"]
    assert {r[0] for r in rows} == {"loader", "loader+device_distortion", "loader+device_distortion+views",
                                    "loader+worker_distortion"}
    assert all(float(r[4]) > 0 for r in rows)


def test_loader_throughput_picks_pipelines_and_prints_each_row_as_it_goes(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "loader_throughput.py", "--pipelines", "loader+device_distortion", "--loaders", "dataloader",
                capsys=capsys)
    _, rows = table(lines, "pipeline")
    assert [(r[0], r[1]) for r in rows] == [("loader+device_distortion", "dataloader")]
    assert sum(line.startswith("row: ") for line in lines) == 1  # kept even if a time limit kills the run later
    assert not any(line.startswith("loader alone") for line in lines)  # no 'loader' row: no verdict
    bad = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "loader_throughput.py"), "--quick",
                          "--pipelines", "loader,warp"], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert bad.returncode == 2 and "unknown ['warp']" in bad.stderr


def test_profile_step_quick(repo_root: Path, capsys) -> None:
    # every shape listed (--rows 60): the cheap first layer must not fall out of a top-10 cut on a busy CPU
    lines = run(repo_root, "profile_step.py", "--by-shape", "aten::convolution", "--rows", "60", capsys=capsys)
    step = next(line for line in lines if line.startswith("step (G + D"))
    start = lines.index(next(line for line in lines if line.startswith("aten::convolution per input shape")))
    # the U-Net's first convolution reads the batch of 1-channel 16x16x8 patches with 3x3x3 weights
    assert any("[2, 1, 16, 16, 8]" in line and "x  [[" in line for line in lines[start + 1 :])
    assert float(step.split("distortion 'transvw' alone: ")[1].split(" ms")[0]) > 0
    assert any("self_cpu_time_total" in line for line in lines)
    assert any("aten::convolution_backward" in line for line in lines)  # the profiled step ran a backward


def test_profile_step_names_the_callers(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "profile_step.py", "--by-shape", "aten::convolution_backward", "--callers", "2",
                capsys=capsys)
    start = lines.index(next(line for line in lines if line.startswith("aten::convolution_backward per input shape and callers")))
    listed = lines[start + 1 :]
    # every backward convolution runs inside the autograd engine's ConvolutionBackward0 node
    assert any("x  [[" in line for line in listed)
    assert any(line.strip() == "in ConvolutionBackward0" for line in listed), listed[:8]


def test_plain_loop_takes_the_engine_settings(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "pretrain_throughput.py", "--configs", "fp32+cl", "--plain-config", "fp32+cl", "--iters", "1",
                "--warmup", "1", capsys=capsys)
    assert any("plain PyTorch loop (fp32+cl): " in line and "patches/s" in line for line in lines)
    assert load_benchmark(repo_root, "pretrain_throughput").main(["--quick", "--plain-config", "fp16"]) == 2
    assert "--plain-config 'fp16'" in capsys.readouterr().err


def test_sync_counter_ignores_the_prototype_notice(repo_root: Path) -> None:
    module = load_benchmark(repo_root, "pretrain_throughput")
    assert module.is_sync_warning("called a synchronizing CUDA operation (Triggered internally at ...)")
    assert not module.is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                                      "synchronizing operations (Triggered internally at ...)")


def test_first_conv_quick(repo_root: Path) -> None:
    header, rows = table(run_script(repo_root, "first_conv.py"), "layer")
    assert header == ["layer", "variant", "batch", "layout", "ms", "vs_cudnn", "wgrad_rel_diff"]
    variants = {layer: [r[1] for r in rows if r[0] == layer] for layer in ("unet_in", "unet_out", "adv_in")}
    assert variants["unet_in"] == ["cudnn", "cudnn+benchmark", "gemm", "pad", "pad+benchmark", "cudnn+ncdhw"]
    assert variants["adv_in"] == variants["unet_in"]
    assert variants["unet_out"] == ["cudnn", "cudnn+benchmark", "pad", "pad+benchmark", "cudnn+ncdhw"]  # 64 in: no gemm
    assert {r[3] for r in rows if r[1] == "cudnn+ncdhw"} == {"ncdhw"} and {r[3] for r in rows if r[1] == "pad"} == {
        "channels_last"}
    assert all(float(r[4]) > 0 and float(r[6]) < 1e-5 for r in rows)  # every variant: the same weight gradient


def test_fp32_matmul_rate_restores_the_tf32_flag() -> None:
    import torch

    from dira3d.engines.performance import matmul_tflops

    before = torch.backends.cuda.matmul.allow_tf32
    assert matmul_tflops("cpu", torch.float32, size=64, repeats=1, tf32=not before) > 0
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_sliding_window_quick(repo_root: Path, capsys) -> None:
    header, rows = table(run(repo_root, "sliding_window.py", capsys=capsys), "precision")
    assert header == ["precision", "sw_batch", "roi", "overlap", "volume", "windows", "seconds", "windows/s", "peak_MiB"]
    # 96x64x32 with roi 64x64x32 at overlap 0.25 (stride 48x48x24): 2 x 1 x 1 windows
    assert rows and rows[0][2] == "64x64x32" and rows[0][4] == "96x64x32" and int(rows[0][5]) == 2


def test_pretrain_throughput_reports_a_failing_configuration_and_goes_on(repo_root: Path, monkeypatch, capsys,
                                                                        tmp_path: Path) -> None:
    module = load_benchmark(repo_root, "pretrain_throughput")
    real = module.run_engine

    def flaky(config, *args, **kwargs):
        if config.name == "fp32+cl":
            raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB\nmore detail")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(module, "run_engine", flaky)
    out = tmp_path / "table.md"
    assert module.main(["--quick", "--configs", "fp32+cl,fp32", "--iters", "1", "--no-plain", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["config"])
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1 : start + 3]:  # a failure note has spaces: it takes the rest of the line
        cells = line.split()
        rows[cells[0]] = {**dict(zip(header[:-1], cells[: len(header) - 1])), "note": " ".join(cells[len(header) - 1 :])}
    failed, ok = rows["fp32+cl"], rows["fp32"]
    assert failed["note"].startswith("failed: RuntimeError: CUDA out of memory.") and failed["patches/s"] == "-"
    assert float(ok["patches/s"]) > 0 and ok["note"] == "-"
    text = out.read_text()
    assert "failed: RuntimeError: CUDA out of memory." in text and "measured matmul rate" in text


def test_a_cudnn_configuration_does_not_autotune_the_ones_after_it(repo_root: Path, monkeypatch, capsys) -> None:
    # the trainer turns torch.backends.cudnn.benchmark on process-wide; an A/B row after a `cudnn`
    # row must still run without autotuning, or it is compared with the wrong baseline
    import torch

    module = load_benchmark(repo_root, "pretrain_throughput")
    real, seen = module.run_engine, []

    def record(config, *args, **kwargs):
        before = torch.backends.cudnn.benchmark
        row = real(config, *args, **kwargs)
        seen.append((config.name, before, torch.backends.cudnn.benchmark))
        return row

    monkeypatch.setattr(module, "run_engine", record)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert module.main(["--quick", "--configs", "fp32+cudnn,fp32", "--iters", "1", "--warmup", "1", "--no-plain"]) == 0
    capsys.readouterr()
    # the cudnn row's trainer switched it on; the next row started with it off again
    assert seen == [("fp32+cudnn", False, True), ("fp32", False, False)]


def test_pretrain_throughput_time_budget_still_prints_the_table(repo_root: Path, capsys) -> None:
    lines = run(repo_root, "pretrain_throughput.py", "--configs", "fp32", "--time-budget", "0", capsys=capsys)
    assert any("skipped: time budget" in line for line in lines)


def test_gpu_runner_script_dry_run(repo_root: Path, tmp_path: Path) -> None:
    script = repo_root / "benchmarks" / "gpu" / "run.sh"
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(script), "inference", "nonsense"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2 and "unknown part 'nonsense'" in result.stderr  # a typo is reported, not ignored
    log = (tmp_path / "inference.txt").read_text()
    assert "windows/s" in log and "exited with" not in log  # the part ran and its table was kept in $OUT


def test_gpu_lease_plan_dry_run_runs_every_part(repo_root: Path, tmp_path: Path) -> None:
    # the one-call plan a session with a 15-minute GPU lease runs: every part must run and keep its output
    script = repo_root / "benchmarks" / "gpu" / "run.sh"
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(script), "lease"], capture_output=True, text=True, timeout=600, env=env)
    for part, marker in (("cuda_tests", "skipped"), ("ab", "=== fastest A/B row: fp32+gemmwg+splitcat"),
                         ("profile", "step (G + D"), ("scale", "peak_MiB"), ("plain", "plain PyTorch loop (fp32): ")):
        log = (tmp_path / f"{part}.txt").read_text()
        assert marker in log and "exited with" not in log and "skipped, no time left" not in log, (part, log[-1500:])

    def rows(part):
        log = (tmp_path / f"{part}.txt").read_text()
        return [eval(line[5:]) for line in log.splitlines() if line.startswith("row: ")]  # noqa: S307 (our own output)

    assert {"fp32+gemmwg+splitcat", "fp32+gemmwg+splitcat+gemmhead+prefetch"} == {r["config"] for r in rows("ab")}
    assert [r["batch"] for r in rows("scale")] == [6, 8]  # the fastest row at the larger batch sizes


def test_gpu_verify_plan_dry_run_runs_every_part(repo_root: Path, tmp_path: Path) -> None:
    """`run.sh verify` (the fourth lease, 2026-11-28): the CUDA tests, the figure at batch 64, the pretraining bundle end
    to end with a resume (which found every resume on a GPU failing), the profile."""
    script = repo_root / "benchmarks" / "gpu" / "run.sh"
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(script), "verify"], capture_output=True, text=True, timeout=600, env=env)
    for part, marker in (("cuda_tests", "skipped"), ("ab", "peak_MiB"), ("bundle", "bundle end to end: OK"),
                         ("profile", "step (G + D")):
        log = (tmp_path / f"{part}.txt").read_text()
        assert marker in log and "exited with" not in log and "skipped, no time left" not in log, (part, log[-1500:])
    table = [line for line in (tmp_path / "bundle.txt").read_text().splitlines() if line.startswith("| 4 | dira |")]
    assert table and float(table[0].split("|")[3]) > 0  # the resumed epoch, its patches/s from the progress lines
    assert (tmp_path / "bundle_resumed_run.log").is_file()  # the runs' logs come back with $OUT


def test_gpu_finetune_part_dry_run_needs_no_simpleitk(repo_root: Path, tmp_path: Path) -> None:
    """`run.sh finetune` (for the next lease): the LiTS bundle fine-tuned, rerun (refused, then --overwrite from a
    pretrained checkpoint) and run on raw scans by inference.json, then LUNA16's, on data the script writes, with
    SimpleITK and fire unimportable, as on the lent GPU machines (where the bundles' SimpleITKReader, and `python -m
    monai.bundle` without fire, stopped inference)."""
    blocker = tmp_path / "no_simpleitk"
    blocker.mkdir()
    for module in ("SimpleITK", "fire"):  # fire: what `python -m monai.bundle` parses its command line with
        (blocker / f"{module}.py").write_text(f"raise ImportError('{module} is not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "FT_RUN": str(tmp_path / "run"), "PYTHONPATH": os.pathsep.join([str(blocker), str(repo_root)])}
    env.pop("PRETRAINED", None)
    result = subprocess.run(["bash", str(repo_root / "benchmarks" / "gpu" / "run.sh"), "finetune"], capture_output=True,
                            text=True, timeout=600, env=env)
    log = (out / "finetune.txt").read_text()
    assert result.returncode == 0 and "finetune end to end: OK" in log and "CHECK FAILED" not in log, log[-3000:]
    for name in ("inference", "inference_luna16"):  # SimpleITK was absent, and both inferences ran without it
        assert f"{name}: no SimpleITK here; reading NIfTI with MONAI's NibabelReader" in log and f"{name}: exit 0 " in log
        assert f"{name}: no fire here; calling monai.bundle.run(...)" in log
    assert "rerun: exit 2 " in log  # the same command to 3 epochs is refused: fine-tuning has no resume
    rows = [line.split("|")[1:-1] for line in log.splitlines() if line.startswith(("| first run |",
            "| rerun --overwrite --pretrained |", "| luna16_nodule_fpr |"))]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("first run", 1), ("first run", 2)] + [
        ("rerun --overwrite --pretrained", e) for e in (1, 2, 3)] + [  # the rerun starts again at epoch 1
        ("luna16_nodule_fpr", 1), ("luna16_nodule_fpr", 2)]
    assert all(float(r[4]) > 0 for r in rows)  # epoch seconds from the log's times
    volumes = [line for line in log.splitlines() if line.startswith("| lits-005_seg.nii.gz | 32x32x16 |")]
    assert volumes and float(volumes[0].split("|")[3]) > 0
    assert (out / "inference.log").is_file() and (out / "finetune_rerun.log").is_file()  # the logs come back in $OUT


def test_gpu_kind_part_dry_run_measures_then_finetunes(repo_root: Path, tmp_path: Path) -> None:
    """`run.sh kind` (a first call on a GPU kind not measured before): the figure of performance.json's configuration,
    then the fine-tuning bundles end to end in the time kept for them (FT_CAP)."""
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "FT_RUN": str(tmp_path / "run"), "DEADLINE": "900", "FT_CAP": "400"}
    env.pop("PRETRAINED", None)
    result = subprocess.run(["bash", str(repo_root / "benchmarks" / "gpu" / "run.sh"), "kind"], capture_output=True,
                            text=True, timeout=900, env=env)
    ab, finetune = (out / "ab.txt").read_text(), (out / "finetune.txt").read_text()
    assert "row: " in ab and "peak_MiB" in ab and "exited with" not in ab, ab[-2000:]
    assert "finetune end to end: OK" in finetune and "skipped, no time left" not in finetune, finetune[-2000:]
    assert (out / "facts.txt").is_file() and (out / "cuda_tests.txt").is_file(), result.stdout[-2000:]


def test_finetune_run_empties_only_a_folder_it_made(repo_root: Path, tmp_path: Path, capsys) -> None:
    module = load_benchmark(repo_root, "gpu/finetune_run")
    (tmp_path / "notes.txt").write_text("a user's file")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "holds files this script did not write" in capsys.readouterr().out
    assert (tmp_path / "notes.txt").read_text() == "a user's file"


def test_gpu_followup_plan_dry_run_runs_every_part(repo_root: Path, tmp_path: Path) -> None:
    script = repo_root / "benchmarks" / "gpu" / "run.sh"
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(script), "followup"], capture_output=True, text=True, timeout=600, env=env)
    for part, marker in (("layers", "every layer in its fastest variant"), ("batches", "peak_MiB"),
                         ("autotune", "peak_MiB")):
        log = (tmp_path / f"{part}.txt").read_text()
        assert marker in log and "exited with" not in log and "skipped, no time left" not in log, (part, log[-1500:])


def test_gpu_lease_profiles_the_fastest_ab_row(repo_root: Path, tmp_path: Path) -> None:
    script = repo_root / "benchmarks" / "gpu" / "run.sh"
    ab = tmp_path / "ab.txt"

    def fastest(rates: dict) -> str:
        ab.write_text("=== ab\n" + "\n".join(f"row: {{'config': '{k}', 'patches/s': {v}}}" for k, v in rates.items()))
        call = f'source <(sed -n "/^fastest() {{/,/^}}/p" {script}); PY={sys.executable}; fastest {ab} base'
        return subprocess.run(["bash", "-c", call], capture_output=True, text=True, timeout=60).stdout.strip()

    assert fastest({"base": 380.0, "base+splitcat": 400.0, "base+gemmup": 370.0}) == "base+splitcat"
    assert fastest({"base": 380.0, "base+splitcat": 379.0}) == "base"
    assert fastest({}) == "base"  # no rows (the A/B part timed out): the baseline
    assert fastest({"base+splitcat": 0.0}) == "base"  # a row that failed
    ab.write_text("row: {'config': 'base+splitcat', 'patches/s': 400.0}\nrow: {'config': 'base+gemmup', 'patc\n")
    call = f'source <(sed -n "/^fastest() {{/,/^}}/p" {script}); PY={sys.executable}; fastest {ab} base'
    assert subprocess.run(["bash", "-c", call], capture_output=True, text=True, timeout=60).stdout.strip() == \
        "base+splitcat"  # a row cut short (a timeout mid-print) is not a result
