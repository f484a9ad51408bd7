"""``dira3d experiment``'s results: ``results.csv`` (read, checked, replaced atomically), the
recorded fine-tuning settings (``experiment.json``), and the report built from the rows
(``table.md``, ``summary.json``, plots).

The grid runner (:mod:`dira3d.evaluation.experiment_grid`) adds one row per finished run and rewrites
the report; everything here is a function of the config and the rows, so a rerun resumes from
``results.csv`` alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

from dira3d.evaluation.result_figures import save_figures
from dira3d.evaluation.result_notes import auc_class_notes
from dira3d.evaluation.split_ids import DIGEST_FIELDS, SPLIT_FIELDS, split_columns
from dira3d.evaluation.stats import (
    TESTS, CellSummary, aggregate, ci_table_note, compare_to_baseline, markdown_ci_table, markdown_table,
)
from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.files import FileContentError, moved_note, read_json, read_text, same_or_moved

__all__ = [
    "FIELDS", "FOLD_FIELDS", "SPLIT_FIELDS", "DIGEST_FIELDS", "RUN_SETTINGS", "RUN_SETTINGS_NAME", "grid_cells",
    "row_key", "read_rows", "write_rows", "split_columns", "check_rows_match", "check_fold_column", "check_run_settings", "check_checkpoints",
    "seed_values", "write_report", "chosen_test", "file_sha256", "result_fields",
]

FIELDS = ["method", "checkpoint", "label_fraction", "seed", "metric", "value", "seconds", "run_dir"] + SPLIT_FIELDS
FOLD_FIELDS = FIELDS[:4] + ["fold"] + FIELDS[4:]  # results.csv of a config with folds


def result_fields(config: Mapping[str, Any]) -> list[str]:
    """The columns of ``results.csv``: :data:`FIELDS`, with ``split_seed`` after ``seed`` when the config has one
    (and ``fold`` after them with folds, :data:`FOLD_FIELDS`)."""
    fields = FOLD_FIELDS if "folds" in config else FIELDS
    return fields[:4] + ["split_seed"] + fields[4:] if "split_seed" in config else list(fields)
# what makes one fine-tuning row comparable with another: a change would mix two protocols in one table
RUN_SETTINGS = ("bundle", "datalist", "metric", "overrides")
RUN_SETTINGS_NAME = "experiment.json"  # in output_dir
DATALIST_SHA256 = "datalist_sha256"  # experiment.json: the datalist's content (from 2026-11-27)
RECORDED_ONLY = ("versions", "earlier_versions")  # experiment.json: dira3d's and the bundles' (experiment_versions)


def check_run_settings(config: Mapping[str, Any], out: Path, rows: list[dict],
                       versions: Mapping[str, Any] | None = None) -> None:
    """Refuse to add runs to (and report together with) rows made with other fine-tuning settings;
    record the settings otherwise, with ``versions`` (:func:`dira3d.evaluation.experiment_versions.versions_record`:
    written, not compared)."""
    # no folds (split_seed): experiment.json as before them
    recorded = RUN_SETTINGS + tuple(k for k in ("folds", "split_seed") if k in config)
    settings = json.loads(json.dumps({k: config.get(k) for k in recorded}, default=str))
    datalist = Path(str(config["datalist"]))
    if datalist.is_file():  # its content: a datalist prepared again at the same path (more scans) has other splits
        settings[DATALIST_SHA256] = file_sha256(datalist)
    path = out / RUN_SETTINGS_NAME
    if rows and path.is_file():
        fix = (f"it records the fine-tuning settings of the runs in {out / 'results.csv'}; put it back, or delete it "
               "(the config's settings are then recorded for those runs) or use another output_dir")
        old = read_json(path, "experiment settings", fix)
        if not isinstance(old.get("overrides") or {}, dict):
            raise FileContentError(path, f"experiment settings {path} hold overrides {old['overrides']!r}, not a mapping; "
                                         f"{fix}")
        old = {k: v for k, v in old.items() if k not in RECORDED_ONLY}
        compared = dict(settings)
        then = old.get("datalist")  # moved with the output_dir, or alone (the same content: sha256) or copied elsewhere
        if same_or_moved(then, settings["datalist"], out) or old.get(DATALIST_SHA256) == settings.get(DATALIST_SHA256, 0):
            old["datalist"] = settings["datalist"]
        if DATALIST_SHA256 not in old or DATALIST_SHA256 not in compared:  # recorded before 2026-11-27: not compared
            old.pop(DATALIST_SHA256, None)
            compared.pop(DATALIST_SHA256, None)
        elif old.get("datalist") == compared["datalist"] and old[DATALIST_SHA256] != compared[DATALIST_SHA256]:
            raise ValueError(f"datalist {datalist} changed since the runs in {out / 'results.csv'} were made from it "
                             f"(sha256 {str(old[DATALIST_SHA256])[:12]}… recorded in {path}, now "
                             f"{settings[DATALIST_SHA256][:12]}…; e.g. prepared again with other scans): its splits, and "
                             "so the runs' label subsets and test split, may differ, and adding runs would mix them in one "
                             "table. Use another output_dir, or put the earlier datalist back (or delete results.csv to "
                             "redo every run)")
        if old != compared:
            changed = [k for k in RUN_SETTINGS + ("folds", "split_seed") if k != "overrides" and old.get(k) != settings.get(k)]
            before, now = old.get("overrides") or {}, settings["overrides"] or {}
            changed += [f"overrides.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
            moved = moved_note([("datalist", then, datalist)], "its sha256 differs" if DATALIST_SHA256 in old
                               else None, f"datalist of {path}") if "datalist" in changed else ""  # sha256: both recorded
            raise ValueError(f"{out / 'results.csv'} holds runs made with other fine-tuning settings ({', '.join(changed)} "
                             f"changed; the earlier ones are in {path}); {moved}adding runs with the new ones would mix them "
                             "in one table. Use another output_dir, or put the settings back (or delete results.csv to redo "
                             "every run)")
    atomic_write_text(path, json.dumps({**settings, **(versions or {})}, indent=1))


def check_fold_column(rows: list[dict], config: Mapping[str, Any], csv_path: Path) -> None:
    """Refuse to add runs with folds to a ``results.csv`` made without them, and the other way round
    (also when ``experiment.json``, which records ``folds``, is missing)."""
    if not rows or ("fold" in rows[0]) == ("folds" in config):
        return
    if "folds" in config:
        raise ValueError(f"{csv_path} holds runs made without folds (no fold column); adding the runs of folds "
                         f"{config['folds']} would mix one test split with cross-validation in one table. Use another "
                         "output_dir, or remove folds (or delete results.csv to redo every run)")
    raise ValueError(f"{csv_path} holds runs of a cross-validation grid (a fold column) but the config has no folds; "
                     "use another output_dir, or put folds back (or delete results.csv to redo every run)")


def grid_cells(config: Mapping[str, Any]) -> list[tuple]:
    """The runs of the config: ``(method, fraction, seed)``, or ``(method, fraction, seed, fold)`` with folds
    (the folds of one seed run one after the other)."""
    cells = [(m, float(f), int(s)) for f in config["label_fractions"] for m in config["methods"] for s in config["seeds"]]
    if "folds" not in config:
        return cells
    return [cell + (int(k),) for cell in cells for k in config["folds"]]


def row_key(row: Mapping[str, Any], folded: bool) -> tuple:
    """The grid key of a ``results.csv`` row (see :func:`grid_cells`)."""
    key = (str(row["method"]), float(row["label_fraction"]), int(row["seed"]))
    return key + (int(row["fold"]),) if folded else key


def read_rows(csv_path: Path) -> list[dict]:
    """The rows of ``results.csv``; a row cut short (a full disk while an older dira3d appended it) or
    garbled is refused with its line, never taken as a finished run.

    The :data:`SPLIT_FIELDS` may be empty (not known) or absent from the header (a results.csv written before
    them), but a row that has the header's columns missing is cut short.

    Raises:
        ValueError: a row lacks a value, has too many, or a number that does not parse (names file and line).
    """
    if not csv_path.is_file():
        return []
    text = read_text(csv_path, "experiment results", "delete the lines with such bytes (their runs are then "
                                                     "redone) and rerun the same command")
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [k for k in ("method", "checkpoint", "label_fraction", "seed", "value") if k not in (reader.fieldnames or ())]
    if reader.fieldnames and missing:
        raise ValueError(f"{csv_path} has no {', '.join(missing)} column (its header is {','.join(reader.fieldnames)[:120]!r}): "
                         "it is not the results.csv of `dira3d experiment`; use another output_dir, or move that file away "
                         "(every run is then redone)")
    for row in reader:
        # checkpoint "" is random init; an empty test split column is not known (a runner without metrics.json)
        needed = [k for k in reader.fieldnames or () if k != "checkpoint" and k not in SPLIT_FIELDS]
        try:
            ok = None not in row and None not in row.values() and all(row[k] != "" for k in needed) and \
                row_key(row, "fold" in row) is not None and math.isfinite(float(row["value"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{csv_path} line {reader.line_num} is incomplete or garbled ({','.join(v for v in row.values() if isinstance(v, str))[:120]!r}), "
                             "e.g. cut short when the disk filled up; delete that line (its run is then redone) "
                             "and rerun the same command")
        rows.append(row)
    return rows


def write_rows(csv_path: Path, rows: list[dict], fields: list[str]) -> None:
    """Replace ``results.csv`` with ``rows`` atomically (a full disk or a kill leaves the previous file whole);
    columns a user added to it are kept."""
    header = list(rows[0]) if rows else []
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header + [f for f in fields if f not in header], restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, text.getvalue())


def check_rows_match(rows: list[dict], config: Mapping[str, Any], csv_path: Path) -> None:
    """Rows of a method fine-tuned from another checkpoint than the config now gives are not reused.

    A method the experiment pretrains itself (``{pretrain: {...}}``) is fine-tuned from a checkpoint in
    ``pretrain/<method>/models/`` (its content guarded by ``check_pretrain_settings``); rows of it made from
    anything else (random init, or a checkpoint file the config gave before) were reused as its runs."""
    for method, spec in config["methods"].items():
        if isinstance(spec, Mapping):
            stale = {r["checkpoint"] for r in rows if r["method"] == method and not _from_own_pretraining(r["checkpoint"], method)}
            if stale:
                raise ValueError(f"{csv_path} holds runs of method {method!r} fine-tuned from "
                                 f"{sorted(stale)[0] or 'random init'}, but the config now pretrains it ({{pretrain: ...}}, "
                                 f"into pretrain/{method}); give the method a new name, use another output_dir, or delete "
                                 "its rows to redo them")
            continue
        stale = {r["checkpoint"] for r in rows if r["method"] == method and not _same_checkpoint(r, spec, csv_path.parent)}
        if stale:
            raise ValueError(f"{csv_path} holds runs of method {method!r} fine-tuned from {sorted(stale)[0] or 'random init'}, "
                             f"but the config now gives {spec or 'random init (null)'}; give the method a new name, use "
                             "another output_dir, or delete its rows to redo them")


def _same_checkpoint(row: Mapping[str, Any], spec: Any, out: Path) -> bool:
    """Whether ``row`` was fine-tuned from ``spec`` (random init: ''), at its path then: moved with the output_dir,
    which was where the row's ``run_dir`` (``<output_dir>/runs/<run>``) says."""
    then = Path(row["run_dir"]).parent.parent if row.get("run_dir") else None
    return same_or_moved(row["checkpoint"], spec or "", out, then)


def _from_own_pretraining(checkpoint: str, method: str) -> bool:
    """Whether ``checkpoint`` is one the experiment's pretraining of ``method`` writes (``.../pretrain/<method>/models/
    <file>.pt``; the folders above it may have moved with the output_dir)."""
    return bool(checkpoint) and Path(checkpoint).parts[-4:-1] == ("pretrain", method, "models")


CHECKPOINTS_NAME = "checkpoints.json"  # in output_dir: the sha256 of each method's checkpoint file


def check_checkpoints(config: Mapping[str, Any], out: Path, rows: list[dict]) -> dict[str, str]:
    """Refuse to add runs of a method whose checkpoint file changed (same path, other content: a pretraining
    rerun into the same folder) since its rows in ``results.csv`` were fine-tuned from it; record the
    checkpoints' sha256 otherwise, and return them (method: sha256). Pretrained methods are guarded by their
    ``settings.json`` instead."""
    path = out / CHECKPOINTS_NAME
    fix = (f"it records the checkpoints the runs in {out / 'results.csv'} were fine-tuned from; put it back, or delete "
           "it (the checkpoints as they are now are then recorded for those runs)")
    recorded = read_json(path, "experiment checkpoints", fix) if path.is_file() else {}
    if not isinstance(recorded, dict):
        raise FileContentError(path, f"experiment checkpoints {path} hold {type(recorded).__name__}, not a mapping; {fix}")
    current = {}
    for method, spec in config["methods"].items():
        if not isinstance(spec, str) or not spec:
            continue  # random init, or pretrained by the experiment itself
        current[method] = {"path": spec, "sha256": file_sha256(Path(spec))}
        before = recorded.get(method)
        runs = sum(r["method"] == method and _same_checkpoint(r, spec, out) for r in rows)
        if runs and isinstance(before, dict) and same_or_moved(before.get("path"), spec, out) and before.get("sha256") != current[method]["sha256"]:
            raise ValueError(f"checkpoint {spec} of method {method!r} changed since {runs} run(s) in {out / 'results.csv'} "
                             f"were fine-tuned from it (sha256 {str(before.get('sha256'))[:12]}… recorded in {path}, now "
                             f"{current[method]['sha256'][:12]}…): adding runs from the new file would mix two checkpoints "
                             "in one cell. Give the method a new name or use another output_dir (or put the earlier file "
                             "back, or delete the method's rows in results.csv to redo them)")
    if current != recorded:
        atomic_write_text(path, json.dumps({**recorded, **current}, indent=1))
    return {method: entry["sha256"] for method, entry in current.items()}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chosen_test(config: Mapping[str, Any]) -> str:
    """The config's t-test, one of :data:`~dira3d.evaluation.stats.TESTS`: ``test``, else ``welch: true``
    (its older spelling), else the paper's Student's test."""
    test = config.get("test") or ("welch" if config.get("welch", False) else "student")
    if test not in TESTS:
        raise ValueError(f"test {test!r} of the experiment config is not one of {', '.join(TESTS)}")
    return test


def write_report(config: Mapping[str, Any], rows: list[dict], plots: bool = True) -> str:
    """Aggregate ``rows`` and write ``table.md``, ``summary.json`` and (with ``plots``) the PNGs; returns the table.

    One value per seed (:func:`seed_values`): with folds, the mean over its folds. The note under the
    table gives the number of seeds and the test, a cell with fewer seeds says ``n=…``, and every run of
    the grid missing from the statistics (not run yet, or failed) is named there. With the paired test
    (:func:`chosen_test`) the note gives the number of pairs, a cell over fewer pairs than it has seeds
    says ``pairs=…``, and the seeds of one side only are named. A second table gives the 95 % confidence interval of
    each cell's mean (:func:`dira3d.evaluation.stats.cell_interval`), also in ``summary.json`` (``ci_low``,
    ``ci_high``, null for one seed or seeds that agree; ``ci_note``). The runs left out are said to be in
    ``failures.json`` only while that file is there.
    """
    out = Path(config["output_dir"])
    metric = config["metric"]
    test = chosen_test(config)
    values, incomplete = seed_values(config, rows)
    cells = aggregate(values, metric)
    if any(c.method == config["baseline"] for c in cells):  # no baseline run yet (or all failed): no p-values yet
        cells = compare_to_baseline(cells, config["baseline"], equal_var=test != "welch", paired=test == "paired")
    seeds = len(config["seeds"])
    table = markdown_table(cells, metric.upper(), method_order=list(config["methods"]), full_n=seeds,
                           baseline=config["baseline"])
    over = f"{seeds} seed{'s' if seeds > 1 else ''}" + ("" if "folds" not in config else (
        f" (a seed's value is its mean over folds {', '.join(map(str, config['folds']))}: a seed is one repetition of "
        "the cross-validation)"))
    if test == "paired":
        counts = sorted({c.pairs for c in cells if c.pairs is not None})
        pairs = "no pairs yet" if not counts else (f"{counts[0]} pair{'s' if counts[0] != 1 else ''}" if len(counts) == 1
                                                   else f"{counts[0]} to {counts[-1]} pairs")
        same = ("the same training seed; every seed the same split" if "split_seed" in config
                else "the same label subset, holdout and split")
        note = (f"\n\nmean ± sample std over {over}, ×100; p: paired t-test against `{config['baseline']}` at the same "
                f"label fraction, over the seeds both have ({pairs}; a seed gives both {same})")
    else:
        name = "Welch's" if test == "welch" else "Student's"
        note = (f"\n\nmean ± sample std over {over}, ×100; p: independent two-sample {name} t-test against "
                f"`{config['baseline']}` at the same label fraction")
    if any(c.n < seeds for c in cells):
        note += "; n=…: a cell of fewer seeds (the others are left out, below)"
    if "pairs=" in table:
        note += "; pairs=…: a cell tested on fewer of its seeds (the baseline lacks the others, below)"
    if "p n/a" in table:
        note += ("; p n/a: the test is undefined there (fewer than 2 pairs, or the same difference in every pair)"
                 if test == "paired" else
                 "; p n/a: the test is undefined there (fewer than 2 seeds on a side, or one value in every seed of both)")
    note += ".\n"
    if "split_seed" in config:  # the spread is over initialisations only, not over which cases were labelled
        note += (f"\nEvery run drew its label subset and early-stopping holdout with split_seed {config['split_seed']}: "
                 "the spread over seeds, the intervals and the t-tests measure the variance of training (initialisation, "
                 "augmentation, batch order) on that one subset, not that of which cases were labelled.\n")
    intervals = markdown_ci_table(cells, metric.upper(), method_order=list(config["methods"]))
    note += f"\n{intervals}\n\n{ci_table_note(cells, metric)}"
    if incomplete:  # failures.json is named only where it is (the grid deletes it when no run has failed)
        failed = (out / "failures.json").is_file()
        why = ("not all folds finished" + (", or some failed: see failures.json" if failed else "") if "folds" in config
               else "not run yet" + (", or failed: see failures.json" if failed else ""))
        note += f"\nLeft out ({why}): {_listed(incomplete)}.\n"
    grid, folded = {(str(key[0]),) + key[1:] for key in grid_cells(config)}, "folds" in config
    note += auc_class_notes(config.get("datalist") or "", [  # classes a mean AUC left out, or trained without a positive
        (f"{r['method']} @ {100 * float(r['label_fraction']):g} % labels, seed {r['seed']}"
         + (f", fold {r['fold']}" if folded else ""), r["run_dir"]) for r in rows if row_key(r, folded) in grid])
    unpaired = _unpaired(cells, config["baseline"]) if test == "paired" else []
    if unpaired:
        note += f"\nUnpaired (a seed of one side only, out of that cell's paired test): {_listed(unpaired)}.\n"
    atomic_write_text(out / "table.md", table + note)
    # std of a one-seed cell is NaN: null, as p_value, since NaN is no JSON (jq, JavaScript and strict readers refuse it)
    summary = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in c.__dict__.items()} for c in cells]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    if plots:
        save_figures(cells, metric, list(config["methods"]), out)
    return table


def _listed(runs: list[str]) -> str:
    return "; ".join(runs[:_LISTED]) + (f"; and {len(runs) - _LISTED} more" if len(runs) > _LISTED else "")


def _unpaired(cells: list[CellSummary], baseline: str) -> list[str]:
    """``dira vs random @ 10 % labels: seed 3 (dira only)``: each seed of a paired comparison that only
    one of its two cells has."""
    base = {c.label_fraction: c for c in cells if c.method == baseline}
    named = []
    for cell in cells:
        ref = base.get(cell.label_fraction)
        if cell.pairs is None or ref is None:
            continue
        one_side = [(s, cell.method) for s in cell.seeds if s not in ref.seeds]
        one_side += [(s, baseline) for s in ref.seeds if s not in cell.seeds]
        if one_side:
            named.append(f"{cell.method} vs {baseline} @ {100 * cell.label_fraction:g} % labels: "
                         + ", ".join(f"seed {s} ({who} only)" for s, who in sorted(one_side)))
    return named


_LISTED = 20  # runs named under the table (all of them in the log)


def seed_values(config: Mapping[str, Any], rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One value per (method, label fraction, seed) of the current grid, and the seeds left out.

    Without folds, a run's value. With folds, the mean over the seed's folds, when every listed fold
    has a row; a seed that lacks one (not run yet, or failed) is left out, not averaged over fewer folds.
    The second list names every seed of the grid left out (``dira @ 50 % labels, seed 2``; with folds
    ``... (fold 1 missing)``). Rows of runs no longer in the grid, or duplicated by a second writer,
    count once or not at all.
    """
    metric = config["metric"]
    folded = "folds" in config
    grid = {(str(key[0]),) + key[1:] for key in grid_cells(config)}
    latest: dict[tuple, Mapping] = {}
    for r in rows:
        key = row_key(r, folded)
        if key in grid:
            latest[key] = r
    per_seed: dict[tuple, dict] = {}
    for key, r in latest.items():
        per_seed.setdefault(key[:3], {})[key[3] if folded else None] = float(r["value"])
    values, incomplete = [], []
    for method, fraction, seed in dict.fromkeys((str(key[0]),) + key[1:3] for key in grid_cells(config)):  # grid order
        by_fold = per_seed.get((method, fraction, seed), {})
        missing = [k for k in config["folds"] if k not in by_fold] if folded else ([] if by_fold else [None])
        if missing:
            incomplete.append(f"{method} @ {100 * fraction:g} % labels, seed {seed}" + ("" if not folded else
                              f" (fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} missing)"))
            continue
        mean = math.fsum(by_fold.values()) / len(by_fold)
        values.append({"method": method, "label_fraction": fraction, "seed": seed, metric: mean})
    return values, incomplete
