"""``torchrun --max_restarts`` restarts the workers of a failed run in place (the pretraining then resumes from
last.pt). The restarted workers joined their process group through the store of the failed attempt, where each
rank's address was still the failed process's: the restart died in init_process_group with ``Gloo connectFullMesh
failed ... Connection refused`` whenever one rank came up before another (PyTorch issue 167288).
dira3d.engines.init_distributed puts the keys of each restart under their own prefix (restart_store)."""

from __future__ import annotations

import os
import sys

from conftest import run_torchrun_command
from dira3d.engines.distributed import restart_store


def test_restart_store_is_used_only_for_one_node_under_torchrun(monkeypatch):
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert restart_store() is None  # not under torchrun: init_process_group's env://
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert restart_store() is None  # several nodes: their agents may count restarts differently


def test_torchrun_max_restarts_restarts_two_gloo_workers_after_one_failed(tmp_path, repo_root):
    script = repo_root / "tests" / "elastic_restart_torchrun.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    proc = run_torchrun_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max_restarts=1", str(script)], cwd=tmp_path, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert "ATTEMPT 0 RANK 1 SUM 2" in output  # the first attempt ran, then rank 1 failed
    assert "Connection refused" not in output, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    assert "ATTEMPT 1 RANK 0 SUM 2" in output and "ATTEMPT 1 RANK 1 SUM 2" in output, output[-3000:]
