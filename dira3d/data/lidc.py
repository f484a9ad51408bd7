"""LIDC-IDRI → per-nodule crops and consensus masks for lung nodule segmentation (NCS).

Input: the TCIA download (``LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/*.dcm`` with the readers'
``*.xml`` next to the CT slices), or the DICOM tree plus ``--xml-dir`` holding the separately
distributed XML files (matched to a series by ``SeriesInstanceUid``).

Per CT series: read the DICOM series (:func:`dira3d.data.io.read_image`), rasterise every
reader's outlines (:mod:`dira3d.data.lidc_xml`), group the readers' nodules into physical
nodules, keep those outlined by ≥ ``min_readers`` readers, and take as consensus the voxels marked
by ≥ ``consensus`` of the readers who outlined the nodule. The image is resampled (linear) to
``spacing`` mm and put in RAS; the consensus mask is resampled (linear, as a float) onto each
crop's grid and cut at one half, which is smoother than nearest-neighbour resampling. Crops
(default 64×64×32) are centred on the consensus centroid; images are windowed to [0, 1], masks
are uint8.

Outputs in ``dst``: ``images/<case>_nKK.nii.gz``, ``labels/<case>_nKK.nii.gz``,
``manifests/<case>.json`` (what each series produced; makes runs resumable),
``lidc_datalist.json`` (training / validation / test by patient) and ``split.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from dira3d import __version__
from dira3d.data.geometry import crop_cube, resample, voxel_to_world, world_to_voxel
from dira3d.data.errors import DataWarning
from dira3d.data.io import DataError, image_to_xyz, read_image, to_ras, write_nifti, xyz_to_image
from dira3d.data.lidc_xml import (
    LidcReads,
    RoiOutline,
    consensus_fraction,
    equivalent_radius_mm,
    group_reader_nodules,
    parse_lidc_xml,
    rasterize_nodule,
)
from dira3d.data.normalize import window_hu
from dira3d.data.manifests import read_case_manifest
from dira3d.data.runner import (Case, CaseResult, add_common_arguments, batch_stopped, case_outputs, read_case_outputs, run_cases,
                                run_prepare, write_datalist)
from dira3d.data.splits import earlier_split, split_patients, write_split_file
from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.cli_help import DefaultsHelpFormatter

__all__ = ["DEFAULT_SPLIT", "SeriesInfo", "find_series", "consensus_nodules", "process_series", "prepare", "main"]

DEFAULT_SPLIT: dict[str, int] = {"training": 510, "validation": 100, "test": 408}
_TAGS = {"modality": "0008|0060", "patient": "0010|0020", "series": "0020|000e", "sop": "0008|0018",
         "position": "0020|0032"}


@dataclass(frozen=True)
class SeriesInfo:
    """A CT series found under ``src`` and its reader XML (None when none was found)."""

    folder: Path
    patient_id: str
    series_uid: str
    xml: Path | None
    error: str = ""


def _header(path: Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(path, f"is not a readable DICOM file ({str(err).splitlines()[-1][:200]})") from err
    return {name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for name, tag in _TAGS.items()}


def _lidc_xmls(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.xml")):
        with open(path, "rb") as handle:
            if b"LidcReadMessage" in handle.read(4096):
                found.append(path)
    return found


def _xml_series_uid(path: Path) -> str:
    try:
        return parse_lidc_xml(path).series_uid
    except ValueError:
        return ""


def _top_folder(src: Path, folder: Path) -> str:
    """The patient folder (first level under ``src``) that holds ``folder``."""
    return (folder.relative_to(src).parts or (folder.name,))[0]


def find_series(src: str | Path, xml_dir: str | Path | None = None) -> list[SeriesInfo]:
    """Find the CT series under ``src`` and the LIDC XML file of each.

    Args:
        src: root of the LIDC-IDRI DICOM tree.
        xml_dir: optional folder (searched recursively) of XML files matched by series UID;
            an XML file inside the series folder takes precedence.

    Returns:
        One :class:`SeriesInfo` per CT series folder (radiographs are ignored), sorted by
        patient id then folder; ``xml`` is None when no read was found.

    Raises:
        FileNotFoundError: ``src`` (or ``xml_dir``) is not a folder or holds no DICOM file.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"LIDC source folder {src} does not exist; pass the folder holding the LIDC-IDRI-0001/, LIDC-IDRI-0002/, … patient folders")
    by_uid: dict[str, Path] = {}
    if xml_dir is not None:
        if not Path(xml_dir).is_dir():
            raise FileNotFoundError(f"--xml-dir {xml_dir} is not a folder")
        for folder in sorted({p.parent for p in Path(xml_dir).rglob("*.xml")}):
            for path in _lidc_xmls(folder):
                by_uid.setdefault(_xml_series_uid(path), path)
    folders = sorted({p.parent for p in src.rglob("*.dcm")})
    if not folders:
        raise FileNotFoundError(f"no .dcm files under {src}; download the LIDC-IDRI DICOM images (TCIA) there")
    series = []
    for folder in folders:
        try:
            header = _header(next(iter(sorted(folder.glob("*.dcm")))))
        except DataError as err:  # reported as this series' failure, not the whole run's
            series.append(SeriesInfo(folder, _top_folder(src, folder), "", None, str(err)))
            continue
        if header["modality"] not in ("CT", ""):
            continue  # chest radiographs (CR/DX) of the same patients carry no CT nodule reads
        local = _lidc_xmls(folder)
        matching = [p for p in local if _xml_series_uid(p) in (header["series"], "")]
        xml = (matching or local or [None])[0] or by_uid.get(header["series"])
        patient = header["patient"] or _top_folder(src, folder)
        series.append(SeriesInfo(folder=folder, patient_id=patient, series_uid=header["series"], xml=xml))
    return sorted(series, key=lambda s: (s.patient_id, str(s.folder)))


def _slice_lookup(folder: Path, image: sitk.Image) -> Callable[[RoiOutline], int | None]:
    """Map an outline to its slice: by SOP instance UID when known, else by z position.

    ``imageZposition`` is the z of the slice's ImagePositionPatient (the world point of its first pixel), which
    moves by ``spacing_z * direction_zz`` per slice: on a gantry-tilted or oblique series that is not the slice
    spacing, so the slice is ``(z - origin_z) / step``, not the slice index of the world point ``(origin_x,
    origin_y, z)`` (off by a slice or more there). A series whose slices do not move along z has no slice by z.
    """
    positions: dict[str, tuple[float, ...]] = {}
    for path in folder.glob("*.dcm"):
        header = _header(path)
        if header["sop"] and header["position"]:
            positions[header["sop"]] = tuple(float(v) for v in header["position"].split("\\"))
    z_step = image.GetSpacing()[2] * image.GetDirection()[8]  # mm of patient z per slice

    def slice_index(roi: RoiOutline) -> int | None:
        point = positions.get(roi.sop_uid)
        if point is not None:
            k = float(world_to_voxel(image, point)[2])
        elif np.isfinite(roi.z_mm) and abs(z_step) > 1e-6:
            k = (roi.z_mm - image.GetOrigin()[2]) / z_step
        else:
            return None
        return int(round(k)) if -0.5 <= k < image.GetSize()[2] - 0.5 else None

    return slice_index


def consensus_nodules(image: sitk.Image, reads: LidcReads, slice_index: Callable[[RoiOutline], int | None], *, consensus: float = 0.5,
                      min_readers: int = 1, group_mm: float = 10.0,
                      include_outline: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Group the readers' outlines into physical nodules and compute each consensus.

    Args:
        image: the CT series as read (native grid).
        reads: the parsed XML.
        slice_index: outline → slice index (see ``_slice_lookup``).
        consensus: fraction of the nodule's readers that must mark a voxel (0 < c ≤ 1).
        min_readers: keep nodules outlined by at least this many readers.
        group_mm: linking distance of :func:`group_reader_nodules`.
        include_outline: count the outline pixels as nodule.

    Returns:
        ``(nodules, notes)``: per kept nodule a dict with ``start`` (index of the fraction box),
        ``fraction`` (x, y, z float32), ``centroid_mm``, ``readers``, ``reader_ids``,
        ``malignancy`` (list); ``notes`` say why other nodules were dropped.
    """
    spacing = np.asarray(image.GetSpacing())
    voxel_mm3 = float(np.prod(spacing))
    marks, centroids, radii, readers = [], [], [], []
    notes: list[str] = []
    for nodule in reads.nodules:
        voxels = rasterize_nodule(nodule, image.GetSize(), slice_index, include_outline)
        if not len(voxels):
            notes.append(f"reader {nodule.reader + 1} nodule {nodule.nodule_id!r}: {_NO_SLICE}")
            continue
        marks.append((nodule, voxels))
        centroids.append(voxel_to_world(image, voxels.mean(axis=0)))
        radii.append(equivalent_radius_mm(len(voxels), voxel_mm3))
        readers.append(nodule.reader)
    kept = []
    for group in group_reader_nodules(centroids, radii, readers, group_mm):
        members = [marks[i][0] for i in group]
        label = ", ".join(f"r{m.reader + 1}:{m.nodule_id}" for m in members)
        if len(group) < min_readers:
            notes.append(f"nodule [{label}]: {len(group)} reader(s) < --min-readers {min_readers}")
            continue
        start, fraction = consensus_fraction([marks[i][1] for i in group])
        inside = np.argwhere(fraction >= consensus - 1e-6)
        if not len(inside):
            notes.append(f"nodule [{label}]: no voxel marked by >= {consensus:.0%} of its {len(group)} readers")
            continue
        kept.append({
            "start": start, "fraction": fraction, "readers": len(group),
            "centroid_mm": voxel_to_world(image, inside.mean(axis=0) + start),
            "reader_ids": [m.nodule_id for m in members],
            "malignancy": [m.characteristics["malignancy"] for m in members if "malignancy" in m.characteristics],
        })
    return kept, notes


_NO_SLICE = "outlines on no slice of the series"


def _check_outlines_found(reads: LidcReads, image: sitk.Image, folder: Path, notes: list[str]) -> None:
    """Refuse an XML none of whose outlined nodules lies on a slice of the series (the read of another series: its
    series would be written with no nodule and skipped by every rerun); warn about the nodules of those that do."""
    missed = [note for note in notes if note.endswith(_NO_SLICE)]
    if not missed:
        return
    if len(missed) < len(reads.nodules):
        warnings.warn(f"{reads.path}: {len(missed)} of its {len(reads.nodules)} readers' outlined nodules lie on no "
                      f"slice of the series (imageSOP_UID and imageZposition match none) and are left out: "
                      f"{'; '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}", DataWarning, stacklevel=2)
        return
    zs = [roi.z_mm for nodule in reads.nodules for roi in nodule.rois if np.isfinite(roi.z_mm)]
    first, last = (float(voxel_to_world(image, (0, 0, k))[2]) for k in (0, image.GetSize()[2] - 1))
    where = (f"and their imageZposition values ({min(zs):.2f} to {max(zs):.2f} mm) lie outside its slices "
             f"({min(first, last):.2f} to {max(first, last):.2f} mm)" if zs else "and they have no imageZposition")
    raise DataError(reads.path, f"none of its {len(reads.nodules)} readers' outlined nodules lies on a slice of the CT "
                                f"series in {folder}: their imageSOP_UIDs match none of its {image.GetSize()[2]} slices "
                                f"{where}; it is the read of another series: put this series' own XML next to its "
                                "slices (or in --xml-dir), or move this one away")


def _crop_grid(reference: sitk.Image, start: np.ndarray, size: Sequence[int]) -> sitk.Image:
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(reference.GetSpacing())
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(tuple(voxel_to_world(reference, start)))
    return grid


def process_series(case: Case) -> dict[str, Any]:
    """Write the crops, masks and manifest of one CT series (the runner's ``process_fn``).

    Raises:
        DataError: unreadable series (e.g. a missing slice), missing or broken XML.
    """
    p = case.params
    folder = Path(p["folder"])
    if p["error"]:
        raise DataError(None, p["error"])
    if p["xml"] is None:
        raise DataError(folder, "no LIDC XML read (LidcReadMessage) for this CT series; put the *.xml next to "
                                "the slices or pass --xml-dir with the LIDC XML annotations")
    try:
        reads = parse_lidc_xml(p["xml"])
    except ValueError as err:
        raise DataError(p["xml"], str(err)) from err
    image = read_image(folder)
    nodules, notes = consensus_nodules(image, reads, _slice_lookup(folder, image), consensus=p["consensus"],
                                       min_readers=p["min_readers"], group_mm=p["group_mm"],
                                       include_outline=p["include_outline"])
    _check_outlines_found(reads, image, folder, notes)
    lo, hi = p["window"]
    ras = to_ras(resample(image, p["spacing"], "linear", default_value=lo))
    volume = image_to_xyz(ras)
    size = np.asarray(p["crop"], dtype=int)
    dst = Path(p["dst"])
    entries = []
    for number, nodule in enumerate(nodules, start=1):
        centre = world_to_voxel(ras, nodule["centroid_mm"])
        grid = _crop_grid(ras, np.round(centre).astype(int) - size // 2, size)
        # The binary consensus, resampled as a float and cut at one half, keeps the volume at any
        # --consensus (cutting the interpolated fraction at 1.0 would erode the mask).
        agreed = xyz_to_image((nodule["fraction"] >= p["consensus"] - 1e-6).astype(np.float32))
        agreed.SetSpacing(image.GetSpacing())
        agreed.SetDirection(image.GetDirection())
        agreed.SetOrigin(tuple(voxel_to_world(image, nodule["start"])))
        on_grid = sitk.Resample(agreed, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        mask = (image_to_xyz(on_grid) >= 0.5).astype(np.uint8)
        crop = window_hu(crop_cube(volume, centre, size, pad_value=lo), lo, hi)
        name = f"{case.case_id}_n{number:02d}.nii.gz"
        write_nifti(xyz_to_image(crop, grid), dst / "images" / name)
        write_nifti(xyz_to_image(mask, grid), dst / "labels" / name)
        entry = {"image": f"images/{name}", "label": f"labels/{name}", "case_id": p["patient_id"],
                 "nodule_id": number, "readers": nodule["readers"], "reader_nodule_ids": nodule["reader_ids"],
                 "voxels": int(mask.sum())}
        if nodule["malignancy"]:
            entry["malignancy"] = float(np.median(nodule["malignancy"]))
        entries.append(entry)
    manifest = {"case_id": case.case_id, "patient_id": p["patient_id"], "series_uid": reads.series_uid,
                "folder": str(folder), "xml": str(p["xml"]), "num_readers": reads.num_readers,
                "small_nodule_marks": reads.small_nodules, "nodules": entries, "dropped": notes}
    atomic_write_text(case.outputs[0], json.dumps(manifest, indent=1) + "\n")  # last: a manifest means the series is complete
    return {"nodules": len(entries), "dropped": len(notes)}


def _nodules(case: Case, fix: str) -> list[dict[str, Any]]:
    """The nodules the manifest of ``case`` lists (each crop and mask there, of this patient)."""
    return read_case_manifest(case.outputs[0], "nodules", root=case.params["dst"], case_id=case.params["patient_id"],
                              required=("case_id", "image", "label"), files=("image", "label"), fix=fix)


def _check_manifest(case: Case) -> None:
    """``check_outputs`` of :func:`run_cases`: a series whose manifest cannot be used is redone."""
    _nodules(case, "so the series does not count as done")


def _case_ids(series: list[SeriesInfo]) -> list[str]:
    ids, seen = [], {}
    for info in series:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", info.patient_id) or "patient"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}_s{seen[base]}")
    return ids


def prepare(src: str | Path, dst: str | Path, *, xml_dir: str | Path | None = None, consensus: float = 0.5,
            min_readers: int = 1, group_mm: float = 10.0, include_outline: bool = False,
            spacing: float | Sequence[float] = 1.0, crop: Sequence[int] = (64, 64, 32),
            window: Sequence[float] = (-1000.0, 1000.0), split: Sequence[int] = (510, 100, 408), seed: int = 0,
            workers: int = 1, overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare LIDC-IDRI nodule crops, masks, the datalist and the patient split.

    Args:
        src, dst: the download and the output folder.
        xml_dir: folder of XML reads when they are not next to the slices.
        consensus, min_readers, group_mm, include_outline: see :func:`consensus_nodules`.
        spacing: output voxel size in mm. crop: crop size (x, y, z) in voxels.
        window: HU window mapped to [0, 1].
        split: reference sizes (training, validation, test), scaled to the patients found.
        seed: seed of the patient split.
        workers, overwrite, dry_run, keep_going, report_path, progress: see :func:`run_cases`.

    Returns:
        One result per CT series.

    Raises:
        ValueError: a setting out of range. FileNotFoundError: no DICOM under ``src``.
    """
    if not 0 < consensus <= 1:
        raise ValueError(f"--consensus must be in (0, 1], got {consensus}")
    if min_readers < 1:
        raise ValueError(f"--min-readers must be >= 1, got {min_readers}")
    if len(crop) != 3 or min(crop) < 1:
        raise ValueError(f"--crop must be three positive sizes (x y z), got {list(crop)}")
    if len(split) != 3:
        raise ValueError(f"--split needs three sizes (training validation test), got {list(split)}")
    dst = Path(dst)
    series = find_series(src, xml_dir)
    options = {"consensus": consensus, "min_readers": min_readers, "group_mm": group_mm,
               "include_outline": include_outline, "spacing": spacing, "crop": list(crop),
               "window": list(window), "dst": str(dst)}
    cases = []
    for case_id, info in zip(_case_ids(series), series):
        outputs, bad_id = case_outputs(case_id, [(dst / "manifests", ".json")], f"{info.folder} (DICOM PatientID)")
        cases.append(Case(case_id, outputs, {**options, "folder": str(info.folder), "xml": info.xml,
                                             "patient_id": info.patient_id, "error": info.error}, bad_id))
    results = run_cases(cases, process_series, out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="lidc",
                        progress=progress, source=src, datalists=[dst / "lidc_datalist.json"],
                        settings={"window": list(window), "spacing": spacing, "crop": list(crop),
                                  "consensus": consensus, "min_readers": min_readers, "group_mm": group_mm,
                                  "include_outline": include_outline}, check_outputs=_check_manifest)
    if dry_run or batch_stopped(results, keep_going):
        return results

    def listed(case: Case, result: CaseResult) -> list[dict[str, Any]]:
        return _nodules(case, f"rerun the same command to redo series {case.case_id}") if result.ok else []

    manifests = read_case_outputs(cases, results, listed, keep_going=keep_going, out_dir=dst, report_path=report_path)
    if manifests is None:  # a manifest that cannot be read failed its case, and the batch stops there
        return results
    rule = {"dataset": "lidc", "method": "sorted patient ids permuted by numpy default_rng(seed), cut in order",
            "seed": seed, "reference_sizes": dict(zip(DEFAULT_SPLIT, split))}
    parts = split_patients(sorted({info.patient_id for info in series}),
                           dict(zip(DEFAULT_SPLIT, split)),
                           seed, earlier=earlier_split(dst / "split.json", rule))  # a rerun keeps its patients' parts
    part_of = {pid: name for name, pids in parts.items() for pid in pids}
    splits: dict[str, list[dict]] = {name: [] for name in DEFAULT_SPLIT}
    for nodules in manifests:
        for entry in nodules or ():
            splits[part_of[entry["case_id"]]].append({**entry, "image": dst / entry["image"], "label": dst / entry["label"]})
    write_split_file(dst / "split.json", parts, rule)
    meta = {"dataset": "lidc-idri", "command": "dira3d prepare lidc", "window": list(window),
            "spacing": spacing, "crop": list(crop), "consensus": consensus, "min_readers": min_readers,
            "group_mm": group_mm, "include_outline": include_outline,
            "split": rule, "source": str(Path(src).resolve()), "version": __version__}
    write_datalist(dst / "lidc_datalist.json", splits, meta,
                   split_advice=f"--split {' '.join(map(str, split))} is cut over the {len(part_of)} patient(s) found, "
                                "so a part is empty below 3 patients, or when its patients kept no nodule: prepare more "
                                "patients, or change --split",
                   asked_empty={name: f"--split {' '.join(map(str, split))} gives it size 0"  # asked for none
                                for name, size in zip(DEFAULT_SPLIT, split) if size == 0})
    return results


def main(argv: list[str] | None = None) -> int:
    """``dira3d prepare lidc``: parse options, run :func:`prepare`, print a summary."""
    parser = argparse.ArgumentParser(prog="dira3d prepare lidc", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--xml-dir", type=Path, default=None, help="folder of LIDC XML reads (matched by series UID)")
    parser.add_argument("--consensus", type=float, default=0.5, help="fraction of readers per voxel (default 0.5)")
    parser.add_argument("--min-readers", type=int, default=1, help="keep nodules outlined by >= N readers (default 1)")
    parser.add_argument("--group-mm", type=float, default=10.0, help="centroid distance linking readers' nodules")
    parser.add_argument("--include-outline", action="store_true", help="count outline pixels as nodule")
    parser.add_argument("--spacing", type=float, default=1.0, help="output voxel size in mm (default 1)")
    parser.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"))
    parser.add_argument("--window", type=float, nargs=2, default=[-1000.0, 1000.0], metavar=("LO", "HI"))
    parser.add_argument("--split", type=int, nargs=3, default=[510, 100, 408], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    args = parser.parse_args(argv)
    return run_prepare("dira3d prepare lidc", prepare, args, xml_dir=args.xml_dir, consensus=args.consensus,
                       min_readers=args.min_readers, group_mm=args.group_mm, include_outline=args.include_outline,
                       spacing=args.spacing, crop=args.crop, window=args.window, split=args.split, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
