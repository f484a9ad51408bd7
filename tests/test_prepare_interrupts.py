"""`dira3d prepare` stopped part-way (found 2026-11-27, interruption walkthrough).

- SIGTERM (``kill``, ``scancel``, a SLURM time limit) ended the command at once without a word (exit -15): no line
  saying that the finished cases are kept and that rerunning the command prepares the rest, as Ctrl-C prints. It now
  takes the Ctrl-C path: that line, "stopped by SIGTERM", exit 143.
- With ``--workers N``, a SIGKILL of the command (the OOM killer, ``kill -9`` of a ``nohup`` job) left its worker
  processes idle for good, holding the lock on ``--dst`` they had inherited: the rerun was refused ("output folder
  (--dst) ... is in use by process N", N the dead process). The workers now end with the command
  (``dira3d.data.workers``), and the rerun prepares the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dira3d.data.synthetic import write_luna16_phantoms

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sends POSIX signals")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _start_prepare(tmp_path: Path, workers: int, count: int = 16) -> tuple[subprocess.Popen, list[str], Path]:
    """Start `dira3d prepare luna16` on ``count`` phantoms; return it once its first volume is written."""
    src, dst = tmp_path / "luna", tmp_path / "prepared"
    write_luna16_phantoms(src, count=count, seed=0)
    cmd = [sys.executable, "-m", "dira3d.cli", "prepare", "luna16", "--src", str(src), "--dst", str(dst),
           "--workers", str(workers)]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:  # not pipes: a worker
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=err)    # left behind holds them open
    deadline = time.monotonic() + 120
    while not list((dst / "volumes").glob("*.nii.gz")):
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
        assert time.monotonic() < deadline, "no volume written in 120 s"
        time.sleep(0.02)
    return proc, cmd, dst


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_ends_prepare_with_the_ctrl_c_line_and_exit_143(tmp_path):
    proc, _, dst = _start_prepare(tmp_path, workers=1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        f"dira3d prepare luna16: stopped by SIGTERM; the cases finished so far are kept in {dst}: rerun the same "
        "command to prepare the rest (finished cases are skipped, an unfinished one is redone)")
    assert "Traceback" not in err
    assert not [p for p in (dst / "volumes").iterdir() if p.name.startswith(".")]  # the case cut short cleaned up


def test_workers_end_with_a_killed_prepare_and_the_rerun_is_not_refused(tmp_path):
    proc, cmd, dst = _start_prepare(tmp_path, workers=2)
    workers = _children(proc.pid)
    try:
        assert len(workers) == 2, workers
        proc.kill()  # SIGKILL: as the OOM killer or `kill -9`; no handler runs in the command
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "the workers outlived the killed command"
        rerun = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert "is in use by process" not in rerun.stderr
        assert (dst / "pretrain_datalist.json").is_file()
        assert len(list((dst / "volumes").glob("*.nii.gz"))) == 16
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
