"""The pretraining bundle end to end, as a user runs it: ``dira3d pretrain`` on a visual-word folder, through the three
stages (dis -> dis+res -> dis+res+adv), then a rerun with a higher ``max_epochs`` that resumes from ``last.pt``.

On a GPU with ``--config performance.json`` (bf16, channels-last, ``torch.compile``, ...) this checks what the
benchmarks do not: the bundle's own loader, validation, checkpoints, TensorBoard and resume on CUDA, compiled. It
prints the training throughput between the progress lines of each epoch (the steady state: the first progress line
of an epoch is the start of its window, so compilation and the epoch's start are left out), the epoch times ignite
logs (these include validation and checkpoints) and the checks it made; it exits 1 when a check fails.

    python benchmarks/gpu/bundle_run.py --words .gpu_e2e/vw --config performance.json --batch 64 --pairs 2560
    python benchmarks/gpu/bundle_run.py --quick        # CPU: a synthetic visual-word folder, tiny network

``--words`` is the output of ``dira3d visual-words``; without it a synthetic folder is written (random smooth
patches: the throughput does not depend on their content).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from dira3d.visual_words.synthetic import write_visual_word_folder

PROGRESS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - INFO - Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- ")
EPOCH_TIME = re.compile(r"DiRATrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
STAGES = [{"name": "dis", "until_epoch": 1, "losses": ["dis"]},
          {"name": "dis_res", "until_epoch": 2, "losses": ["dis", "res"]},
          {"name": "dira", "losses": ["dis", "res", "adv"]}]



def log_time(text: str) -> float:
    """Seconds since the epoch of a log line's time stamp (``2026-11-28 06:39:03,469``, logging.conf's format)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_logged(command: list[str], log_path: Path, cwd: Path | None = None) -> tuple[int, str, float]:
    """Run ``command`` with its output written to ``log_path`` as it runs (a run cut short by a time limit leaves its
    log); return the exit status, the log and the wall seconds."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    return done.returncode, log_path.read_text(), time.perf_counter() - start


def throughput(log: str, batch: int) -> dict[int, float]:
    """Patches per second of each epoch between its first and last progress line (None-free: epochs with one line
    are left out)."""
    lines: dict[int, list[tuple[float, int]]] = {}
    for line in log.splitlines():
        match = PROGRESS.match(line)
        if match:
            lines.setdefault(int(match[2]), []).append((log_time(match[1]), int(match[3])))
    rates = {}
    for epoch, marks in lines.items():
        (t0, i0), (t1, i1) = marks[0], marks[-1]
        if i1 > i0 and t1 > t0:
            rates[epoch] = (i1 - i0) * batch / (t1 - t0)
    return rates


def epoch_times(log: str) -> dict[int, float]:
    return {int(m[1]): int(m[2]) * 3600 + int(m[3]) * 60 + float(m[4]) for m in EPOCH_TIME.finditer(log)}


def pretrain(words: Path, out: Path, args: argparse.Namespace, max_epochs: int, log_path: Path) -> tuple[int, str, float]:
    command = [sys.executable, "-m", "dira3d", "pretrain", "--datalist", str(words / "visual_words.json"),
               "--config", "visual_words.json", "--output", str(out)]
    if args.quick:
        command.append("--tiny")
    for config in args.config:
        command += ["--config", config]
    settings = {"batch_size": args.batch, "pairs_per_epoch": args.pairs, "max_epochs": max_epochs,
                "patch_size": json.dumps(args.patch), "stages": json.dumps(STAGES), "log_every": args.log_every}
    for key, value in settings.items():
        command += ["--override", f"{key}={value}"]
    return run_logged(command, log_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=Path, help="a `dira3d visual-words` output folder (default: a synthetic one)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dira3d_bundle_run"), help="run folder (emptied)")
    parser.add_argument("--log-dir", type=Path, help="where the two runs' logs are written as they run (default: --out)")
    parser.add_argument("--config", action="append", default=[], help="extra bundle config, e.g. performance.json")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2560, help="pairs per epoch (pairs_per_epoch)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--epochs", type=int, default=3, help="the first run (one epoch per stage)")
    parser.add_argument("--resume-to", type=int, default=5, help="max_epochs of the rerun that resumes")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny network and sizes, synthetic words")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.pairs, args.patch, args.log_every, args.resume_to = 2, 8, [16, 16, 8], 1, args.epochs + 1
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    words = args.words or write_visual_word_folder(args.out / "words", 8, 5, args.patch, val_instances=2).parent
    failures, logs = [], []
    for label, epochs in (("first run", args.epochs), ("resumed run", args.resume_to)):
        log_path = (args.log_dir or args.out) / f"bundle_{label.replace(' ', '_')}.log"
        rc, log, wall = pretrain(words, args.out / "run", args, epochs, log_path)
        logs.append(log)
        print(f"{label}: exit {rc} after {wall:.1f} s (max_epochs {epochs})", flush=True)
        if rc != 0:
            failures.append(f"{label} exited with {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}")
    print("| epoch | stage | patches/s between progress lines | epoch s (ignite, incl. validation) |")
    print("|---|---|---|---|")
    for log in logs:
        rates, times = throughput(log, args.batch), epoch_times(log)
        for epoch in sorted(times):
            stage = STAGES[min(epoch - 1, len(STAGES) - 1)]["name"]
            rate = f"{rates[epoch]:.1f}" if epoch in rates else "-"
            print(f"| {epoch} | {stage} | {rate} | {times[epoch]:.2f} |")
    failures += check(args, logs)
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    print("bundle end to end: " + ("OK" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


def check(args: argparse.Namespace, logs: list[str]) -> list[str]:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    failures = []
    last = args.out / "run" / "models" / "last.pt"
    if not last.is_file():
        return [f"{last} was not written"]
    state = torch.load(last, map_location="cpu", weights_only=True)
    epoch = state["trainer"]["epoch"]
    if epoch != args.resume_to:
        failures.append(f"last.pt is at epoch {epoch}, not {args.resume_to}")
    resumed = [e for e in epoch_times(logs[-1]) if e <= args.epochs]
    if resumed:
        failures.append(f"the rerun trained epoch(s) {resumed} again instead of resuming after epoch {args.epochs}")
    acc = EventAccumulator(str(args.out / "run" / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train_loss_dis", "train_loss_res", "train_loss_adv", "val_loss"):
        if tag not in tags:
            failures.append(f"TensorBoard has no {tag} (tags: {sorted(tags)})")
    if "train_loss_adv" in tags:
        steps = sorted({e.step for e in acc.Scalars("train_loss_adv")})
        if steps[-1:] != [args.resume_to]:
            failures.append(f"train_loss_adv logged for epochs {steps}, not up to {args.resume_to}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
