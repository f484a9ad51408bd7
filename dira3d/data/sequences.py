"""Multi-sequence MRI: several sequences of one case stacked as the channels of one volume.

``dira3d prepare brats`` reads them from the BraTS layout; ``dira3d prepare generic --sequences`` from
any folder per case (a hospital export, BIDS ``anat/``): each sequence is the one image file, or DICOM
series folder, in the case folder whose name matches its pattern (:func:`parse_sequences`,
:func:`find_sequence_cases`). Both write the volume :func:`stack_sequences` makes, so the
``brats_tumor_seg`` bundle reads either. The sequence names are those the bundle knows
(:data:`SEQUENCE_NAMES`; its ``modalities`` and ``image_channels`` settings). ``generic``'s check of its
``--sequences`` settings (:func:`check_sequence_settings`) and of a written volume's channels
(:func:`check_channels`) are here too.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk

from dira3d.data.errors import DataError, record_or_raise
from dira3d.data.io import check_mask_matches, image_suffix, looks_like_dicom, read_image
from dira3d.data.nifti_header import is_marked_prediction

__all__ = ["SEQUENCE_NAMES", "parse_sequences", "find_sequence_cases", "stack_sequences", "check_channels",
           "check_sequence_settings"]

# the sequences brats_tumor_seg knows (dira3d.evaluation.transforms.BRATS_MODALITIES, kept free of torch here)
SEQUENCE_NAMES = ("t1", "t1ce", "t2", "flair")


def parse_sequences(specs: str | Sequence[str]) -> dict[str, str]:
    """``--sequences``: ``NAME=PATTERN`` items (also comma-separated within one item) → ``{name: pattern}``
    in the order given, which is the channel order; names lower-cased.

    Raises:
        ValueError: an item without ``=`` or with an empty pattern, a name not in :data:`SEQUENCE_NAMES`,
            a name given twice.
    """
    items = [part.strip() for spec in ([specs] if isinstance(specs, str) else specs) for part in str(spec).split(",")]
    out: dict[str, str] = {}
    for item in filter(None, items):
        name, sep, pattern = item.partition("=")
        name = name.strip().lower()
        if not sep or not pattern.strip():
            raise ValueError(f"--sequences item {item!r} must be NAME=PATTERN, e.g. 't1=*T1w*' 'flair=*FLAIR*'")
        if name not in SEQUENCE_NAMES:
            raise ValueError(f"--sequences name {name!r} is unknown; use names from {list(SEQUENCE_NAMES)} (those "
                             "brats_tumor_seg reads), e.g. t1ce for a contrast-enhanced T1")
        if name in out:
            raise ValueError(f"--sequences names {name} twice; give each sequence once")
        out[name] = pattern.strip()
    if not out:
        raise ValueError("--sequences needs at least one NAME=PATTERN, e.g. 't1=*T1w*' 'flair=*FLAIR*'")
    return out


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())  # case-insensitive on every system


def _is_series_folder(folder: Path) -> bool:
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return False
    return any(looks_like_dicom(p) for p in files) and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _case_problems(folder: Path, candidates: list[Path], patterns: Mapping[str, str],
                   predictions: frozenset[Path] = frozenset()) -> tuple[dict[str, Path | None], list[str]]:
    """The one candidate of each pattern, and what is wrong (a pattern matching none or several, a
    file matched by two patterns). ``predictions``: candidates that are a dira3d bundle's predictions, which no
    sequence pattern takes (``x_T1w_seg.nii.gz``, written next to ``x_T1w.nii.gz``, matches ``*T1w*`` too)."""
    found: dict[str, Path | None] = {}
    problems = []
    shown = ", ".join(p.name for p in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
    for key, pattern in patterns.items():
        hits = [p for p in candidates if _matches(p.name, pattern) and (key == "label" or p not in predictions)]
        found[key] = hits[0] if len(hits) == 1 else None
        what = "--label-pattern" if key == "label" else f"the {key} pattern of --sequences"
        if not hits:
            problems.append(f"no image file or DICOM series folder matches {what} {pattern!r} (found: {shown}); "
                            "add it, fix the pattern, or leave the case out")
        elif len(hits) > 1:
            problems.append(f"{len(hits)} files match {what} {pattern!r}: {', '.join(p.name for p in hits)}; make "
                            "the pattern match one of them (e.g. add the part of the name that tells them apart)")
    for path in candidates:
        keys = [k for k, pattern in patterns.items() if _matches(path.name, pattern) and (k == "label" or path not in predictions)]
        if len(keys) > 1:
            problems.append(f"{path.name} matches the patterns of {' and '.join(keys)}; make each pattern match "
                            "its own file")
    return found, [f"{folder}: {p}" for p in problems]


def find_sequence_cases(src: str | os.PathLike, sequences: Mapping[str, str], label_pattern: str | None = None,
                        exclude: Sequence[str | os.PathLike] = (), problems: dict[str, str] | None = None,
                        ) -> list[tuple[str, Path, dict[str, Path | None], Path | None]]:
    """The case folders under ``src``: every folder (searched recursively, hidden ones left out) holding an
    image file or a DICOM series folder whose name matches a pattern of ``sequences`` or ``label_pattern``
    (shell patterns, case-insensitive; non-image files such as BIDS ``.json`` sidecars are ignored). A NIfTI file
    that carries the mark of a dira3d bundle's prediction is no sequence (the label pattern may still take it).

    Args:
        sequences: ``{name: pattern}`` (:func:`parse_sequences`).
        label_pattern: the pattern of the mask; ``None``: no masks.
        exclude: folders not searched (the output folder when it lies inside ``src``).
        problems: when given, a case missing a sequence (or its mask), with two files matching one
            pattern or a file matching two patterns, or with the case id of another case, is recorded
            here as ``{case_id: message}`` (the folder, the pattern and the files named) instead of raised.

    Returns:
        Sorted ``(case_id, folder, {name: path or None}, mask path or None)``; the case id is the folder's
        path relative to ``src`` with ``_`` for ``/`` (``site_b/sub-01`` → ``site_b_sub-01``).

    Raises:
        DataError: ``src`` is not a folder; without ``problems``, a case's problem.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must hold one folder per case")
    patterns = dict(sequences) | ({"label": label_pattern} if label_pattern else {})
    skip = {Path(p).resolve() for p in exclude}
    cases: dict[str, tuple[Path, dict[str, Path | None], Path | None]] = {}
    for root, dirs, files in os.walk(src):
        folder = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (folder / d).resolve() not in skip)
        candidates = [folder / n for n in sorted(files) if image_suffix(n) and not n.startswith(".")]
        series = [d for d in dirs if any(_matches(d, p) for p in patterns.values()) and _is_series_folder(folder / d)]
        dirs[:] = [d for d in dirs if d not in series]  # a sequence's DICOM folder is not a case of its own
        candidates = sorted(candidates + [folder / d for d in series], key=lambda p: p.name)
        if not any(_matches(p.name, pattern) for p in candidates for pattern in patterns.values()):
            continue
        rel = folder.relative_to(src)
        cid = "_".join(rel.parts) if rel.parts else src.name
        # inference writes its prediction next to the scan by default: not a sequence, however it is named
        marked = frozenset(p for p in candidates if any(_matches(p.name, pattern) for pattern in sequences.values())
                           and is_marked_prediction(p))
        found, wrong = _case_problems(folder, candidates, patterns, marked)
        if cid in cases:
            wrong.append(f"{folder}: gives the same case id {cid!r} as {cases[cid][0]}, so both would write the same "
                         "output; rename or move one of them")
        for message in wrong:
            record_or_raise(problems, cid, DataError(None, message))
        label = found.pop("label", None)
        cases.setdefault(cid, (folder, found, label))
    return [(cid, *cases[cid]) for cid in sorted(cases)]


def stack_sequences(paths: Mapping[str, str | os.PathLike], normalise: Callable[[sitk.Image, Path], sitk.Image],
                    check: Callable[[sitk.Image, Path], None] | None = None) -> tuple[sitk.Image, sitk.Image, Path]:
    """The sequences of one case as one volume: each read, checked on the voxel grid of the first
    (size, spacing, origin, direction: they must be co-registered; nothing is resampled here) and
    normalised; one sequence is a 3D image, several a 4D image with the channels last (``JoinSeries``), in
    the order of ``paths``.

    Args:
        paths: ``{name: image file or DICOM folder}`` in channel order.
        normalise: ``(image, path) -> prepared image`` (e.g. :func:`dira3d.data.generic.normalise_image`
            with ``"mr"``).
        check: called on each image as read (e.g. that it is not a mask).

    Returns:
        ``(volume, the first sequence as read, its path)``: the reference a mask is checked against.

    Raises:
        DataError: an unreadable sequence, or one on another grid than the first (both files named).
    """
    items = [(name, Path(path)) for name, path in paths.items()]
    reference_path = items[0][1]
    reference = read_image(reference_path)
    channels = []
    for index, (_name, path) in enumerate(items):
        image = reference if index == 0 else read_image(path)
        if check is not None:
            check(image, path)
        check_mask_matches(reference, image, reference_path, path, allow_empty=True, kind="sequence")
        channels.append(normalise(image, path))
    # JoinSeries stacks the channels as a 4th axis: a 4D NIfTI with channels last, same affine.
    volume = channels[0] if len(channels) == 1 else sitk.JoinSeries(channels)
    return volume, reference, reference_path


def check_channels(path: str | os.PathLike, channels: int) -> None:
    """Check that a written volume (NIfTI) holds ``channels`` channels (4D, last axis; 3D for one), for
    ``run_cases(check_outputs=)``: a volume of another run (other sequences, a single scan) is redone.

    Raises:
        DataError: another number of channels, or a header that cannot be read.
    """
    from dira3d.data.nifti_header import read_raw_nifti_header

    try:
        dim = read_raw_nifti_header(path)["dim"]
    except Exception as err:  # noqa: BLE001 (any unreadable header: redo the case)
        raise DataError(path, f"cannot be read as NIfTI ({err})") from None
    held = int(dim[4]) if int(dim[0]) >= 4 else 1
    if held != channels:
        raise DataError(path, f"holds {held} channel(s), not the {channels} sequence(s) of --sequences")


def check_sequence_settings(sequences: str | Sequence[str] | None, label_pattern: str | None, modality: str | None,
                            image_suffix: str, label_suffix: str | None) -> dict[str, str]:
    """The ``{name: pattern}`` of ``--sequences`` (empty without it).

    Raises:
        ValueError: a bad ``--sequences``; ``--label-pattern`` without it; with it, ``--modality ct``,
            ``--image-suffix`` or ``--label-suffix`` (single-scan options).
    """
    if sequences is None:
        if label_pattern is not None:
            raise ValueError("--label-pattern names the mask in a case folder of --sequences; give --sequences too, "
                             "or pair masks with single scans by --label-suffix")
        return {}
    patterns = parse_sequences(sequences)
    if modality == "ct":
        raise ValueError("--sequences stacks MR sequences (scaled as mr); drop --modality ct")
    if image_suffix or label_suffix is not None:
        raise ValueError("--image-suffix / --label-suffix pair single scans; with --sequences the mask is found by "
                         "--label-pattern (e.g. --label-pattern '*mask*')")
    if label_pattern is not None and not label_pattern.strip():
        raise ValueError("--label-pattern is empty; give the mask's file name pattern, e.g. '*mask*'")
    return patterns

