"""Training / early-stopping / test splits of a prepared datalist for fine-tuning.

The fine-tuning protocol of the paper (``docs/finetuning.md``): a seeded fraction of the training
labels is used (1 %, 25 %, 50 % or 100 %), 10 % of it is held out *by patient* for early stopping,
and the test split is either the datalist's ``"test"`` key or, for cross-validation datasets
(PE-CAD), the entries of one ``"fold"``.

Splits, by name:

- ``"train"``   — the selected training labels minus the held-out patients;
- ``"holdout"`` — the held-out patients (early stopping / model selection), completed so that it can be
  scored: both classes, or a non-empty mask where the datalist says which masks are empty
  (:func:`holdout_by_patient`); a classification holdout or test split whose AUC is undefined all the same
  (one class) is refused (:func:`dira3d.evaluation.split_checks.check_auc_defined`). With
  ``holdout="validation"`` (:data:`VALIDATION`) it is the datalist's whole ``"validation"`` list instead, and
  ``"train"`` all the selected training labels
  (:func:`dira3d.evaluation.split_checks.check_validation_holdout`);
- ``"validation"`` — the datalist's own ``"validation"`` key, untouched (empty if absent);
- ``"test"``    — the datalist's ``"test"`` key, or the training entries of ``fold``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dira3d.data.datalist import check_entry_files, datalist_entries, read_datalist_json

__all__ = ["SPLITS", "VALIDATION", "FOREGROUND_KEYS", "load_split", "select_fraction", "holdout_by_patient"]

SPLITS = ("train", "holdout", "validation", "test")
# the `holdout` setting that early-stops on the datalist's own "validation" list instead of a share of training
VALIDATION = "validation"


def is_classification(entries: list[dict]) -> bool:
    """Integer labels mean classification; a path (mask) means segmentation."""
    return bool(entries) and all(isinstance(e.get("label"), (int, bool, np.integer)) for e in entries)


def is_multilabel(entries: list[dict]) -> bool:
    """List labels (one float per class) mean multi-label classification (2D chest X-rays)."""
    return bool(entries) and all(isinstance(e.get("label"), (list, tuple)) for e in entries)


def patient_of(entry: dict) -> str:
    """The patient of an entry: its ``patient_id`` when it has one (``dira3d prepare generic`` records it,
    since there a case is a scan), else its ``case_id`` (the patient in the other datasets)."""
    return str(entry.get("patient_id", entry["case_id"]))


def entry_classes(entry: dict) -> set[int]:
    """Classes an entry counts for: its integer label, or its positive (≥ 0.5) classes when multi-label."""
    label = entry["label"]
    if isinstance(label, (list, tuple)):
        return {i for i, value in enumerate(label) if float(value) >= 0.5}
    return {int(label)}


# keys of a segmentation entry that say whether its mask has foreground, as `dira3d prepare` writes them:
# SIIM-ACR's 0/1 ``pneumothorax`` and LIDC-IDRI's consensus ``voxels`` count (the other prepared segmentation
# datasets, lung, liver and whole tumour, have foreground in every mask and carry neither)
FOREGROUND_KEYS = ("pneumothorax", "voxels")


def foreground_key(entries: list[dict]) -> str | None:
    """The first of :data:`FOREGROUND_KEYS` that every segmentation entry carries as a number, else None
    (classification entries, or a datalist that does not say which masks are empty)."""
    if not entries or is_classification(entries) or is_multilabel(entries):
        return None
    for key in FOREGROUND_KEYS:
        if all(isinstance(e.get(key), (int, float, np.integer, np.floating)) for e in entries):
            return key
    return None


def has_foreground(key: str) -> Callable[[dict], set[bool]]:
    """``classes_of`` for :func:`_complete_classes`: ``{True}`` for an entry whose mask has foreground, else
    nothing, so that the holdout is completed with a positive only (never with an empty mask)."""
    return lambda entry: {True} if float(entry[key]) > 0 else set()


def _rng(seed: int, salt: int) -> np.random.Generator:
    # one independent stream per purpose, so changing the fraction does not move the holdout seed
    return np.random.default_rng([int(seed), salt])


def fraction_count(fraction: float, total: int) -> int:
    """How many of ``total`` samples (or patients) a label ``fraction`` keeps: ``fraction * total`` rounded to
    the nearest whole number, a half rounded **up** (25 % of 10 keeps 3, 15 % of 10 keeps 2), and at least one.

    Python's ``round`` rounds a half to even (25 % of 10 kept 2, 35 % kept 4, 45 % kept 4) until 2026-11-27;
    the 1e-9 slack makes a product that float arithmetic leaves just under a half (0.35 * 90 = 31.4999...)
    count as the half it is.
    """
    return max(1, math.floor(float(fraction) * total + 0.5 + 1e-9))


def select_fraction(entries: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Seeded subset of ``entries`` keeping ``fraction`` of the labels; smaller fractions nest in larger ones.

    Classification entries are sampled per class (stratified), keeping at least one sample of
    every class; segmentation entries are sampled per patient (``patient_id``, else ``case_id``),
    keeping at least one. Each count is :func:`fraction_count`: rounded to the nearest, a half up
    (25 % of 10 patients keeps 3; before 2026-11-27 a half was rounded to even, and kept 2).
    Multi-label entries (``label`` a list) are sampled per patient too, then completed, for every
    class that has positives in ``entries`` but none in the subset, with the first patient carrying it.

    The draw is one seeded order per class (or of the patients) of which a fraction keeps a prefix,
    so for one seed the subsets are **nested**: the 10 % subset lies inside the 25 % one, which lies
    inside the 50 % one, as in a label-efficiency curve where each step adds labels to the ones a
    user already had instead of drawing a new set. (Selections made before 2026-11-26 drew each
    fraction independently; the same seed now gives another subset below 100 %.)

    Args:
        entries: datalist entries with ``"case_id"`` (or ``"patient_id"``) and ``"label"``.
        fraction: share in (0, 1] of the labels to keep.
        seed: seed of the selection.

    Returns:
        The kept entries, in their original order.

    Raises:
        ValueError: ``fraction`` is outside (0, 1].
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"label_fraction={fraction} is outside (0, 1]; use e.g. 0.01, 0.25, 0.5 or 1.0")
    if fraction >= 1.0 or not entries:
        return list(entries)
    rng = _rng(seed, 1)
    keep: set[int] = set()
    if is_classification(entries):
        by_class: dict[int, list[int]] = defaultdict(list)
        for index, entry in enumerate(entries):
            by_class[int(entry["label"])].append(index)
        for label in sorted(by_class):
            members = by_class[label]
            order = rng.permutation(members)  # drawn in full whatever the fraction: the prefixes nest
            keep.update(order[: fraction_count(fraction, len(members))].tolist())
    else:
        patients = sorted({patient_of(e) for e in entries})
        order = [patients[i] for i in rng.permutation(len(patients))]
        chosen = set(order[: fraction_count(fraction, len(patients))])
        if is_multilabel(entries):
            chosen |= _first_carriers_of_missing_classes(entries, chosen, order)
        keep = {i for i, e in enumerate(entries) if patient_of(e) in chosen}
    return [entries[i] for i in sorted(keep)]


def _first_carriers_of_missing_classes(entries: list[dict], chosen: set[str], order: list[str]) -> set[str]:
    """For each class with positives in ``entries`` but none among ``chosen``'s, the first patient of ``order`` with it.

    Every missing class gets its own first carrier, even when another class's carrier already brings
    it: that keeps the subsets nested (a larger prefix either holds a class, and then its first
    carrier, or adds that same carrier) at the price of at most one patient per missing class.
    """
    classes_of: dict[str, set[int]] = defaultdict(set)
    for entry in entries:
        classes_of[patient_of(entry)] |= entry_classes(entry)
    have = set().union(*(classes_of[p] for p in chosen))
    missing = set().union(*classes_of.values()) - have
    first: dict[int, str] = {}
    for patient in order:
        for cls in classes_of[patient] & missing:
            first.setdefault(cls, patient)
    return set(first.values())


def holdout_by_patient(entries: list[dict], holdout: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split ``entries`` into (train, holdout) so that no patient is in both.

    Patients are drawn in a seeded random order until the holdout holds at least ``holdout`` of
    the entries. For classification the holdout is then completed so that it holds every class
    (an AUC needs both) while the training part keeps every class too, when the data allow it;
    multi-label entries count for each of their positive classes, and the holdout is then also
    completed with a negative of each class (a class positive in every holdout entry has no AUC),
    while training keeps a positive and a negative of each class.
    For segmentation entries that say whether their mask has foreground (a :data:`FOREGROUND_KEYS` key on
    every entry: SIIM-ACR's ``pneumothorax``, LIDC-IDRI's ``voxels``), a holdout drawn with empty masks
    only takes, in addition, the first patient of the seeded order with a non-empty mask, as long as
    another one stays in training; a holdout that has one already is left as drawn.
    With a single patient the holdout is empty.

    Args:
        entries: datalist entries with ``"case_id"`` (the patient, unless a ``"patient_id"`` names it).
        holdout: share in [0, 1) of the entries to hold out.
        seed: seed of the draw.

    Returns:
        ``(train, holdout)`` lists, each in the original order.

    Raises:
        ValueError: ``holdout`` is outside [0, 1).
    """
    if not 0.0 <= float(holdout) < 1.0:
        raise ValueError(f"holdout={holdout} is outside [0, 1); the protocol uses 0.1")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, entry in enumerate(entries):
        by_patient[patient_of(entry)].append(index)
    patients = sorted(by_patient)
    if holdout == 0.0 or len(patients) < 2:
        return list(entries), []
    order = [patients[i] for i in _rng(seed, 2).permutation(len(patients))]
    target = max(1, math.ceil(holdout * len(entries)))
    held: list[str] = []
    for patient in order[:-1]:  # the last patient always stays in training
        if sum(len(by_patient[p]) for p in held) >= target:
            break
        held.append(patient)
    if is_classification(entries) or is_multilabel(entries):
        held = _complete_classes(entries, by_patient, order, held)
    if is_multilabel(entries):  # then both values of each class, when training can spare them
        held = _complete_classes(entries, by_patient, order, held, _outcomes_of)
    key = foreground_key(entries)
    if key is not None:  # segmentation: a non-empty mask, when training can spare one
        held = _complete_classes(entries, by_patient, order, held, has_foreground(key))
    held_set = set(held)
    train = [e for e in entries if patient_of(e) not in held_set]
    kept = [e for e in entries if patient_of(e) in held_set]
    return train, kept


def _outcomes_of(entry: dict) -> set[tuple[int, bool]]:
    """``(class, positive)`` for every class of a multi-label entry: its positive and its negative classes."""
    return {(i, float(value) >= 0.5) for i, value in enumerate(entry["label"])}


def _complete_classes(entries: list[dict], by_patient: dict[str, list[int]], order: list[str], held: list[str],
                      classes_of: Callable[[dict], set] = entry_classes) -> list[str]:
    """Add patients to the holdout until it has every class (what ``classes_of`` gives an entry), as long as
    training keeps them too."""

    def classes(patients: list[str]) -> set:
        return {c for p in patients for i in by_patient[p] for c in classes_of(entries[i])}

    all_classes = classes(order)
    have = classes(held)  # kept up to date: recounting the holdout for every patient is quadratic
    for patient in order:
        missing = all_classes - have
        if not missing:
            break
        if patient in held or not classes([patient]) & missing:
            continue
        rest = [p for p in order if p not in held and p != patient]
        if classes(rest) == all_classes:  # never starve training of a class
            held.append(patient)
            have |= classes([patient])
    return held


def _load_key(datalist: Path, content: dict, key: str) -> list[dict]:
    # paths as MONAI's load_decathlon_datalist(is_segmentation=True) resolves them: "image" and
    # "label" against the datalist's folder, other values where they name an existing path there;
    # an absent or empty split is empty (load_split says which split it needed)
    return datalist_entries(datalist, key, content=content, path_keys=("image", "label"), optional=True)


def load_split(
    datalist: str | os.PathLike,
    split: str,
    label_fraction: float = 1.0,
    seed: int = 0,
    holdout: float = 0.1,
    fold: int | None = None,
    num_labels: int | None = None,
) -> list[dict]:
    """Entries of one split of a prepared datalist, with absolute paths.

    Args:
        datalist: path of the datalist JSON (paths inside are relative to its folder).
        split: one of ``"train"``, ``"holdout"``, ``"validation"``, ``"test"``.
        label_fraction: share of the training labels used (seeded; see :func:`select_fraction`).
        seed: seed of the label fraction and of the early-stopping holdout.
        holdout: share of the (selected) training entries held out by patient for early stopping, or
            ``"validation"``: the datalist's whole ``"validation"`` list is the holdout and ``"train"`` is all the
            selected training entries (the label fraction does not shrink it;
            :func:`dira3d.evaluation.split_checks.check_validation_holdout`).
        fold: for cross-validation datalists (entries with ``"fold"``): test on this fold and
            train on the others. ``None`` uses the ``"test"`` key.
        num_labels: a multi-label classifier's number of outputs (``@out_channels`` of the 2D
            classification bundles): every returned entry's ``label`` must be a list of that many
            numbers. None: not checked.

    Returns:
        A list of entry dicts (``"image"``, ``"label"``, ``"case_id"``, ...).

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: unknown split, a bad fraction or holdout, a fold that no entry has, an empty split,
            ``holdout="validation"`` refused (no or an empty validation list, a patient shared with training or
            test, ``fold`` set), a classification
            holdout or test split whose AUC is undefined (one class only; multi-label: no class with both values;
            :func:`dira3d.evaluation.split_checks.check_auc_defined`), or (with
            ``num_labels``) a label that is not a list of ``num_labels`` numbers (names the file, the entry and
            what to do: a segmentation datalist, or CheXpert prepared with ``--labels all`` for the 5-class bundle).
        dira3d.data.datalist.DatalistFilesMissingError: image or label files of the returned entries that
            do not exist (all named, with their case ids; a ``FileNotFoundError`` too).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
    if isinstance(holdout, str) and holdout != VALIDATION:
        raise ValueError(f"holdout={holdout!r} is neither a share in [0, 1) of the training patients nor "
                         f"{VALIDATION!r}; use 0.1 (the protocol's default) or {VALIDATION!r} (early stopping on the "
                         "datalist's own 'validation' list)")
    on_validation = holdout == VALIDATION
    path = Path(datalist).resolve()
    content = read_datalist_json(path)
    training = _load_key(path, content, "training")
    if fold is not None and int(fold) >= 0:
        folds = sorted({e.get("fold") for e in training if "fold" in e})
        if int(fold) not in folds:
            raise ValueError(f"fold={fold} is not in datalist {path} (folds present: {folds or 'none'}); set `fold` to one of them or to null")
        test = [e for e in training if e.get("fold") == int(fold)]
        training = [e for e in training if e.get("fold") != int(fold)]
    else:
        test = _load_key(path, content, "test")
    if split == "test":
        result = test
        if fold is None or int(fold) < 0:  # a fold's test entries come out of training
            import dira3d.evaluation.split_checks as checks  # (it imports this module)
            checks.warn_test_patients_in_training(path, training, test)
    elif split == "validation":
        result = _load_key(path, content, "validation")
        check_entry_files(path, "validation", result)
        _check_label_vectors(path, content, split, result, num_labels)
        return _common_keys(result)
    elif on_validation:  # checked for "train" too: a bad setting must fail whichever split is loaded first
        from dira3d.evaluation.split_checks import check_validation_holdout

        held = _load_key(path, content, VALIDATION)
        check_validation_holdout(path, content, held, training, test, fold)
        chosen = select_fraction(training, label_fraction, seed)
        result = chosen if split == "train" else held
    else:
        chosen = select_fraction(training, label_fraction, seed)
        train, held = holdout_by_patient(chosen, holdout, seed)
        result = train if split == "train" else held
        _warn_holdout_without_foreground(path, chosen, held, dict(label_fraction=label_fraction, seed=seed,
                                                                  holdout=holdout, fold=fold))
    if not result:
        hint = "check the datalist or use more data"
        if split == "holdout" and holdout == 0.0:
            hint = ("holdout=0 holds out no training patient, but fine-tuning selects and saves models/model.pt at "
                    "its early-stopping holdout; use a share such as 0.1 (the default), or holdout=validation "
                    "(the datalist's 'validation' list)")
        elif split == "holdout":
            kept = len({patient_of(e) for e in chosen})
            total = len({patient_of(e) for e in training})
            if total < 2:  # no label fraction helps: e.g. 2 labelled scans prepared with --test-fraction 0.5
                hint = (f"the 'training' list has {total} patient(s), and the early-stopping holdout needs at least "
                        "2 (one held out, one to train on); fine-tuning needs 3 or more labelled patients in all "
                        "(training, holdout, test): add labelled scans, or early-stop on the datalist's own "
                        "'validation' list with holdout=validation (`dira3d prepare generic --val-fraction`)")
            elif kept < 2:
                # e.g. LiTS at 1 %: 100 training volumes -> one patient, nothing left to hold out
                hint = (f"label_fraction={label_fraction} keeps {kept} of the {total} training patient(s), and the "
                        f"early-stopping holdout needs 2 (one held out, one to train on); label_fraction at least {2 / total:.3g}")
        if split == "test" and (fold is None or int(fold) < 0):
            where = ("its 'test' list has no entries" if "test" in content
                     else f"add a 'test' list to the datalist (it has {sorted(k for k in content if k != 'meta')})")
            hint = (f"{where} (`dira3d prepare generic --test-fraction F` writes one: F of the patients, rounded to "
                    "whole patients, so choose F for one or more: 0.2 of 2 patients rounds to none), or set fold for a "
                    "cross-validation datalist")
        raise ValueError(
            f"split {split!r} of datalist {path} is empty (label_fraction={label_fraction}, holdout={holdout}, "
            f"fold={fold}); {hint}"
        )
    # the entries this run uses (not the whole list: a 1 % run does not need the other 99 %)
    listed = "test" if split == "test" and (fold is None or int(fold) < 0) else "training"
    check_entry_files(path, VALIDATION if split == "holdout" and on_validation else listed, result)
    # labels the bundle cannot take first: their error names the entry (the AUC check would give other advice)
    _check_label_vectors(path, content, split, result, num_labels)
    if split in ("test", "holdout"):  # an AUC of one class is NaN: refused before any training
        from dira3d.evaluation.split_checks import check_auc_defined

        check_auc_defined(path, VALIDATION if split == "holdout" and on_validation else split, result,
                          chosen=None if split == "test" else chosen,
                          fold=int(fold) if fold is not None and int(fold) >= 0 else None,
                          settings=f"label_fraction={label_fraction}, seed={seed}, holdout={holdout}, fold={fold}")
    return _common_keys(result)


def _check_label_vectors(path: Path, content: dict, split: str, entries: list[dict], num_labels: int | None) -> None:
    """Refuse a label that a multi-label classifier with ``num_labels`` outputs cannot take: it failed deep in
    training (``Target size ([2, 14]) must be the same as input size ([2, 5])``, or ``new(): invalid data type
    'str'`` for a mask path), naming no file."""
    if num_labels is None:
        return
    for index, entry in enumerate(entries):
        label = entry.get("label")
        if isinstance(label, (list, tuple)) and len(label) == int(num_labels) \
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label):
            continue
        where = f"datalist {path}: entry {index} of split {split!r} (image {entry.get('image')})"
        if isinstance(label, str):
            raise ValueError(f"{where} has label {label!r}, a file (a segmentation datalist?); this classification bundle "
                             f"takes a list of {num_labels} numbers per image, as `dira3d prepare chestxray14` / `chexpert` "
                             "write them: pass the datalist of its dataset")
        meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
        names = f" ({', '.join(map(str, meta['labels']))})" if isinstance(meta.get("labels"), list) else ""
        count = len(label) if isinstance(label, (list, tuple)) else None
        if count is not None and count != int(num_labels):
            raise ValueError(f"{where} has {count} labels{names}, but the network has out_channels {num_labels}: pass a "
                             f"datalist with the bundle's {num_labels} labels (chexpert_cls: `dira3d prepare chexpert` with "
                             "the default --labels five; chestxray14_cls: `dira3d prepare chestxray14`), or train on these "
                             f"{count} with --set out_channels={count} (and class_names)")
        raise ValueError(f"{where} has label {label!r}; expected a list of {num_labels} numbers (1 = finding present); "
                         "regenerate the datalist with `dira3d prepare`")


_WARNED: set[tuple] = set()  # (datalist, settings) already warned about in this process


def _warn_holdout_without_foreground(path: Path, chosen: list[dict], held: list[dict], settings: dict) -> None:
    """Warn, once per datalist and settings, when the early-stopping holdout holds only empty masks although
    the datalist says which masks are empty (:func:`holdout_by_patient` could not complete it)."""
    from dira3d.utils.setting_hints import label_fraction_setting

    key = foreground_key(chosen)
    if key is None or not held or any(has_foreground(key)(e) for e in held):
        return
    seen = (str(path), *sorted(settings.items()))
    if seen in _WARNED:
        return
    _WARNED.add(seen)
    positive = {patient_of(e) for e in chosen if has_foreground(key)(e)}
    why = (f"none of the {len(chosen)} training entries this label_fraction keeps has one" if not positive else
           f"the only patient of the {len(chosen)} training entries with one stays in training")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    warnings.warn(
        f"{path}: the early-stopping holdout ({len(held)} entries; {shown}) has no case with a non-empty mask "
        f"(`{key}` is 0 in all of them): {why}. Its mean Dice scores an empty prediction of an empty mask as 1, so "
        "early stopping and the saved model reward predicting nothing; use a larger label_fraction "
        f"({label_fraction_setting()}) or more training data, and compare `holdout` in metrics.json with the test Dice",
        UserWarning, stacklevel=3)


def _common_keys(entries: list[dict]) -> list[dict]:
    """Keep only the keys every entry has: a batch cannot collate a key that some samples lack
    (e.g. LUNA16 positives carry ``diameter_mm``, negatives do not)."""
    if not entries:
        return entries
    common = set.intersection(*(set(e) for e in entries))
    return [{k: v for k, v in e.items() if k in common} for e in entries]
