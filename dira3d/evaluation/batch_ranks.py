"""A batch inference (``inference.json`` with ``--datalist``) split over the processes of ``torchrun``.

``torchrun --nproc_per_node=8 -m monai.bundle run --config_file configs/inference.json --datalist big.json``: each
process (rank ``r`` of ``W``) runs the inputs ``r, r + W, r + 2W, ...`` of the datalist (:func:`rank_share`, the split
of MONAI's ``DistributedSampler`` with ``even_divisible=False``: no input is run twice, and neighbouring entries of a
datalist, often alike in size (one patient's series, a site's scans sorted together), go to different ranks, so the
shares take about the same time) on its own device (``cuda:LOCAL_RANK``; the bundles' ``device`` is
:func:`~dira3d.engines.distributed.local_device`) and writes its own predictions only. A failure of one input, a stop
of a rank's share (the same error on its first inputs, a full disk) or Ctrl-C / SIGTERM are that rank's, as in one
process: the ranks do not talk while the model runs, so none waits for another there. When a rank's share ends
(done or stopped) it hands its rows of the report to the others in one ``all_gather_object`` (:func:`gather_rows`)
and rank 0 writes the one ``inference_report.json`` and logs the summary of every input; the ranks leave the process
group together (:func:`~dira3d.engines.distributed.cleanup_distributed`, after rank 0 has written) and end with the
same exit status (a stopped rank with its error). The process group is gloo (it moves the rows only, not GPU
tensors) with a long timeout (:data:`WAIT_FOR_RANKS`): a rank that stopped after its first inputs waits for the
others to finish theirs, which may take hours. A rank that dies (killed, out of memory) closes its connections:
``torchrun`` sends the others SIGTERM, and their gather fails at once (``Connection closed by peer``), so rank 0 writes
the report of its own inputs, the others' ``not run``, and each rank exits 143 (checked by hand with rank 1 of 2 killed
by SIGKILL in its share: the report and exit within seconds, 2026-11-28); rank 0 killed, no report is written, as when
one process is killed.

Only for the bundles that write a file per input (``output_dir``); the classification bundles' one ``_prob.json``
(``output_path``) is refused under ``torchrun`` in one line (:func:`join_ranks`).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

__all__ = ["WAIT_FOR_RANKS", "gather_rows", "join_ranks", "leave_ranks", "rank_share"]

logger = logging.getLogger(__name__)

WAIT_FOR_RANKS = timedelta(days=7)  # a rank whose share ended waits this long for the others' (gloo's timeout)


def _world() -> int:
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    return int(world) if world.isdigit() else 1


def join_ranks(output_path: Any = None) -> tuple[int, int, bool]:
    """``(rank, world size, joined)``: ``(0, 1, False)`` in one process; under ``torchrun`` (``WORLD_SIZE`` above 1) the
    process group ``torchrun`` describes (gloo, :data:`WAIT_FOR_RANKS`), ``joined`` when this call formed it (then
    :func:`leave_ranks` ends it).

    Raises:
        RuntimeError: ``output_path`` is set (one output file for every input: the classification bundles), or
            ``WORLD_SIZE`` is above 1 without ``MASTER_ADDR`` (not ``torchrun``).
    """
    import torch.distributed as dist

    from dira3d.engines.distributed import init_distributed

    world = _world()
    if world < 2:
        return 0, 1, False
    if output_path is not None:
        raise RuntimeError(
            f"this bundle writes the predictions of every input into one file ({output_path}), which the {world} "
            f"processes of torchrun (WORLD_SIZE={world}) cannot share: run `python -m monai.bundle run` without torchrun "
            "(pick the GPU with --device), or split the datalist and run one process per part, each with its own "
            "--output_path")
    formed = dist.is_available() and dist.is_initialized()
    if not init_distributed("gloo", timeout=WAIT_FOR_RANKS):
        raise RuntimeError(f"WORLD_SIZE={world} but no MASTER_ADDR in the environment: run the batch under torchrun, "
                           "or unset WORLD_SIZE to run it in one process")
    return dist.get_rank(), dist.get_world_size(), not formed


def leave_ranks(joined: bool) -> None:
    """Wait for every rank and leave the process group, when :func:`join_ranks` formed it. A rank that is gone (its
    error was logged by :func:`gather_rows`) fails the wait: the group is left without it."""
    import torch.distributed as dist

    from dira3d.engines.distributed import cleanup_distributed

    if not joined:
        return
    try:
        cleanup_distributed()
    except Exception:  # noqa: BLE001 - another rank is gone: leave the group all the same
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_share(count: int, rank: int, world: int) -> list[int]:
    """The indices of the inputs that rank ``rank`` of ``world`` runs, of ``count``: ``rank, rank + world, ...``."""
    return list(range(rank, count, world))


def gather_rows(rows: list[dict], share: list[int], stopped: str | None, completed: bool,
                rank: int) -> tuple[list[dict], str | None, bool]:
    """The report's rows of every rank (``rows``: this rank's record of every input, of which its ``share`` is taken),
    in datalist order; why the ranks that stopped stopped (one reason when every rank stopped for it, else ``rank r:
    reason`` for each) and whether every rank completed its share; on every rank, in one ``all_gather_object``.

    A rank that died before its share ended (its connection closed) leaves the others without its rows: each rank
    logs that error and reports its own inputs, the others' ``not run`` with the error as the reason."""
    import torch.distributed as dist

    mine = {index: rows[index] for index in share}
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, (mine, stopped, completed))
    except Exception as err:  # noqa: BLE001 - another rank is gone: this rank's own record is still reported
        from dira3d.evaluation.batch_failures import failure_reason

        reason = f"the ranks' records could not be gathered: {failure_reason(err)}"
        logger.error(f"rank {rank}: {reason}; the report holds this rank's inputs only (see each rank's log)")
        gathered = [(mine, f"{stopped}; {reason}" if stopped else reason, False)]
    merged: dict[int, dict] = {}
    reasons: dict[int, str] = {}
    for other, (their_rows, their_stop, _) in enumerate(gathered):
        merged.update(their_rows)
        if their_stop:
            reasons[other] = their_stop
    if len(set(reasons.values())) == 1 and len(reasons) == len(gathered):
        why: str | None = next(iter(reasons.values()))
    else:
        why = "; ".join(f"rank {r}: {reason}" for r, reason in sorted(reasons.items())) or None
    gone = {"status": "not run", "reason": f"the batch stopped before it: {why}"}  # a rank's whose rows did not come
    return ([merged.get(i) or {"image": row["image"], **gone} for i, row in enumerate(rows)], why,
            all(done for _, _, done in gathered))
