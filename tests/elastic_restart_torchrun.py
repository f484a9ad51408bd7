"""Run by ``torchrun --standalone --nproc_per_node 2 --max_restarts 1`` (tests/test_elastic_restart.py).

Attempt 0: both ranks join the process group, then rank 1 fails (exit 1) and torchrun restarts both workers.
Attempt 1: rank 1 joins 3 s late, so rank 0 looks for rank 1's address before rank 1 has written it again: with
torchrun's one store for every attempt it found the failed process's address (Connection refused). Each rank
prints ``ATTEMPT <n> RANK <r> SUM <s>`` after an all-reduce."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from dira3d.engines.distributed import cleanup_distributed, init_distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(3)
assert init_distributed("gloo")
value = torch.ones(1)
dist.all_reduce(value)
print(f"ATTEMPT {attempt} RANK {rank} SUM {int(value)}", flush=True)
if attempt == 0:
    dist.barrier()  # both printed; rank 0 then waits in a collective that rank 1 leaves by failing
    if rank == 1:
        os._exit(1)
    dist.barrier()
    sys.exit(0)
cleanup_distributed()
