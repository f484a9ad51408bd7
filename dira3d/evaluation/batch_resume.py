"""A rerun of a batch inference that keeps what an earlier run wrote: ``--skip_written True``
(:class:`~dira3d.evaluation.batch.InferenceBatch`'s ``skip_written``).

A batch of 1,000 CTs stopped by a SLURM time limit at input 700 ran all 1,000 again when the same command was run
again. With ``skip_written`` on, an input is kept, neither read nor run, when all of these hold:

- the earlier ``inference_report.json`` at the same ``report_path`` is there, dira3d's own and unchanged (its mark and
  checksum, :func:`~dira3d.evaluation.outputs.is_own_prediction`);
- it was made by the same model and settings (:func:`made_by_record`, which every report records as ``made_by``: the
  SHA-256 of the model file, and the settings that change a prediction, as each bundle's ``inference.json`` lists them
  in ``inference_batch#made_by``: its top-level settings but where the outputs go, the device, the batch sizes and
  those of the network's training, with the inferer's ``overlap`` / ``mode`` and the threshold); otherwise nothing is
  kept, and one line says what differs;
- its row for the input (the same ``image``) is ``written`` with the ``output`` this run would write, and that file is
  the one the earlier run wrote (dira3d's own, marked) and unchanged since: the ``output_state`` the report recorded
  (size, ``mtime_ns`` and ``ctime_ns``, :func:`output_states`) is the file's now. A file written, replaced or touched
  since has another ``ctime_ns``, which no one sets, even with its ``mtime`` put back, so the file is not read: reading a
  512 x 512 x 300 mask to check its mark's checksum takes seconds, and the evaluator's check of the targets
  (:class:`~dira3d.evaluation.CheckPredictionFiles`) reads every existing one again when the run starts;
- for the classification bundles, the earlier ``_prob.json`` (the row's ``output``) holds the input's row: the new
  file takes it, so it still lists every input in datalist order (:func:`held_rows`). A classification batch in one
  process that stops (Ctrl-C, SIGTERM, an error that stops the batch) writes that file with the rows of the inputs
  it ran and kept (:func:`write_stopped_rows`): it was written only when the batch ended, so a stopped batch left no
  row to keep and the rerun ran every input again. An earlier file such a batch leaves as it was (it holds rows of
  inputs the stopped run did not reach, or writing failed) keeps in the new report the inputs whose rows the earlier
  report says it holds (:func:`keep_earlier_rows`): the new report replaced the one that recorded them.

Any other input is run again. A kept input is ``written`` in the new report, with ``"skipped": true``. Under
``torchrun`` each rank decides for its own share, so the outputs are those of one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["earlier_rows", "held_rows", "in_order", "keep_earlier_rows", "keeps_earlier_file", "kept_inputs", "log_kept",
           "made_by_record", "output_states", "state_of", "stopped_rows", "write_stopped_rows"]

logger = logging.getLogger(__name__)

SETTING = "--skip_written"


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it (tuples and arrays as lists, other objects as text), to compare with a report's."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy, torch
        return _plain(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def made_by_record(made_by: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What makes a run's predictions, as its report records it: ``{"model": {"path", "size", "sha256"}, "settings":
    {...}}`` from ``made_by`` (``{"model": <model file>, "settings": {...}}``; None: not given). An unreadable model
    file has ``sha256`` null (nothing is kept then)."""
    if made_by is None:
        return None
    model = made_by.get("model")
    record: dict[str, Any] = {"path": str(model) if model else None, "size": None, "sha256": None}
    if model:
        try:
            with open(model, "rb") as file:
                record["sha256"] = hashlib.file_digest(file, "sha256").hexdigest()
            record["size"] = os.path.getsize(model)
        except OSError:  # unreadable now: recorded without a checksum, which matches no run (nothing is kept)
            pass
    return json.loads(json.dumps({"model": record, "settings": _plain(made_by.get("settings") or {})}))


def state_of(path: str | os.PathLike | None) -> dict[str, int] | None:
    """A file's ``{"size", "mtime_ns", "ctime_ns"}`` (None: no file): what tells whether it changed since a report
    recorded it."""
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return None if stat is None else {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def output_states(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with each ``written`` row's ``output_state`` (:func:`state_of` its ``output``), for the report."""
    states: dict[str, dict | None] = {}
    result = []
    for row in rows:
        row = dict(row)
        output = row.get("output")
        if row.get("status") == "written" and output:
            if output not in states:
                states[output] = state_of(output)
            if states[output] is not None:
                row["output_state"] = states[output]
        result.append(row)
    return result


def _differences(then: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """What differs between an earlier run's ``made_by`` and this run's, in words ("" when nothing does)."""
    model_then, model_now = then.get("model") or {}, now.get("model") or {}
    if not model_now.get("sha256"):
        return f"the model file {model_now.get('path')} cannot be read"
    if model_then.get("sha256") != model_now.get("sha256"):
        return (f"the model differs from the earlier run's ({model_then.get('path')}, {model_then.get('size')} bytes then; "
                f"{model_now.get('path')}, {model_now.get('size')} bytes now)")
    settings_then, settings_now = then.get("settings") or {}, now.get("settings") or {}
    changed = [key for key in sorted(set(settings_then) | set(settings_now))
               if settings_then.get(key, "(none)") != settings_now.get(key, "(none)")]
    if not changed:
        return ""
    said = "; ".join(f"{key} {json.dumps(settings_then.get(key, '(none)'))} then, {json.dumps(settings_now.get(key, '(none)'))} "
                     "now" for key in changed[:3])
    return f"the settings differ from the earlier run's: {said}" + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def earlier_rows(report_path: Path | None, made_by: Mapping[str, Any] | None) -> tuple[list[dict], str]:
    """The rows of the earlier report at ``report_path`` when its predictions may be kept (the report is dira3d's own
    and records the same ``made_by``), else ``[]`` and why not."""
    from dira3d.evaluation.outputs import is_own_prediction

    if report_path is None:
        return [], "the batch writes no report (report_path \"\"), so no earlier run can be told apart"
    if made_by is None:
        return [], ("this inference.json gives inference_batch no made_by (the model and settings that make the "
                    "predictions), so an earlier run's cannot be told to be this run's")
    if not report_path.is_file():
        return [], f"no earlier report at {report_path}"
    if not is_own_prediction(report_path):
        return [], f"{report_path} is not a report dira3d wrote, or it was changed since"
    payload = json.loads(report_path.read_text(encoding="utf-8"))
    then = payload.get("made_by")
    if not isinstance(then, Mapping):
        return [], (f"the earlier report {report_path} does not record the model and settings of its run (written by "
                    f"{payload.get('written_by')})")
    why = _differences(then, made_by)
    if why:
        return [], why
    rows = payload.get("inputs")
    return [row for row in rows if isinstance(row, Mapping)] if isinstance(rows, list) else [], ""


def _key(image: Any) -> str:
    return json.dumps(image, sort_keys=True, default=str)


def _probability_rows(path: str) -> dict[str, list[dict]] | None:
    """The rows of an earlier ``_prob.json`` by their ``image`` (None: not dira3d's own or unreadable)."""
    from dira3d.evaluation.outputs import is_own_prediction

    if not is_own_prediction(path):
        return None
    rows: dict[str, list[dict]] = {}
    for row in json.loads(Path(path).read_text(encoding="utf-8")).get("predictions", []):
        if isinstance(row, Mapping):
            rows.setdefault(str(row.get("image")), []).append(dict(row))
    return rows


def kept_inputs(images: Mapping[int, Any], targets: Mapping[int, str | None], rows: Sequence[Mapping[str, Any]],
                single_file: bool) -> tuple[dict[int, dict], list[str]]:
    """The inputs of ``images`` (index: the datalist's ``image``) that the earlier report's ``rows`` say were written to
    their ``targets`` (index: the file this run would write) and may be kept, each with its ``state`` (the output's
    :func:`state_of`) and, for a ``single_file`` (the classification bundles' ``_prob.json``), its earlier ``row``; and
    why each other input written then is run again."""
    earlier: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        earlier.setdefault(_key(row.get("image")), []).append(row)
    probabilities: dict[str, dict[str, list[dict]] | None] = {}
    kept: dict[int, dict] = {}
    again: list[str] = []
    for index, image in images.items():
        same = earlier.get(_key(image))
        row = same.pop(0) if same else None
        if row is None or row.get("status") != "written":
            continue
        output, first = row.get("output"), str(image[0] if isinstance(image, (list, tuple)) and image else image)
        state = state_of(output) if output == targets.get(index) else None
        if output != targets.get(index):
            why = f"it was written to {output}, this run writes {targets.get(index)}"
        elif state is None:
            why = f"{output} is gone"
        elif state != row.get("output_state"):
            why = f"{output} changed since the earlier run"
        else:
            why = ""
        if not why and single_file:
            if output not in probabilities:
                probabilities[output] = _probability_rows(output)
            found = probabilities[output] or {}  # (a row names its input as MONAI's loader records it: ~ expanded)
            held = found.get(first) or found.get(os.path.expanduser(first))
            if held:
                kept[index] = {"state": state, "row": held.pop(0)}
            else:
                why = (f"its row is not in {output}" if probabilities[output] is not None
                       else f"{output} is not dira3d's own unchanged file")
        elif not why:
            kept[index] = {"state": state, "row": None}
        if why:
            again.append(f"{first}: {why}")
    return kept, again


def held_rows(done: Sequence[int], run_rows: list[dict], kept: Mapping[int, dict]) -> tuple[list[float], list[dict]]:
    """The rows of the one output file of inputs ``done`` (this run's ``run_rows``, one per input in order) and of the
    ``kept`` inputs (their earlier rows), each with the datalist index of its input (run rows that are not one per input,
    from an ``output_transform`` of one's own, after the others)."""
    keys: list[float] = sorted(done) if len(done) == len(run_rows) else [float("inf")] * len(run_rows)
    return keys + sorted(kept), run_rows + [kept[i]["row"] for i in sorted(kept)]


def in_order(held: tuple[list[float], list[dict]]) -> list[dict]:
    """The rows of :func:`held_rows` in datalist order."""
    return [row for _, row in sorted(zip(*held), key=lambda pair: pair[0])]


def log_kept(kept: Mapping[int, Any], count: int, again: list[str], why: str, report_path: Any) -> None:
    """The lines on what ``--skip_written`` keeps of the ``count`` inputs."""
    if why:
        logger.warning(f"{SETTING}: nothing is kept from the earlier run: {why}; every input is run")
        return
    logger.info(f"{SETTING}: {len(kept)} of the {count} inputs are kept from the earlier run (report: {report_path}), "
                f"the other {count - len(kept)} {'is' if count - len(kept) == 1 else 'are'} run")
    if again:
        logger.warning(f"{SETTING}: {len(again)} input(s) written by the earlier run are run again: {'; '.join(again[:3])}"
                       + (f"; and {len(again) - 3} more" if len(again) > 3 else ""))


def stopped_rows(batch: Any) -> tuple[list[int], list[dict]] | None:
    """The rows of the one output file that a stopped batch (an :class:`~dira3d.evaluation.InferenceBatch` whose
    ``ProbabilityWriter`` is ``batch.writer``) holds of the inputs it ran, ``(indices, rows)`` in order; None when the
    writer's rows are not one per input (an ``output_transform`` of one's own). An input run whose row the writer had
    not taken yet (the stop came between the two) is not ``done`` any more."""
    run, rows = sorted(i for i in batch.done if i not in batch.kept), list(batch.writer.rows)
    if len(rows) < len(run):  # the stop came after the model ran on these inputs, before their rows were taken
        batch.done.difference_update(run[len(rows):])
        run = run[:len(rows)]
    return (run, rows) if len(rows) == len(run) else None


def keeps_earlier_file(path: str, new: list[dict], count: int) -> bool:
    """Whether a stopped batch leaves the file at ``path`` as it was rather than write ``new`` there (the rows of its
    ``count`` inputs run, with those it kept): the file holds a row of an input ``new`` lacks (an earlier run's, which a
    stopped rerun would cut short) or is not dira3d's own (given ``--overwrite True``). Logged when it does."""
    from collections import Counter

    if not os.path.lexists(path):
        return False
    earlier = _probability_rows(path) if os.path.isfile(path) else None
    images = Counter(str(row.get("image")) for row in new)
    if earlier is None or any(len(same) > images[image] for image, same in earlier.items()):
        logger.warning(f"{path} is left as it was: it holds rows of inputs that this stopped run did not reach (or "
                       f"is not dira3d's own), so the rows of the {count} input(s) run are not written")
        return True
    return False


def write_stopped_rows(batch: Any) -> bool:
    """Write the one output file of a stopped classification batch in one process (``batch``: an
    :class:`~dira3d.evaluation.InferenceBatch` whose ``ProbabilityWriter`` is ``batch.writer``): the rows of the inputs
    it ran (:func:`stopped_rows`), with those it kept, in datalist order, so that a rerun with ``--skip_written True``
    keeps them (the file was written only when the batch ended: a batch stopped at input 700 of 1,000 lost 700 rows,
    and the rerun ran every input again). Nothing is written when no input was run, when the writer's rows are not one
    per input, when the file at ``output_path`` is to be kept (:func:`keeps_earlier_file`), or when writing fails (a
    full disk, a folder made read-only): the inputs run are then ``failed`` in the report, as before, and the error is
    kept as ``batch.rows_error``, for the summary's one line on the rows lost
    (:func:`~dira3d.evaluation.batch_report.summarise`).

    Returns:
        whether the file was written.
    """
    taken = stopped_rows(batch)
    if not taken or not taken[0]:
        return False
    new = in_order(held_rows(*taken, batch.kept))
    if keeps_earlier_file(str(batch.output_path), new, len(taken[0])):
        return False
    try:
        batch.writer.write(new)
    except Exception as err:  # noqa: BLE001 - the summary says how many rows were lost and why; the stop's error is raised
        batch.rows_error = err
        return False
    return True


def keep_earlier_rows(batch: Any, rows: list[dict]) -> int:
    """After a batch stopped without writing its one output file (``batch``: an
    :class:`~dira3d.evaluation.InferenceBatch` with an ``output_path``; the file left as it was because it holds rows of
    inputs the run did not reach, :func:`keeps_earlier_file`, or writing it failed): each input of ``rows`` (the new
    report's) ``not run``, or run but its row lost, whose row the earlier report says was written there by the same
    model and settings, the file unchanged since (:func:`kept_inputs`), is ``written`` with ``"skipped": true``, as a
    rerun with ``--skip_written True`` keeps it. The new report replaced the earlier one with those inputs ``failed`` or
    ``not run``, so such a rerun ran every input again although the file still held their rows. The earlier report is
    read before the new one replaces it. Returns how many inputs were kept so."""
    from dira3d.evaluation.batch_report import lost_reason

    target, lost = str(batch.output_path), lost_reason(batch.output_path, None)
    if any(r["status"] == "written" and r.get("output") == target and not r.get("skipped") for r in rows):
        return 0  # this run wrote the file
    open_rows = {i: r["image"] for i, r in enumerate(rows)
                 if r["status"] == "not run" or (r["status"] == "failed" and r["reason"].startswith(lost))}
    earlier, why = earlier_rows(batch.report_path, batch._made_by) if open_rows else ([], "")
    if why or not earlier:
        return 0
    kept, _ = kept_inputs(open_rows, dict.fromkeys(open_rows, target), earlier, single_file=True)
    for index in kept:
        rows[index] = {"image": rows[index]["image"], "status": "written", "output": target, "skipped": True}
    return len(kept)
