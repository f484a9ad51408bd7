"""The batch runner every dataset preparation shares.

A dataset module lists its work as :class:`Case` objects (an id, the files it will write, and
the parameters its worker needs) and hands them to :func:`run_cases` with a ``process_fn``.
The runner gives every dataset the same behaviour:

- resumable: a case whose outputs all exist is ``"skipped"`` (an interrupted case, with only
  some outputs present, is redone); ``overwrite=True`` redoes everything;
- damaged outputs are redone: an empty output file, or outputs that the dataset's ``check_outputs``
  refuses (e.g. a per-case manifest that is cut short, edited, or lists a file that is gone), do not
  count as done; the case is redone and its report entry says why (a warning);
- safe reruns: a datalist in ``out_dir`` prepared from another ``--src``, a ``report.json`` in ``out_dir`` (or at
  ``--report``) of another dataset (``desc``), or a ``--report`` path holding a file that is not a report, is an
  error unless ``overwrite=True``;
- a problem found while listing the work (a duplicate file, a bad CSV row) is a case with an
  ``error``: reported as ``"failed"`` like a case whose ``process_fn`` raised, never skipped;
- :class:`~dira3d.data.errors.DataWarning` raised while a case runs is listed under its
  ``warnings`` in the report; a rerun that skips the case keeps the warnings the earlier report gave it;
- ``dry_run``: prints what would be written, writes nothing;
- ``workers > 1``: a process pool (``process_fn`` and case params must be picklable:
  a module-level function or a ``functools.partial`` of one);
- a tqdm progress bar and a JSON report of every case (written / skipped / failed + reason);
- without ``keep_going`` the first failure stops the batch (cases not started are reported as
  ``"cancelled"``) and :func:`finish` returns 1; with it, every good case is still written, the
  bad ones are reported and the exit code is 0.

:class:`Case`, :class:`CaseResult` and the output paths of a case live in :mod:`dira3d.data.cases`,
the checks and lock before any case runs in :mod:`dira3d.data.guards`, the messages a command ends
with (:func:`finish`, :func:`next_steps`) in :mod:`dira3d.data.end_messages`; the names of ``__all__``
are importable from here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dira3d.data.cases import STATUSES, Case, CaseResult, batch_stopped, case_outputs, safe_case_path
from dira3d.data.datalist_writer import warn_one_validation, write_datalist, write_json  # re-exported
from dira3d.data.end_messages import NEXT_STEPS, datalists_recorded, finish, next_steps
from dira3d.data.errors import DataWarning, join_errors  # join_errors: re-exported
from dira3d.data.guards import (check_rerun, lock_output_folder, locks_held_until_done, record_dataset, release_when_done,
                                why_not_done)
from dira3d.data.workers import case_pool
from dira3d.utils.atomic import stale_temporaries
from dira3d.utils.files import read_json
from dira3d.utils.interrupts import interrupt_exit_code, interrupted_word, sigterm_as_interrupt
from dira3d.utils.progress import ProgressLines, show_progress

__all__ = [
    "Case",
    "CaseResult",
    "STATUSES",
    "run_cases",
    "batch_stopped",
    "join_errors",
    "add_common_arguments",
    "finish",
    "run_prepare",
    "safe_case_path",
    "case_outputs",
    "write_json",
    "write_datalist",
    "warn_one_validation",
    "read_case_outputs",
    "update_report",
    "NEXT_STEPS",
    "next_steps",
]


def _run_one(process_fn: Callable[[Case], dict | None], case: Case) -> CaseResult:
    if case.error:
        return CaseResult(case.case_id, "failed", [], case.error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            info = process_fn(case) or {}
        except Exception as err:  # a bad case must not stop the others; the reason goes to the report
            # DataError / OSError messages already name the file; other errors need their type
            reason = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
            reason = " ".join(reason.split())  # one line in the report and the FAILED line: a library's may break
            info = None
    notes = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    for w in caught:  # other warnings are shown as usual
        if not issubclass(w.category, DataWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if info is None:
        return CaseResult(case.case_id, "failed", [], reason, warnings=notes)
    missing = [str(p) for p in case.outputs if not Path(p).is_file()]
    if missing:
        return CaseResult(case.case_id, "failed", [], f"finished without writing {missing[:3]}", warnings=notes)
    return CaseResult(case.case_id, "written", [str(p) for p in case.outputs], info=dict(info), warnings=notes)


def run_cases(cases: list[Case], process_fn: Callable[[Case], dict | None], *, out_dir: str | os.PathLike,
              workers: int = 1, overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
              report_path: str | os.PathLike | None = None, desc: str = "",
              progress: bool = True, source: str | os.PathLike | None = None,
              datalists: Sequence[str | os.PathLike] = (), settings: Mapping[str, Any] | None = None,
              check_outputs: Callable[[Case], Any] | None = None) -> list[CaseResult]:
    """Run ``process_fn`` on every case that still needs it and write a JSON report.

    Args:
        cases: the work; case ids must be unique.
        process_fn: called once per case in a worker; writes ``case.outputs`` and may return a
            dict recorded as the result's ``info``. It raises (ideally a ``DataError``) on bad input.
        out_dir: the output root (created unless ``dry_run``).
        workers: processes; 1 runs in this process.
        overwrite: redo cases whose outputs exist; allow replacing a datalist of another
            ``source``, the report (and datalists) of another dataset in ``out_dir`` and a ``report_path`` file
            that is not a report (nothing is deleted: files of the other dataset not rewritten stay).
        dry_run: print the plan, write nothing (no report either).
        keep_going: process every case despite failures.
        report_path: JSON report (default ``out_dir/report.json``). Wherever it goes, ``out_dir/prepared.json``
            records ``desc``, ``source``, ``settings`` and this path, written before the cases run
            (:func:`~dira3d.data.guards.record_dataset`): what names the folder's dataset to a later run.
        desc: label of the progress bar and the report.
        progress: draw a tqdm bar over the cases on stderr (``dira3d prepare`` passes
            :func:`dira3d.utils.show_progress`: a terminal only, so a log file or a pipe gets no bar); without it, a
            line ``<desc>: done/total cases (...; about ... to go)`` at most every minute
            (:class:`dira3d.utils.progress.ProgressLines`).
        source: the input (``--src``); with ``datalists``, the datalists the caller will write
            afterwards: one whose ``meta.source`` names another input stops the run before any case.
        settings: the processing settings that shape every output (window, spacing, ...), as the
            datalists' ``meta`` records them; a datalist (or this dataset's report) recording other
            values stops the run before any case (without ``overwrite``). Recorded in the report.
        check_outputs: called (in this process) on a case whose outputs all exist, before it is skipped; it
            raises ``ValueError`` / ``OSError`` (ideally a ``DataError`` naming the file) when they cannot be
            used, e.g. a manifest that is cut short, edited or lists a missing file. Such a case, like one with
            an empty output file, is redone, with the reason among its ``warnings``.

    Returns:
        One :class:`CaseResult` per case, in the order of ``cases``.

    Raises:
        ValueError: duplicate case ids or ``workers < 1``.
        DataError: ``out_dir`` (or the report's folder) cannot be created or written to, or another
            process prepares into ``out_dir`` (it is locked while the cases run); a datalist of another source, a report of another ``desc`` in ``out_dir`` or at
            ``report_path``, or a non-report file at ``report_path`` or ``out_dir/prepared.json`` (without ``overwrite``).
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    ids = Counter(c.case_id for c in cases)
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        raise ValueError(f"duplicate case ids {duplicates[:5]}: two inputs would write the same outputs; rename one")
    report_path = Path(report_path or Path(out_dir) / "report.json")
    lock = None if dry_run else lock_output_folder(Path(out_dir), report_path)
    try:
        return _run_cases(cases, process_fn, out_dir=Path(out_dir), workers=workers, overwrite=overwrite,
                          dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc=desc,
                          progress=progress, source=source, datalists=datalists, settings=settings,
                          check_outputs=check_outputs)
    finally:
        if lock is not None:
            release_when_done(lock)  # dira3d prepare: released once the datalists are written


def _run_cases(cases: list[Case], process_fn: Callable[[Case], dict | None], *, out_dir: Path, workers: int,
               overwrite: bool, dry_run: bool, keep_going: bool, report_path: Path, desc: str, progress: bool,
               source: str | os.PathLike | None, datalists: Sequence[str | os.PathLike],
               settings: Mapping[str, Any] | None, check_outputs: Callable[[Case], Any] | None) -> list[CaseResult]:
    """The body of :func:`run_cases` (``out_dir`` locked unless ``dry_run``)."""
    check_rerun(Path(out_dir), source, datalists, report_path, desc, overwrite, settings)
    if not dry_run:  # locked: no other run writes here, so these are a killed run's half-written files
        left = stale_temporaries(out_dir)
        for path in left:
            path.unlink(missing_ok=True)
        if left:
            print(f"removed {len(left)} half-written temporary file(s) an interrupted run left in {out_dir} "
                  f"(e.g. {left[0].relative_to(out_dir)})", file=sys.stderr)
        record_dataset(out_dir, desc, source, settings, report_path)  # --dst names its dataset wherever the report goes
    results: dict[str, CaseResult] = {}
    todo: list[Case] = []
    redo: dict[str, str] = {}  # case id -> why its existing outputs are not done
    earlier: dict[str, list[str]] | None = None  # the warnings the last report gave the cases it wrote or skipped
    for case in cases:
        if case.error and dry_run:  # finish() prints it with the failures
            results[case.case_id] = CaseResult(case.case_id, "failed", [], case.error)
            continue
        if case.error:
            todo.append(case)
            continue
        if case.outputs and not overwrite and all(Path(p).is_file() for p in case.outputs):
            why = why_not_done(case, check_outputs)
            if not why:
                if earlier is None:
                    earlier = {} if dry_run else _earlier_warnings(report_path, desc)
                results[case.case_id] = CaseResult(case.case_id, "skipped", [str(p) for p in case.outputs],
                                                   "outputs exist (use --overwrite to redo)",
                                                   warnings=list(earlier.get(case.case_id, [])))
                continue
            redo[case.case_id] = f"redone: {why}"
        if dry_run:
            results[case.case_id] = CaseResult(case.case_id, "dry-run", [str(p) for p in case.outputs],
                                               redo.get(case.case_id, ""))
            print(f"would {'redo' if case.case_id in redo else 'write'} {case.case_id}: "
                  + ", ".join(str(p) for p in case.outputs[:3])
                  + (f" (+{len(case.outputs) - 3} more)" if len(case.outputs) > 3 else "")
                  + (f" ({redo[case.case_id]})" if case.case_id in redo else ""))
        else:
            todo.append(case)
    if dry_run:
        return [results[c.case_id] for c in cases]

    bar = tqdm(total=len(todo), desc=desc or "cases", unit="case", disable=not progress or not todo, file=sys.stderr)
    lines = ProgressLines(desc or "cases", len(todo), enabled=not progress)  # a line a minute where no bar is drawn
    try:  # closed before anything else is printed, also on Ctrl-C
        stop = False
        if workers == 1:
            for case in todo:
                if stop:
                    break
                result = results[case.case_id] = _run_one(process_fn, case)
                stop = result.status == "failed" and not keep_going
                bar.update()
                lines.update()
        else:
            with case_pool(workers) as pool, _cancelled_when_interrupted(pool):  # workers end with this process
                queue = list(reversed(todo))
                running: dict[Any, Case] = {}
                while (queue and not stop) or running:
                    while queue and not stop and len(running) < 2 * workers:  # bounded queue: stop early works
                        case = queue.pop()
                        running[pool.submit(_run_one, process_fn, case)] = case
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        case = running.pop(future)
                        try:
                            result = future.result()
                        except Exception as err:  # the worker process itself died (e.g. out of memory)
                            result = CaseResult(case.case_id, "failed", [], f"worker crashed: {err!r}")
                        results[case.case_id] = result
                        stop = stop or (result.status == "failed" and not keep_going)
                        bar.update()
                        lines.update()
    finally:
        bar.close()
    not_run = "not run: an earlier case failed (use --keep-going to process all)"
    for case in todo:
        results.setdefault(case.case_id, CaseResult(case.case_id, "cancelled", [], not_run))
        if case.case_id in redo and results[case.case_id].status != "cancelled":
            results[case.case_id].warnings.insert(0, redo[case.case_id])
    ordered = [results[c.case_id] for c in cases]
    counts = Counter(r.status for r in ordered)
    report = {"desc": desc, "source": None if source is None else str(Path(source).resolve()),
              "summary": {s: counts.get(s, 0) for s in STATUSES}, "cases": [asdict(r) for r in ordered]}
    if settings is not None:
        report["settings"] = json.loads(json.dumps(settings))
    write_json(report_path, report)
    return ordered


def _earlier_warnings(report_path: Path, desc: str) -> dict[str, list[str]]:
    """Case id -> the warnings of the report an earlier run of this dataset (``desc``) wrote at ``report_path``, for
    the cases it wrote or skipped, so that a rerun that skips them keeps them (a grey image stored as RGB is still
    one); its notes on its own run ("redone: ...") are left out. ``{}`` when there is no such report."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("desc") != desc:
            return {}
        return {str(c["case_id"]): [str(w) for w in c.get("warnings") or [] if not str(w).startswith("redone: ")]
                for c in report["cases"] if c.get("status") in ("written", "skipped")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_case_outputs(cases: Sequence[Case], results: list[CaseResult], read: Callable[[Case, CaseResult], Any], *,
                      keep_going: bool, out_dir: str | os.PathLike,
                      report_path: str | os.PathLike | None = None) -> list[Any] | None:
    """After :func:`run_cases`: what each case gives the datalist, read back from its outputs (e.g. the
    entries of its manifest), one case's unusable output failing that case alone.

    ``read(case, result)`` is called for every case and returns its part (e.g. ``[]`` for a failed case);
    when it raises ``ValueError`` / ``OSError`` (a manifest found damaged at this late point), the case's
    result becomes ``"failed"`` with that reason (its part ``None``), in ``results`` and in the report.

    Args:
        cases, results: as given to and returned by :func:`run_cases` (``results`` is changed in place).
        keep_going, out_dir, report_path: as given to :func:`run_cases`.

    Returns:
        The parts, in the order of ``cases``; ``None`` when a case failed here without ``keep_going``
        (no datalist may be written: :func:`batch_stopped` is then true).
    """
    parts: list[Any] = []
    changed = False
    for case, result in zip(cases, results):
        try:
            parts.append(read(case, result))
        except (ValueError, OSError) as err:
            parts.append(None)
            if result.status != "failed":
                result.status, result.outputs, result.reason = "failed", [], str(err)
            else:
                result.reason = join_errors(result.reason, str(err))
            changed = True
    if changed:
        update_report(Path(report_path or Path(out_dir) / "report.json"), results)
    return None if batch_stopped(results, keep_going) else parts


def update_report(report_path: Path, results: Sequence[CaseResult]) -> None:
    """Rewrite the cases and summary of the report :func:`run_cases` wrote with ``results`` (e.g. after a case's
    result changed, or a warning was added to it, once the datalists were assembled)."""
    report = read_json(report_path, "prepare report", "rerun the same command")
    counts = Counter(r.status for r in results)
    report["summary"] = {s: counts.get(s, 0) for s in STATUSES}
    report["cases"] = [asdict(r) for r in results]
    write_json(report_path, report)


@contextlib.contextmanager
def _cancelled_when_interrupted(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On Ctrl-C (or any error) drop the cases not yet started: the pool's exit then waits only for the
    ones running (each writes its files whole), not for every case submitted."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--src --dst --workers --overwrite --dry-run --keep-going --report`` to ``parser``."""
    parser.add_argument("--src", required=True, type=Path, help="the dataset as downloaded")
    parser.add_argument("--dst", required=True, type=Path,
                        help="output folder (volumes, datalists, report, prepared.json naming the dataset and --src)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo cases whose outputs already exist; also allows replacing a datalist "
                             "prepared from another --src, the report.json and datalists of another dataset "
                             "prepared into --dst (its volumes are not deleted), a --report file that is not "
                             "a report, and a prepared.json in --dst that is not dira3d's record")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    parser.add_argument("--keep-going", action="store_true",
                        help="process every case despite failures (failures are reported; exit code 0)")
    parser.add_argument("--report", type=Path, default=None, help="JSON report path (default DST/report.json); DST/prepared.json "
                                                                      "names the dataset either way")
    return parser


def run_prepare(prog: str, prepare: Callable[..., list[CaseResult]], args: argparse.Namespace, **options: Any) -> int:
    """The body of every ``dira3d prepare <dataset>`` command.

    Calls ``prepare(args.src, args.dst, **options)`` with the options of
    :func:`add_common_arguments` added, turns an error raised before any case ran (bad layout,
    missing folder, bad setting) into a one-line message and exit code 2, and otherwise returns
    :func:`finish`'s exit code. The lock :func:`run_cases` takes on ``--dst`` is held until ``prepare``
    returns (its datalists written).
    """
    try:  # run_cases' lock of --dst: kept until the datalists are written; SIGTERM (scancel, kill) as Ctrl-C
        with sigterm_as_interrupt(), datalists_recorded() as datalists, locks_held_until_done():
            results = prepare(args.src, args.dst, **options, workers=args.workers, overwrite=args.overwrite,
                              dry_run=args.dry_run, keep_going=args.keep_going, report_path=args.report,
                              progress=show_progress())  # a bar on a terminal only, never into a log
    except (ValueError, OSError) as err:  # DataError included; OSError: e.g. the report could not be written
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: every output is written whole (atomically), a rerun skips them
        print(f"\n{prog}: {interrupted_word(err)}; the cases finished so far are kept in {args.dst}: rerun the same "
              "command to prepare the rest (finished cases are skipped, an unfinished one is redone)", file=sys.stderr)
        return interrupt_exit_code(err)
    code = finish(results, args.keep_going, dry_run=args.dry_run, report=args.report or Path(args.dst) / "report.json")
    for path, labelled in datalists:  # where the datalists are, and what to run next
        print("\n".join(next_steps(path.resolve(), labelled)))
    return code
