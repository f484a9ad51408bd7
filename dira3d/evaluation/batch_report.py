"""The end of a batch inference (:class:`~dira3d.evaluation.batch.InferenceBatch`): ``inference_report.json``, written
atomically and marked as dira3d's own (:func:`write_report`: a row per input, with the state of each written output and
what made the predictions, ``made_by``, that ``--skip_written True`` reads, :mod:`dira3d.evaluation.batch_resume`), and
the summary in the log (:func:`summarise`).
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

from dira3d.evaluation.batch_failures import failure_reason
from dira3d.evaluation.batch_resume import keep_earlier_rows, output_states
from dira3d.utils.atomic import atomic_write_text

__all__ = ["STATUSES", "first_file", "lost_reason", "summarise", "write_report"]

logger = logging.getLogger("dira3d.evaluation.batch")  # the batch's lines, under its name as before

STATUSES = ("written", "left out", "failed", "not run")
_LOST = "the batch stopped before {} was written: "  # the reason of an input whose row of the one output file was lost


def first_file(image: Any) -> str:
    """The file that names an entry's output (the first of a list of files, one per channel)."""
    return str(image[0] if isinstance(image, (list, tuple)) and image else image)


def lost_reason(path: Any, stopped: str | None, error: BaseException | None = None) -> str:
    """The reason of an input run whose row of the one output file ``path`` (the classification bundles' ``_prob.json``)
    was lost: the batch ``stopped`` before the file was written, and writing it then failed with ``error``, if any."""
    why = failure_reason(error) if error is not None else ""
    return _LOST.format(path) + ("; writing it then failed: ".join(filter(None, [stopped, why])) if why != stopped else why)


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... {names[-1]}" if len(names) > 3 else "")


def _lost_line(batch: Any, why: str, names: list[str]) -> str:
    """One line for the inputs whose rows of the one output file were lost for the same reason ``why`` (a batch stopped
    at input 700 of 1,000 whose file could not be written printed 700 ``failed:`` lines): how many, why, what to do."""
    error = batch.rows_error if batch.rows_error is not None and why.endswith(failure_reason(batch.rows_error)) else None
    code = getattr(error, "errno", None)
    fix = ("free space on that disk or raise your quota" if code in (errno.ENOSPC, getattr(errno, "EDQUOT", None))
           else f"make {Path(str(batch.output_path)).parent} writable" if code in (errno.EROFS, errno.EACCES, errno.EPERM)
           else "fix that" if error is not None else "")
    todo = f"{fix}, or pass --output_path with another file; then " if fix else ""
    count = len(names)
    return (f"failed: the rows of {count} input{'s' if count > 1 else ''} run ({_names(names)}) are lost, not in "
            f"{batch.output_path}: {why}; {todo}run the same command again to run {'them' if count > 1 else 'it'} again")


def summarise(batch: Any, rows: list[dict[str, Any]], completed: bool) -> int:
    """Write the report of ``batch`` (an :class:`~dira3d.evaluation.batch.InferenceBatch`) and log the summary of its
    ``rows``; the exit status. A stopped batch that did not write its one output file keeps in ``rows`` the inputs
    whose rows the earlier file still holds (:func:`~dira3d.evaluation.batch_resume.keep_earlier_rows`, how many:
    ``batch.earlier_kept``)."""
    batch.earlier_kept = keep_earlier_rows(batch, rows) if not completed and batch.output_path is not None else 0
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    counts.update({"kept": sum(bool(r.get("skipped")) for r in rows)} if batch.skip_written or batch.earlier_kept else {})
    code = batch._code(rows)
    report = write_report(batch, rows, counts, code if completed else None)
    if not (batch.several or report):
        return code
    parts = [f"{counts[s]} {s}" for s in STATUSES[1:] if counts[s]]
    summary = (f"inference: {counts['written']} of {len(rows)} inputs written" + (
        f", {counts['kept']} of them kept from the earlier run" if counts.get("kept") else "")
        + (f" ({', '.join(parts)})" if parts else ""))
    if report:
        summary += f"; report: {report}"
    log = logger.info if code == 0 and completed else logger.warning
    log(summary)
    lost: dict[str, list[str]] = {}  # the inputs whose rows of the one output file were lost, by the reason
    prefix = _LOST.format(batch.output_path)
    for row in rows:
        if row["status"] == "failed" and batch.output_path is not None and row["reason"].startswith(prefix):
            lost.setdefault(row["reason"][len(prefix):], []).append(first_file(row["image"]))
        elif row["status"] not in ("written", "not run"):
            name = first_file(row["image"])  # a refusal's reason names its file already: not twice
            log(f"{row['status']}: {row['reason'] if row['reason'].startswith(name) else f'{name}: ' + row['reason']}")
    for why, names in lost.items():  # one line, not one per input (a stop after 700 of 1,000 inputs)
        log(_lost_line(batch, why, names))
    not_run = [first_file(r["image"]) for r in rows if r["status"] == "not run"]
    if not_run:  # one line, not one per input: their reason is the same (a stop after 3 of 1,000 inputs)
        names = _names(not_run)
        log(f"not run: {len(not_run)} input{'s' if len(not_run) > 1 else ''} ({names}): the batch stopped before "
            f"{'them' if len(not_run) > 1 else 'it'}: {batch.stopped}")
    if completed and code:
        log(f"exit status {code}: not every input was written (each one named above)")
    return code


def write_report(batch: Any, rows: list[dict[str, Any]], counts: dict[str, int], code: int | None) -> Path | None:
    """Write the report atomically; an error writing it is logged, not raised (the predictions are written)."""
    import dira3d
    from dira3d.evaluation.outputs import json_digest

    if batch.report_path is None:
        return None
    payload: dict[str, Any] = {"summary": {"inputs": len(rows), **counts}, "exit_status": code,
                               "stopped": batch.stopped, "made_by": batch._made_by, "inputs": output_states(rows)}
    payload.update(written_by=f"dira3d {dira3d.__version__}", sha256=json_digest(payload))
    try:
        batch._check_report()  # a file put there during the run is not replaced either
        batch.report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(batch.report_path, json.dumps(payload, indent=2))
    except OSError as err:
        logger.error(f"the inference report could not be written: {err}")
        return None
    return batch.report_path
