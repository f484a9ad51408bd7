"""How often a gloo rank aborts at exit after DDP, leaving the group as PyTorch's docs say vs with ``cleanup_distributed``.

Each run is ``torchrun --nproc_per_node=2`` of a short script: one ``DistributedDataParallel`` step of a ``Linear``
on gloo, then either ``dist.barrier(); dist.destroy_process_group()`` (``plain``) or
``dira3d.engines.distributed.cleanup_distributed()`` (``dira3d``: the same, then the wait for gloo's worker threads of
:mod:`dira3d.engines.gloo_exit`). A run fails when a rank ends by a signal (``terminate called without an active
exception``, SIGABRT). The two kinds of run alternate, so both see the same load; the abort needs one (it came in a few
percent of the runs at a load average of about 14 on 2 cores, rarely on an idle machine): run it beside other work,
e.g. ``--load 2`` busy processes.

    python benchmarks/gloo_exit_check.py --runs 150 --load 2
    python benchmarks/gloo_exit_check.py --runs 1 --load 0          # smoke

Prints the failures of each kind, the run time, and the first failure's output.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
model(torch.ones(3, 2)).sum().backward()
if sys.argv[1] == "plain":
    dist.barrier()
    dist.destroy_process_group()
else:
    from dira3d.engines.distributed import cleanup_distributed
    cleanup_distributed()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(script: Path, kind: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), kind]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=150, help="runs of each kind (default 150)")
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the runs (default 2)")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    failures: dict[str, list[str]] = {"plain": [], "dira3d": []}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "ddp_exit.py"
            script.write_text(SCRIPT)
            for _ in range(args.runs):
                for kind in failures:
                    proc = one_run(script, kind, env)
                    if proc.returncode != 0:
                        failures[kind].append(proc.stdout + proc.stderr)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"{args.runs} runs of each kind beside {args.load} busy processes on {os.cpu_count()} CPUs, "
          f"{time.perf_counter() - start:.0f} s")
    for kind, failed in failures.items():
        aborts = sum("terminate called" in out for out in failed)
        print(f"{kind:7s}: {len(failed)} of {args.runs} runs failed ({aborts} with 'terminate called')")
    first = next((out for failed in failures.values() for out in failed), None)
    if first:
        print("first failure:\n" + first[-2000:])


if __name__ == "__main__":
    main()
