"""Fine-tune one target-task bundle, evaluate it on the test split, and record the metrics.

``run_finetune(bundle, overrides)`` drives a bundle under ``bundles/`` through MONAI's
``ConfigWorkflow``: ``train.json`` (plus ``tiny.json`` for smoke runs), then ``train.json`` +
``evaluate.json`` on the test split with the best checkpoint. It returns the test metrics and
writes them to ``<output_dir>/metrics.json``, which is what the multi-seed experiment grid reads.
``--set eval_split=holdout`` (or ``validation``, ``train``) scores that split instead, and every record says so:
``metrics.json``'s ``eval_split`` and ``splits.<split>``, the per-case file ``<split>_cases.csv``, the TensorBoard
scalars ``<split>/<metric>`` (``dira3d experiment`` takes test scores only).

Command line (``dira3d finetune``)::

    dira3d finetune --bundle lidc_nodule_seg --datalist /data/lidc/lidc_datalist.json \\
        --pretrained runs/dira/model_best.pt --label-fraction 0.25 --seed 3 --output-dir runs/ft/lidc_s3

The bundle names and :func:`bundle_path` live in :mod:`dira3d.evaluation.bundle_lookup`, what a run scored (split,
entries, summaries, TensorBoard scalars) in :mod:`dira3d.evaluation.finetune_scoring`, the refusals before a run (an
earlier run in the output folder, a missing input) in :mod:`dira3d.evaluation.finetune_checks`; the names of
``__all__`` are importable from here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from dira3d.evaluation.bundle_lookup import BUNDLES, BUNDLES_2D, bundle_path, tiny_settings
from dira3d.evaluation.finetune_checks import check_input_paths, earlier_outputs, refuse_earlier_run, remove_killed_writes
from dira3d.evaluation.finetune_messages import finished_message, localise_line, scored_line, show_cache_lines, without_logging_file_warning
from dira3d.evaluation.finetune_scoring import log_split_metrics, scored_split, split_entries, split_summary
from dira3d.evaluation.preprocessing import (
    PREPROCESSING_FILE,
    datalist_preprocessing,
    training_preprocessing,
    write_preprocessing,
)
from dira3d.evaluation.split_ids import write_splits
from dira3d.utils.atomic import atomic_write_text, check_writable, removed_if_failed_empty
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.folder_lock import FolderInUseError, FolderLock
from dira3d.utils.interrupts import StoppedBySignal, interrupt_exit_code, interrupted_word, sigterm_as_interrupt
from dira3d.utils.overrides import check_overrides, parse_value

__all__ = ["BUNDLES", "BUNDLES_2D", "bundle_path", "tiny_settings", "run_finetune", "finished_message", "main"]

logger = logging.getLogger(__name__)

# recorded in metrics.json with the values the run used, passed or default
_RECORDED = ("datalist", "pretrained", "label_fraction", "holdout", "seed", "split_seed", "fold", "max_epochs",
             "learning_rate", "pretrained_head")  # pretrained_head: segmentation bundles (default changed in 2026-11)


def _workflow(configs: list[Path], meta: Path, overrides: dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    with without_logging_file_warning():  # MONAI's warning about logging_file=False, which is asked for here
        return ConfigWorkflow(
            config_file=[str(c) for c in configs],
            meta_file=str(meta),
            logging_file=False,  # the caller's logging setup stays as it is
            workflow_type=None,
            **overrides,
        )


def _number(value: Any) -> Any:
    """JSON-friendly metric value (tensors and numpy scalars to float, NaN to None)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return None if math.isnan(value) else value


def _resolved(parser: Any, key: str) -> Any:
    """``parser``'s content of ``key``; a bad path or setting raised as its own error (a missing datalist's
    ``FileNotFoundError``), not in MONAI's "Failed to evaluate ConfigExpression" that wraps it."""
    from dira3d.utils.bundle_errors import setting_error_in

    try:
        return parser.get_parsed_content(key)
    except Exception as err:
        cause = setting_error_in(err)
        if cause is None or cause is err:
            raise
        raise cause from None


def _write_json(obj: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def run_finetune(
    bundle: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    tiny: bool = False,
    overwrite: bool = False,
    overrides_from: str = "setting",
) -> dict[str, Any]:
    """Fine-tune ``bundle``, evaluate the best checkpoint on the test split, write ``metrics.json``.

    Args:
        bundle: a bundle name (see :data:`BUNDLES`) or a bundle folder.
        overrides: config ids and values, e.g. ``{"datalist": ..., "pretrained": ..., "seed": 1,
            "label_fraction": 0.25, "fold": 2}``.
        output_dir: where ``models/model.pt``, TensorBoard logs, the evaluation CSVs and
            ``metrics.json`` go; default ``overrides["output_dir"]`` or ``./finetune_<bundle>``.
        tiny: add the bundle's ``configs/tiny.json`` (tiny network, 2 epochs in 2D, 3 in 3D) for smoke tests.
        overwrite: replace the model and metrics of an earlier run in ``output_dir`` (refused otherwise).
        overrides_from: what an unknown override id is said to come from (the command line: ``--set``).

    Returns:
        ``{"bundle", "metrics": {name: value}, "eval_split", "holdout": {name: best value}, "epochs", "splits",
        "split_digests", "settings"}`` (and ``"test_cases": "test_cases.csv"``, the per-case test metrics or predictions,
        every task bundle, :mod:`dira3d.evaluation.case_metrics`); ``eval_split`` is the split ``metrics`` were scored
        on (``"test"``; another with ``eval_split=holdout``, ``validation`` or ``train``, whose per-case file is then
        ``"<split>_cases": "<split>_cases.csv"``); ``splits`` holds ``{"cases", "patients", "positive"}`` of the
        training split (the label fraction's selection less the holdout), of the early-stopping holdout and of the
        scored split under its name (``test``) (:func:`dira3d.evaluation.split_checks.describe_split`);
        ``split_digests`` a digest of each one's cases, which ``<output_dir>/splits.json`` lists
        (:mod:`dira3d.evaluation.split_ids`). A segmentation split scored with no or few cases with foreground, or a
        multi-label one with classes of one value, is warned about once, naming the split
        (:func:`dira3d.evaluation.split_checks.warn_test_split`).

    Raises:
        FileNotFoundError: unknown bundle, missing datalist or checkpoint.
        FileExistsError: ``output_dir`` holds an earlier run's ``models/model.pt`` or ``metrics.json``
            (without ``overwrite``).
        FolderInUseError: another process is fine-tuning into ``output_dir`` (it is locked while a run lasts).
        ValueError: bad settings (label fraction, fold, checkpoint shapes...).
        StoppedBySignal: SIGTERM or Ctrl-C stopped the training (a ``SystemExit``, 143 / 130; the bundle logged where):
            no test evaluation, no ``metrics.json`` (:mod:`dira3d.evaluation.stopping`).
    """
    # the refusals up to check_input_paths import neither torch nor MONAI: a rerun, a typo'd path, an unknown bundle
    # are refused at once, not after seconds (20 s on a GPU machine) of loading them (docs/benchmarks.md)
    root = bundle_path(bundle)
    overrides = dict(overrides or {})
    configs = root / "configs"
    files = [configs / "train.json"] + ([configs / "tiny.json"] if tiny else [])
    out = Path(output_dir or overrides.pop("output_dir", None) or Path.cwd() / f"finetune_{root.name}").resolve()
    if "overwrite" in overrides:  # `--set overwrite=true` is --overwrite
        from dira3d.utils.overrides import as_bool

        overwrite = as_bool(overrides.pop("overwrite"), "overwrite") or overwrite
    with removed_if_failed_empty(out):  # a run refused at its start (a bad datalist) leaves no empty folder
        check_writable(out, what="fine-tuning output folder (--output-dir)",
                       advice="choose another --output-dir (by default ./finetune_<bundle>) or fix its permissions")
        # one run per folder: two would pass the check below together, then replace each other's model.pt and
        # test it under the other's metrics.json
        with FolderLock(out, what="fine-tuning output folder (--output-dir)",
                        clash="a second run into it would replace its model.pt and metrics.json"):
            refuse_earlier_run(out, overwrite)
            check_input_paths(overrides)
            from dira3d.evaluation.stopping import stopped_before_training

            try:
                with stopped_before_training(out) as watch:  # a stop before it says so, and a plain rerun starts it
                    # before any work: MONAI adds an unknown id silently, so a typo would train with the default
                    check_overrides(files + [configs / "evaluate.json"],
                                    {k: v for k, v in overrides.items() if k != "output_dir"}, where=overrides_from)
                    return _run_finetune(root, overrides, out, files, tiny, overwrite, watch)
            finally:  # the lock of models/ that train.json's initialize took, also when the run failed
                from dira3d.engines.stopping import end_stop_before_training
                from dira3d.evaluation.run_folders import release_run_folders

                release_run_folders(out / "models")
                end_stop_before_training()  # the handlers of its data loading, when it failed before training


def _run_finetune(root: Path, overrides: dict[str, Any], out: Path, files: list[Path], tiny: bool,
                  overwrite: bool, watch: Any) -> dict[str, Any]:
    """The body of :func:`run_finetune`, with ``out`` locked."""
    from dira3d.utils.interrupts import quiet_interrupt_logs

    configs = root / "configs"
    # listed before this run creates its own TensorBoard files; removed once it has set up without error (train.json's
    # initialize, told overwrite, already removes the earlier curves and metrics.csv: only the model is kept until
    # this run's first validation)
    replaced = earlier_outputs(out) if overwrite else []
    overrides.update({"bundle_root": str(root), "output_dir": str(out), "ckpt_dir": str(out / "models")})
    if overwrite:  # train.json's initialize refuses an earlier run unless told (checked above with our wording)
        overrides["overwrite"] = True

    trainer_flow = _workflow(files, configs / "metadata.json", overrides)
    trainer_flow.initialize()
    parser = trainer_flow.parser
    scored = scored_split(configs, overrides)  # the split evaluate.json scores after training (test by default)
    # the test split (or the 'validation' list) is scored after training: a missing one must fail now, not hours later;
    # the training split is checked here too for labels of the bundle's kind (a pretraining datalist, another task's),
    # which failed in MONAI's tracebacks while it was cached
    if "datalist" in parser:
        from dira3d.evaluation.datalists import is_multilabel, load_split
        from dira3d.evaluation.split_checks import check_labels

        fold = parser.get_parsed_content("fold") if "fold" in parser else None
        datalist = parser.get_parsed_content("datalist")
        kind = parser.get("network_def", {}).get("kind") if isinstance(parser.get("network_def"), dict) else None
        kind = kind if kind in ("classification", "segmentation") else None
        if "train#datalist" in parser:  # the list the trainer caches, loaded once (the bundles' check_before_caching
            # and the trainer find it resolved); the task bundles' load_split checks the kind, a bundle of one's own not
            check_labels(Path(datalist).resolve(), "train", _resolved(parser, "train#datalist"), kind)
        else:
            drawn = {key: parser.get_parsed_content(key) for key in ("label_fraction", "seed", "holdout") if key in parser}
            if "split_seed" in parser:  # the seed of the label subset and holdout, as the task bundles' train.json
                drawn["seed"] = parser.get_parsed_content("split_seed")
            load_split(datalist, "train", fold=fold, kind=kind, **drawn)
        if scored not in ("train", "holdout"):
            test = load_split(datalist, scored, fold=fold, kind=kind)
            if is_multilabel(test) and "out_channels" in parser:  # lists of out_channels numbers, as train.json checks
                load_split(datalist, scored, fold=fold, num_labels=parser.get_parsed_content("out_channels"))
    if "network" in parser:  # built (and its --pretrained checkpoint read) before the datasets are cached: a missing
        # or unfitting checkpoint was found only after caching them (minutes to hours); the trainer reuses it
        _resolved(parser, "network")
    # what the run used, defaults included (metrics.json must say which subset and seed made a number)
    effective = {key: parser.get_parsed_content(key) for key in _RECORDED if key in parser}
    for key in ("datalist", "pretrained"):  # absolute: metrics.json must name the files wherever it is read
        if effective.get(key):
            effective[key] = str(Path(effective[key]).resolve())
    if effective.get("datalist"):  # a multi-label training split with a class of no positive, before training
        from dira3d.evaluation.split_checks import warn_training_split

        warn_training_split(Path(effective["datalist"]), split_entries(parser, "train#datalist"),
                            split_entries(parser, "validate#datalist"),
                            parser.get_parsed_content("class_names") if "class_names" in parser else None,
                            ", ".join(f"{key}={effective[key]}" for key in ("label_fraction", "split_seed", "fold")
                                      if effective.get(key) is not None))
    # instantiated first (the run uses these objects), so that the StatsHandler loggers exist when
    # quiet_interrupt_logs looks for handlers: Ctrl-C prints main()'s one line, not MONAI's traceback
    trainer = trainer_flow.parser.get_parsed_content("train#trainer")
    validator = trainer_flow.parser.get_parsed_content("validate#evaluator")
    # --overwrite: the earlier run goes as this one starts, metrics.json first, so that a kill mid-training
    # never leaves the earlier run's metrics.json beside this run's unfinished model.pt (taken as finished),
    # nor its TensorBoard curves merged into this run's
    for path in replaced:
        path.unlink(missing_ok=True)
    remove_killed_writes(out)  # the half-written .test_cases.csv.*.tmp, ... a run killed mid-write left (none held)
    # how the training volumes were scaled (and, for BraTS, which sequences went in, in which order), for
    # inference.json to prepare a raw scan the same way
    (out / "models" / PREPROCESSING_FILE).unlink(missing_ok=True)
    inputs = {key: parser.get_parsed_content(key) for key in ("modalities", "image_channels") if key in parser}
    write_preprocessing(out / "models", training_preprocessing(effective.get("datalist"), **inputs))
    watch.started()  # the training runs: a stop from here leaves its TensorBoard curves (and perhaps model.pt)
    with quiet_interrupt_logs():
        trainer_flow.run()
    holdout = {"best_" + str(getattr(validator.state, "key_metric_name", "metric")): _number(validator.state.best_metric)}
    epochs = int(trainer.state.epoch)
    trainer_flow.finalize()  # a run stopped by SIGTERM / Ctrl-C ends here (the bundles' exit_if_training_stopped)
    if getattr(trainer.state, "stopped_by", None):  # a bundle of one's own without that step: no test, no metrics.json
        from dira3d.evaluation.stopping import exit_if_training_stopped

        exit_if_training_stopped()

    # the test run loads the fine-tuned weights, not the pretrained ones
    eval_overrides = {k: v for k, v in overrides.items() if k != "pretrained"}
    eval_flow = _workflow(files + [configs / "evaluate.json"], configs / "metadata.json", eval_overrides)
    eval_flow.initialize()
    evaluator = eval_flow.parser.get_parsed_content("validate#evaluator")
    with quiet_interrupt_logs():
        eval_flow.run()
    metrics = {name: _number(value) for name, value in evaluator.state.metrics.items()}
    if "eval_split" in eval_flow.parser:  # what evaluate.json scored, as it resolved it
        scored = str(eval_flow.parser.get_parsed_content("eval_split"))
    # the scored split under its own name (eval_split=holdout: the holdout, as the evaluator counted it; no "test")
    entries = {"train": split_entries(parser, "train#datalist"), "holdout": split_entries(parser, "validate#datalist")}
    entries[scored] = split_entries(eval_flow.parser, "validate#datalist")
    summaries = {"train": split_summary(entries["train"], None), "holdout": split_summary(entries["holdout"], validator)}
    summaries[scored] = split_summary(entries[scored], evaluator)
    splits = {name: summary for name, summary in summaries.items() if summary}
    eval_flow.finalize()

    result = {
        "bundle": root.name,
        "metrics": metrics,
        "eval_split": scored,  # the split `metrics` were scored on (a metrics.json without it: test)
        "holdout": holdout,
        "epochs": epochs,
        "splits": splits,
        # which cases: splits.json lists them, these are their digests (dira3d experiment pairs runs on them)
        "split_digests": write_splits(out, effective.get("datalist"), entries),
        # the per-case rows (dira3d.evaluation.case_metrics) that evaluate.json's CaseMetricsWriter wrote, when it has one
        # ("test_cases"; "holdout_cases" with eval_split=holdout)
        **({f"{scored}_cases": Path(evaluator.state.case_metrics_file).name}
           if getattr(evaluator.state, "case_metrics_file", None) else {}),
        # a list of numbers or names too (--set roi_size=[128,128]: dira3d localise builds the network from this record)
        "settings": {k: v for k, v in overrides.items() if _recordable(v)}
        | {k: v for k, v in effective.items() if _recordable(v)} | {"tiny": tiny},
    }
    log_split_metrics(out, metrics, epochs, split=scored)  # before metrics.json, which marks the run finished
    _write_json(result, out / "metrics.json")
    if scored in splits and effective.get("datalist"):  # a scored split of no (or few) masks with foreground, ...
        from dira3d.evaluation.split_checks import split_kind, warn_test_split

        fold = effective.get("fold")
        warn_test_split(Path(effective["datalist"]), split_kind(eval_flow.parser.get_parsed_content("validate#datalist")),
                        splits[scored], fold=int(fold) if fold is not None and int(fold) >= 0 else None,
                        class_names=parser.get_parsed_content("class_names") if "class_names" in parser else None,
                        split=scored)
    logger.info("fine-tuning %s finished: %s metrics %s", root.name, scored, metrics)
    return result


def _recordable(value: Any) -> bool:
    """Whether ``metrics.json``'s ``settings`` keeps a setting's value: a number, a name, a bool, null or a list of them."""
    plain = (str, int, float, bool, type(None))
    return isinstance(value, plain) or isinstance(value, list) and all(isinstance(v, plain) for v in value)


def _prepared_spacing(datalist: str | os.PathLike | None) -> list[float] | None:
    """The voxel size the datalist's volumes were resampled to (``meta.spacing``, ``dira3d prepare --spacing``), for
    ``pixdim`` in the inference command; None when it records none (the scans kept their own) or cannot be read."""
    return datalist_preprocessing(datalist).get("spacing")


def _output_dir(args: argparse.Namespace, overrides: dict[str, Any]) -> Path:
    """The output folder of ``dira3d finetune`` (as :func:`run_finetune` chooses it)."""
    return Path(args.output_dir or overrides.get("output_dir") or Path.cwd() / f"finetune_{bundle_path(args.bundle).name}")


def main(argv: list[str] | None = None) -> int:
    """``dira3d finetune``: parse the options, run :func:`run_finetune`, print the test metrics."""
    parser = argparse.ArgumentParser(prog="dira3d finetune", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--bundle", required=True, help=f"bundle name ({', '.join(BUNDLES + BUNDLES_2D)}) or folder")
    parser.add_argument("--datalist", help="prepared datalist JSON (default: the bundle's own in its dataset_dir, e.g. "
                        "ncc_datalist.json for luna16_nodule_fpr, lits_datalist.json for lits_liver_seg)")
    parser.add_argument("--dataset-dir", help="folder holding the prepared datalist")
    parser.add_argument("--pretrained", default=None, help="dira3d checkpoint to start from; empty = random initialisation")
    parser.add_argument("--label-fraction", type=float, default=None, help="share of the training labels used (seeded; the count is rounded to the nearest, a half up, at least one: 0.25 of 10 patients keeps 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of training (initialisation, augmentation, batch "
                        "order) and, unless --split-seed is given, of the label subset and holdout")
    parser.add_argument("--split-seed", "--split_seed", dest="split_seed", type=int, default=None,
                        help="seed of the label subset and early-stopping holdout alone (default: --seed), e.g. to train "
                        "several seeds on one labelled subset")
    parser.add_argument("--fold", type=int, default=None, help="test fold for cross-validation datalists (PE-CAD)")
    parser.add_argument("--output-dir", default=None, help="folder for the model, logs and metrics.json")
    parser.add_argument("--tiny", action="store_true", help="add the bundle's configs/tiny.json: tiny network, 2 (2D) or 3 (3D) epochs (smoke test)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model and metrics.json of an earlier run in --output-dir")
    parser.add_argument("--set", "--override", action="append", default=[], metavar="ID=VALUE",
                        help="any other config override, e.g. max_epochs=50")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    for name in ("datalist", "pretrained", "label_fraction", "seed", "split_seed", "fold"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.dataset_dir:
        overrides["dataset_dir"] = args.dataset_dir
    settings: dict[str, Any] = {}  # those of --set, for the inference command at the end
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r} must look like ID=VALUE, e.g. --set max_epochs=50")
        key, value = item.split("=", 1)
        overrides[key] = settings[key] = parse_value(value)
    show_cache_lines()  # how large the cache is, or where on disk (the bundle's logging.conf is not applied)
    try:
        with sigterm_as_interrupt():  # SIGTERM (SLURM preemption, scancel) as Ctrl-C: no resume, so stop with the line
            result = run_finetune(args.bundle, overrides, output_dir=args.output_dir, tiny=args.tiny,
                                  overwrite=args.overwrite, overrides_from="--set")
    except (FileExistsError, FolderInUseError) as err:  # an earlier run's results, or a run going on there: kept
        print(f"dira3d finetune: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StoppedBySignal) as err:  # Ctrl-C or SIGTERM (the training stops after its step, the
        # bundle logs where): one line on how to go on, not a traceback; 130 / 143
        from dira3d.evaluation.stopping import stopped_before_training_of

        where, word = _output_dir(args, overrides).resolve(), interrupted_word(err)
        if stopped_before_training_of(err):  # nothing saved: the same command starts it (--overwrite was not needed)
            print(f"dira3d finetune: {word} before training started (while the data were loaded and cached); nothing "
                  f"was trained or saved in {where}; run the same command again to start it", file=sys.stderr)
        else:
            print(f"dira3d finetune: {word}; {where} holds an unfinished run (no test metrics); rerun with --overwrite "
                  "to start it again", file=sys.stderr)
        return interrupt_exit_code(err)
    except Exception as err:
        from dira3d.utils.bundle_errors import setting_error_in  # light: a refusal before torch loaded stays quick

        cause = setting_error_in(err)  # a bad path or setting
        if cause is None:
            raise
        # MONAI wraps config errors in "Failed to instantiate/evaluate ..." tracebacks: print the cause alone
        print(f"dira3d finetune: error: {cause}", file=sys.stderr)
        return 2
    print(json.dumps(result["metrics"], indent=2))
    scored = scored_line(result)  # a cross-validation run's test fold; another split than the test split
    if scored:
        print(scored)
    spacing = _prepared_spacing(result.get("settings", {}).get("datalist"))
    if spacing and "pixdim" not in settings:  # a new scan must be resampled as the training volumes were
        settings["pixdim"] = spacing
    print(finished_message(_output_dir(args, overrides), args.bundle, tiny=args.tiny, settings=settings), flush=True)
    localise = localise_line(_output_dir(args, overrides), result)  # chestxray14_cls: Grad-CAM on the boxes
    if localise:
        print(localise, flush=True)
    return 0

