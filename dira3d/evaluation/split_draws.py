"""Seeded draws of a fine-tuning run's training labels and early-stopping holdout, and what kind of entries a
datalist holds (classification, multi-label, segmentation with or without foreground flags).

:func:`select_fraction` keeps a seeded share of the labels, :func:`holdout_by_patient` holds out patients for early
stopping; :func:`dira3d.evaluation.datalists.load_split` applies both (``docs/finetuning.md``), after
:func:`check_split_settings` has checked the settings' types. Each pass over the
entries is linear in their number: ``load_split`` runs them on CheXpert's 223,414 training images at every start
(``docs/benchmarks.md``, "Loading a split").
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from dira3d.data.errors import DataError
from dira3d.utils.seeding import check_seed

__all__ = ["FOREGROUND_KEYS", "is_classification", "is_multilabel", "patient_of", "entry_classes", "foreground_key",
           "has_foreground", "fraction_count", "select_fraction", "holdout_by_patient", "check_split_settings"]


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


def check_split_settings(label_fraction: object = 1.0, seed: object = 0, holdout: object = 0.1,
                         fold: object = None) -> dict:
    """A fine-tuning run's split settings, checked for their kind before anything uses them.

    ``python -m monai.bundle run`` passes ``--fold 2`` as the number 2, but ``--fold 1.5`` as a float, ``--fold two``,
    ``--fold true`` or ``--fold null`` as text and ``--fold True`` as a bool: such a fold failed in a bare ``int()``
    deep in the split loading (MONAI's traceback) or was cut to a whole number without a word (``fold`` 1.5 tested
    fold 1, ``seed`` 1.5 drew with seed 1, ``label_fraction`` True kept every label). The task bundles call this first
    in ``initialize``; :func:`dira3d.evaluation.datalists.load_split` calls it too. A whole number written as a float
    (2.0, as JSON or YAML may give it) is that number. Ranges are checked where the settings are used
    (:func:`select_fraction`, :func:`holdout_by_patient`, the datalist's folds), but for ``seed``, which must be >= 0.

    Returns:
        ``{"label_fraction": float, "seed": int, "holdout": float or "validation", "fold": int or None}``.

    Raises:
        DataError: naming the setting, the value given and what to give (one ``error:`` line under
            ``python -m monai.bundle run``).
    """
    def number(name: str, value: object, advice: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(None, f"{name}={value!r} is not a number; {advice}")
        return float(value)

    def whole(name: str, value: object, advice: str) -> int:
        if not number(name, value, advice).is_integer():
            raise DataError(None, f"{name}={value!r} is not a whole number; {advice}")
        return int(value)

    fraction = number("label_fraction", label_fraction, "give the share in (0, 1] of the training labels to use, "
                                                        "e.g. 0.25 or 1.0")
    seed_ = check_seed(seed)
    held = holdout if holdout == "validation" else number(
        "holdout", holdout, "give the share in [0, 1) of the training patients held out for early stopping (0.1, the "
        "protocol's default) or 'validation' (the datalist's own 'validation' list)")
    fold_ = None if fold is None else whole(
        "fold", fold, "give one of the datalist's fold numbers (e.g. --fold 2), or null to test on its 'test' list "
                      "(--fold None on the command line of python -m monai.bundle run)")
    return {"label_fraction": fraction, "seed": seed_, "holdout": held, "fold": fold_}


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
        DataError: ``fraction`` is outside (0, 1] (a ``ValueError``; one ``error:`` line under
            ``python -m monai.bundle run``).
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise DataError(None, f"label_fraction={fraction} is outside (0, 1]; use e.g. 0.01, 0.25, 0.5 or 1.0")
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
        owners = [patient_of(e) for e in entries]
        patients = sorted(set(owners))
        order = [patients[i] for i in rng.permutation(len(patients))]
        chosen = set(order[: fraction_count(fraction, len(patients))])
        if is_multilabel(entries):
            chosen |= _first_carriers_of_missing_classes(entries, owners, chosen, order)
        keep = {i for i, owner in enumerate(owners) if owner in chosen}
    return [entries[i] for i in sorted(keep)]


def _first_carriers_of_missing_classes(entries: list[dict], owners: list[str], chosen: set[str],
                                       order: list[str]) -> set[str]:
    """For each class with positives in ``entries`` but none among ``chosen``'s, the first patient of ``order`` with it.

    Every missing class gets its own first carrier, even when another class's carrier already brings
    it: that keeps the subsets nested (a larger prefix either holds a class, and then its first
    carrier, or adds that same carrier) at the price of at most one patient per missing class.
    """
    classes_of: dict[str, set[int]] = defaultdict(set)
    of_entry = _by_label(entry_classes)
    for entry, owner in zip(entries, owners):  # owners: the patient of each entry
        classes_of[owner] |= of_entry(entry)
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
        DataError: ``holdout`` is outside [0, 1) (a ``ValueError``; one ``error:`` line under
            ``python -m monai.bundle run``).
    """
    if not 0.0 <= float(holdout) < 1.0:
        raise DataError(None, f"holdout={holdout} is outside [0, 1); the protocol uses 0.1")
    owners = [patient_of(e) for e in entries]
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, owner in enumerate(owners):
        by_patient[owner].append(index)
    patients = sorted(by_patient)
    if holdout == 0.0 or len(patients) < 2:
        return list(entries), []
    order = [patients[i] for i in _rng(seed, 2).permutation(len(patients))]
    target = max(1, math.ceil(holdout * len(entries)))
    held: list[str] = []
    count = 0  # entries of the held patients, kept up to date (summing them for every patient was quadratic)
    for patient in order[:-1]:  # the last patient always stays in training
        if count >= target:
            break
        held.append(patient)
        count += len(by_patient[patient])
    multilabel = is_multilabel(entries)
    if multilabel or is_classification(entries):
        held = _complete_classes(entries, by_patient, order, held)
    if multilabel:  # then both values of each class, when training can spare them
        held = _complete_classes(entries, by_patient, order, held, _outcomes_of)
    key = foreground_key(entries)
    if key is not None:  # segmentation: a non-empty mask, when training can spare one
        held = _complete_classes(entries, by_patient, order, held, has_foreground(key))
    held_set = set(held)
    train = [e for e, owner in zip(entries, owners) if owner not in held_set]
    kept = [e for e, owner in zip(entries, owners) if owner in held_set]
    return train, kept


def _outcomes_of(entry: dict) -> set[tuple[int, bool]]:
    """``(class, positive)`` for every class of a multi-label entry: its positive and its negative classes."""
    return {(i, float(value) >= 0.5) for i, value in enumerate(entry["label"])}


def _complete_classes(entries: list[dict], by_patient: dict[str, list[int]], order: list[str], held: list[str],
                      classes_of: Callable[[dict], set] = entry_classes) -> list[str]:
    """Add patients to the holdout until it has every class (what ``classes_of`` gives an entry), as long as
    training keeps them too."""
    if classes_of in (entry_classes, _outcomes_of):
        classes_of = _by_label(classes_of)
    of_patient = {}  # shared with classes_of's answers: never changed in place
    for patient in order:
        indices = by_patient[patient]
        of_patient[patient] = (classes_of(entries[indices[0]]) if len(indices) == 1
                               else set().union(*(classes_of(entries[i]) for i in indices)))
    all_classes = set().union(*of_patient.values())
    held_set = set(held)
    have = set().union(*(of_patient[p] for p in held))  # kept up to date: recounting the holdout is quadratic
    # patients outside the holdout that carry each class: training keeps a class while its count is positive
    carriers = dict.fromkeys(all_classes, 0)
    for patient in order:
        if patient not in held_set:
            for cls in of_patient[patient]:
                carriers[cls] += 1
    for patient in order:
        missing = all_classes - have
        if not missing:
            break
        classes = of_patient[patient]
        if patient in held_set or not classes & missing:
            continue
        if all(carriers[c] > (c in classes) for c in all_classes):  # never starve training of a class
            held.append(patient)
            held_set.add(patient)
            have |= classes
            for cls in classes:
                carriers[cls] -= 1
    return held


def _by_label(classes_of: Callable[[dict], set]) -> Callable[[dict], set]:
    """``classes_of`` (a function of an entry's ``label`` only: :func:`entry_classes`, :func:`_outcomes_of`) computed
    once per distinct label: a multi-label list of 0/1 values takes a few dozen values over 100,000s of entries."""
    known: dict = {}

    def of(entry: dict) -> set:
        label = entry["label"]
        key = tuple(label) if isinstance(label, list) else label
        try:
            return known[key]
        except KeyError:
            known[key] = result = classes_of(entry)
            return result
        except TypeError:  # not hashable (a label the checks refuse): not remembered
            return classes_of(entry)

    return of
