"""Reading MONAI decathlon-style datalists: the one reader behind pretraining, visual words and fine-tuning.

:func:`read_datalist_json` checks the file (it exists, is UTF-8 JSON, an object with the required
keys); :func:`datalist_entries` checks one split's entries (a list of objects that have the
required keys, optionally whose files exist) and resolves their relative paths against the
datalist's folder (or ``base_dir``) as :func:`monai.data.load_decathlon_datalist` does:
``os.path.normpath(os.path.join(base_dir, value))`` for the path keys, and, with
``detect_paths``, for any other string value that names an existing path there (MONAI's
auto-detection; off for callers that want only the path keys touched). A ``"test"`` list of bare
paths (the Medical Segmentation Decathlon's format) becomes ``[{"image": path}, ...]``.

Every problem is a :class:`DatalistError` (a :class:`~dira3d.data.errors.DataError`, so a
``ValueError``) whose message starts with ``datalist <path>``; a missing datalist is a
``FileNotFoundError``. Entry problems are all listed at once (the first ten in the message).
Torch-free: ``dira3d.data`` does not import torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.data.errors import DataError

__all__ = ["DatalistError", "DatalistFilesMissingError", "check_datalist_file", "read_datalist_json", "folder_not_datalist",
           "datalist_entries", "datalist_meta", "check_entry_files", "more_training_advice", "split_option"]

_SHOWN = 10  # entry problems named in one message


class DatalistError(DataError):
    """A datalist that cannot be used as it is; ``path`` names it and the message starts with ``datalist <path>``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(None, f"datalist {path} {problem}")
        self.path = Path(path)


class DatalistFilesMissingError(DatalistError, FileNotFoundError):
    """Entries whose files do not exist (and no other problem): a ``FileNotFoundError`` too."""


def datalist_meta(datalist: str | os.PathLike | None) -> dict[str, Any]:
    """The ``meta`` object ``dira3d prepare`` wrote into a datalist (how the volumes were made); empty when
    there is no datalist, no ``meta``, or the file cannot be read: lenient on purpose, for settings read
    from it before the datalist's reader (:func:`read_datalist_json`) reports a broken file."""
    if not datalist or not os.path.isfile(datalist):
        return {}
    try:
        with open(datalist, encoding="utf-8") as handle:
            meta = json.load(handle).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


# meta.dataset -> (the prepare command's name, its options that fill 'validation' and 'test')
_SPLIT_OPTIONS: dict[str, tuple[str, str | None, str | None]] = {
    "luna16": ("luna16", "--val-subsets", "--test-subsets"),
    "lits": ("lits", "--val-range", "--test-range"),
    "lidc-idri": ("lidc", "--split", "--split"),
    "brats2018": ("brats", "--split", "--split"),
    # the 2D datasets whose prepare takes generic's fractions (cxr_splits.add_split_arguments) under its own name
    "siim-acr": ("siim", "--val-fraction", "--test-fraction"),
    "montgomery": ("montgomery", "--val-fraction", "--test-fraction"),
    "radiographs": ("radiographs", "--val-fraction", "--test-fraction"),
    # None: no option of its prepare fills that part (_SPLIT_WITHOUT_OPTION says what it writes instead)
    "chexpert": ("chexpert", "--val-fraction", None),
    "chestxray14": ("chestxray14", "--val-fraction", None),
    "pecad": ("pecad", None, None),
}
# the datasets whose prepare has no option for a part: how it fills that part instead (`dira3d prepare <ds> --help`)
_SPLIT_WITHOUT_OPTION = {
    ("chexpert", "test"): "`dira3d prepare chexpert` writes CheXpert's official valid.csv as the 'test' list",
    ("chestxray14", "test"): "`dira3d prepare chestxray14` writes the official test_list.txt as the 'test' list",
    ("pecad", "validation"): "`dira3d prepare pecad` writes no 'validation' list: its patients are all in 'training', "
                             "in folds, and fine-tuning holds out a share of the training folds' patients (holdout)",
    ("pecad", "test"): "`dira3d prepare pecad ... --folds K` writes cross-validation folds instead of a 'test' list: "
                       "set fold to test on one (`dira3d finetune --fold K`)",
}
# meta.dataset -> the option of its prepare command that fills 'training' (the others: smaller fractions)
_TRAINING_OPTIONS = {"luna16": "--train-subsets", "lits": "--train-range", "lidc-idri": "--split", "brats2018": "--split"}


def split_option(datalist: str | os.PathLike | None, part: str) -> str:
    """The ``dira3d prepare`` option that puts volumes in ``part`` (``validation`` / ``test``) for the dataset the
    datalist's ``meta.dataset`` records, as a command: ``dira3d prepare luna16 ... --val-subsets`` (LUNA16's
    official subsets), else ``generic``'s fraction (advice written for ``generic`` named ``--val-fraction`` for
    every dataset); for a dataset whose prepare has no such option (CheXpert's and ChestX-ray14's official test
    lists, PE-CAD's folds) what its prepare writes there instead."""
    dataset = str(datalist_meta(datalist).get("dataset"))
    name, validation, test = _SPLIT_OPTIONS.get(dataset, ("generic", "--val-fraction", "--test-fraction"))
    option = validation if part == "validation" else test
    return f"`dira3d prepare {name} ... {option}`" if option else _SPLIT_WITHOUT_OPTION[dataset, part]


def more_training_advice(datalist: str | os.PathLike | None) -> str:
    """How to prepare more training volumes for the dataset the datalist's ``meta.dataset`` records: its own option
    (``dira3d prepare luna16 ... --train-subsets``: LUNA16 splits by subset), else a smaller validation fraction of its
    prepare command (advice written for ``generic`` named ``--val-fraction`` for every dataset, LUNA16's too); PE-CAD's
    prepare puts every candidate in 'training' already."""
    dataset = str(datalist_meta(datalist).get("dataset"))
    name, validation, _ = _SPLIT_OPTIONS.get(dataset, ("generic", "--val-fraction", "--test-fraction"))
    if dataset in _TRAINING_OPTIONS:
        return (f"prepare the scans again with more of them for training (`dira3d prepare {name} ... "
                f"{_TRAINING_OPTIONS[dataset]}`; the volumes written are kept)")
    if validation is None:  # pecad: no option moves volumes into 'training'
        return (f"rerun `dira3d prepare {name}` with more volumes and candidates.csv rows (it puts every patient's "
                "candidates in 'training', with its fold)")
    return (f"prepare the scans again with a smaller {validation} (`dira3d prepare {name} ... {validation} 0`; the "
            "volumes written are kept)")


def channels_advice(datalist: str | os.PathLike | None, channels: int, in_channels: int) -> str:
    """What to do with volumes of ``channels`` channels when the network takes ``in_channels``, for the dataset the
    datalist's ``meta.dataset`` records and the sequences its ``meta.channels`` names: set ``in_channels``, or prepare
    ``in_channels`` sequences with that dataset's own option (``dira3d prepare brats ... --modalities``; advice written
    for ``generic`` named ``--sequences`` for every dataset)."""
    meta = datalist_meta(datalist)
    names = meta.get("channels") if isinstance(meta.get("channels"), list) else []
    override = f"set in_channels to {channels} (`dira3d pretrain --override in_channels={channels}`)"
    of = f" ({', '.join(map(str, names))})" if len(names) == channels else ""
    if meta.get("dataset") == "brats2018":
        keep = " ".join(map(str, names[:in_channels])) if len(names) >= in_channels else "flair"
        return (f"for the {channels} sequences{of} of this BraTS datalist {override}, or prepare {in_channels} of "
                f"them (`dira3d prepare brats ... --modalities {keep}`)")
    if meta.get("dataset") == "generic" and names:
        return (f"for the {channels} sequences{of} of this datalist {override}, or prepare {in_channels} of them "
                f"(`dira3d prepare generic ... --sequences` with {in_channels} NAME=PATTERN)")
    return (f"for volumes of {channels} channels (e.g. the sequences of `dira3d prepare generic --sequences`) "
            f"{override}, or fix the datalist")


def folder_not_datalist(folder: Path) -> str:
    """The error for a folder given as a datalist (e.g. the ``--dst`` of ``dira3d prepare``): the datalists in it."""
    found = sorted(p.name for p in folder.glob("*.json") if p.name.endswith("datalist.json") or p.name == "visual_words.json")
    return (f"datalist {folder} is a folder, not a datalist file; pass "
            + (f"the datalist in it: {' or '.join(str(folder / name) for name in found)}" if found
               else "the datalist JSON that `dira3d prepare` wrote (docs/data.md)"))


def check_datalist_file(datalist: str | os.PathLike) -> Path:
    """``datalist`` as a ``Path``, refused when it is no file (a folder: the datalists in it, :func:`folder_not_datalist`).

    Raises:
        FileNotFoundError: ``datalist PATH does not exist; make one with `dira3d prepare ...` ...``, or the folder's.
    """
    path = Path(datalist)
    if path.is_dir():
        raise FileNotFoundError(folder_not_datalist(path))
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist; make one with `dira3d prepare ...` (docs/data.md) "
                                "or fix the path")
    return path


def read_datalist_json(datalist: str | os.PathLike, required: Sequence[str] = ("training",)) -> dict[str, Any]:
    """The JSON content of a decathlon-style datalist, as written (paths not resolved).

    Args:
        datalist: path of the JSON file.
        required: top-level keys that must be present (their entries are checked by
            :func:`datalist_entries`).

    Raises:
        FileNotFoundError: the datalist does not exist.
        DatalistError: not UTF-8 JSON (the message names the line and column), not a JSON object,
            or a ``required`` key missing.
    """
    path = check_datalist_file(datalist)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(path, f"is not valid JSON ({err}); regenerate it with `dira3d prepare ...` or fix it "
                                  "there") from err
    if not isinstance(content, dict):
        raise DatalistError(path, f"holds a JSON {type(content).__name__}, not an object; expected a MONAI "
                                  'decathlon-style datalist {"training": [...], ...}')
    for key in required:
        if key not in content:
            raise DatalistError(path, f"has no {key!r} key (keys: {sorted(content)}); expected a MONAI "
                                      "decathlon-style datalist")
    return content


def datalist_entries(
    datalist: str | os.PathLike,
    key: str = "training",
    *,
    content: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = ("image",),
    detect_paths: bool = True,
    required: Sequence[str] = ("image",),
    optional: bool = False,
    check_files: str | None = None,
    bare_list: bool = False,
) -> list[dict[str, Any]]:
    """The entries of split ``key``, checked, as new dicts with their relative paths resolved.

    Args:
        datalist: path of the JSON file (named in errors; read unless ``content`` is given).
        key: the split, e.g. ``"training"``.
        content: the datalist's content when already read (:func:`read_datalist_json`).
        base_dir: folder relative paths are resolved against (None: the datalist's folder).
        path_keys: keys whose string (or list of strings) values are always resolved: MONAI's
            ``"image"``, plus ``"label"`` for segmentation (``is_segmentation=True``).
        detect_paths: also resolve any other string value that names an existing path under
            ``base_dir`` (MONAI's behaviour); False leaves the other keys as written.
        required: keys every entry must have, with a non-empty value.
        optional: an absent (or null) split is an empty list instead of an error.
        check_files: ``"file"`` (the required path keys must name files) or ``"path"`` (files or
            folders, e.g. a DICOM series); None: not checked.
        bare_list: the file holds the list of entries itself (``content`` is ``{key: that list}``): the errors say
            so (``is a list of 3 entries, 2 of them bad``), not ``has 2 bad 'test' entries``: a key the file does not
            have.

    Raises:
        FileNotFoundError: the datalist does not exist.
        DatalistError: the checks of :func:`read_datalist_json`; no list ``key`` (unless
            ``optional``); entries that are not objects or lack a ``required`` key (all listed).
        DatalistFilesMissingError: entries whose files do not exist, and no other problem.
    """
    if check_files not in (None, "file", "path"):
        raise ValueError(f"check_files={check_files!r} is not supported; use 'file', 'path' or None")
    path = Path(datalist)
    if content is None:
        content = read_datalist_json(path, required=() if optional else (key,))
    raw = content.get(key)
    if raw is None:
        if optional:
            return []
        raise DatalistError(path, f"has no {key!r} key (keys: {sorted(content)}); expected a MONAI decathlon-style "
                                  "datalist")
    if not isinstance(raw, list):
        raise DatalistError(path, f"has no list {key!r} (it holds a {type(raw).__name__}); expected a list of entries")
    if key == "test" and raw and not isinstance(raw[0], dict):  # the decathlon's bare list of test images: each path
        # (or list of paths) one entry; an object or a number among them is checked as an entry, and refused (each was
        # taken as an image before: "{'img': 'b.nii.gz'}: img: does not exist", "5: cannot be loaded (TypeError ...)")
        raw = [{"image": item} if isinstance(item, (str, list)) else item for item in raw]
    base = str(path.parent if base_dir is None else base_dir)
    resolve = _resolver(base)
    entries, problems, missing_files = [], [], 0
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            kind = type(entry).__name__
            problems.append(f"entry {index} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not an object")
            continue
        absent = [name for name in required if entry.get(name) in (None, "", [])]
        if absent:
            problems.append(f"entry {index} has no {' or '.join(repr(a) for a in absent)}")
            continue
        item = {k: resolve(v, k in path_keys) if k in path_keys or detect_paths else v for k, v in entry.items()}
        if check_files is not None:
            for name in (k for k in required if k in path_keys):
                for file in _strings(item[name]):
                    if not (os.path.isfile(file) if check_files == "file" else os.path.exists(file)):
                        problems.append(f"entry {index} (case {entry.get('case_id', '?')}): {file} does not exist")
                        missing_files += 1
        entries.append(item)
    if problems:
        shown = _first_few(problems)
        kind = DatalistFilesMissingError if missing_files == len(problems) else DatalistError
        if bare_list:  # the file's own list, not a key's
            held = ("is a list of 1 entry, a bad one" if len(raw) == 1 else
                    f"is a list of {len(raw)} entries, {len(problems)} of them bad")
        else:
            held = f"has {len(problems)} bad {key!r} entr{'y' if len(problems) == 1 else 'ies'}"
        raise kind(path, f"{held}: {shown}. Fix or remove them and rerun")
    return entries


_NOT_PATHS = (int, float, bool, type(None), dict)  # exact types of JSON values that are never paths


def _resolver(base: str) -> Callable[[Any, bool], Any]:
    """``resolve(value, always)``: ``value`` (a path or a list of paths) joined to ``base`` as MONAI does;
    ``always=False``: only where the joined path exists (other values are returned as they are). Made once per
    read: a value looked up once is not looked up again (a patient id or a view repeats over many entries)."""
    detected: dict[str, str] = {}
    normpath, exists = os.path.normpath, os.path.exists
    # posixpath.join(base, item) of a str, in one step: item if absolute, else base + "/" + item ("/" not doubled)
    prefix = base if not base or base.endswith("/") else base + "/"
    posix = os.path.__name__ == "posixpath"

    def join(item: str | os.PathLike) -> str:
        if posix and type(item) is str:
            return normpath(item if item.startswith("/") else prefix + item)
        return normpath(os.path.join(base, item))

    def one(item: str | os.PathLike, always: bool) -> str:
        if always:
            return join(item)
        if isinstance(item, str) and item in detected:
            return detected[item]
        result = join(item)
        result = result if exists(result) else f"{item}"
        if isinstance(item, str):
            detected[item] = result
        return result

    def resolve(value: Any, always: bool) -> Any:
        kind = type(value)
        if kind in _NOT_PATHS:  # first: isinstance of os.PathLike (an ABC) is slow, and most values are these
            return value
        if kind is str or isinstance(value, (str, os.PathLike)):
            return one(value, always)
        if isinstance(value, list):
            if value and type(value[0]) in _NOT_PATHS:  # a label vector
                return value
            if all(isinstance(v, (str, os.PathLike)) for v in value):
                return [one(v, always) for v in value]
        return value

    return resolve


def check_entry_files(datalist: str | os.PathLike, key: str, entries: Sequence[Mapping[str, Any]],
                      keys: Sequence[str] = ("image", "label")) -> None:
    """Check that the paths of ``entries`` (as :func:`datalist_entries` returns them: resolved) exist, files or
    folders (a DICOM series), before a loader meets the first missing one after caching the others.

    Args:
        datalist: the datalist the entries come from (named in the error).
        key: the list they come from (named in the error).
        entries: the entries to check (e.g. the share a run uses).
        keys: the keys whose string values (or lists of strings) are paths; other values (a class
            index) are not checked.

    Raises:
        DatalistFilesMissingError: every missing path, with its case id (up to ten named).
    """
    problems = [f"case {entry.get('case_id', '?')}: {file} does not exist"
                for entry in entries for name in keys for file in _strings(entry.get(name)) if not os.path.exists(file)]
    if problems:
        shown = _first_few(problems)
        count = f"{len(problems)} missing file{'' if len(problems) == 1 else 's'} in its {key!r} list"
        raise DatalistFilesMissingError(datalist, f"has {count}: {shown}. Prepare the data again (`dira3d prepare`) "
                                                  "or fix or remove these entries and rerun")


def _first_few(problems: Sequence[str]) -> str:
    """The first :data:`_SHOWN` problems, ``"; "``-joined, and how many more there are."""
    return "; ".join(problems[:_SHOWN]) + (f"; ... {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")


def _strings(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
