"""``dira3d experiment``'s config: read, checked and resolved before any run (:func:`load_config`).

Every setting is checked here, so that a typo, a missing file or a value of the wrong kind is
refused with the setting named instead of failing mid-grid. The settings are described in
``dira3d experiment --help`` (:mod:`dira3d.evaluation.experiment`). The checks of the methods' checkpoints and
pretrainings against the bundle's network live in :mod:`dira3d.evaluation.experiment_method_checks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from dira3d.utils.files import read_yaml
from dira3d.utils.overrides import check_overrides, did_you_mean
from dira3d.evaluation.experiment_method_checks import (check_checkpoints_fit, check_datalist_dims, check_pretrain_run,
                                                        check_pretrainings_fit)
from dira3d.evaluation.experiment_pretrain import pretrain_configs
from dira3d.evaluation.stats import TESTS

__all__ = ["REQUIRED", "KNOWN", "load_config", "read_config", "check_config_bundle"]

REQUIRED = ("bundle", "datalist", "metric", "methods", "seeds", "label_fractions", "output_dir")
KNOWN = REQUIRED + ("baseline", "test", "welch", "overrides", "pretrain", "folds", "split_seed")


def load_config(path: str | Path) -> dict:
    """Read and check an experiment config; relative paths are resolved against its folder: :func:`read_config`,
    then :func:`check_config_bundle`.

    Raises:
        FileNotFoundError: the config or a listed checkpoint does not exist.
        ValueError: a required key is missing or a value is out of range (the message names it).
    """
    return check_config_bundle(read_config(path), path)


def read_config(path: str | Path) -> dict:
    """Read an experiment config, resolve its paths and run the checks that need neither torch nor MONAI (settings,
    files and folders that exist, label fractions, baseline, the pretraining's folder and configs): ``dira3d
    experiment`` refuses these at once. :func:`check_config_bundle` checks the rest against the bundle.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_config`.
    """
    path = Path(path)
    if path.is_dir():  # e.g. docs/experiments/: name the configs in it, not "does not exist"
        held = sorted(p.name for p in path.glob("*.y*ml"))
        raise FileNotFoundError(f"experiment config {path} is a folder, not a YAML/JSON file; "
                                + (f"pass a config in it: {', '.join(str(path / n) for n in held)}" if held else
                                   "pass the config file (`dira3d experiment --help` lists its settings)"))
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
    negative = [s for s in config["seeds"] if s < 0]
    if negative:  # else every run of the seed failed, one after the other, with numpy's 'expected non-negative integer'
        raise ValueError(f"seeds in {path} must be whole numbers >= 0, got {negative[0]!r}; e.g. seeds: [0, 1, 2]")
    _check_split_seed(config, path)
    _check_folds(config, path)
    _check_types(config, path)
    _check_method_names(config, path)
    _check_test(config, path)
    _check_grid_overrides(config, path)
    base = path.parent
    resolve = lambda p: str(p if Path(p).is_absolute() else (base / p).resolve())  # noqa: E731
    config["datalist"] = resolve(config["datalist"])
    config["output_dir"] = resolve(config["output_dir"])
    for name, ckpt in list(config["methods"].items()):
        if isinstance(ckpt, dict):
            if "pretrain" not in ckpt or "pretrain" not in config:
                raise ValueError(f"method {name!r} in {path}: a mapping needs a 'pretrain' entry and a top-level 'pretrain' section")
            extra = [key for key in ckpt if key != "pretrain"]
            if extra:  # `overrides: {learning_rate: ...}` beside `pretrain` was ignored: every run used the grid's
                raise ValueError(f"method {name!r} in {path} sets {', '.join(map(str, extra))} beside pretrain; a method "
                                 "takes only {pretrain: {...}} (its pretraining's bundle ids). The fine-tuning settings "
                                 "are the grid's `overrides`, the same for every method so that methods differ only in "
                                 "their initialisation; for other fine-tuning settings use another experiment "
                                 "(output_dir)")
        elif isinstance(ckpt, str) and not ckpt.strip():  # "" was random init under the method's name
            raise ValueError(f"method {name!r} in {path} has an empty checkpoint path; give the checkpoint file, or null "
                             "for random init")
        elif ckpt:
            config["methods"][name] = resolve(ckpt)
            if Path(config["methods"][name]).is_dir():
                raise FileNotFoundError(f"checkpoint {config['methods'][name]} of method {name!r} in {path} is a folder; "
                                        "give the checkpoint file in it (e.g. models/best.pt of a pretraining)")
            if not Path(config["methods"][name]).is_file():
                raise FileNotFoundError(f"checkpoint {config['methods'][name]} of method {name!r} in {path} does not exist; "
                                        "fix the path (paths are relative to the config's folder) or use null for random init")
    if not Path(config["datalist"]).is_file():
        raise FileNotFoundError(f"datalist {config['datalist']} in {path} does not exist; run `dira3d prepare` or fix the "
                                "path (relative to the config's folder)")
    # the checks that need neither torch nor MONAI come first, so that `dira3d experiment` refuses these at once
    for fraction in config["label_fractions"]:
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"label fraction {fraction} in {path} must be in (0, 1]")
    _check_fractions_distinct(config["label_fractions"], path)
    config.setdefault("baseline", next(iter(config["methods"])))
    if config["baseline"] not in config["methods"]:
        raise ValueError(f"baseline {config['baseline']!r} in {path} is not one of the methods {list(config['methods'])}")
    if "pretrain" in config:
        _check_pretrain_section(config, path, resolve)
    return config


def check_config_bundle(config: dict, path: str | Path) -> dict:
    """The checks of a :func:`read_config` config against its bundle's configs (override ids, metric, folds, the
    methods' checkpoints and pretrainings, label fractions against the datalist): they load MONAI, and torch for the
    checkpoints. Returns ``config``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_config`.
    """
    path = Path(path)
    configs = [Path(c) for c in pretrain_configs(config["pretrain"])] if "pretrain" in config else []
    from dira3d.evaluation.finetune import bundle_path

    bundle_configs = bundle_path(config["bundle"]) / "configs"  # FileNotFoundError naming the valid bundles
    overrides = dict(config.get("overrides") or {})
    check_overrides([bundle_configs / "train.json", bundle_configs / "evaluate.json"]
                    + ([bundle_configs / "tiny.json"] if overrides.get("tiny") else []),
                    {k: v for k, v in overrides.items() if k != "tiny"}, where=f"overrides in {path}")
    check_checkpoints_fit(config, path, bundle_configs, overrides)
    check_datalist_dims(config, path, bundle_configs, overrides)  # else every run failed, after the pretrainings
    if "split_seed" in config:  # else every run failed on the unknown setting (a bundle of one's own, or an older one)
        check_overrides([bundle_configs / "train.json"], {"split_seed": config["split_seed"]},
                        where=f"split_seed in {path} (bundle {config['bundle']!r} must draw its splits with a "
                              "split_seed setting, as the task bundles' train.json does)")
    if "folds" in config:
        _check_fold_data(config, path, bundle_configs)
    if overrides.get("holdout") == "validation":  # else every run of the grid fails on it, one after the other
        _check_validation_holdout(config, path, overrides.get("fold"))
    metrics = _bundle_metrics(bundle_configs)  # else a wrong name is found only after the first fine-tuning
    if metrics and config["metric"] not in metrics:
        raise ValueError(f"metric {config['metric']!r} in {path}: bundle {config['bundle']!r} reports "
                         f"{', '.join(map(repr, metrics))} on the test split; use one of them")
    if "pretrain" in config:
        for name, spec in config["methods"].items():
            if isinstance(spec, dict):
                overrides = {**(config["pretrain"].get("overrides") or {}), **(spec.get("pretrain") or {})}
                check_overrides(configs, overrides, where=f"pretrain overrides of method {name!r} in {path}")
                check_pretrain_run(name, configs, overrides, path)
        check_pretrainings_fit(config, path, bundle_configs, dict(config.get("overrides") or {}))
    if "folds" not in config:  # with folds each fold has its own training entries: its runs say what they kept
        _check_fractions_select_apart(config, path)
    from dira3d.evaluation.fraction_checks import check_fractions_trainable, split_settings

    # a fraction that keeps too few patients failed each of its runs at its start, listed as failed after the grid
    check_fractions_trainable(config, path, *split_settings(bundle_configs, dict(config.get("overrides") or {})))
    return config


def _check_pretrain_section(config: dict, path: Path, resolve: Callable[[Any], str]) -> list[Path]:
    """The ``pretrain`` section's folder and config files, resolved in ``config`` and refused when missing (no
    torch or MONAI needed); returns the pretraining bundle's config paths."""
    if not isinstance(config["pretrain"], dict) or "dataset_dir" not in config["pretrain"]:
        raise ValueError(f"pretrain in {path} needs a dataset_dir (the visual-words folder given to bundles/dira_pretrain)")
    config["pretrain"]["dataset_dir"] = resolve(config["pretrain"]["dataset_dir"])
    if not Path(config["pretrain"]["dataset_dir"]).is_dir():
        raise FileNotFoundError(f"pretrain dataset_dir {config['pretrain']['dataset_dir']} in {path} does not exist; "
                                "point it to the output of `dira3d visual-words` (or a prepared dataset folder); "
                                "paths are relative to the config's folder")
    # a datalist of the pretraining read relative to the working folder: every other path here is the config's
    for values in [config["pretrain"].get("overrides")] + [spec.get("pretrain") for spec in config["methods"].values()
                                                          if isinstance(spec, dict)]:
        if isinstance(values, dict) and isinstance(values.get("datalist"), str) and values["datalist"].strip() \
                and not values["datalist"].startswith(("$", "@", "%")):
            values["datalist"] = resolve(values["datalist"])
    # a bare file name is one of the pretraining bundle's configs; anything else a path
    config["pretrain"]["configs"] = [str(c) if "/" not in str(c) else resolve(c)
                                     for c in config["pretrain"].get("configs", ["train.json"])]
    from dira3d.engines.command import BUNDLE_DIR

    configs = [Path(c) for c in pretrain_configs(config["pretrain"])]
    missing_configs = [str(c) for c in configs if not c.is_file()]
    if missing_configs:
        raise FileNotFoundError(f"pretrain configs {missing_configs} in {path} do not exist; name files of "
                                f"{BUNDLE_DIR / 'configs'} or give paths")
    return configs


def _check_fractions_distinct(fractions: list, path: Path) -> None:
    """Refuse two label fractions that the runs' folders (``runs/<method>_lf0.1_seed0``) or the table's columns
    (``10 % labels``) write alike: the second one's runs replaced the first one's folders, and the table showed
    two columns of the same name."""
    seen: dict[str, Any] = {}
    for fraction in fractions:
        for name in (f"{float(fraction):g}", f"{100 * float(fraction):g} %"):
            if name in seen and seen[name] != fraction:
                raise ValueError(f"label_fractions in {path} lists {seen[name]!r} and {fraction!r}, which the run folders "
                                 f"or the table's columns both name {name!r} (6 significant digits), so the runs of one "
                                 "would replace the other's; list only one of them")
            seen[name] = fraction


def _check_fractions_select_apart(config: Mapping[str, Any], path: Path) -> None:
    """Refuse two label fractions that keep the same training entries for every seed: on a small labelled set the
    counts are rounded to whole patients (or samples per class, at least one), so 10 % and 25 % of 4 patients both
    keep 1, and as the subsets nest, their runs were the same runs, shown as two points of a label-efficiency curve."""
    from dira3d.data.datalist import read_datalist_json
    from dira3d.evaluation.datalists import select_fraction
    from dira3d.evaluation.fraction_checks import split_seeds

    try:
        training = read_datalist_json(config["datalist"]).get("training") or []
        if not isinstance(training, list) or not training:
            return  # the runs refuse it, naming the datalist
        kept = {float(f): [len(select_fraction(training, float(f), s)) for s in split_seeds(config)]
                for f in config["label_fractions"]}
    except Exception:  # noqa: BLE001  (a datalist the runs refuse themselves, with their own error)
        return
    fractions = sorted(kept)
    for small, large in zip(fractions, fractions[1:]):
        if kept[small] == kept[large]:
            raise ValueError(f"label_fractions in {path}: {small:g} and {large:g} keep the same "
                             f"{kept[small][0]} of the {len(training)} training entries of datalist {config['datalist']} "
                             "for every seed (rounded to whole patients, or to samples of each class, at least one), so "
                             "their runs would be the same; list one of them, or fractions further apart")


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


def _check_method_names(config: dict, path: Path) -> None:
    """Method names are text that makes one folder name (``runs/<method>_lf..``, ``pretrain/<method>``): a YAML key
    ``2024:`` or ``yes:`` is a number or a bool, which results.csv gives back as text, so its finished runs were run
    again on every rerun and added twice; ``a/b`` or ``../x`` wrote outside the output_dir's folders."""
    for name in config["methods"]:
        if not isinstance(name, str):
            raise ValueError(f"method {name!r} in {path} is read as {type(name).__name__}, not a name; quote it "
                             f"('{name}': ...) or give it a name that starts with a letter")
        if not name.strip() or name.strip(".") == "" or any(c in name for c in '/\\:') or name != name.strip():
            raise ValueError(f"method {name!r} in {path} must be a plain name (its runs go to folders named after it): "
                             "no '/', '\\' or ':', not '.' or '..', no leading or trailing spaces; e.g. dira_tiny")


# ids the grid sets for every run (and the config setting that gives them): in `overrides`, replaced without a word
_GRID_SETS = {"datalist": "datalist", "pretrained": "methods", "label_fraction": "label_fractions", "seed": "seeds",
              "split_seed": "split_seed", "output_dir": "output_dir", "bundle_root": "bundle", "ckpt_dir": "output_dir"}
# ids the experiment sets for each method's pretraining (bundles/dira_pretrain): a TypeError (bundle_root,
# dataset_dir) or a checkpoint written outside <output_dir>/pretrain/<method>, which the runs then did not find
_PRETRAIN_SETS = {"bundle_root": "output_dir", "dataset_dir": "pretrain: {dataset_dir: ...}", "ckpt_dir": "output_dir",
                  "output_dir": "output_dir"}


def _check_grid_overrides(config: dict, path: Path) -> None:
    """Refuse ``overrides`` the grid replaces for every run, ``tiny`` that is not true or false, and pretraining
    overrides that move the pretraining's folders."""
    overrides = config.get("overrides") or {}
    taken = [key for key in overrides if key in _GRID_SETS]
    if taken:
        key = taken[0]
        raise ValueError(f"overrides in {path} set {key}, which the experiment sets for every run from `{_GRID_SETS[key]}`; "
                         f"remove {key} from overrides and use {_GRID_SETS[key]} (`dira3d experiment --help`)")
    if "tiny" in overrides and not isinstance(overrides["tiny"], bool):  # bool("no") is True
        raise ValueError(f"tiny in the overrides of {path} must be true or false, got {overrides['tiny']!r}")
    if overrides.get("eval_split", "test") != "test":  # its scores went into the table as test scores, unlabelled
        raise ValueError(f"overrides in {path} set eval_split={overrides['eval_split']!r}, but dira3d experiment compares "
                         "the methods on the test split (results.csv's value and test_cases, the table, the t-tests); "
                         "remove eval_split from overrides (each run's metrics.json keeps its best early-stopping holdout "
                         "score, `holdout`; `dira3d finetune --set eval_split=...` scores another split for one run)")
    pretrain = config.get("pretrain") or {}
    sources = [("pretrain overrides", pretrain.get("overrides") or {})] + [
        (f"pretrain of method {name!r}", spec.get("pretrain") or {}) for name, spec in config["methods"].items()
        if isinstance(spec, dict)]
    for where, values in sources:
        taken = [key for key in values if key in _PRETRAIN_SETS]
        if taken:
            key = taken[0]
            raise ValueError(f"{where} in {path} set {key}, which the experiment sets for each method's pretraining "
                             f"(<output_dir>/pretrain/<method>); remove it (the setting to use: {_PRETRAIN_SETS[key]})")


def _check_test(config: dict, path: Path) -> None:
    """Check ``test`` (student, welch or paired; ``test: null`` is the same as none) against ``welch``, its
    older spelling: ``welch: true`` beside ``test: student`` or ``test: paired`` asks for two tests at once."""
    if config.get("test") is None:
        config.pop("test", None)
        return
    test = config["test"]
    if not isinstance(test, str) or test not in TESTS:
        raise ValueError(f"test in {path} must be one of {', '.join(TESTS)} (the t-test against the baseline), got "
                         f"{test!r}; e.g. test: paired")
    if config.get("welch") is True and test != "welch":
        raise ValueError(f"welch: true and test: {test} in {path} ask for two different t-tests; keep test: {test} and "
                         "remove welch (welch: true is the older spelling of test: welch)")


def _check_split_seed(config: dict, path: Path) -> None:
    """Check ``split_seed`` (the seed of every run's label subset and holdout): a whole number >= 0, as ``seeds``
    (``split_seed: null`` is the same as none: each seed draws its own split)."""
    if config.get("split_seed") is None:
        config.pop("split_seed", None)
        return
    value = config["split_seed"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:  # int(0.5) would silently draw seed 0's
        raise ValueError(f"split_seed in {path} must be a whole number >= 0 (the seed of the label subset and "
                         f"early-stopping holdout of every run), got {value!r}; e.g. split_seed: 0, or leave split_seed "
                         "out to draw each seed's own split")


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


def _check_validation_holdout(config: Mapping[str, Any], path: Path, fold: Any) -> None:
    """Refuse ``holdout: validation`` in ``overrides`` with ``folds``, or on a datalist whose 'validation' list
    the runs would refuse (:func:`dira3d.evaluation.split_checks.check_validation_holdout`), before any run."""
    from dira3d.evaluation.datalists import load_split

    if "folds" in config:
        raise ValueError(f"overrides in {path} set holdout: validation, but folds runs a cross-validation, which holds "
                         "out for early stopping from the training folds: the datalist's 'validation' list lies outside "
                         "them, so every fold would select its model on the same cases; remove holdout (0.1, the "
                         "default) or remove folds")
    try:
        load_split(config["datalist"], "holdout", holdout="validation", fold=fold)
    except ValueError as err:
        raise ValueError(f"overrides in {path}: {err}") from None


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
