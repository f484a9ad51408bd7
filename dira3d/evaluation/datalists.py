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

import hashlib
import json
import math
import numbers
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dira3d.data.datalist import check_entry_files, datalist_entries, read_datalist_json, split_option
from dira3d.data.errors import DataError
# the draws and entry kinds live in split_draws.py; importable from here as before
from dira3d.evaluation.split_draws import (FOREGROUND_KEYS, check_split_settings, entry_classes, foreground_key,
                                           fraction_count, has_foreground, holdout_by_patient, is_classification,
                                           is_multilabel, patient_of, select_fraction)
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["SPLITS", "VALIDATION", "FOREGROUND_KEYS", "load_split", "select_fraction", "holdout_by_patient",
           "is_classification", "is_multilabel", "patient_of", "entry_classes", "foreground_key", "has_foreground",
           "fraction_count"]

SPLITS = ("train", "holdout", "validation", "test")
# the `holdout` setting that early-stops on the datalist's own "validation" list instead of a share of training
VALIDATION = "validation"


_READ: OrderedDict[tuple[str, bytes], dict] = OrderedDict()  # (path, sha256 of its bytes) -> the parsed datalist
_READ_KEPT = 1  # datalists kept parsed: a fine-tune's one (its splits, train.json and evaluate.json), not each of a grid


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:  # none there, unreadable: read_datalist_json names it
        return None


def _read_content(path: Path) -> dict:
    """The datalist's parsed JSON (:func:`read_datalist_json`), parsed once per content: a fine-tune loads its splits
    one by one, and each call parsed the file again (2.3 s for CheXpert's 223k entries; reading and hashing its 35 MB
    takes 0.07 s). Keyed by the resolved path and the sha256 of the file's bytes, not its size and modification time:
    a datalist rewritten within the file system's timestamp step (a few ms) with the same size is read again too.
    The last one parsed is kept (:data:`_READ_KEPT`; CheXpert's holds about 150 MB of Python objects until another
    datalist is loaded). The content stays inside this module: :func:`load_split` returns new entries
    (:func:`_detached`)."""
    digest = _digest(path)
    key = (str(path), digest or b"")
    if digest is not None and key in _READ:
        _READ.move_to_end(key)
        return _READ[key]
    content = read_datalist_json(path)
    if digest is not None and _digest(path) == digest:  # not rewritten while it was parsed
        _READ[key] = content
        while len(_READ) > _READ_KEPT:
            _READ.popitem(last=False)
    return content


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
    kind: str | None = None,
    class_names: list[str] | None = None,
    spatial_dims: int | None = None,
) -> list[dict]:
    """Entries of one split of a prepared datalist, with absolute paths.

    Args:
        datalist: path of the datalist JSON (paths inside are relative to its folder).
        split: one of ``"train"``, ``"holdout"``, ``"validation"``, ``"test"``.
        label_fraction: share of the training labels used (seeded; see :func:`select_fraction`).
        seed: seed of the label fraction and of the early-stopping holdout (the task bundles pass their ``split_seed``,
            by default their ``seed``); a whole number >= 0.
        holdout: share of the (selected) training entries held out by patient for early stopping, or
            ``"validation"``: the datalist's whole ``"validation"`` list is the holdout and ``"train"`` is all the
            selected training entries (the label fraction does not shrink it;
            :func:`dira3d.evaluation.split_checks.check_validation_holdout`).
        fold: for cross-validation datalists (entries with ``"fold"``): test on this fold and
            train on the others. ``None`` uses the ``"test"`` key.
        num_labels: a multi-label classifier's number of outputs (``@out_channels`` of the 2D
            classification bundles): every returned entry's ``label`` must be a list of that many
            numbers. None: not checked.
        kind: the bundle's network kind (``"classification"`` / ``"segmentation"``): a label of the other kind is
            refused (:func:`dira3d.evaluation.split_checks.check_labels`). None: not checked. An entry without a
            ``label`` is refused whatever ``kind``.
        class_names: the classifier's names of its outputs (``@class_names``): when the datalist names its labels
            (``meta.labels``, as ``dira3d prepare chestxray14`` / ``chexpert`` write it), they must be these names in
            this order, or the AUCs, ``test_cases.csv`` and the probabilities would name the classes wrongly. None:
            not checked.
        spatial_dims: the dimensions of the bundle's network (2 or 3; the task bundles pass theirs): a split whose
            images are files of the other dimensions (PNGs for a 3D bundle, volumes for a 2D one;
            :func:`dira3d.evaluation.datalist_dims.other_dims_entry`) is refused first, naming the datalist, the image and
            the ``dira3d prepare`` that writes a datalist that fits. None: not checked.

    Returns:
        A list of entry dicts (``"image"``, ``"label"``, ``"case_id"``, ...), each with the keys every entry of the
        split has (a batch collates no other); a ``world_mm`` that only some have is kept, with three NaN in the others.

    Raises:
        FileNotFoundError: the datalist does not exist.
        DataError: (a ``ValueError``, which ``python -m monai.bundle run`` prints as one ``error:`` line,
            :mod:`dira3d.utils.bundle_errors`) unknown split, a bad fraction or holdout, a setting of the wrong kind
            (:func:`~dira3d.evaluation.split_draws.check_split_settings`: a fold or seed that is not a whole number, a
            text or bool for a number), a fold that no entry has, an
            empty split, ``holdout="validation"`` refused (no or an empty validation list, a patient shared with training or
            test, ``fold`` set), a classification
            holdout or test split whose AUC is undefined (one class only; multi-label: no class with both values;
            :func:`dira3d.evaluation.split_checks.check_auc_defined`), or (with
            ``num_labels``) a label that is not a list of ``num_labels`` numbers, an entry without a label or (with
            ``kind``) one of the other kind (names the file, the entry and
            what to do: a segmentation datalist, or CheXpert prepared with ``--labels all`` for the 5-class bundle),
            or (with ``class_names``) a ``meta.labels`` that names other classes.
        dira3d.data.datalist.DatalistFilesMissingError: image or label files of the returned entries that
            do not exist (all named, with their case ids; a ``FileNotFoundError`` too).
    """
    if split not in SPLITS:
        raise DataError(None, f"split={split!r} is unknown; use one of {SPLITS}")
    if (isinstance(seed, bool) or not isinstance(seed, numbers.Real) or not float(seed).is_integer()
            or seed < 0):  # int(1.5) drew seed 1's split (2.0, as YAML may write it, is seed 2),
        # None and -1 failed in numpy inside MONAI's traceback
        raise DataError(None, f"seed={seed!r} of the label subset and early-stopping holdout (a task bundle's split_seed, "
                              "by default its seed) must be a whole number >= 0; e.g. split_seed=0, or leave split_seed "
                              "out to draw with seed")
    if isinstance(holdout, str) and holdout != VALIDATION:
        raise DataError(None, f"holdout={holdout!r} is neither a share in [0, 1) of the training patients nor "
                              f"{VALIDATION!r}; use 0.1 (the protocol's default) or {VALIDATION!r} (early stopping on the "
                              "datalist's own 'validation' list)")
    settings = check_split_settings(label_fraction, seed, holdout, fold)  # a fold of 1.5 or "two" failed in int()
    seed, fold = settings["seed"], settings["fold"]  # whole numbers (2.0 from a YAML file is fold 2)
    on_validation = holdout == VALIDATION
    path = Path(datalist).resolve()
    content = _read_content(path)
    training = _load_key(path, content, "training")
    if fold is not None and int(fold) >= 0:
        folds = sorted({e.get("fold") for e in training if "fold" in e})
        if int(fold) not in folds:
            raise DataError(None, f"fold={fold} is not in datalist {path} (folds present: {folds or 'none'}); set `fold` "
                                  "to one of them or to null")
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
        _check_dims(path, split, result, spatial_dims)
        _check_labels(path, split, result, kind)
        check_entry_files(path, "validation", result)
        _check_label_vectors(path, content, split, result, num_labels)
        _check_class_names(path, content, class_names)
        return _detached(_common_keys(result))
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
                        f"'validation' list with holdout=validation ({split_option(path, 'validation')})")
            elif kept < 2:
                # e.g. LiTS at 1 %: 100 training volumes -> one patient, nothing left to hold out
                hint = (f"label_fraction={label_fraction} keeps {kept} of the {total} training patient(s), and the "
                        f"early-stopping holdout needs 2 (one held out, one to train on); label_fraction at least {2 / total:.3g}")
        if split == "test" and (fold is None or int(fold) < 0):
            where = ("its 'test' list has no entries" if "test" in content
                     else f"add a 'test' list to the datalist (it has {sorted(k for k in content if k != 'meta')})")
            option = split_option(path, "test")
            if option.endswith("`"):  # an option of the dataset's prepare that fills 'test'
                hint = (f"{where} ({option} writes one" + (": F of the patients, rounded to whole patients, so choose F "
                        "for one or more: 0.2 of 2 patients rounds to none" if "generic" in option else "") + "), or set "
                        "fold for a cross-validation datalist")
            else:  # what the dataset's prepare writes instead (an official test list, PE-CAD's folds)
                hint = ("its 'test' list has no entries" if "test" in content else "it has no 'test' list") + f"; {option}"
        # a DataError, as each error of the user's datalist or settings here: `python -m monai.bundle run` prints it
        # as one line (dira3d.utils.bundle_errors), not in MONAI's "Failed to evaluate ConfigExpression" traceback
        raise DataError(
            None,
            f"split {split!r} of datalist {path} is empty (label_fraction={label_fraction}, holdout={holdout}, "
            f"fold={fold}); {hint}"
        )
    # the entries this run uses (not the whole list: a 1 % run does not need the other 99 %)
    listed = "test" if split == "test" and (fold is None or int(fold) < 0) else "training"
    _check_dims(path, split, result, spatial_dims)  # first: a 3D datalist's masks are the wrong labels of a 2D classifier
    _check_labels(path, split, result, kind)
    check_entry_files(path, VALIDATION if split == "holdout" and on_validation else listed, result)
    # labels the bundle cannot take first: their error names the entry (the AUC check would give other advice)
    _check_label_vectors(path, content, split, result, num_labels)
    _check_class_names(path, content, class_names)
    if split in ("test", "holdout"):  # an AUC of one class is NaN: refused before any training
        from dira3d.evaluation.split_checks import check_auc_defined

        check_auc_defined(path, VALIDATION if split == "holdout" and on_validation else split, result,
                          chosen=None if split == "test" else chosen,
                          fold=int(fold) if fold is not None and int(fold) >= 0 else None,
                          settings=f"label_fraction={label_fraction}, seed={seed}, holdout={holdout}, fold={fold}")
    return _detached(_common_keys(result))


def _check_dims(path: Path, split: str, entries: list[dict], spatial_dims: int | None) -> None:
    """Refuse a split whose images are of the other dimensions than the bundle's network (``load_split``'s
    ``spatial_dims``): they failed while caching (``3D pretraining needs 3D volumes``) or on their labels."""
    from dira3d.evaluation.datalist_dims import fitting_datalist, other_dims_entry

    found = other_dims_entry(entries, spatial_dims) if spatial_dims is not None else None
    if found is not None:
        index, image = found
        other = 5 - spatial_dims
        raise DataError(None, f"datalist {path}: entry {index} of split {split!r} (image {image}) is a {other}D "
                              f"{'volume' if other == 3 else 'image'}, but this bundle's network is {spatial_dims}D; "
                              f"pass a {spatial_dims}D datalist, {fitting_datalist(spatial_dims)}, or fine-tune a "
                              f"{other}D bundle")


_NUMBERS = {int, float}


def _check_labels(path: Path, split: str, entries: list[dict], kind: str | None) -> None:
    from dira3d.evaluation.split_checks import check_labels  # (it imports this module)

    check_labels(path, split, entries, kind)


def _check_label_vectors(path: Path, content: dict, split: str, entries: list[dict], num_labels: int | None) -> None:
    """Refuse a label that a multi-label classifier with ``num_labels`` outputs cannot take: it failed deep in
    training (``Target size ([2, 14]) must be the same as input size ([2, 5])``, or ``new(): invalid data type
    'str'`` for a mask path), naming no file."""
    if num_labels is None:
        return
    for index, entry in enumerate(entries):
        label = entry.get("label")
        if isinstance(label, (list, tuple)) and len(label) == int(num_labels) \
                and (set(map(type, label)) <= _NUMBERS  # quick: JSON numbers are of these exact types
                     or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label)):
            continue
        where = f"datalist {path}: entry {index} of split {split!r} (image {entry.get('image')})"
        if isinstance(label, str):
            raise DataError(None, f"{where} has label {label!r}, a file (a segmentation datalist?); this classification bundle "
                                  f"takes a list of {num_labels} numbers per image, as `dira3d prepare chestxray14` / `chexpert` "
                                  "write them: pass the datalist of its dataset")
        meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
        names = f" ({', '.join(map(str, meta['labels']))})" if isinstance(meta.get("labels"), list) else ""
        count = len(label) if isinstance(label, (list, tuple)) else None
        if count is not None and count != int(num_labels):
            raise DataError(None, f"{where} has {count} labels{names}, but the network has out_channels {num_labels}: pass a "
                                  f"datalist with the bundle's {num_labels} labels (chexpert_cls: `dira3d prepare chexpert` with "
                                  "the default --labels five; chestxray14_cls: `dira3d prepare chestxray14`), or train on these "
                                  f"{count} with --set out_channels={count} and {_class_names_option(meta, count)}")
        raise DataError(None, f"{where} has label {label!r}; expected a list of {num_labels} numbers (1 = finding present); "
                              "regenerate the datalist with `dira3d prepare`")


def _class_names_option(meta: dict, count: int) -> str:
    """``--set class_names='[...]'`` with the datalist's ``meta.labels`` (JSON, as the shell passes it on)."""
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != count:
        return f"--set class_names= a list of {count} names, in the order of the labels"
    return f"--set class_names='{json.dumps([str(n) for n in labels], ensure_ascii=False, separators=(',', ':'))}'"


def _check_class_names(path: Path, content: dict, class_names: list[str] | None) -> None:
    """Refuse ``class_names`` that are not the datalist's ``meta.labels``: CheXpert prepared with ``--labels all`` and
    trained with ``--set out_channels=14`` but the bundle's 5 names wrote ``test_cases.csv`` and the probabilities
    with the first 5 of the 14 outputs named Atelectasis ... (they are No Finding ...), the rest class5 ..."""
    meta = content.get("meta") if isinstance(content.get("meta"), dict) else {}
    labels = meta.get("labels")
    if class_names is None or not isinstance(labels, list) or not labels:
        return
    names, labels = [str(n) for n in class_names], [str(n) for n in labels]
    if names != labels:
        raise DataError(None, f"datalist {path} names its {len(labels)} labels in meta.labels, but class_names is "
                              f"{names}: the AUCs, test_cases.csv and the probabilities would name the classes wrongly; "
                              f"pass {_class_names_option(meta, len(labels))} (--class_names with python -m monai.bundle "
                              "run), or a datalist of the bundle's labels")


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
        Dira3dWarning, stacklevel=3)


# optional keys kept when only some entries have them, with this placeholder in the others: a candidate's world
# position (dira3d prepare luna16 / pecad), which CasePredictionsWriter writes beside its prediction (empty cells
# for the placeholder; it collates as the positions do: three numbers)
_PLACEHOLDERS = {"world_mm": (math.nan, math.nan, math.nan)}


_NEEDED = {"image", "label"}  # never left out: a label vector of another length is the caller's error to name


def _uneven(entries: list[dict], key: str) -> bool:
    """Whether ``key``'s values are not all lists of one length (a batch cannot collate them)."""
    size = len(entries[0][key])
    return any(type(v) is not list or len(v) != size for v in (e[key] for e in entries))


def _common_keys(entries: list[dict]) -> list[dict]:
    """Keep only the keys every entry has: a batch cannot collate a key that some samples lack (MONAI's
    ``list_data_collate`` takes the keys of the batch's first sample: a KeyError, or the key dropped from the batch;
    e.g. LUNA16 positives carry ``diameter_mm``, negatives do not). A key of :data:`_PLACEHOLDERS` that some entries
    have is kept, and the others get its placeholder (``world_mm``: three NaN), so the positions that exist are not
    lost for all. A key whose lists differ in length from entry to entry is left out too, the image and label
    excepted (MONAI's collate stacks a list element by element: 'each element in list of batch should be of equal
    size'; e.g. ``reader_nodule_ids`` of ``dira3d prepare lidc``, one id per reader who outlined the nodule)."""
    if not entries:
        return entries
    common = set(entries[0]).intersection(*entries)
    common -= {k for k in common - _NEEDED if type(entries[0][k]) is list and _uneven(entries, k)}
    size = len(common)  # an entry with that many keys has exactly these: copied as it is, in one step
    filled = {k: v for k, v in _PLACEHOLDERS.items() if k not in common and any(k in e for e in entries)}
    if filled:
        common |= set(filled)
        return [{**{k: v for k, v in e.items() if k in common}, **{k: list(v) for k, v in filled.items() if k not in e}}
                for e in entries]
    return [dict(e) if len(e) == size else {k: v for k, v in e.items() if k in common} for e in entries]


def _copy_json(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_copy_json(v) for v in value]
    if kind is dict:
        return {k: _copy_json(v) for k, v in value.items()}
    return value


def _detached(entries: list[dict]) -> list[dict]:
    """``entries`` (new dicts) with no list or dict of the parsed datalist in them (a label vector, a nested object):
    what a caller changes in them does not change the next :func:`load_split` of the same file (:func:`_read_content`)."""
    for entry in entries:
        for key, value in entry.items():
            if type(value) in (list, dict):
                entry[key] = _copy_json(value)
    return entries
