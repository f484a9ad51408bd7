"""Which modality the scans of ``dira3d prepare generic`` are, and the checks that keep CT and MR apart.

CT in Hounsfield units always has air (or the scanner's padding) below :data:`AIR_HU`; an MRI has none.
The boundary is strict: a scan is CT when some voxel is *below* :data:`AIR_HU` (a lowest voxel of exactly
-500 is no air), so every non-constant scan passes exactly one of :func:`check_hu` and :func:`check_mr`.
Without ``--modality`` the modality an earlier run into ``--dst`` recorded is taken
(:func:`recorded_modality`), else a few scans spread over the folder decide (:func:`modality_from_scans`);
each case is then checked against it (:func:`check_hu`, :func:`check_mr`), so a scan of the other kind
fails its case (modality not given) or is warned about (given explicitly). A label map left among the
scans is refused (:func:`check_not_a_mask`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dira3d.data.errors import DataWarning
from dira3d.data.io import DataError, read_image
from dira3d.data.normalize import AIR_HU, mask_values
from dira3d.data.runner import Case

__all__ = ["MODALITIES", "AIR_HU", "check_not_a_mask", "check_hu", "check_mr", "modality_from_scans",
           "recorded_modality"]

MODALITIES = ("ct", "mr")


_MASK_ADVICE = "give masks a suffix and pass it (e.g. --image-suffix _image --label-suffix _label), or move the file out of --src"


def check_not_a_mask(image: sitk.Image, path: str | os.PathLike, advice: str = _MASK_ADVICE) -> None:
    """A mask left among the scans (no ``--label-suffix``) would be normalised into a flat volume; ``advice``
    ends the message (what to do). Judged whatever the voxel type: a mask saved as float32 (0.0 / 1.0) is one
    too, while a float scan has fractional values or more than :data:`~dira3d.data.normalize.MASK_VALUES`
    distinct ones (:func:`~dira3d.data.normalize.mask_values`: a coarse look settles a scan, one copy at most)."""
    values = mask_values(sitk.GetArrayViewFromImage(image))
    if values is not None:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(path, f"has only {values.size} distinct values ({shown}): it looks like a mask, not a scan; "
                              f"{advice}")


def _lowest_if_not_hu(image: sitk.Image) -> float | None:
    """The lowest voxel of a scan with no voxel below :data:`AIR_HU` (lowest ``>= AIR_HU``: no air, an MRI, or a
    CT stored without its rescale intercept or cropped to soft tissue); None for a scan with air (a voxel
    strictly below), and for a constant image (no scan at all: judged elsewhere)."""
    array = sitk.GetArrayViewFromImage(image)
    lowest = float(np.min(array))
    return lowest if lowest >= AIR_HU and float(np.max(array)) > lowest else None


_NO_AIR_ADVICE = ("for an MRI pass --modality mr; for a CT stored without its rescale intercept, or a CT cropped "
                  "without air, pass --modality ct")


def check_hu(image: sitk.Image, path: str | os.PathLike, chosen_by: str = "") -> None:
    """A scan without air prepared as CT is windowed to a flat, saturated volume without any error.

    ``chosen_by`` (``--modality`` not given: why ``ct`` was chosen, e.g. "the scans sampled have air"):
    the case fails, so no windowed MRI is written; empty (``--modality ct`` given): a warning names the file.

    Raises:
        DataError: ``chosen_by`` and no voxel strictly below :data:`AIR_HU` (the complement of
            :func:`check_mr`'s test).
    """
    lowest = _lowest_if_not_hu(image)
    if lowest is None:
        return
    if chosen_by:
        raise DataError(path, f"no voxel below {AIR_HU:g} HU (lowest {lowest:g}), so this does not look like a CT "
                              f"in Hounsfield units; --modality was not given and the scans are prepared as ct "
                              f"({chosen_by}), so this one is left out: {_NO_AIR_ADVICE} (prepare MR and CT scans "
                              "into separate --dst folders)")
    warnings.warn(f"{path}: no voxel below {AIR_HU:g} HU (lowest {lowest:g}), so this does not look like a CT in "
                  "Hounsfield units and the HU window will flatten it; for an MRI pass --modality mr",
                  DataWarning, stacklevel=2)


def check_mr(image: sitk.Image, path: str | os.PathLike, chosen_by: str = "") -> None:
    """A CT (air below :data:`AIR_HU`) prepared as MR is scaled by its own percentiles, not by the HU window its
    neighbours in a CT datalist would get: the mirror of :func:`check_hu`.

    ``chosen_by`` (``--modality`` not given, ``mr`` as an earlier run recorded it): the case fails, so no CT is
    written as MR; empty (``--modality mr`` given): a warning names the file.

    Raises:
        DataError: ``chosen_by`` and a voxel strictly below :data:`AIR_HU` (a lowest voxel of exactly
            :data:`AIR_HU` is no air; the complement of :func:`check_hu`'s test).
    """
    lowest = float(np.min(sitk.GetArrayViewFromImage(image)))
    if lowest >= AIR_HU:
        return
    found = f"voxels down to {lowest:g}, below {AIR_HU:g} (air in Hounsfield units), so this looks like a CT"
    if chosen_by:
        raise DataError(path, f"{found}; --modality was not given and the scans are prepared as mr ({chosen_by}), so "
                              "this one is left out: prepare CT scans into another --dst with --modality ct")
    warnings.warn(f"{path}: {found}, which MR percentile scaling will not treat as one; for a CT pass --modality ct "
                  "(into another --dst than the MR scans)", DataWarning, stacklevel=2)


_PROBE_READS = 5  # scans the modality probe reads (spread over the folder), more only while none decides


def _probe_order(count: int) -> list[int]:
    """Indices ``0 .. count - 1``: up to :data:`_PROBE_READS` spread over the range (first, last, between), then the rest."""
    spread = sorted({int(round(i)) for i in np.linspace(0, count - 1, min(count, _PROBE_READS))}) if count else []
    return spread + sorted(set(range(count)) - set(spread))


def modality_from_scans(cases: Sequence[Case], src: str | os.PathLike) -> tuple[str, str]:
    """``("ct", why)`` when the scans look like CT in HU (air below :data:`AIR_HU`), read from up to
    :data:`_PROBE_READS` cases spread over ``cases`` (more while none decides: an unreadable scan, a mask or
    a constant image decides nothing; its case reports it). Also ``ct`` when no scan decides (the scans
    are judged case by case).

    Raises:
        DataError: the scans read have no air (naming one; nothing is written), or some have and some
            do not (a mixed folder, naming a few of each).
    """
    usable = [c for c in cases if not c.error and c.params.get("image") is not None]
    with_air: list[Path] = []
    without: list[tuple[Path, float]] = []
    for read, index in enumerate(_probe_order(len(usable))):
        if read >= _PROBE_READS and (with_air or without):
            break
        if read >= 4 * _PROBE_READS:
            break
        path = Path(usable[index].params["image"])
        try:
            with warnings.catch_warnings():  # the case itself reports them
                warnings.simplefilter("ignore")
                image = read_image(path)
                check_not_a_mask(image, path)
        except Exception:  # noqa: BLE001 - an unreadable scan fails its own case, with its own message
            continue
        array = sitk.GetArrayViewFromImage(image)
        if float(np.min(array)) == float(np.max(array)):
            continue
        lowest = _lowest_if_not_hu(image)
        if lowest is None:
            with_air.append(path)
        else:
            without.append((path, lowest))

    def names(paths: Sequence[Path]) -> str:
        return ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")

    if with_air and without:
        raise DataError(src, f"--modality was not given and the scans are mixed: {len(with_air)} of those read look "
                             f"like CT (air below {AIR_HU:g} HU: {names(with_air)}), {len(without)} do not (no voxel "
                             f"below {AIR_HU:g} HU: {names([p for p, _ in without])}); nothing was written. Prepare "
                             "CT and MR scans from separate --src folders into separate --dst folders, each with its "
                             "--modality (ct or mr); or pass --modality ct (e.g. CTs stored without their rescale "
                             "intercept) to prepare them all as CT")
    if without:
        path, lowest = without[0]
        others = f"; nor have the {len(without) - 1} other scan(s) read" if len(without) > 1 else ""
        raise DataError(path, f"--modality was not given and this scan has no voxel below {AIR_HU:g} HU (lowest "
                              f"{lowest:g}{others}), so it does not look like a CT in Hounsfield units, which the HU "
                              f"window would flatten; nothing was written: {_NO_AIR_ADVICE}")
    if with_air:
        return "ct", f"taken from the scans: air below {AIR_HU:g} HU in the {len(with_air)} read, e.g. {_shown(with_air[0], src)}"
    return "ct", "no scan read could tell, so the former default"


def _shown(path: Path, src: str | os.PathLike) -> str:
    """``path`` as the user knows it: relative to ``src`` (a DICOM series folder is often named ``ct`` or
    ``1``, so its name alone says nothing), else as given."""
    try:
        return path.resolve().relative_to(Path(src).resolve()).as_posix()
    except ValueError:
        return str(path)


def recorded_modality(dst: Path, src: str | os.PathLike, report_path: str | os.PathLike | None) -> tuple[str, Path] | None:
    """``(modality, file)`` an earlier run of this ``src`` into ``dst`` recorded (its datalist's meta, or the
    settings of its report when it stopped before the datalist); None when there is none."""
    source = str(Path(src).resolve())
    datalist = dst / "pretrain_datalist.json"
    report = Path(report_path) if report_path is not None else dst / "report.json"
    for path in (datalist, report):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if path == datalist:
                recorded, recorded_source = data["meta"], data["meta"].get("source")
            elif data.get("desc") == "generic" and path.parent.resolve() == dst.resolve():  # as run_cases reads it
                recorded, recorded_source = data["settings"], data.get("source")
            else:
                continue
            modality = recorded.get("modality")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if recorded_source == source and modality in MODALITIES:
            return modality, path
    return None
