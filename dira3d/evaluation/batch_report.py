"""The end of a batch inference (:class:`~dira3d.evaluation.batch.InferenceBatch`): ``inference_report.json``, written
atomically and marked as dira3d's own (:func:`write_report`: a row per input, with the state of each written output and
what made the predictions, ``made_by``, that ``--skip_written True`` reads, :mod:`dira3d.evaluation.batch_resume`), and
the summary in the log (:func:`summarise`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dira3d.evaluation.batch_resume import output_states
from dira3d.utils.atomic import atomic_write_text

__all__ = ["STATUSES", "first_file", "summarise", "write_report"]

logger = logging.getLogger("dira3d.evaluation.batch")  # the batch's lines, under its name as before

STATUSES = ("written", "left out", "failed", "not run")


def first_file(image: Any) -> str:
    """The file that names an entry's output (the first of a list of files, one per channel)."""
    return str(image[0] if isinstance(image, (list, tuple)) and image else image)


def summarise(batch: Any, rows: list[dict[str, Any]], completed: bool) -> int:
    """Write the report of ``batch`` (an :class:`~dira3d.evaluation.batch.InferenceBatch`) and log the summary of its
    ``rows``; the exit status."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    counts.update({"kept": sum(bool(r.get("skipped")) for r in rows)} if batch.skip_written else {})
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
    for row in rows:
        if row["status"] not in ("written", "not run"):
            name = first_file(row["image"])  # a refusal's reason names its file already: not twice
            log(f"{row['status']}: {row['reason'] if row['reason'].startswith(name) else f'{name}: ' + row['reason']}")
    not_run = [first_file(r["image"]) for r in rows if r["status"] == "not run"]
    if not_run:  # one line, not one per input: their reason is the same (a stop after 3 of 1,000 inputs)
        names = ", ".join(not_run[:3]) + (f", ... {not_run[-1]}" if len(not_run) > 3 else "")
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
