"""Smoke tests of the benchmark scripts: they run in seconds with --quick and print their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_distortions_benchmark_quick(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "distortions.py"), "--quick"],
                            capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    match = re.search(r"ratio: ([0-9.]+)x", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) > 0
    assert "dira3d batched torch" in result.stdout and "per-patch NumPy" in result.stdout


def test_split_loading_benchmark_small(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "split_loading.py"), "--entries", "400"],
                            capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    counts = {(m[0], m[1]): int(m[2]) for m in re.findall(r"load_split\('(\w+)', label_fraction=([0-9.]+)\): (\d+) entries",
                                                         result.stdout)}
    assert set(counts) == {(s, f) for s in ("train", "holdout", "test") for f in ("1", "0.01")}, result.stdout
    assert counts["train", "1"] + counts["holdout", "1"] == 400 and counts["test", "1"] == 234


def test_rerun_check_benchmark_small(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "rerun_check.py"), "--volumes", "20",
                             "--classes", "12", "--repeats", "1", "--width", "0.125"],
                            capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    timed = re.findall(r"^(count_classes, train\.json|count_classes, visual_words\.json|data_source|finished_note)"
                       r".*: ([0-9.]+) ms$", result.stdout, flags=re.M)
    assert [name for name, _ in timed] == ["count_classes, train.json", "count_classes, visual_words.json",
                                           "data_source", "finished_note"], result.stdout
    assert "datalist of 20 volumes" in result.stdout and "manifest of 12 classes" in result.stdout


def test_gloo_exit_check_benchmark_one_run_each(repo_root: Path) -> None:
    """One torchrun of each kind, no load: both leave the group and exit cleanly (the abort itself is rare and needs a
    loaded machine: the benchmark's figures are in docs/reliability.md)."""
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "gloo_exit_check.py"), "--runs", "1",
                             "--load", "0"], capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^1 runs of each kind beside 0 busy processes", result.stdout, flags=re.M), result.stdout
    lines = re.findall(r"^(plain|dira3d) *: (\d+) of 1 runs failed", result.stdout, flags=re.M)
    assert sorted(kind for kind, _ in lines) == ["dira3d", "plain"], result.stdout
    assert dict(lines)["dira3d"] == "0", result.stdout
