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
stopped (a signal, a full disk) hands over the rows of the inputs it ran too, those its writer took, as one process
that stops writes them (:func:`~dira3d.evaluation.batch_resume.stopped_rows`; it handed over none, so a rerun with
``--skip_written True`` ran them again); its inputs not reached are ``not run``. When a rank stopped, rank 0 leaves an
earlier file holding rows of inputs this run did not reach as it was, as one process does (the inputs run are then
``failed``, those whose rows it holds by the same model and settings ``written`` as kept:
:func:`~dira3d.evaluation.batch_resume.keep_earlier_rows`); when no rank ran an input, no file is written. Rank 0
stopped and failing to write the file ends as one process that stops (the summary's one line on the rows lost, its
stop's exit), not with the write's error. A writer not linked to the batch is refused under
``torchrun`` when the run starts, in one ``error:`` line naming its ``batch`` setting (each rank would write the file
with its own share).

Under ``torchrun`` every rank logs its own lines (``writing: ...``, ``failed: ...``) into the one console: once the
ranks have joined, each line a rank logs starts with ``[rank r/W]`` (:func:`prefix_rank_logs`, put in the message, so
a ``logging.conf`` of one's own keeps its format); one process logs as before. After Ctrl-C or SIGTERM (``kill`` of
the ``torchrun`` process, which sends SIGTERM to every rank, or Slurm's, which every process of the job step gets)
each rank writes what it holds as above and says what it kept (:func:`stop_note`): rank 0 the report and what the
one output file holds, another rank its own predictions, or that rank 0 writes its rows into the one file. Each
rank exits 143 (130 for Ctrl-C); ``torchrun`` itself ends with its own error (``SignalException``, exit 1).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from dira3d.evaluation.batch_failures import failure_reason

__all__ = ["WAIT_FOR_RANKS", "gather_rows", "join_ranks", "leave_ranks", "prefix_rank_logs", "rank_share", "stop_note",
           "write_gathered"]

logger = logging.getLogger(__name__)

WAIT_FOR_RANKS = timedelta(days=7)  # a rank whose share ended waits this long for the others' (gloo's timeout)


def _world() -> int:
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    return int(world) if world.isdigit() else 1


def join_ranks() -> tuple[int, int, bool]:
    """``(rank, world size, joined)``: ``(0, 1, False)`` in one process; under ``torchrun`` (``WORLD_SIZE`` above 1) the
    process group ``torchrun`` describes (gloo, :data:`WAIT_FOR_RANKS`), ``joined`` when this call formed it (then
    :func:`leave_ranks` ends it); from then on the process's log lines name its rank (:func:`prefix_rank_logs`).

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
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix_rank_logs(rank, world)
    return rank, world, not formed


class _RankPrefix:
    """A ``logging`` record factory: the record the one before it makes, its message prefixed with ``[rank r/W]``."""

    def __init__(self, previous: Any, prefix: str) -> None:
        self.previous, self.prefix = previous, prefix

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format or argument: left as it is, for logging to report as usual
            return record
        record.msg, record.args = f"{self.prefix} {message}", ()
        return record


def prefix_rank_logs(rank: int, world: int) -> None:
    """From now on, every log record this process makes starts its message with ``[rank r/W]`` (``[rank 1/2] writing:
    ...``): under ``torchrun`` the ranks log into the one console, and their lines could not be told apart. Set as
    ``logging``'s record factory, so every logger and handler has it, the bundle's ``logging.conf`` included (its format
    is kept: the prefix is the message's), and dira3d's ``WARNING:`` lines
    (:func:`~dira3d.utils.warning_format.prefix_warnings`); for the process's life (the lines after the ranks have left
    the group, a stop's line, are a rank's too); a second call changes the prefix, not adds one; nothing in one process (``world``
    1)."""
    if world < 2:
        return
    from dira3d.utils.warning_format import prefix_warnings

    factory = logging.getLogRecordFactory()
    previous = factory.previous if isinstance(factory, _RankPrefix) else factory
    logging.setLogRecordFactory(_RankPrefix(previous, f"[rank {rank}/{world}]"))
    prefix_warnings(f"[rank {rank}/{world}]")  # dira3d's WARNING: lines too (an input left out of the rank's share)


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
        reason = f"the ranks' records could not be gathered: {failure_reason(err)}"
        where = ("the report holds this rank's inputs only (see each rank's log)" if rank == 0 else
                 "rank 0's report, if it writes one, has this rank's inputs as not run (this log names each one "
                 "written)")
        logger.error(f"rank {rank}: {reason}; {where}")
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


def write_gathered(writer: Any, predictions: list[dict], rows: list[dict], stopped: str | None = None
                   ) -> BaseException | None:
    """Rank 0: write every rank's ``predictions`` into the one output file with ``writer`` (the
    :class:`~dira3d.evaluation.ProbabilityWriter`); the error when that fails, the inputs ``written`` of ``rows`` then
    ``failed`` with it, as in one process. ``stopped``: why a rank stopped (None: every rank completed its share); then,
    as one process that stops, an earlier file holding rows of inputs this run did not reach is left as it was
    (:func:`~dira3d.evaluation.batch_resume.keeps_earlier_file`), the inputs run ``failed`` (those kept stay ``written``)."""
    from dira3d.evaluation.batch_report import lost_reason
    from dira3d.evaluation.batch_resume import keeps_earlier_file

    target = str(writer.output_path)
    run = [row for row in rows if row["status"] == "written" and row.get("output") == target and not row.get("skipped")]
    if stopped is not None and keeps_earlier_file(target, predictions, len(run)):
        for row in run:
            row.pop("output", None)
            row.update(status="failed", reason=lost_reason(target, stopped))
        return None
    try:
        writer.write(predictions)
    except Exception as err:  # noqa: BLE001 - the report says it, and the batch raises it after the report
        reason = lost_reason(target, stopped, err)  # (as one process's: the stop's reason, then the error)
        for row in rows:
            if row["status"] == "written":
                row.pop("output", None)
                row.update(status="failed", reason=reason)
        return err
    return None


def stop_note(rank: int, world: int, output_path: Any, written: tuple[int, int], report_path: Any,
              file_written: bool = False, rows_error: BaseException | None = None, earlier_kept: int = 0) -> str:
    """What the line after Ctrl-C / SIGTERM says was kept, true for the rank that logs it (``written``: the inputs
    written of every rank, after the gather, and of this rank's share): one process (``world`` 1) and rank 0 keep the
    predictions written, or say what the one ``output_path`` holds, and name the report they wrote (``report_path``;
    None: none); another rank keeps its own predictions, and never writes ``output_path`` (rank 0 does, with this
    rank's rows of the inputs it ran) nor the report. ``file_written``: one process wrote ``output_path``
    with the rows of the inputs written when it stopped; ``rows_error``: why writing it failed (one process, rank 0);
    ``earlier_kept``: the batch did not write ``output_path``, which still holds that many rows of an earlier run by the
    same model and settings, kept in the report
    (:func:`~dira3d.evaluation.batch_resume.keep_earlier_rows`: the ``written`` ones are all in that file)."""
    every, mine = written
    nothing = f"nothing was written to {output_path}" + (f" ({failure_reason(rows_error)})" if rows_error else "")
    if earlier_kept and output_path is not None and rank == 0:
        nothing += (f"; it still holds the rows of the {every} input(s) written, by an earlier run with the same model "
                    "and settings, which the report keeps")
    if world < 2:
        kept = (f"the {every} prediction(s) written are kept, each whole" if output_path is None  # written atomically
                else f"{output_path} holds the rows of the {every} input(s) written" if file_written else nothing)
    elif rank == 0:
        kept = (f"the {every} prediction(s) written are kept, each whole" if output_path is None
                else f"{output_path} holds the rows of the {every} input(s) written"
                if every and rows_error is None and not earlier_kept else nothing)
    else:
        kept = (f"this rank's {mine} prediction(s) written are kept, each whole" if output_path is None
                else f"rank 0 writes {output_path} with this rank's rows of the {mine} input(s) it ran (the report says "
                     "which inputs are written)" if mine
                else f"this rank ran no input to the end, so no row of {output_path} is this rank's")
    if report_path is None:
        return kept
    return f"{kept}; report: {report_path}" + (" (rank 0 writes it)" if rank else "")
