"""Under torchrun every rank of a run that fails for a common reason (a last.pt of other settings, a bad setting)
printed the same tracebacks, interleaved: 9 tracebacks and 400 lines for two ranks. The pretraining bundle's
multi_gpu_train.json now calls dira3d.engines.distributed.brief_errors_on_other_ranks: a rank other than 0 reports
its error in one line (rank 0 keeps its traceback). So do the task bundles' inference.json, which form no process
group under torchrun: the rank is torchrun's RANK there (the subprocesses below run without a process group)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAIL = textwrap.dedent(
    """
    import logging
    from ignite.engine import Engine, Events
    import dira3d.engines.distributed as distributed  # the rank: torchrun's RANK (no process group here)
    from dira3d.utils.interrupts import QuietInterruptMixin

    logging.basicConfig(level=logging.INFO)
    distributed.brief_errors_on_other_ranks()

    class Quiet(QuietInterruptMixin, Engine):
        pass

    def step(engine, batch):
        raise ValueError("checkpoint last.pt does not fit this run's encoder")

    engine = Quiet(step)
    try:
        engine.run([1])
    except ValueError as err:  # as MONAI's bundle run wraps it
        raise RuntimeError("Failed to evaluate ConfigExpression: $@train#trainer.run()") from err
    """
)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_other_than_0_reports_its_error_in_one_line(rank):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RANK": rank}
    env.pop("DIRA3D_ALL_TRACEBACKS", None)
    proc = subprocess.run([sys.executable, "-c", FAIL], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    if rank == "0":  # rank 0: ignite's error log and the traceback, as before
        assert "Traceback" in proc.stderr and "Engine run is terminating due to exception" in proc.stderr
        return
    assert proc.stderr.strip() == ("[rank1]: ValueError: checkpoint last.pt does not fit this run's encoder (this "
                                   "rank's traceback is left out; DIRA3D_ALL_TRACEBACKS=1 prints it)"), proc.stderr


def test_every_traceback_when_asked():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DIRA3D_ALL_TRACEBACKS": "1", "RANK": "1"}
    proc = subprocess.run([sys.executable, "-c", FAIL], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "[rank1]" not in proc.stderr
