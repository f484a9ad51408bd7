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

The classification bundles write every input's probabilities into one file (``output_path``, their ``_prob.json``):
there each rank's :class:`~dira3d.evaluation.ProbabilityWriter` (linked to the batch: ``batch=@inference_batch``)
keeps its rows instead of writing them, they travel in the same ``all_gather_object``, and rank 0 writes the one file
in datalist order (:func:`gather_rows`, :func:`write_gathered`), as one process would have written it. A rank that
stopped hands over no rows (as in one process, where a stopped batch writes no file): its inputs are ``failed`` or
``not run`` in the report with the reason, the others' are in the file; when no rank completed its share, no file is
written. A writer not linked to the batch is refused under ``torchrun`` when the run starts (each rank would write
the file with its own share).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

__all__ = ["WAIT_FOR_RANKS", "gather_rows", "join_ranks", "leave_ranks", "rank_share", "write_gathered"]

logger = logging.getLogger(__name__)

WAIT_FOR_RANKS = timedelta(days=7)  # a rank whose share ended waits this long for the others' (gloo's timeout)


def _world() -> int:
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    return int(world) if world.isdigit() else 1


def join_ranks() -> tuple[int, int, bool]:
    """``(rank, world size, joined)``: ``(0, 1, False)`` in one process; under ``torchrun`` (``WORLD_SIZE`` above 1) the
    process group ``torchrun`` describes (gloo, :data:`WAIT_FOR_RANKS`), ``joined`` when this call formed it (then
    :func:`leave_ranks` ends it).

    Raises:
        RuntimeError: ``WORLD_SIZE`` is above 1 without ``MASTER_ADDR`` (not ``torchrun``).
    """
    import torch.distributed as dist

    from dira3d.engines.distributed import init_distributed

    world = _world()
    if world < 2:
        return 0, 1, False
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


def gather_rows(rows: list[dict], share: list[int], stopped: str | None, completed: bool, rank: int,
                held: tuple[list[int], list[dict]] | None = None
                ) -> tuple[list[dict], str | None, bool, list[dict] | None]:
    """The report's rows of every rank (``rows``: this rank's record of every input, of which its ``share`` is taken),
    in datalist order; why the ranks that stopped stopped (one reason when every rank stopped for it, else ``rank r:
    reason`` for each); whether every rank completed its share; and the rows of the one output file (``held``: this
    rank's, ``(indices, rows)``: the inputs whose rows they are, in order, or None when its share did not complete)
    of every rank that completed, in datalist order (None when none did); on every rank, in one ``all_gather_object``.

    A rank that died before its share ended (its connection closed) leaves the others without its rows: each rank
    logs that error and reports its own inputs, the others' ``not run`` with the error as the reason."""
    import torch.distributed as dist

    mine = {index: rows[index] for index in share}
    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, (mine, stopped, completed, held))
    except Exception as err:  # noqa: BLE001 - another rank is gone: this rank's own record is still reported
        from dira3d.evaluation.batch_failures import failure_reason

        reason = f"the ranks' records could not be gathered: {failure_reason(err)}"
        logger.error(f"rank {rank}: {reason}; the report holds this rank's inputs only (see each rank's log)")
        gathered = [(mine, f"{stopped}; {reason}" if stopped else reason, False, held)]
    merged: dict[int, dict] = {}
    reasons: dict[int, str] = {}
    for other, (their_rows, their_stop, _, _) in enumerate(gathered):
        merged.update(their_rows)
        if their_stop:
            reasons[other] = their_stop
    if len(set(reasons.values())) == 1 and len(reasons) == len(gathered):
        why: str | None = next(iter(reasons.values()))
    else:
        why = "; ".join(f"rank {r}: {reason}" for r, reason in sorted(reasons.items())) or None
    gone = {"status": "not run", "reason": f"the batch stopped before it: {why}"}  # a rank's whose rows did not come
    return ([merged.get(i) or {"image": row["image"], **gone} for i, row in enumerate(rows)], why,
            all(done for _, _, done, _ in gathered), _in_datalist_order([h for *_, h in gathered if h is not None]))


def _in_datalist_order(held: list[tuple[list[int], list[dict]]]) -> list[dict] | None:
    """The ranks' rows of the one output file, by the index of their input; None when no rank completed its share. A
    rank whose rows are not one per input (an ``output_transform`` of one's own) has them after the others', in order."""
    if not held:
        return None
    keyed: list[tuple[float, dict]] = []
    for indices, their_rows in held:
        keyed.extend(zip(indices if len(indices) == len(their_rows) else [float("inf")] * len(their_rows), their_rows))
    return [row for _, row in sorted(keyed, key=lambda pair: pair[0])]


def write_gathered(writer: Any, predictions: list[dict], rows: list[dict]) -> BaseException | None:
    """Rank 0: write every rank's ``predictions`` into the one output file with ``writer`` (the
    :class:`~dira3d.evaluation.ProbabilityWriter`); the error when that fails, the inputs ``written`` of ``rows`` then
    ``failed`` with it, as in one process."""
    from dira3d.evaluation.batch_failures import failure_reason

    try:
        writer.write(predictions)
    except Exception as err:  # noqa: BLE001 - the report says it, and the batch raises it after the report
        reason = f"the batch stopped before {writer.output_path} was written: {failure_reason(err)}"
        for row in rows:
            if row["status"] == "written":
                row.pop("output", None)
                row.update(status="failed", reason=reason)
        return err
    return None
