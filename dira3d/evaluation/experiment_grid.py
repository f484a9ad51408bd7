"""``dira3d experiment``'s grid: every (method, label fraction, seed[, fold]) not yet in ``results.csv``
is fine-tuned, one after the other, under the ``output_dir``'s folder lock (:func:`run_experiment`).

A failed run is recorded in ``failures.json`` and the others go on; each finished run is added to
``results.csv`` at once and the report (:func:`dira3d.evaluation.results.write_report`) rewritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from dira3d.utils.atomic import atomic_write_text, check_writable
from dira3d.utils.files import same_or_moved
from dira3d.utils.folder_lock import FolderInUseError, FolderLock
from dira3d.utils.setting_hints import experiment_settings
from dira3d.evaluation.experiment_pretrain import check_pretrainings_unchanged, pretrain_method
from dira3d.evaluation.experiment_versions import versions_record, warn_rows_without_digests
from dira3d.evaluation.split_ids import SPLITS_FILE, scored_split
from dira3d.evaluation.results import (
    DIGEST_FIELDS, check_checkpoints, check_fold_column, check_rows_match, check_run_settings, file_sha256, grid_cells,
    read_rows, result_fields, row_key, seed_values, split_columns, write_report, write_rows,
)  # fmt: skip

__all__ = ["Runner", "ExperimentRunsFailed", "ExperimentBusy", "check_experiment_free", "run_experiment"]

Runner = Callable[[str, dict], Mapping[str, float]]


class ExperimentRunsFailed(RuntimeError):
    """Some runs of the grid failed; the others finished and are in ``results.csv``."""



def _describe(method: str, fraction: float, seed: int, fold: int | None = None) -> str:
    """``dira labels=0.5 seed=1`` (`` fold=2`` with folds): one run in logs and errors."""
    return f"{method} labels={fraction:g} seed={seed}" + ("" if fold is None else f" fold={fold}")


def _default_runner(bundle: str, overrides: dict) -> Mapping[str, float]:
    from dira3d.evaluation.finetune import run_finetune
    from dira3d.utils.overrides import as_bool

    overrides = dict(overrides)
    tiny = as_bool(overrides.pop("tiny", False), "tiny")  # bool("no") is True
    # results.csv is the grid's resume point: a cell run again has no row, so its folder holds only an
    # interrupted or failed attempt, which is replaced
    return run_finetune(bundle, overrides, tiny=tiny, overwrite=True)["metrics"]


class ExperimentBusy(FolderInUseError):
    """Another process is running an experiment in the same ``output_dir``."""


def _output_dir_lock(out: str | Path) -> FolderLock:
    return FolderLock(out, what="the experiment's output_dir",
                      clash="a second `dira3d experiment` there would run the same grid into one results.csv")


def check_experiment_free(output_dir: str | Path) -> None:
    """Raise :class:`ExperimentBusy` now when another process runs an experiment in ``output_dir``, without taking
    its lock or creating anything: ``dira3d experiment``'s check before its bundle checks load MONAI and torch
    (:func:`run_experiment` takes the lock)."""
    try:
        _output_dir_lock(output_dir).check_free()
    except FolderInUseError as err:
        raise ExperimentBusy(str(err)) from None


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out``'s :class:`~dira3d.utils.folder_lock.FolderLock`, or raise :class:`ExperimentBusy` at once."""
    lock = _output_dir_lock(out)
    try:
        lock.acquire()
    except FolderInUseError as err:
        raise ExperimentBusy(str(err)) from None
    try:
        yield
    finally:
        lock.release()


def run_experiment(config: Mapping[str, Any], runner: Runner | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every (method, label fraction, seed[, fold]) not yet in ``results.csv``; returns all rows.

    ``runner(bundle, overrides) -> metrics`` fine-tunes once; the default runs the bundle through
    :func:`dira3d.evaluation.finetune.run_finetune`.

    Raises:
        ExperimentBusy: another process runs an experiment in the same ``output_dir``.
        ExperimentRunsFailed: some runs failed (the others are in ``results.csv``).
        FolderNotWritableError: ``output_dir`` cannot be created or written to (before any run).
    """
    out = check_writable(config["output_dir"], what="the experiment's output_dir",
                         advice="set output_dir in the config to a writable folder, or fix its permissions")
    with _exclusive(out):
        return _run_grid(config, runner or _default_runner, log, out)


def _run_grid(config: Mapping[str, Any], runner: Runner, log: Callable[[str], None], out: Path) -> list[dict]:
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    check_rows_match(rows, config, csv_path)
    check_fold_column(rows, config, csv_path)
    _check_split_seed_column(rows, config, csv_path)
    folded = "folds" in config
    done = {row_key(r, folded) for r in rows}
    grid = grid_cells(config)
    todo = [key for key in grid if key not in done]
    # warns of a bundle upgrade only where it matters: runs of the grid reused, and new ones to add to them
    versions = versions_record(config, out, rows, reused=len(set(grid) & done), to_run=len(todo))
    check_run_settings(config, out, rows, versions=versions)
    fingerprints = check_checkpoints(config, out, rows)  # method: sha256 of its checkpoint file, now
    check_pretrainings_unchanged(config)  # also when all their runs are done: they would be reused
    _rebase_moved_rows(rows, config, out)
    clash = _split_clash(rows, set(grid), folded)
    if clash:
        raise ValueError(f"{csv_path} holds runs of one label fraction and {_shared(config)} that drew different "
                         f"splits ({clash}): the datalist or dira3d's split rules changed between them{_or_bundle(config)} "
                         "(e.g. an upgrade; docs/finetuning.md, 'Splits'), so they are no fair pair, and the table would "
                         "compare them. Rerun the whole grid into another output_dir (or delete the rows of one side in "
                         "results.csv to redo them)")
    warn_rows_without_digests(rows, set(grid), folded, csv_path)
    log(f"experiment: {len(grid)} runs in the grid, {len(grid) - len(todo)} already in {csv_path}, {len(todo)} to run")
    checkpoints = {}
    for method, spec in config["methods"].items():
        if isinstance(spec, Mapping):
            if any(key[0] == method for key in todo):
                checkpoints[method] = pretrain_method(method, spec, config, log)
        else:
            checkpoints[method] = spec or ""
    failures = _Failures(out / "failures.json", todo, folded)
    for i, (method, fraction, seed, *fold) in enumerate(todo, 1):
        fold = fold[0] if fold else None
        checkpoint = checkpoints[method]
        run_dir = out / "runs" / (f"{method}_lf{fraction:g}_seed{seed}" + ("" if fold is None else f"_fold{fold}"))
        overrides = dict(config.get("overrides", {}))
        overrides.update(datalist=config["datalist"], pretrained=checkpoint, label_fraction=fraction, seed=seed,
                         output_dir=str(run_dir))
        if fold is not None:
            overrides["fold"] = fold
        if "split_seed" in config:  # every run draws the same label subset and holdout; seed seeds its training alone
            overrides["split_seed"] = config["split_seed"]
        run = _describe(method, fraction, seed, fold)
        start = time.perf_counter()
        try:
            with experiment_settings():  # its errors name the config's settings, not dira3d finetune's options
                metrics = runner(str(config["bundle"]), overrides)
            _check_value(metrics, config["metric"])
            _check_scored_test(run_dir)
        except Exception as err:  # one failed run must not stop (or lose) the rest of the grid
            cause = cause_of(err)
            failures.add({"method": method, "label_fraction": fraction, "seed": seed,
                          **({} if fold is None else {"fold": fold}), "run_dir": str(run_dir),
                          "error": f"{type(cause).__name__}: {cause}"})
            log(f"[{i}/{len(todo)}] {run}: FAILED ({type(cause).__name__}: {cause}); going on with the other runs")
            continue
        if config["metric"] not in metrics:
            raise ValueError(f"fine-tuning returned {sorted(metrics)}, not the experiment's metric {config['metric']!r}")
        if method in fingerprints:
            _check_checkpoint_unchanged(method, checkpoint, fingerprints[method], run, out)
        row = {"method": method, "checkpoint": checkpoint, "label_fraction": fraction, "seed": seed,
               **({"split_seed": config["split_seed"]} if "split_seed" in config else {}),
               **({} if fold is None else {"fold": fold}),
               "metric": config["metric"], "value": float(metrics[config["metric"]]),
               "seconds": round(time.perf_counter() - start, 2), "run_dir": str(run_dir),
               **split_columns(run_dir, config["metric"], float(metrics[config["metric"]]))}
        value = row["value"]
        row = {k: str(v) for k, v in row.items()}
        clash = _split_clash(rows + [row], set(grid), folded, new=row)
        if clash:  # every later run would clash too: stop, as for a checkpoint replaced mid-grid
            raise ValueError(f"the run {run} drew another split than the runs of the same label fraction and "
                             f"{_shared(config)} in {csv_path} ({clash}): the datalist or dira3d's split rules changed "
                             f"since they were made{_or_bundle(config)} (e.g. an upgrade; docs/finetuning.md, 'Splits'), so "
                             "they would be no fair pair; the run is not added, and the grid stops. Rerun the whole grid "
                             "into another output_dir")
        rows.append(row)
        write_rows(csv_path, rows, result_fields(config))  # one row per finished run: the resume point
        failures.done(row_key(rows[-1], folded))
        log(f"[{i}/{len(todo)}] {run}: {config['metric']}={value:.4f}")
        write_report(config, rows, plots=False)  # the table follows progress; plots once at the end
    write_report(config, rows)
    incomplete = seed_values(config, rows)[1]
    if incomplete:  # failures.json is named only where it was written (a failure of this call, or of an earlier one)
        failed = failures.path.is_file()
        why = ("not all folds finished" + (", or some failed: see failures.json" if failed else "") if folded
               else "failed: see failures.json" if failed else "not run")
        log(f"experiment: left out of the statistics ({why}): {'; '.join(incomplete)}")
    if failures.new:
        raise ExperimentRunsFailed(
            f"{len(failures.new)} of {len(todo)} runs failed (details in {failures.path}): "
            + "; ".join(f"{_describe(f['method'], f['label_fraction'], f['seed'], f.get('fold'))}: {f['error']}"
                        for f in failures.new[:3])
            + ("; ..." if len(failures.new) > 3 else "")
            + f". The other runs are in results.csv (their table: {out / 'table.md'}); rerun the same command to retry "
              "only the failed ones")
    return rows


class _Failures:
    """``failures.json``, kept up to date after every run: this call's failed runs, and those of an earlier call that
    this one has not reached yet. It was written only when the grid ended, so after Ctrl-C, SIGTERM or a kill the
    table's 'see failures.json' pointed to no file, or to the failures of an older call."""

    def __init__(self, path: Path, todo: list[tuple], folded: bool) -> None:
        self.path, self.folded, self.new = path, folded, []
        self._todo, self._reached = set(todo), set()
        try:
            earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            self._earlier = [f for f in earlier if self._key(f) in self._todo]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # our own file, unreadable: rewritten
            self._earlier = []
        self._write()

    def _key(self, failure: Mapping[str, Any]) -> tuple:
        return row_key(failure, self.folded)

    def add(self, failure: dict) -> None:
        self.new.append(failure)
        self.done(self._key(failure))

    def done(self, key: tuple) -> None:
        """The run ``key`` was made in this call (a row, or a failure in :attr:`new`)."""
        self._reached.add(key)
        self._write()

    def _write(self) -> None:
        current = self.new + [f for f in self._earlier if self._key(f) not in self._reached]
        if current:
            atomic_write_text(self.path, json.dumps(current, indent=2))
        else:
            self.path.unlink(missing_ok=True)


# what results.csv knows of a run's split (split_columns): every method's run of one label fraction and seed (and fold)
# draws the same split, so that they are pairs (with split_seed, every run of one label fraction (and fold), whatever
# its seed, so that the spread over seeds is that of training alone); a grid resumed across a change of the split
# rules (the rounding of 2026-11-27) mixed runs of other subsets into one comparison without a word; the sizes see a change that moved the
# counts, the digests of the cases (split_ids) one that kept them (the nested label fractions of 2026-11-26)
_SPLIT_COLUMNS = ("train_cases", "test_cases", "test_positive", *DIGEST_FIELDS)


def _split_clash(rows: list[dict], grid: set, folded: bool, new: Mapping[str, str] | None = None) -> str | None:
    """Two runs of the grid of one (label fraction, split seed[, fold]) whose recorded splits differ, in words
    (``dira labels=0.5 seed=1 has train_cases 43, random labels=0.5 seed=1 44``), else None; with ``new``,
    only a clash of that row with the others. A row's split seed is its ``split_seed`` (every seed of the grid
    shares it), else its ``seed``. Columns not known (empty) are not compared."""
    groups: dict[tuple, list[Mapping[str, str]]] = {}
    for row in rows:
        if row_key(row, folded) in grid:
            groups.setdefault(_split_group(row, folded), []).append(row)
    for row in [new] if new is not None else [r for group in groups.values() for r in group]:
        for other in groups.get(_split_group(row, folded), []):
            if row_key(other, folded) == row_key(row, folded):  # the run itself (or its row written twice)
                continue
            for column in _SPLIT_COLUMNS:
                mine, theirs = row.get(column) or "", other.get(column) or ""
                if mine and theirs and mine != theirs:
                    where = "" if column not in DIGEST_FIELDS else (
                        f"; the cases are listed in {Path(row['run_dir']) / SPLITS_FILE} and "
                        f"{Path(other['run_dir']) / SPLITS_FILE}")
                    return (f"{_describe(*_run_of(row, folded))} has {column} {mine}, "
                            f"{_describe(*_run_of(other, folded))} {theirs}{where}")
    return None


def _split_group(row: Mapping[str, str], folded: bool) -> tuple:
    """``(label fraction, split seed[, fold])``: the runs that draw one split."""
    key = row_key(row, folded)
    return (key[1], int(row.get("split_seed") or key[2])) + key[3:]


def _shared(config: Mapping[str, Any]) -> str:
    """What the runs that must draw one split share, in words: ``seed``, or ``split_seed`` (every seed)."""
    return f"split_seed ({config['split_seed']}, every seed)" if "split_seed" in config else "seed"


def _or_bundle(config: Mapping[str, Any]) -> str:
    """With ``split_seed``, the other cause of runs of other seeds that drew other splits: a bundle of one's own whose
    ``load_split`` still draws with ``seed``."""
    return ", or the bundle does not draw its splits with split_seed (load_split(..., seed=@split_seed))" \
        if "split_seed" in config else ""


def _check_split_seed_column(rows: list[dict], config: Mapping[str, Any], csv_path: Path) -> None:
    """Refuse to add runs that share ``split_seed``'s split to a ``results.csv`` of runs that drew each seed's own
    (no ``split_seed`` column), the other way round, and rows of another ``split_seed`` (also when
    ``experiment.json``, which records it, is missing): one table would mix two kinds of spread over seeds."""
    if not rows:
        return
    wanted = config.get("split_seed")
    fix = "Use another output_dir, or {}; or delete results.csv to redo every run"
    if ("split_seed" in rows[0]) != (wanted is not None):
        if wanted is not None:
            raise ValueError(f"{csv_path} holds runs that drew each seed's own label subset and holdout (no split_seed "
                             f"column); adding runs that all draw split_seed {wanted}'s would mix two kinds of spread "
                             "over seeds in one table. " + fix.format("remove split_seed from the config"))
        raise ValueError(f"{csv_path} holds runs that all drew one split (a split_seed column), but the config has no "
                         "split_seed, so its runs would draw each seed's own. " + fix.format("put split_seed back"))
    if wanted is None:
        return
    other = sorted({str(r["split_seed"]) for r in rows if str(r["split_seed"]) != str(wanted)})
    if other:
        raise ValueError(f"{csv_path} holds runs drawn with split_seed {other[0]}, but the config gives split_seed "
                         f"{wanted}, another label subset and holdout. " + fix.format(f"set split_seed: {other[0]}"))


def _run_of(row: Mapping[str, str], folded: bool) -> tuple:
    return row_key(row, folded) + (() if folded else (None,))


def _rebase_moved_rows(rows: list[dict], config: Mapping[str, Any], out: Path) -> None:
    """Rows run before the output_dir was moved (``mv project_A project_B``; checked as moved with it by
    ``check_rows_match``) name the new places from the next write of ``results.csv``: their ``run_dir``, and a checkpoint
    that moved with it (the experiment's own pretraining, or the config's checkpoint file), never the old ones."""
    for row in rows:
        then = Path(row.get("run_dir") or "").parent.parent
        if not row.get("run_dir") or then == out:
            continue
        spec, checkpoint = config["methods"].get(row["method"]), row["checkpoint"]
        if isinstance(spec, str) and same_or_moved(checkpoint, spec, out, then):
            row["checkpoint"] = spec
        elif isinstance(spec, Mapping) and len(Path(checkpoint).parents) > 3 and Path(checkpoint).parents[3] == then:
            row["checkpoint"] = str(out / Path(checkpoint).relative_to(then))
        row["run_dir"] = str(out / "runs" / Path(row["run_dir"]).name)


def _check_checkpoint_unchanged(method: str, checkpoint: str, sha256: str, run: str, out: Path) -> None:
    """Stop the grid when ``method``'s checkpoint file was replaced since the grid started (a ``dira3d pretrain``
    still writing its ``best.pt`` there): the run just made may have loaded either file, and the method's next runs
    would load the new one, so one cell would mix two checkpoints (between two calls ``check_checkpoints``
    refuses it; within one it went unnoticed)."""
    try:
        now = file_sha256(Path(checkpoint))
    except OSError:
        now = None
    if now != sha256:
        raise ValueError(f"checkpoint {checkpoint} of method {method!r} changed while the experiment ran (sha256 "
                         f"{sha256[:12]}… when it started, now {(now or 'unreadable')[:12]}…; e.g. a pretraining still "
                         f"writing it): the run {run} is not added to {out / 'results.csv'}, and the grid stops rather than "
                         "mix two checkpoints in one cell. Let the pretraining finish, then give the method a copy of "
                         "the checkpoint that nothing writes to (and a new name, or another output_dir, if it has rows)")


def _check_value(metrics: Mapping[str, Any], metric: str) -> None:
    """Refuse an undefined test metric (``run_finetune`` writes a NaN, e.g. an AUC on a test split of
    one class, as ``None``): the run is a failure of its own, not a crash of the grid."""
    value = metrics.get(metric, 0.0)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"the test metric {metric!r} is undefined (NaN), e.g. an AUC on a test split that holds "
                         "one class only; check the test split")


def _check_scored_test(run_dir: Path) -> None:
    """Refuse a run whose ``metrics.json`` says it scored another split than the test split (a bundle whose
    evaluate.json sets another ``eval_split``): the table compares test scores. A runner that writes no (readable)
    ``metrics.json`` is taken at its word."""
    try:
        result = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        scored = scored_split(result)
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if scored != "test":
        raise ValueError(f"{run_dir / 'metrics.json'} was scored on the {scored} split (eval_split={scored}), not the "
                         "test split that the experiment's table compares: set eval_split to test in the bundle's "
                         "configs/evaluate.json (or overrides: {eval_split: test})")


def cause_of(err: BaseException) -> BaseException:
    """The bad setting or path behind MONAI's wrappers, else ``err`` itself."""
    from dira3d.engines.inputs import setting_error_in

    return setting_error_in(err) or err
