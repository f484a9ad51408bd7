"""What the early-stopping holdout and the test split hold for their metric.

A metric is only as meaningful as the split it averages over:

- an AUC needs both classes: :func:`check_auc_defined` refuses, before any training, a classification
  holdout or test split with one class only (a multi-label one: with no class that has both values),
  naming the datalist, the split and the class; MONAI's ``ROCAUCMetric`` returned NaN with a generic
  warning, so early stopping never fired, the first epoch's model was kept and ``metrics.json`` said
  ``null``;
- a mean Dice with MONAI's convention scores an empty prediction of an empty mask as 1: a segmentation
  test split with no (or very few) cases with foreground rewards predicting nothing.
  :func:`warning_for_test_split` says so, and :func:`describe_split` gives the counts ``metrics.json`` records
  (``splits``), from the masks the metric scored (:class:`dira3d.evaluation.ForegroundDice` counts them at no
  cost: the evaluator has loaded them anyway) or, failing that, the datalist's
  :data:`~dira3d.evaluation.datalists.FOREGROUND_KEYS` flags;
- a model selected on patients it trains or is tested on is no model selection: :func:`check_validation_holdout`
  refuses the datalist's ``validation`` list as the holdout (``holdout="validation"``) where it shares a patient
  with ``training`` or ``test``, is absent or empty, or meets cross-validation folds.

A datalist of the wrong task (:func:`check_labels`) or a ``pretrained`` checkpoint that is missing or does not fit is
refused before any volume is cached: :func:`check_before_caching`, the first ``run`` step of the task bundles'
``train.json`` and ``multi_gpu_train.json``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from dira3d.data.datalist import split_option
from dira3d.data.errors import DataError
from dira3d.evaluation.datalists import (VALIDATION, entry_classes, foreground_key, has_foreground,
                                         is_classification, is_multilabel, patient_of)
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["FEW_POSITIVE", "split_kind", "describe_split", "check_auc_defined", "check_validation_holdout", "check_labels",
           "check_before_caching",
           "warning_for_test_split", "warn_test_split", "warning_for_training_split",
           "warn_training_split", "warn_test_patients_in_training"]

# a segmentation test split with fewer cases with foreground than this, and fewer than half its cases, is warned about
FEW_POSITIVE = 5


def describe_split(entries: list[dict], scored: dict | None = None) -> dict:
    """``{"cases", "patients", "positive"}`` of a split, as ``metrics.json`` records it.

    ``positive``: binary classification, the entries of class 1; multi-label, the positive (≥ 0.5) entries of
    each class (a list); segmentation, the cases whose ground truth has foreground: ``scored``
    (``{"cases", "positive"}`` as :class:`~dira3d.evaluation.ForegroundDice` counted the masks it scored) when
    given, else the datalist's ``pneumothorax`` / ``voxels`` flags, else None (not known).
    """
    summary = {"cases": len(entries), "patients": len({patient_of(e) for e in entries}), "positive": None}
    if is_classification(entries):
        summary["positive"] = sum(int(e["label"]) > 0 for e in entries)
    elif is_multilabel(entries):
        width = max(len(e["label"]) for e in entries)
        summary["positive"] = [sum(k in entry_classes(e) for e in entries) for k in range(width)]
    elif scored:
        summary.update(cases=int(scored["cases"]), positive=int(scored["positive"]))
    elif (key := foreground_key(entries)) is not None:
        summary["positive"] = sum(bool(has_foreground(key)(e)) for e in entries)
    return summary


def _where(path: Path, split: str, fold: int | None) -> str:
    if split == "test":
        return (f"the test split of datalist {path} (fold {fold} of its training entries)" if fold is not None
                else f"the test split of datalist {path} (its 'test' list)")
    return f"the {split} split of datalist {path}"


def check_auc_defined(path: Path, split: str, entries: list[dict], chosen: list[dict] | None = None,
                      fold: int | None = None, settings: str = "") -> None:
    """Refuse a classification ``split`` (``"holdout"``, ``"test"``, or ``"validation"``: the datalist's
    'validation' list as the holdout, ``holdout="validation"``) on which its AUC is undefined.

    Binary labels: all ``entries`` of one class. Multi-label: no class with both values (the bundles' mean AUC
    leaves a class of one value out; :func:`warning_for_test_split` names those). Segmentation entries pass.

    Args:
        path: the datalist (named in the error). split: the split's name. entries: its entries.
        chosen: for the holdout, the training entries the label fraction kept (to say why it could not be
            completed). fold: the test fold of a cross-validation datalist. settings: the split's settings
            (``"label_fraction=0.01, seed=0, ..."``), for the error.

    Raises:
        DataError: (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``) naming the datalist,
            the split, the class it holds and what to do.
    """
    from dira3d.evaluation.metrics import undefined_auc
    from dira3d.utils.setting_hints import label_fraction_setting

    if not entries:
        return
    if is_multilabel(entries):
        if not all(_numbers(e["label"]) for e in entries):
            return  # a label the bundle cannot take: refused by load_split's label check, naming the entry
        if any(len({k in entry_classes(e) for e in entries}) == 2 for k in range(max(len(e["label"]) for e in entries))):
            return
        raise DataError(None, f"{undefined_auc(split if split in ('holdout', VALIDATION) else 'test', len(entries))} "
                              f"({_where(path, split, fold)}{'; ' + settings if settings else ''}){_OR_SHARE * (split == VALIDATION)}")
    if not is_classification(entries):
        return
    classes = {int(e["label"]) for e in entries}
    if len(classes) > 1:
        return
    (held,) = classes
    missing = "1 (positive)" if held == 0 else "0 (negative)"
    what = f"all its {len(entries)} candidate(s) ({len({patient_of(e) for e in entries})} patient(s)) are of class {held}"
    if split == VALIDATION:
        raise DataError(None, f"AUC is undefined on the early-stopping holdout, the 'validation' list of datalist {path} "
                              f"({settings}): {what}, none of class {missing}; its AUC would be NaN every epoch, so early "
                              "stopping would never stop and the first epoch's model would be kept. Add candidates of class "
                              f"{missing} to its 'validation' list{_OR_SHARE}")
    if split == "holdout":
        carriers = {patient_of(e) for e in chosen or [] if int(e["label"]) != held}
        # holdout_by_patient completes the holdout with a patient of the other class whenever training keeps another
        why = (f"the {len(chosen or [])} training candidates this label fraction keeps have class {missing} in "
               f"{len(carriers)} patient(s) only, which training needs" if carriers else
               f"the training candidates this label fraction keeps are of class {held} only")
        raise DataError(None, f"AUC is undefined on the early-stopping holdout of datalist {path} ({settings}): "
                              f"{what}, because {why}; its AUC would be NaN every epoch, so early stopping would never stop and "
                              f"the first epoch's model would be kept. Use a larger label fraction ({label_fraction_setting()}) "
                              "or more training data (docs/finetuning.md)")
    fix = ("assign the folds again (e.g. `dira3d prepare pecad --seed`) or test on another fold" if fold is not None
           else "add candidates of the other class to its 'test' list")
    raise DataError(None, f"AUC is undefined on {_where(path, split, fold)}: {what}, none of class {missing}, so the test "
                          f"AUC would be NaN after the whole training; {fix}")


_OR_SHARE = ", or set holdout to a share of the training patients, e.g. 0.1 (the default)"


def check_validation_holdout(path: Path, content: dict, entries: list[dict], training: list[dict], test: list[dict],
                             fold: int | None = None) -> None:
    """Refuse the datalist's ``"validation"`` list, ``entries``, as the early-stopping holdout (``holdout="validation"``)
    where it cannot be one.

    Args:
        path: the datalist (named in the errors). content: its parsed JSON (its keys are named). training / test: its
            "training" and "test" entries (all of them: a patient shared with any would leak, whatever the label
            fraction selects; the runs of one grid are all allowed or all refused).
        fold: the cross-validation fold, refused with this setting.

    Raises:
        DataError: (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``) naming the datalist and
            the setting: ``fold`` is set; the datalist has no (or an empty)
            "validation" list; a patient (``patient_id``, else ``case_id``) of it is also in "training" or "test".
    """
    setting = f"holdout={VALIDATION!r}"
    if fold is not None and int(fold) >= 0:
        raise DataError(None, f"{setting} cannot be used with fold={fold} (datalist {path}): a cross-validation run trains "
                              "on the other folds and holds out for early stopping from them, while the 'validation' list "
                              "lies outside the folds (`dira3d prepare pecad` writes none), so every fold would select its "
                              "model on the same cases outside the cross-validation; use holdout=0.1 (the default) with "
                              "folds, or set fold to null to test on the datalist's 'test' list")
    if not entries:
        has = ("its 'validation' list is empty" if VALIDATION in content
               else f"it has no 'validation' list (it has {sorted(k for k in content if k != 'meta')})")
        option = split_option(path, VALIDATION)  # the dataset's own prepare option (meta.dataset)
        fix = f"add one ({option} writes one)" if option.endswith("`") else option  # else what its prepare does
        raise DataError(None, f"{setting} early-stops on the 'validation' list of datalist {path}, but {has}; {fix}{_OR_SHARE}")
    patients = {patient_of(e) for e in entries}
    for name, entries_of in (("training", training), ("test", test)):
        shared = sorted(patients & {patient_of(e) for e in entries_of})
        if shared:
            use = "trains on" if name == "training" else "is tested on"
            raise DataError(None, f"{setting}: {len(shared)} patient(s) of the 'validation' list of datalist {path} are also "
                                  f"in its '{name}' list ({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}), so "
                                  f"early stopping would select the model on patients it {use}; keep each patient "
                                  f"(patient_id, else case_id) in one list, as `dira3d prepare` does{_OR_SHARE}")


def check_labels(path: Path, split: str, entries: list[dict], kind: str | None = None) -> None:
    """Refuse, in one line naming the datalist, the split and the first bad entry, entries a fine-tuning bundle cannot
    train on: an entry without a ``label`` (a pretraining datalist, images only), and with ``kind`` (the bundle's
    ``network_def#kind``) a label of the other kind: a mask file for ``"classification"``, a class for
    ``"segmentation"``. Such a datalist failed while the dataset was cached, in MONAI's tracebacks of a ``KeyError``
    or a ``TypeError`` naming no file."""
    def bad(label) -> str:
        if label is None:
            return "has no 'label': a datalist of images only (for pretraining) cannot fine-tune"
        if kind == "classification" and isinstance(label, str):
            return (f"has label {label!r}, a mask file (a segmentation datalist?), but this classification bundle "
                    "takes a class per entry")
        if kind == "segmentation" and not (isinstance(label, str)
                                           or isinstance(label, list) and label and all(isinstance(v, str) for v in label)):
            return (f"has label {label!r}, a class (a classification datalist?), but this segmentation bundle takes "
                    "a mask file per entry")
        return ""

    problems = [(index, entry, reason) for index, entry in enumerate(entries) if (reason := bad(entry.get("label")))]
    if problems:
        index, entry, reason = problems[0]
        more = f" ({len(problems) - 1} other entr{'y' if len(problems) == 2 else 'ies'} of it too)" if len(problems) > 1 else ""
        # a DataError: `python -m monai.bundle run` prints it as one line (dira3d.utils.bundle_errors), not in MONAI's
        # "Failed to evaluate ConfigExpression" traceback
        raise DataError(None, f"datalist {path}: entry {index} of split {split!r}{more} (image {entry.get('image')}) {reason}; "
                         "pass the datalist `dira3d prepare` wrote for this task (it names it on its `datalist:` line, "
                         "e.g. ncc_datalist.json for luna16_nodule_fpr; `dira3d prepare generic` with --label-suffix "
                         "for masks of your own)")


def check_before_caching(train: list[dict], holdout: list[dict], network: Any = None) -> None:
    """The first ``run`` step of a task bundle's ``train.json`` (and ``multi_gpu_train.json``)::

        "$dira3d.evaluation.check_before_caching(@train#datalist, @validate#datalist, @network)"

    Its arguments are its work: MONAI resolves them in this order before calling it, so the training split and the
    early-stopping holdout are loaded and checked (:func:`~dira3d.evaluation.datalists.load_split` with the bundle's
    ``kind=@network_def#kind`` and ``spatial_dims``: images of the other dimensions than the network, entries without
    a label, a mask datalist for a classification bundle and the reverse, missing files, a holdout without both classes...), then the network is built and its ``pretrained``
    checkpoint read (missing, or of other settings), all before the next step builds the trainer, which caches the
    datasets (hours and hundreds of GiB for LUNA16): these were found only then, or in MONAI's tracebacks naming no
    file. The trainer and the evaluator reuse the lists and the network (MONAI keeps what it resolved): nothing is
    loaded or built twice. Under ``python -m monai.bundle run`` a bad datalist or checkpoint ends the run in one
    ``error:`` line naming the file (:mod:`dira3d.utils.bundle_errors`), with nothing cached or trained.

    A ``run`` step, not an ``initialize`` one: ``initialize`` (the run folders, the seed, the handlers of a signal
    before training) needs no data, as a notebook's ``initialize()`` then ``finalize()`` does not, and a step that failed
    there would leave those handlers behind; ``dira3d finetune`` checks the same lists and builds the network itself
    after ``initialize`` (:func:`dira3d.evaluation.finetune.run_finetune`), and this step then finds them resolved.

    Raises:
        ValueError: ``train`` or ``holdout`` is not a list of entries (a bundle whose ``train#datalist`` or
            ``validate#datalist`` is not a datalist split).
    """
    for name, entries in (("train#datalist", train), ("validate#datalist", holdout)):
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{name} must be a list of datalist entries (dicts), as "
                             f"dira3d.evaluation.load_split returns, not {type(entries).__name__}")


def _numbers(label: list | tuple) -> bool:
    """Whether a multi-label ``label`` holds numbers only (what ``load_split``'s label check asks of it)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label)


def split_kind(entries: list[dict]) -> str:
    """``"classification"`` (an integer label), ``"multilabel"`` (a list of labels) or ``"segmentation"`` (a mask)."""
    return "classification" if is_classification(entries) else "multilabel" if is_multilabel(entries) else "segmentation"


def warning_for_test_split(path: Path, kind: str, summary: dict, fold: int | None = None,
                           class_names: list[str] | None = None, split: str = "test") -> str | None:
    """What to warn about a test split of ``kind`` (:func:`split_kind`) described by ``summary``
    (:func:`describe_split`), or None; ``split``: the split scored, when not the test split (``eval_split=holdout``:
    the message names it, and its advice is not the test split's).

    Segmentation: no case with foreground, or fewer than :data:`FEW_POSITIVE` and fewer than half the cases.
    Multi-label: the classes of one value only, which the mean AUC leaves out. (A binary test split of one
    class is refused before training: :func:`check_auc_defined`.)
    """
    where = _where(path, split, fold) + ("" if split == "test" else f" (eval_split={split})")
    positive, cases = summary.get("positive"), int(summary.get("cases") or 0)
    if kind == "multilabel" and isinstance(positive, list):
        names = [str(n) for n in class_names or []][: len(positive)]
        names += [f"class {k}" for k in range(len(names), len(positive))]
        single = [f"{names[k]} ({'all positive' if p == cases else 'all negative'})"
                  for k, p in enumerate(positive) if p in (0, cases)]
        if not single or len(single) == len(positive):
            return None
        return (f"{where}: {len(single)} of {len(positive)} classes have one value in all its {cases} image(s) and are "
                f"left out of the mean AUC: {', '.join(single)}; the mean AUC is over the other "
                f"{len(positive) - len(single)} classes, so it is not comparable with a mean over all of them")
    if kind != "segmentation" or not isinstance(positive, int) or not cases:
        return None
    if positive == 0:
        return (f"{where} has no case with foreground (0 of {cases} ground-truth masks): its mean Dice and IoU score an "
                "empty prediction of an empty mask as 1, so they only say how often the model predicts nothing, and "
                "predicting nothing everywhere scores 1.0; "
                + ("test on a split with cases with foreground: prepare the datalist again with another split `--seed` "
                   "(or a larger `--test-fraction`), or add such cases to its test list" if split == "test" else
                   "score a split with cases with foreground (the test split: eval_split=test)"))
    if positive < FEW_POSITIVE and 2 * positive < cases:
        return (f"{where} has only {positive} of {cases} cases with foreground: its mean Dice and IoU score an empty "
                f"prediction of each of the {cases - positive} empty masks as 1, so predicting nothing everywhere scores "
                f"{(cases - positive) / cases:.3g} and the mean rests on {positive} segmentation(s); compare runs on the "
                f"same split only, and prefer a {'test ' if split == 'test' else ''}split with more cases with foreground")
    return None


_WARNED: set[str] = set()  # warnings already given in this process (an experiment grid tests one split many times)


def warn_test_split(path: Path, kind: str, summary: dict, fold: int | None = None,
                    class_names: list[str] | None = None, split: str = "test") -> None:
    """Warn once per process about a test split, or the ``split`` scored instead (:func:`warning_for_test_split`): the
    same split tested again (the runs of an experiment grid) is not warned about again."""
    message = warning_for_test_split(path, kind, summary, fold, class_names, split)
    if message is None or message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, Dira3dWarning, stacklevel=2)


def warning_for_training_split(path: Path, train: list[dict], holdout: list[dict], class_names: list[str] | None = None,
                               settings: str = "") -> str | None:
    """What to warn about a multi-label training split (the label subset less the early-stopping holdout) with classes
    of no positive image, or None: the classifier learns to call them absent, and their test AUCs, in the mean AUC,
    then say nothing of what fine-tuning learned. On a small label fraction the holdout may take the subset's only
    positive of a class (it is completed to hold every class only where training can spare it, but drawn first)."""
    if not train or not is_multilabel(train):
        return None
    positive = describe_split(train)["positive"]
    absent = [k for k, count in enumerate(positive) if count == 0]
    if not absent:
        return None
    names = [str(n) for n in class_names or []][: len(positive)]
    names += [f"class {k}" for k in range(len(names), len(positive))]
    held = describe_split(holdout)["positive"] if holdout and is_multilabel(holdout) else []
    went = [names[k] for k in absent if k < len(held) and held[k] > 0]
    return (f"the training split of datalist {path}{f' ({settings})' if settings else ''}: {len(absent)} of "
            f"{len(positive)} classes have no positive in its {len(train)} image(s): "
            f"{', '.join(names[k] for k in absent)}; the classifier learns to call them absent, so their test AUCs (in "
            "the mean AUC) say nothing of what it learned; use a larger label fraction"
            + (f" ({', '.join(went)}: the label subset's only positive(s) went to the early-stopping holdout)"
               if went else ""))


def warn_training_split(path: Path, train: list[dict], holdout: list[dict], class_names: list[str] | None = None,
                        settings: str = "") -> None:
    """Warn once per process (:func:`warning_for_training_split`)."""
    message = warning_for_training_split(path, train, holdout, class_names, settings)
    if message is None or message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, Dira3dWarning, stacklevel=2)


def warn_test_patients_in_training(path: Path, training: list[dict], test: list[dict]) -> None:
    """Warn, once per process and datalist, when a patient (``patient_id``, else ``case_id``) of the ``"test"`` list
    is also in ``"training"``: the test score then rests on scans the model trained on (a datalist edited by hand;
    ``dira3d prepare`` keeps each patient in one list). It was scored without a word."""
    shared = sorted({patient_of(e) for e in test} & {patient_of(e) for e in training})
    if not shared:
        return
    message = (f"{path}: {len(shared)} patient(s) of its 'test' list are also in its 'training' list "
               f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}), so the test score is measured on "
               "patients the model may train on; keep each patient (patient_id, else case_id) in one list, as "
               "`dira3d prepare` does")
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, Dira3dWarning, stacklevel=3)
