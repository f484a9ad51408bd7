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
