"""The tests' ``run_torchrun_command`` (tests/conftest.py) ends a hung torchrun run with its workers.

``subprocess.run(..., timeout=...)`` killed torchrun alone: its workers, in sessions of their own, went on holding the
output pipes, and ``subprocess.run`` waited for them for ever (a CI job that hangs instead of a test that fails)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import run_torchrun_command
from test_distributed import free_port


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc (Linux)")
def test_a_hung_torchrun_run_fails_the_test_and_leaves_no_worker(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, pathlib, sys, time\n"
                      "pathlib.Path(sys.argv[1], f\"pid{os.environ['RANK']}\").write_text(str(os.getpid()))\n"
                      "time.sleep(600)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(tmp_path)]
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not end in 20 s"):
        run_torchrun_command(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=20)
    assert time.monotonic() - started < 120
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
    time.sleep(0.5)
    for pid in pids:  # gone, or a zombie of a parent that is gone too
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
