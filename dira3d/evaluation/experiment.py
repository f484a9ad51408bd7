"""``dira3d experiment``: the paper's evaluation protocol as one resumable command.

A grid of initialisations (random, L_dis only, L_dis + L_res, full DiRA, any checkpoint) × label
fractions × seeds (× cross-validation folds) is fine-tuned through one task bundle. Each finished
run is added to ``results.csv`` at once (the file is replaced atomically), so an interrupted experiment picks up where it stopped; the aggregation
(mean ± std, t-tests against the baseline), a Markdown table and PNG plots are rewritten after
every run (the plots at the end).

Config (YAML or JSON)::

    bundle: luna16_nodule_fpr          # a folder under bundles/, or a path to a bundle
    datalist: prepared/ncc_datalist.json
    metric: auc                        # key of the metrics dict the fine-tuning returns
    output_dir: runs/experiment
    baseline: random                   # method the t-tests compare against
    welch: false                       # Welch's t-test instead of Student's
    seeds: [0, 1, 2, 3, 4]
    label_fractions: [0.1, 0.25, 1.0]
    folds: [0, 1, 2]                   # optional: cross-validation (PE-CAD); absent: the datalist's test list
    methods:                           # name: checkpoint path, null (random init), or {pretrain: {...}}
      random: null
      mine: runs/pretrain/best.pt
      dis: {pretrain: {stages: [{name: dis, losses: [dis]}]}}
      dira: {pretrain: {}}             # the pretraining bundle's own stages
    overrides: {tiny: true, max_epochs: 10}   # bundle ids for every run; `tiny` adds configs/tiny.json
    pretrain:                          # only for methods with a `pretrain` entry
      dataset_dir: visual_words        # folder given to bundles/dira_pretrain as dataset_dir
      configs: [train.json, tiny.json, visual_words.json]   # in bundles/dira_pretrain/configs, or paths
      overrides: {max_epochs: 6}       # bundle ids shared by every pretraining run

A method with a ``pretrain`` entry is pretrained first (``<output_dir>/pretrain/<method>``, the
entry's ids on top of ``pretrain.overrides``) and fine-tuned from its ``best.pt``; a finished
pretraining (``done.json``) is not repeated; its settings (``settings.json``) must match the
config's, and rows of a method fine-tuned from another checkpoint are not reused either: another
path, or the same path holding another file (a pretraining rerun into the same folder; the sha256 of
each checkpoint is recorded in ``checkpoints.json``) is refused while the method has rows. The
fine-tuning settings (bundle, datalist, metric, overrides, folds) are recorded in ``experiment.json``: a rerun
with other ones on a ``results.csv`` that has rows is refused rather than mixed into one table.

With ``folds``, every (method, label fraction, seed) runs once per fold, with the bundle's ``fold``
set to it (that fold is the test set, the others are trained on;
``runs/<method>_lf<f>_seed<s>_fold<k>``), and ``results.csv`` gains a ``fold`` column. A seed is one
repetition of the whole cross-validation: its folds draw their label subset and holdout with the
seed's rule (each from its own training folds), so its value in the statistics is the mean over its
folds, and mean ± std and the t-tests are over seeds, as without folds (the folds of one seed are
not independent samples). A seed whose folds are not all in ``results.csv`` (not run yet, or failed)
is left out of the statistics, never averaged over fewer folds, and listed under the table and in
the log with the folds it lacks. The folds
list is a recorded setting: a rerun with another one on the same ``results.csv`` is refused. The
bundle must have a ``fold`` setting and the datalist's ``training`` entries must carry every listed
``fold``, else the config is refused.

The config is checked before any run: unknown keys, missing checkpoints, datalist or bundle, and
override ids no bundle config defines are refused with the setting named. A run that fails is
logged and listed in ``failures.json``; the other runs go on, the command exits 1 at the end, and
rerunning it retries only the failed runs. The table and ``summary.json`` count each run of the
current grid once (rows of seeds, fractions or methods no longer in the config stay in
``results.csv`` but out of the statistics). The note under the table gives the number of seeds and
the test; a cell of fewer seeds says ``n=…`` and every run left out (failed, or not run yet) is
named below it (and, at the end, in the log); a cell whose t-test is undefined (fewer than two
seeds on a side, or one value in every seed of both sides) says ``p n/a`` rather than showing none. One experiment runs in an ``output_dir`` at a time: a
second ``dira3d experiment`` on the same folder is refused at once (the folder lock of every dira3d
output folder, ``<output_dir>/.dira3d.lock``, released by the system when the first process ends,
however it ends), so two processes never run the same grid twice into one ``results.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from dira3d.utils.atomic import FolderNotWritableError, atomic_write_text, check_writable
from dira3d.utils.folder_lock import FolderInUseError, FolderLock
from dira3d.utils.cli_help import DefaultsRawDescriptionHelpFormatter
from dira3d.utils.files import FileContentError, read_json, read_yaml
from dira3d.utils.interrupts import StoppedBySignal, interrupt_exit_code, sigterm_as_interrupt
from dira3d.utils.overrides import check_overrides, did_you_mean
from dira3d.evaluation.results import (
    FIELDS, FOLD_FIELDS, check_checkpoints, check_fold_column, check_rows_match, check_run_settings, grid_cells, read_rows,
    row_key, seed_values, write_report, write_rows,
)  # fmt: skip

__all__ = ["load_config", "run_experiment", "write_report", "main"]

Runner = Callable[[str, dict], Mapping[str, float]]
SETTINGS_NAME = "settings.json"  # what a method's pretraining was made with (output_dir/pretrain/<method>/)
REQUIRED = ("bundle", "datalist", "metric", "methods", "seeds", "label_fractions", "output_dir")
KNOWN = REQUIRED + ("baseline", "welch", "overrides", "pretrain", "folds")


class ExperimentRunsFailed(RuntimeError):
    """Some runs of the grid failed; the others finished and are in ``results.csv``."""


def load_config(path: str | Path) -> dict:
    """Read and check an experiment config; relative paths are resolved against its folder.

    Raises:
        FileNotFoundError: the config or a listed checkpoint does not exist.
        ValueError: a required key is missing or a value is out of range (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist")
    config = read_yaml(path, "experiment config", "fix it there (`dira3d experiment --help` lists its settings)")
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ValueError(f"experiment config {path} lacks {', '.join(missing)}; see `dira3d experiment --help`")
    unknown = [key for key in config if key not in KNOWN]
    if unknown:  # a typo (`welsh: true`) would silently run with the default
        raise ValueError(f"experiment config {path}: unknown setting {did_you_mean(unknown, KNOWN)}; "
                         f"the settings are {', '.join(KNOWN)}")
    for key in ("seeds", "label_fractions"):
        if not isinstance(config[key], list) or not config[key]:
            raise ValueError(f"{key} in {path} must be a non-empty list, e.g. {key}: [{'0, 1, 2' if key == 'seeds' else '0.1, 1.0'}]")
        # int(0.5) would silently run seed 0, float('ten') fails mid-grid without naming the setting
        kinds = (int,) if key == "seeds" else (int, float)
        bad = [v for v in config[key] if isinstance(v, bool) or not isinstance(v, kinds)]
        if bad:
            raise ValueError(f"{key} in {path} must be {'whole numbers' if key == 'seeds' else 'numbers in (0, 1]'}, "
                             f"got {bad[0]!r}; e.g. {key}: [{'0, 1, 2' if key == 'seeds' else '0.1, 1.0'}]")
        twice = sorted({v for v in config[key] if config[key].count(v) > 1})
        if twice:
            raise ValueError(f"{key} in {path} lists {twice[0]!r} more than once; list each value once")
    _check_folds(config, path)
    _check_types(config, path)
    base = path.parent
    resolve = lambda p: str(p if Path(p).is_absolute() else (base / p).resolve())  # noqa: E731
    config["datalist"] = resolve(config["datalist"])
    config["output_dir"] = resolve(config["output_dir"])
    for name, ckpt in list(config["methods"].items()):
        if isinstance(ckpt, dict):
            if "pretrain" not in ckpt or "pretrain" not in config:
                raise ValueError(f"method {name!r} in {path}: a mapping needs a 'pretrain' entry and a top-level 'pretrain' section")
        elif ckpt:
            config["methods"][name] = resolve(ckpt)
            if not Path(config["methods"][name]).is_file():
                raise FileNotFoundError(f"checkpoint {config['methods'][name]} of method {name!r} in {path} does not exist; "
                                        "fix the path (paths are relative to the config's folder) or use null for random init")
    if not Path(config["datalist"]).is_file():
        raise FileNotFoundError(f"datalist {config['datalist']} in {path} does not exist; run `dira3d prepare` or fix the "
                                "path (relative to the config's folder)")
    from dira3d.evaluation.finetune import bundle_path

    bundle_configs = bundle_path(config["bundle"]) / "configs"  # FileNotFoundError naming the valid bundles
    overrides = dict(config.get("overrides") or {})
    check_overrides([bundle_configs / "train.json", bundle_configs / "evaluate.json"]
                    + ([bundle_configs / "tiny.json"] if overrides.get("tiny") else []),
                    {k: v for k, v in overrides.items() if k != "tiny"}, where=f"overrides in {path}")
    if "folds" in config:
        _check_fold_data(config, path, bundle_configs)
    metrics = _bundle_metrics(bundle_configs)  # else a wrong name is found only after the first fine-tuning
    if metrics and config["metric"] not in metrics:
        raise ValueError(f"metric {config['metric']!r} in {path}: bundle {config['bundle']!r} reports "
                         f"{', '.join(map(repr, metrics))} on the test split; use one of them")
    if "pretrain" in config:
        if not isinstance(config["pretrain"], dict) or "dataset_dir" not in config["pretrain"]:
            raise ValueError(f"pretrain in {path} needs a dataset_dir (the visual-words folder given to bundles/dira_pretrain)")
        config["pretrain"]["dataset_dir"] = resolve(config["pretrain"]["dataset_dir"])
        if not Path(config["pretrain"]["dataset_dir"]).is_dir():
            raise FileNotFoundError(f"pretrain dataset_dir {config['pretrain']['dataset_dir']} in {path} does not exist; "
                                    "point it to the output of `dira3d visual-words` (or a prepared dataset folder); "
                                    "paths are relative to the config's folder")
        # a bare file name is one of the pretraining bundle's configs; anything else a path
        config["pretrain"]["configs"] = [str(c) if "/" not in str(c) else resolve(c)
                                         for c in config["pretrain"].get("configs", ["train.json"])]
        from dira3d.engines.command import BUNDLE_DIR

        configs = [Path(c) for c in _pretrain_configs(config["pretrain"])]
        missing_configs = [str(c) for c in configs if not c.is_file()]
        if missing_configs:
            raise FileNotFoundError(f"pretrain configs {missing_configs} in {path} do not exist; name files of "
                                    f"{BUNDLE_DIR / 'configs'} or give paths")
        for name, spec in config["methods"].items():
            if isinstance(spec, dict):
                check_overrides(configs, {**(config["pretrain"].get("overrides") or {}), **(spec.get("pretrain") or {})},
                                where=f"pretrain overrides of method {name!r} in {path}")
    for fraction in config["label_fractions"]:
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"label fraction {fraction} in {path} must be in (0, 1]")
    config.setdefault("baseline", next(iter(config["methods"])))
    if config["baseline"] not in config["methods"]:
        raise ValueError(f"baseline {config['baseline']!r} in {path} is not one of the methods {list(config['methods'])}")
    return config


def _check_types(config: dict, path: Path) -> None:
    """Refuse settings of the wrong kind (``datalist: 5``, ``output_dir: null``, ``overrides: [..]``) with
    the setting named, before they fail as a TypeError deep in the run."""
    for key in ("bundle", "datalist", "metric", "output_dir") + (("baseline",) if "baseline" in config else ()):
        if not isinstance(config[key], str) or not config[key].strip():
            raise ValueError(f"{key} in {path} must be text (a name or a path), got {config[key]!r}")
    if not isinstance(config["methods"], dict) or not config["methods"]:
        raise ValueError(f"methods in {path} must map names to a checkpoint, null or {{pretrain: ...}}")
    bad = [name for name, spec in config["methods"].items() if spec is not None and not isinstance(spec, (str, dict))]
    if bad:
        raise ValueError(f"method {bad[0]!r} in {path} must be a checkpoint path, null (random init) or {{pretrain: "
                         f"{{...}}}}, got {config['methods'][bad[0]]!r}")
    for key in ("overrides", "pretrain"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{key} in {path} must be a mapping of settings, e.g. {key}: "
                             f"{{{'max_epochs: 10' if key == 'overrides' else 'dataset_dir: visual_words'}}}, got {config[key]!r}")
    pretrain = config.get("pretrain") or {}
    for name, spec in [("pretrain", pretrain)] + [(f"method {n!r}", s) for n, s in config["methods"].items() if isinstance(s, dict)]:
        overrides = spec.get("overrides") if name == "pretrain" else spec.get("pretrain")
        if overrides is not None and not isinstance(overrides, dict):
            what = "pretrain overrides" if name == "pretrain" else f"pretrain of {name}"
            raise ValueError(f"{what} in {path} must be a mapping of bundle settings (or {{}}), got {overrides!r}")
    configs = pretrain.get("configs", [])
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ValueError(f"pretrain configs in {path} must be a list of config files, e.g. configs: [train.json, tiny.json], "
                         f"got {configs!r}")
    if not isinstance(config.get("welch", False), bool):
        raise ValueError(f"welch in {path} must be true or false, got {config['welch']!r}")
    if not isinstance(pretrain.get("dataset_dir", ""), str):
        raise ValueError(f"pretrain dataset_dir in {path} must be a folder path, got {pretrain['dataset_dir']!r}")


def _check_folds(config: dict, path: Path) -> None:
    """Check the ``folds`` list: distinct whole numbers >= 0, and no ``fold`` override beside it
    (``folds: null`` is the same as no ``folds``)."""
    if config.get("folds") is None:
        config.pop("folds", None)
        return
    folds = config["folds"]
    if not isinstance(folds, list) or not folds:
        raise ValueError(f"folds in {path} must be a non-empty list of the datalist's fold numbers, e.g. folds: [0, 1, 2] "
                         "(or leave folds out to test on the datalist's 'test' list)")
    bad = [f for f in folds if isinstance(f, bool) or not isinstance(f, int) or f < 0]
    if bad:
        raise ValueError(f"folds in {path} must be whole numbers >= 0 (the datalist's fold numbers), got {bad[0]!r}; "
                         "e.g. folds: [0, 1, 2]")
    twice = sorted({f for f in folds if folds.count(f) > 1})
    if twice:
        raise ValueError(f"folds in {path} lists {twice[0]!r} more than once; list each fold once")
    if "fold" in (config.get("overrides") or {}):
        raise ValueError(f"overrides in {path} set fold, but folds runs every listed fold; remove fold from "
                         f"overrides (folds: [{config['overrides']['fold']}] runs that one fold)")


def _check_fold_data(config: Mapping[str, Any], path: Path, bundle_configs: Path) -> None:
    """Refuse ``folds`` when the bundle has no ``fold`` setting or the datalist lacks a listed fold:
    every fold would run on the same test split, or fail only when its turn comes."""
    from monai.bundle import ConfigParser

    from dira3d.data.datalist import read_datalist_json

    parser = ConfigParser()
    parser.read_config([str(c) for c in (bundle_configs / "train.json", bundle_configs / "evaluate.json") if c.is_file()])
    if "fold" not in parser:
        raise ValueError(f"folds in {path}: bundle {config['bundle']!r} has no `fold` setting, so every fold would be "
                         "tested on the same split; remove folds, or use a bundle that tests on one fold of the "
                         "datalist (e.g. pecad_embolism_fpr)")
    try:
        content = read_datalist_json(config["datalist"])
    except ValueError as err:
        raise ValueError(f"folds in {path}: {err}; folds need a cross-validation datalist (training entries with "
                         "'fold'), or remove folds") from None
    present = sorted({e["fold"] for e in content["training"] or [] if isinstance(e, dict) and e.get("fold") is not None})
    if not present:
        raise ValueError(f"folds in {path}: datalist {config['datalist']} has no cross-validation folds (no 'fold' in "
                         "its training entries); remove folds to test on its 'test' list, or use a datalist prepared "
                         "with folds (e.g. `dira3d prepare pecad`)")
    missing = [f for f in config["folds"] if f not in present]
    if missing:
        raise ValueError(f"folds in {path} lists fold {missing[0]}, which datalist {config['datalist']} does not have "
                         f"(folds present: {present}); list only those, e.g. folds: {present}")


def _bundle_metrics(configs: Path) -> list[str]:
    """Names of the test metrics ``run_finetune`` returns for a bundle: the keys of its evaluator's
    ``key_metric`` and ``additional_metrics``; empty when the configs do not spell them out."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in (configs / "train.json", configs / "evaluate.json") if c.is_file()])
    names: list[str] = []
    for key in ("validate#key_metric", "validate#additional_metrics"):
        value = parser.get(key)
        if key == "validate#key_metric" and not isinstance(value, dict):
            return []  # computed (an expression or a reference): not checkable here
        if isinstance(value, dict):
            names += [str(k) for k in value]
    return names


def _describe(method: str, fraction: float, seed: int, fold: int | None = None) -> str:
    """``dira labels=0.5 seed=1`` (`` fold=2`` with folds): one run in logs and errors."""
    return f"{method} labels={fraction:g} seed={seed}" + ("" if fold is None else f" fold={fold}")


def _default_runner(bundle: str, overrides: dict) -> Mapping[str, float]:
    from dira3d.evaluation.finetune import run_finetune

    overrides = dict(overrides)
    tiny = bool(overrides.pop("tiny", False))
    # results.csv is the grid's resume point: a cell run again has no row, so its folder holds only an
    # interrupted or failed attempt, which is replaced
    return run_finetune(bundle, overrides, tiny=tiny, overwrite=True)["metrics"]


def pretrain_method(name: str, spec: Mapping[str, Any], config: Mapping[str, Any], log: Callable[[str], None] = print) -> str:
    """Pretrain one method of the grid with ``bundles/dira_pretrain``; returns its ``best.pt``.

    Resumable twice over: a finished run (``done.json``) is skipped, an interrupted one resumes
    from its ``last.pt`` (the bundle's own resume).
    """
    from dira3d.engines.command import BUNDLE_DIR
    from dira3d.utils.overrides import run_bundle

    out, settings = _pretrain_settings(name, spec, config)
    best = out / "models" / "best.pt"
    _check_pretrain_settings(name, out, settings)
    if (out / "done.json").is_file() and best.is_file():
        return str(best)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_NAME, json.dumps(settings, indent=1))
    log(f"experiment: pretraining {name!r} into {out}")
    overrides = settings["overrides"]
    run_bundle(settings["configs"], meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),  # null overrides kept
               logging_file=str(BUNDLE_DIR / "configs" / "logging.conf"), bundle_root=str(out),
               dataset_dir=settings["dataset_dir"], **overrides)
    atomic_write_text(out / "done.json", json.dumps({"method": name, "overrides": overrides}, default=str))
    return str(best)


def _pretrain_configs(section: Mapping[str, Any]) -> list[str]:
    """The pretraining config files of the ``pretrain`` section: paths, or names in the bundle's configs/."""
    from dira3d.engines.command import BUNDLE_DIR

    return [c if Path(c).is_absolute() else str(BUNDLE_DIR / "configs" / c) for c in section.get("configs", ["train.json"])]


def _pretrain_settings(name: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Path, dict]:
    """``(folder, settings)`` of a method's pretraining: its config files, data and overrides (JSON values)."""
    section = config["pretrain"]
    configs = _pretrain_configs(section)
    overrides = {**section.get("overrides", {}), **(spec.get("pretrain") or {})}
    settings = {"configs": configs, "dataset_dir": section["dataset_dir"], "overrides": overrides}
    return Path(config["output_dir"]) / "pretrain" / name, json.loads(json.dumps(settings, default=str))


def _check_pretrain_settings(name: str, out: Path, settings: dict) -> None:
    """Refuse to reuse (or resume) a pretraining of ``name`` made with other settings: its
    ``best.pt`` and the fine-tuning rows built on it would be reported under the new settings."""
    if not (out / "done.json").is_file() and not any((out / "models").glob("*.pt")):
        return  # nothing was made with the recorded settings (e.g. a run that failed at its start)
    fix = (f"it records what method {name!r} was pretrained with; delete the folder {out} (and the method's rows "
           "in results.csv) to pretrain it again, or put the file back")
    if (out / SETTINGS_NAME).is_file():
        record = out / SETTINGS_NAME
        old = read_json(record, "pretraining settings", fix)
    elif (out / "done.json").is_file():  # a run from before settings.json: it recorded its overrides
        record = out / "done.json"
        old = {**settings, "overrides": read_json(record, "pretraining record", fix).get("overrides")}
    else:
        return
    if not isinstance(old.get("overrides") or {}, dict):
        raise FileContentError(record, f"pretraining record {record} holds overrides {old['overrides']!r}, not a "
                                       f"mapping; {fix}")
    if old != settings:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if "overrides" in changed:
            before, now = old.get("overrides") or {}, settings["overrides"]
            changed.remove("overrides")
            changed += [f"overrides.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        raise ValueError(f"method {name!r} was pretrained in {out} with other settings ({', '.join(changed)} changed); "
                         "its checkpoint and the results built on it would be reported under the new ones. Give the "
                         "method a new name or use another output_dir (or delete that folder and its rows in "
                         "results.csv to redo it)")


class ExperimentBusy(FolderInUseError):
    """Another process is running an experiment in the same ``output_dir``."""


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out``'s :class:`~dira3d.utils.folder_lock.FolderLock`, or raise :class:`ExperimentBusy` at once."""
    lock = FolderLock(out, what="the experiment's output_dir",
                      clash="a second `dira3d experiment` there would run the same grid into one results.csv")
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
    check_run_settings(config, out, rows)
    check_checkpoints(config, out, rows)
    for method, spec in config["methods"].items():  # also when all its runs are done: they would be reused
        if isinstance(spec, Mapping):
            _check_pretrain_settings(method, *_pretrain_settings(method, spec, config))
    folded = "folds" in config
    done = {row_key(r, folded) for r in rows}
    grid = grid_cells(config)
    todo = [key for key in grid if key not in done]
    log(f"experiment: {len(grid)} runs in the grid, {len(grid) - len(todo)} already in {csv_path}, {len(todo)} to run")
    checkpoints = {}
    for method, spec in config["methods"].items():
        if isinstance(spec, Mapping):
            if any(key[0] == method for key in todo):
                checkpoints[method] = pretrain_method(method, spec, config, log)
        else:
            checkpoints[method] = spec or ""
    failures: list[dict] = []
    for i, (method, fraction, seed, *fold) in enumerate(todo, 1):
        fold = fold[0] if fold else None
        checkpoint = checkpoints[method]
        run_dir = out / "runs" / (f"{method}_lf{fraction:g}_seed{seed}" + ("" if fold is None else f"_fold{fold}"))
        overrides = dict(config.get("overrides", {}))
        overrides.update(datalist=config["datalist"], pretrained=checkpoint, label_fraction=fraction, seed=seed,
                         output_dir=str(run_dir))
        if fold is not None:
            overrides["fold"] = fold
        run = _describe(method, fraction, seed, fold)
        start = time.perf_counter()
        try:
            metrics = runner(str(config["bundle"]), overrides)
            _check_value(metrics, config["metric"])
        except Exception as err:  # one failed run must not stop (or lose) the rest of the grid
            cause = _cause_of(err)
            failures.append({"method": method, "label_fraction": fraction, "seed": seed,
                             **({} if fold is None else {"fold": fold}), "run_dir": str(run_dir),
                             "error": f"{type(cause).__name__}: {cause}"})
            log(f"[{i}/{len(todo)}] {run}: FAILED ({type(cause).__name__}: {cause}); going on with the other runs")
            continue
        if config["metric"] not in metrics:
            raise ValueError(f"fine-tuning returned {sorted(metrics)}, not the experiment's metric {config['metric']!r}")
        row = {"method": method, "checkpoint": checkpoint, "label_fraction": fraction, "seed": seed,
               **({} if fold is None else {"fold": fold}),
               "metric": config["metric"], "value": float(metrics[config["metric"]]),
               "seconds": round(time.perf_counter() - start, 2), "run_dir": str(run_dir)}
        rows.append({k: str(v) for k, v in row.items()})
        write_rows(csv_path, rows, FOLD_FIELDS if folded else FIELDS)  # one row per finished run: the resume point
        log(f"[{i}/{len(todo)}] {run}: {config['metric']}={row['value']:.4f}")
        write_report(config, rows, plots=False)  # the table follows progress; plots once at the end
    write_report(config, rows)
    incomplete = seed_values(config, rows)[1]
    if incomplete:
        why = "not all folds finished" if folded else "failed: see failures.json"
        log(f"experiment: left out of the statistics ({why}): {'; '.join(incomplete)}")
    failures_path = out / "failures.json"
    if failures:
        atomic_write_text(failures_path, json.dumps(failures, indent=2))
        raise ExperimentRunsFailed(
            f"{len(failures)} of {len(todo)} runs failed (details in {failures_path}): "
            + "; ".join(f"{_describe(f['method'], f['label_fraction'], f['seed'], f.get('fold'))}: {f['error']}"
                        for f in failures[:3])
            + ("; ..." if len(failures) > 3 else "")
            + ". The other runs are in results.csv; rerun the same command to retry only the failed ones")
    failures_path.unlink(missing_ok=True)
    return rows


def _check_value(metrics: Mapping[str, Any], metric: str) -> None:
    """Refuse an undefined test metric (``run_finetune`` writes a NaN, e.g. an AUC on a test split of
    one class, as ``None``): the run is a failure of its own, not a crash of the grid."""
    value = metrics.get(metric, 0.0)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"the test metric {metric!r} is undefined (NaN), e.g. an AUC on a test split that holds "
                         "one class only; check the test split")


def _cause_of(err: BaseException) -> BaseException:
    """The bad setting or path behind MONAI's wrappers, else ``err`` itself."""
    from dira3d.engines.inputs import setting_error_in

    return setting_error_in(err) or err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dira3d experiment", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=DefaultsRawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML/JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    try:
        with sigterm_as_interrupt():  # SIGTERM (SLURM preemption, scancel) as Ctrl-C; a pretraining stops gently itself
            run_experiment(config)
    except ExperimentRunsFailed as err:
        print(f"dira3d experiment: error: {err}", file=sys.stderr)
        return 1
    except ExperimentBusy as err:
        print(f"dira3d experiment: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StoppedBySignal) as err:  # Ctrl-C, SIGTERM: one line on how to go on, not a traceback
        # (a pretraining stopped by a signal wrote its last.pt first: the rerun resumes it); 130 / 143
        print(f"dira3d experiment: interrupted; the finished runs are in {Path(config['output_dir']) / 'results.csv'}; "
              "rerun the same command to go on from there", file=sys.stderr)
        return interrupt_exit_code(err)
    except Exception as err:
        cause = _cause_of(err)
        if cause is err and not isinstance(err, (ValueError, FileNotFoundError, FolderNotWritableError)):
            raise
        print(f"dira3d experiment: error: {cause}", file=sys.stderr)
        return 2
    print((Path(config["output_dir"]) / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
