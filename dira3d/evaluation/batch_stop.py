"""What an :class:`~dira3d.evaluation.InferenceBatch` does when it stops, and what each rank hands over at the end.

- :func:`stop_on_signal`: after Ctrl-C or SIGTERM, the report, one line on what was kept and how to go on, and under
  ``python -m monai.bundle run`` the exit status 130 / 143 instead of the interrupt's traceback;
- :func:`output_file_rows`: the classification bundles' one output file (``output_path``) at the end: in one process a
  stopped batch writes the rows of the inputs it ran and kept
  (:func:`~dira3d.evaluation.batch_resume.write_stopped_rows`); under ``torchrun`` each rank hands its rows to rank 0,
  also when it stopped (:func:`~dira3d.evaluation.batch_resume.stopped_rows`), which writes them
  (:mod:`dira3d.evaluation.batch_ranks`).
"""

from __future__ import annotations

import logging
from typing import Any

from dira3d.evaluation.batch_failures import failure_reason
from dira3d.evaluation.batch_ranks import stop_note
from dira3d.evaluation.batch_resume import held_rows, stopped_rows, write_stopped_rows

__all__ = ["output_file_rows", "stop_on_signal"]

logger = logging.getLogger("dira3d.evaluation.batch")  # the batch's lines, under the logger they always had


def stop_on_signal(batch: Any, err: KeyboardInterrupt, when: str) -> None:
    """After Ctrl-C or SIGTERM (``batch``: an :class:`~dira3d.evaluation.InferenceBatch`): write the report, log one
    line on what was written and how to go on (under torchrun each rank its own, :func:`stop_note`), and under ``python
    -m monai.bundle run`` exit with 130 / 143 (``SystemExit``) instead of the interrupt's traceback (in-process, the
    caller re-raises the interrupt)."""
    from dira3d.utils.bundle_errors import run_by_monai_bundle_command
    from dira3d.utils.interrupts import interrupt_exit_code, interrupted_word, sigterm_ignored

    batch.stopped = failure_reason(err) + (f" {when}" if when else "")
    with sigterm_ignored():  # a second SIGTERM (SLURM's to every process, torchrun's forwarded) ends no report
        batch._finish(completed=False)
    kept = stop_note(batch.rank, batch.world, batch.output_path, (batch._written, len(batch.done)), batch.report_path if
                     batch.several else None, batch._file_written, batch.rows_error, batch.earlier_kept)  # a rank's
    nothing_kept = batch.output_path is not None and batch.rank == 0 and not batch._written  # (of every rank's inputs)
    again = ("run the same command again for every input (it replaces dira3d's own earlier predictions)" if nothing_kept
             else "run the same command again with --skip_written True to run only the inputs not written (without "
             "it, every input is run again)")
    logger.warning(f"inference {interrupted_word(err)}{f' {when}' if when else ''}; {kept}; {again}")
    if run_by_monai_bundle_command():
        raise SystemExit(interrupt_exit_code(err)) from None


def output_file_rows(batch: Any, completed: bool) -> tuple[list, list[dict]] | None:
    """The one output file of a batch that ends (``completed``) or stops, before its report: sets
    ``batch._file_written`` (whether the rows of the inputs run are in that file) and returns the rows this rank hands
    to rank 0 under torchrun (None: none; always None in one process).

    In one process a stopped batch writes the file itself (:func:`write_stopped_rows`). Under torchrun the rows a rank
    hands over (:func:`held_rows`) are those of the inputs it ran, also when it stopped (those its writer took, as one
    process writes them: :func:`stopped_rows`), and those it kept."""
    batch._file_written = False
    if batch.writer is None:
        return None
    if batch.world < 2:
        batch._file_written = not completed and write_stopped_rows(batch)
        return None
    taken = ((sorted(batch.done), batch.writer.rows) if completed else stopped_rows(batch)) if batch._order else None
    taken = taken if completed or (taken and taken[0]) else None  # a stopped rank that ran none: nothing of its own
    batch._file_written = not completed and taken is not None  # its inputs run are written if rank 0 writes the file
    return held_rows(*(taken or ([], [])), batch.kept) if taken is not None or batch.kept else None
