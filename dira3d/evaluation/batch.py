"""A batch of inputs given to a task bundle's ``inference.json`` (``--datalist``): every input is accounted for.

Each input of a batch ends up as one of :data:`STATUSES`:

- ``written``: its prediction was written (a segmentation's mask, or its row of the classification bundles'
  ``_prob.json``, which is written when the run ends, and also when it stops: under torchrun rank 0 writes every
  rank's rows; a file that cannot be written then is one line of the summary, the rows lost, why and what to do);
- ``left out``: refused at the input check before the model ran (:func:`~dira3d.evaluation.screen_inputs`);
- ``failed``: an error while the model ran on it or while its prediction was written (e.g. out of GPU
  memory on one large scan, a transform that fails on it): the batch goes on with the others. An error
  that every later input would meet too, a full disk or a folder that cannot be written (``ENOSPC``,
  ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``), stops the batch, as does Ctrl-C or an error while an input is
  loaded after its check. So does the same error (:func:`failure_key`: its type and message, file names left
  out) on :data:`REPEATED_FAILURES` (3) inputs in a row while none was written yet: a bad setting, a model
  that does not fit the inputs or a lost GPU, which every input would meet (:class:`RepeatedFailureError`);
  once an input was written, a failure is one input's and the batch goes on. With a ``batch_size`` above 1 (the
  bundles use 1), a failure of a batch runs its inputs not written yet again one at a time
  (:func:`~dira3d.evaluation.batch_failures.split_batch`): only an input that fails on its own is ``failed``, with its
  own reason (the failed batch is not counted among the repeated failures, each input run alone is); one whose
  prediction was written before the failure is ``written``;
- ``not run``: the batch stopped before it.

:class:`InferenceBatch` keeps that record. ``inference.json`` builds it from the ``datalist`` and uses it three
times: ``dataset.data`` (:meth:`~InferenceBatch.screen`), the evaluator's ``iteration_update``
(:meth:`~InferenceBatch.iteration`) and ``run`` (:meth:`~InferenceBatch.run`). At the end, also when the batch
stops, it writes ``inference_report.json`` next to the outputs (atomically, marked as dira3d's own like the
predictions: a rerun replaces it; a file from elsewhere, or a folder that cannot be created or written, is refused
before any input is read), logs a summary naming each input not written (those not run on one line), and gives
the exit status: 0 when every input was written, :data:`NOT_ALL_WRITTEN` (3) when some were not (under ``python -m
monai.bundle run`` the process exits with it; called in-process, :meth:`~InferenceBatch.run` returns it). A batch
that stops (a full disk, the same error on its first inputs) exits with its error (1). Ctrl-C and SIGTERM (which
ended the run without a word or a report) while the inputs are screened or the model runs write the report, log one
line on what was kept and exit 130 / 143 under ``python -m monai.bundle run`` (in-process the interrupt is raised); an
input whose prediction was renamed into place before the signal is ``written``, as its file is whole
(:mod:`dira3d.evaluation.batch_stop`).
A single ``--image`` keeps its behaviour: no report, and its error stops the run as the only answer.
Under ``torchrun`` (``WORLD_SIZE`` above 1) each process runs its share of the inputs and rank 0 writes the one report,
and the classification bundles' one file of every input's probabilities (:mod:`dira3d.evaluation.batch_ranks`).
With ``skip_written`` (``--skip_written True``) a rerun keeps, neither read nor run, each input that the earlier report
says was written by the same model and settings, its output unchanged since (:mod:`dira3d.evaluation.batch_resume`).
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.evaluation.batch_datalist import batch_entries
from dira3d.evaluation.batch_failures import (failure_key, failure_reason, file_state, release_gpu_memory, split_batch,
                                              stops_batch)
from dira3d.evaluation.batch_ranks import gather_rows, join_ranks, leave_ranks, rank_share, write_gathered
from dira3d.evaluation.batch_report import STATUSES, first_file, lost_reason, summarise
from dira3d.evaluation.batch_resume import earlier_rows, held_rows, in_order, kept_inputs, log_kept, made_by_record, state_of
from dira3d.evaluation.batch_stop import output_file_rows, stop_on_signal
from dira3d.utils.interrupts import sigterm_as_interrupt
from dira3d.utils.overrides import as_bool

__all__ = ["InferenceBatch", "NOT_ALL_WRITTEN", "REPEATED_FAILURES", "REPORT_NAME", "RepeatedFailureError", "STATUSES",
           "batch_entries", "failure_key"]

logger = logging.getLogger(__name__)

NOT_ALL_WRITTEN = 3  # exit status of a batch that finished with some inputs not written
REPORT_NAME = "inference_report.json"
_HINT = "pass --report_path with another file (\"\" for none)"  # the refusal adds: or pass --overwrite True
# the same error on this many inputs in a row, before any input was written: the batch stops (0: never);
# InferenceBatch(repeated_failures=...), in a bundle: --inference_batch#repeated_failures N
REPEATED_FAILURES = 3


class RepeatedFailureError(RuntimeError):
    """Several inputs of a batch in a row failed with the same error before any was written: the batch stops."""


def _batch_size(batchdata: Any, key: str) -> int:
    names = getattr(batchdata.get(key) if isinstance(batchdata, Mapping) else None, "meta", {}).get("filename_or_obj")
    if isinstance(names, (list, tuple)):
        return max(1, len(names))
    image = batchdata.get(key) if isinstance(batchdata, Mapping) else None
    return int(image.shape[0]) if getattr(image, "shape", None) else 1


class InferenceBatch:
    """The record of a batch run of ``inference.json``: what was written, left out or failed, and why.

    Args:
        datalist: the run's entries (``[{"image": path}, ...]``; the image may be a list of files, one per channel), or
            the path of a JSON file holding them (:func:`batch_entries`).
        report_path: the JSON report to write at the end; ``""`` / None: none (a single ``--image``).
        output_dir, output_postfix, output_ext: as given to ``SavePredictiond`` (segmentation bundles): the report
            names each written mask.
        output_path: the one output file instead (classification bundles' ``_prob.json``; its writer sets :attr:`writer`).
        overwrite: replace an existing ``report_path`` that dira3d did not write.
        image_key: the key of the input in the datalist and in the batches.
        repeated_failures: stop the batch when this many inputs in a row failed with the same error
            (:func:`failure_key`) and none was written yet (:data:`REPEATED_FAILURES`; 0: never).
        skip_written: keep each input the earlier report at ``report_path`` says was written by the same ``made_by``,
            its output unchanged since (:mod:`~dira3d.evaluation.batch_resume`): it is neither read nor run.
        made_by: what makes the predictions, recorded in the report: ``{"model": <model file>, "settings": {...}}``.

    The evaluator's data loader must keep the order of the screened entries (``shuffle`` off), as the
    bundles' do. Under ``torchrun`` it joins the process group, and each rank screens and runs its share
    (:mod:`dira3d.evaluation.batch_ranks`).
    """

    def __init__(self, datalist: Sequence[Mapping[str, Any]] | str | os.PathLike, report_path: str | os.PathLike | None = "",
                 output_dir: str | os.PathLike | None = None, output_postfix: str = "", output_ext: str = ".nii.gz",
                 output_path: str | os.PathLike | None = None, overwrite: Any = False, image_key: str = "image",
                 repeated_failures: int = REPEATED_FAILURES, skip_written: Any = False,
                 made_by: Mapping[str, Any] | None = None) -> None:
        self.datalist = batch_entries(datalist)
        self.report_path = Path(report_path) if report_path else None
        self.output_dir, self.output_postfix, self.output_ext = output_dir, output_postfix, output_ext
        if output_path is not None:  # the probabilities' JSON, checked before screen reads any input
            from dira3d.evaluation.outputs import check_probability_path

            check_probability_path(output_path)
        self.output_path = output_path
        self.overwrite, self.skip_written = as_bool(overwrite, "overwrite"), as_bool(skip_written, "skip_written")
        self.made_by, self._made_by = made_by, None  # (what the report records: made_by_record, in screen)
        self.kept: dict[int, dict] = {}  # the inputs kept from the earlier run: their output's state and row
        self.image_key = image_key
        count = repeated_failures
        if isinstance(count, str) and count.strip().isdigit():  # a number given as text
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"repeated_failures={repeated_failures!r}: pass the number of inputs failing the same way "
                             "that stops a batch, a whole number (0: never stop)")
        self.repeated_failures = int(count)
        self._repeat: tuple[str, int] = ("", 0)  # the last error and on how many inputs in a row
        self.left_out: dict[int, str] = {}
        self.failed: dict[int, str] = {}
        self.done: set[int] = set()
        self.stopped: str | None = None
        self._order = list(range(len(self.datalist)))
        self._next = 0
        # the inputs the model runs on now, with the state of their prediction file before (_settle_in_flight)
        self._in_flight: dict[int, tuple[int, ...] | None] = {}
        self._unusable: BaseException | None = None  # screen's error when no input can be used, for run to raise
        self._written = 0  # inputs written (of every rank), for the line after a signal
        self.rank, self.world, self._joined = join_ranks()  # under torchrun (batch_ranks)
        self.writer: Any = None  # the ProbabilityWriter of output_path: under torchrun rank 0 writes every rank's rows
        self._file_written = False  # output_path written by a batch that stopped (one process: write_stopped_rows)
        self.rows_error: BaseException | None = None  # why output_path could not be written, its rows lost (summarise)
        self.earlier_kept = 0  # inputs whose rows an earlier output_path a stopped batch did not write holds (summarise)
        self._share = rank_share(len(self.datalist), self.rank, self.world)  # this rank's inputs (in one process all)

    @property
    def several(self) -> bool:
        return len(self.datalist) > 1

    # --- the three uses in inference.json ---------------------------------------------------------------------

    def screen(self, preprocessing: Any) -> list[Mapping[str, Any]]:
        """``dataset.data``: the entries that pass the input checks (:func:`~dira3d.evaluation.screen_inputs`).

        Raises:
            FolderNotWritableError: the folder of ``report_path`` cannot be created or written (before any input is
                read).
            FileExistsError: ``report_path`` holds a file dira3d did not write (before any input is read).
            DataError: no input can be used (the report, listing each, is written first).
        """
        from dira3d.data.errors import DataError
        from dira3d.evaluation.inputs import screen_inputs
        from dira3d.utils.atomic import check_output_settings

        if self.report_path is not None:  # (it was met only at the end, after every prediction)
            check_output_settings(hint='"" for none', report_path=self.report_path)
        self._check_report()
        self._made_by = made_by_record(self.made_by) if self.report_path is not None else None
        self.kept = self._keep_written() if self.skip_written and self.several else {}
        self.left_out.clear()
        self._unusable = self.rows_error = None
        left_out: dict[int, str] = {}  # by the index in the inputs to run (this rank's share but those kept)
        todo = [i for i in self._share if i not in self.kept]
        share = [self.datalist[i] for i in todo]
        try:
            try:
                with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: one line, the report, exit 143 (it ended without a word)
                    good = screen_inputs(share, preprocessing, left_out=left_out,
                                         several=True if self.world > 1 or self.kept else None) if share else []
            finally:
                self.left_out.update({todo[i]: reason for i, reason in left_out.items()})
        except KeyboardInterrupt as err:
            stop_on_signal(self, err, "while the inputs were checked")
            raise
        except DataError as err:
            if self.world > 1 or self.kept:  # none of this rank's share, or of those not kept: others may be good
                good = []
            else:
                if self.left_out:
                    self.stopped = "none of the inputs can be used"
                    self._finish(completed=False)
                # raised by run() as the run starts, not while MONAI builds the dataset
                self._unusable, good = err, []
        self._order = [i for i in todo if i not in self.left_out]
        self._next, self._repeat, self._in_flight = 0, ("", 0), {}
        return good

    def iteration(self, engine: Any, batchdata: Any) -> Any:
        """The evaluator's ``iteration_update``: its own iteration (model, post-processing, writing), with the
        failure of one input of a batch recorded and the batch going on. A failure that every later input would
        meet (:func:`~dira3d.evaluation.batch_failures.stops_batch`), and any failure of a single input, is raised as
        before; the same failure on ``repeated_failures`` inputs in a row, none written, raises
        :class:`RepeatedFailureError`. A failed batch of several inputs (``batch_size`` > 1) runs its inputs not
        written yet again one at a time: only one that fails on its own is ``failed``, with its own reason."""
        size = _batch_size(batchdata, self.image_key)
        indices = self._order[self._next: self._next + size]
        self._next += size
        return self._run(engine, batchdata, indices)

    def _run(self, engine: Any, batchdata: Any, indices: list[int]) -> Any:
        """The evaluator's own iteration on ``batchdata``, the inputs ``indices``; a failure recorded (see
        :meth:`iteration`), and a failed batch of several inputs run again one input at a time."""
        if self.output_path is None:  # a file per input: its state before, for _settle_in_flight
            self._in_flight = {index: file_state(self._output(index)) for index in indices}
        try:
            output = engine._iteration(engine, batchdata)
        except Exception as err:  # noqa: BLE001 - one input's failure is recorded; the batch goes on
            # in a batch of several inputs (batch_size > 1), one whose prediction was written before another failed
            # is written: its file is whole (renamed into place) and dira3d's own
            self.done.update(self._settle_in_flight())
            pending = [index for index in indices if index not in self.done]
            parts = None if not self.several or stops_batch(err) else split_batch(batchdata, len(indices))
            if parts is None:
                reason = failure_reason(err)
                for index in pending:
                    self.failed[index] = reason
                if not self.several or stops_batch(err):
                    raise
                files = [first_file(self.datalist[i][self.image_key]) for i in pending]
                self._stop_if_repeated(err, files)
                logger.warning(f"failed: {', '.join(files)}: {reason}; the batch goes on with the other inputs")
                release_gpu_memory(engine)
                return []
            if pending:  # (all written before the failure: nothing to run again)
                logger.warning(f"a batch of {len(indices)} inputs failed ({failure_reason(err)}); its {len(pending)} "
                               "input(s) not written are run again one at a time")
        else:
            self.done.update(indices)
            self._in_flight = {}
            return output
        # out of the except clause: the failed batch's traceback (its tensors, on the GPU) is let go before the retries
        release_gpu_memory(engine)
        return self._one_at_a_time(engine, [(i, part) for i, part in zip(indices, parts) if i in pending])

    def _one_at_a_time(self, engine: Any, parts: list[tuple[int, Any]]) -> list:
        """Run each input of a failed batch again as a batch of one (:func:`split_batch`); the outputs and batches of
        those written, as one iteration's (for the handlers that read them: the classification bundles' writer)."""
        state = getattr(engine, "state", None)
        outputs, batches = [], []
        for index, part in parts:
            if state is not None:
                state.batch = part  # MONAI's post-processing reads the batch from the engine's state
            output = self._run(engine, part, [index])
            if index in self.done:
                outputs.extend(output if isinstance(output, list) else [output])
                if state is not None:
                    batches.extend(state.batch if isinstance(state.batch, list) else [state.batch])
        if state is not None:
            state.batch, state.output = batches, outputs
        return outputs

    def _stop_if_repeated(self, err: BaseException, files: list[str]) -> None:
        """Raise :class:`RepeatedFailureError` when this failure makes ``repeated_failures`` inputs in a row that
        failed the same way, none written yet: every input would (a setting, the model, the device), not one input."""
        key = failure_key(err, files)
        count = (self._repeat[1] if key == self._repeat[0] else 0) + len(files)
        self._repeat = (key, count)
        if self.done or not self.repeated_failures or count < self.repeated_failures:
            return
        left = sum(i not in self.done and i not in self.failed for i in self._order)  # with a failed batch's not tried
        rest = f"the other {left} input{'s are' if left > 1 else ' is'} not run" if left else "no input is left"
        raise RepeatedFailureError(
            f"the batch stops: {count} inputs in a row failed with the same error and none was written, so every input "
            f"would: {failure_reason(err)}; it comes from the run, not the inputs: check the settings (roi_size, "
            f"in_channels, the transforms' settings), the model in ckpt_dir and the device, fix it and run the batch "
            f"again ({rest}; --inference_batch#repeated_failures 0 goes on regardless)") from err

    def run(self, evaluator: Any) -> int:
        """``run``: run ``evaluator``, then write the report and log the summary (also when the batch stops).

        Returns:
            0 when every input was written, :data:`NOT_ALL_WRITTEN` otherwise; under ``python -m monai.bundle run``
            a non-zero status ends the process with it (``SystemExit``).

        Raises:
            DataError: no input can be used, or the single input is refused; under ``python -m monai.bundle run`` it
                ends the process in one ``error:`` line (:mod:`dira3d.utils.bundle_errors`), ignite's traceback of it
                left out.
        """
        from dira3d.utils.bundle_errors import run_by_monai_bundle_command, user_error_in
        from dira3d.utils.interrupts import quiet_error_logs

        if self._unusable is not None:  # no input can be used (screen)
            raise self._unusable
        try:  # a bad input's error ends `python -m monai.bundle run` in one line (dira3d.utils.bundle_errors)
            with sigterm_as_interrupt(), quiet_error_logs(  # not also ignite's traceback of it, nor of a Ctrl-C
                    lambda err: isinstance(err, KeyboardInterrupt) or user_error_in(err) is not None):
                if self._order or (self.world < 2 and not self.kept):  # (none to run in a rank's share: nothing runs)
                    evaluator.run()
                elif self.writer is not None and self.world < 2:  # every input kept or left out: their rows
                    self.writer.write(self.probability_rows([]))
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: the report and one line, not a traceback
            stop_on_signal(self, err, "")
            raise
        except BaseException as err:
            self.stopped = failure_reason(err)
            self._finish(completed=False)
            raise
        code = self._finish(completed=True)
        if self._unusable is not None:  # under torchrun: no rank had an input that can be used (_finish)
            raise self._unusable
        if code and run_by_monai_bundle_command():
            raise SystemExit(code)
        return code

    # --- the record --------------------------------------------------------------------------------------------

    def _output(self, index: int) -> str | None:
        from dira3d.evaluation.outputs import prediction_target

        if self.output_path is not None:
            return str(self.output_path)
        if self.output_dir is None:
            return None
        return prediction_target(first_file(self.datalist[index][self.image_key]), self.output_dir, self.output_postfix,
                                 self.output_ext)

    def _settle_in_flight(self) -> set[int]:
        """The inputs the model ran on whose prediction was renamed into place before the batch stopped in them (Ctrl-C,
        SIGTERM) or another input of their batch failed (``batch_size`` > 1), but before :meth:`iteration` recorded
        them: their file is dira3d's own and another file than the one there when the input started (the atomic rename
        puts a new file in place). Without this the report said ``not run`` (or ``failed``) next to a whole prediction.
        Clears the inputs in flight."""
        from dira3d.evaluation.outputs import is_own_prediction

        written = set()
        for index, before in self._in_flight.items():
            target = self._output(index)
            if index in self.done or index in self.failed or target is None:
                continue
            now = file_state(target)
            if now is not None and now != before and is_own_prediction(target):
                written.add(index)
        self._in_flight = {}
        return written

    def rows(self, completed: bool = True) -> list[dict[str, Any]]:
        """One row per input, in datalist order: ``image``, ``status`` and ``output`` or ``reason``."""
        rows = []
        whole = completed or self.output_path is None or self._file_written  # one file: written at the end or the stop
        for index, entry in enumerate(self.datalist):
            row: dict[str, Any] = {"image": entry.get(self.image_key)}
            if index in self.kept and (whole or state_of(self.output_path) == self.kept[index]["state"]):
                row.update(status="written", output=self._output(index), skipped=True)  # (the earlier file is kept)
            elif index in self.left_out:
                row.update(status="left out", reason=self.left_out[index])
            elif index in self.failed:
                row.update(status="failed", reason=self.failed[index])
            elif index in self.done and whole:
                row.update(status="written", output=self._output(index))
            elif index in self.done or index in self.kept:
                row.update(status="failed", reason=lost_reason(self.output_path, self.stopped, self.rows_error))
            else:
                row.update(status="not run", reason=f"the batch stopped before it: {self.stopped}")
            rows.append(row)
        return rows

    def _keep_written(self) -> dict[int, dict]:
        """The inputs of this rank's share that the earlier report says may be kept (:func:`kept_inputs`), logged."""
        rows, why = earlier_rows(self.report_path, self._made_by)
        images = {i: self.datalist[i].get(self.image_key) for i in self._share}
        kept, again = kept_inputs(images, {i: self._output(i) for i in self._share}, rows, self.output_path is not None)
        log_kept(kept, len(self._share), again, why, self.report_path)
        return kept

    def probability_rows(self, rows: list[dict]) -> list[dict]:
        """The rows of the one output file: ``rows`` (those of the inputs run, in order) with the kept inputs' rows, in
        datalist order (the classification bundles' writer writes them)."""
        return in_order(held_rows(sorted(self.done), rows, self.kept)) if self.kept else rows

    def _check_report(self) -> None:
        from dira3d.evaluation.outputs import check_prediction_targets

        if self.report_path is not None:
            check_prediction_targets([self.report_path], self.overwrite, hint=_HINT, before_marks=False)  # always marked

    def _finish(self, completed: bool) -> int:
        self.done.update(self._settle_in_flight())
        # the one output file: stopped in one process, the rows of the inputs run (and kept), for a --skip_written
        # rerun; under torchrun, this rank's rows for rank 0 (done trimmed first)
        held = output_file_rows(self, completed)
        rows = self.rows(completed)
        if self.world > 1:  # every rank's rows, to rank 0; the ranks leave together once it has written the report
            try:
                mine, (rows, self.stopped, completed, held) = completed, gather_rows(rows, self._share, self.stopped,
                                                                                     completed, self.rank, held)
                self.rows_error = write_gathered(self.writer, held, rows, None if completed else self.stopped) \
                    if self.rank == 0 and held is not None else None
                if self.rows_error is not None and mine:  # as when one process's writer fails: the report, the error
                    self.stopped = "; ".join(filter(None, [self.stopped, failure_reason(self.rows_error)]))
                    summarise(self, rows, completed=False)
                    raise self.rows_error  # (rank 0 stopped: as one process that stops, the summary says it)
                if all(r["status"] == "left out" for r in rows):  # no rank had an input that can be used
                    from dira3d.data.errors import DataError

                    self.stopped, completed = "none of the inputs can be used", False
                    self._unusable = DataError(None, f"none of the {len(rows)} inputs can be used:\n  "
                                               + "\n  ".join(r["reason"] for r in rows))
                return summarise(self, rows, completed) if self.rank == 0 else self._code(rows)
            finally:
                leave_ranks(self._joined)
        return summarise(self, rows, completed)

    def _code(self, rows: list[dict[str, Any]]) -> int:
        self._written = sum(r["status"] == "written" for r in rows)
        return 0 if self._written == len(rows) else NOT_ALL_WRITTEN
