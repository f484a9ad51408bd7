"""PE-CAD → 64³ candidate cubes with patient-level 3-fold cross-validation (ECC).

PE-CAD (121 CTPA scans with the candidate lists of a pulmonary-embolism CAD system) has no
public standard layout, so dira3d defines one::

    PE-CAD/
      volumes/<patient_id>.nii.gz      one CTPA per patient: .nii.gz .nii .nrrd .nhdr .mha .mhd,
      volumes/<patient_id>/*.dcm       or a folder holding its DICOM series
      candidates.csv                   patient_id,x,y,z,coords,label   (more columns are ignored)

``coords`` is ``world`` (x, y, z in mm, ITK/DICOM physical LPS coordinates, as in LUNA16) or
``voxel`` (0-based index x = column, y = row, z = slice of the volume as SimpleITK reads it, not
NumPy's (z, y, x)); ``label`` is 1 for a true embolus, 0 for a false positive.

Each volume is reoriented to RAS, windowed (HU [−1000, 1000] → [0, 1]) and optionally resampled;
each candidate becomes ``cubes/<patient_id>/<row>.nii.gz`` (row = 0-based data row of the CSV),
a cube (default 64×64×64) centred on it that keeps its place in the world. Bad rows — a patient
without a volume, a coordinate outside its volume, a malformed value — are reported per patient
in ``report.json``; with ``--keep-going`` the good candidates are still written and listed.
``pecad_datalist.json`` lists every cube under ``training`` with its ``fold`` (0 … 2): patients
are assigned to folds by the rule of :mod:`dira3d.data.splits`, so no patient is in two folds;
``split.json`` records the assignment. Use fold k as the test set and the others for training.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dira3d import __version__
from dira3d.data.errors import join_errors, record_or_raise
from dira3d.data.generic import normalise_image
from dira3d.data.geometry import crop_cube, voxel_to_world, world_to_voxel
from dira3d.data.io import IMAGE_SUFFIXES, DataError, image_to_xyz, read_image, write_nifti, xyz_to_image
from dira3d.data.manifests import read_case_manifest
from dira3d.data.pipeline import add_ct_arguments
from dira3d.data.runner import (Case, CaseResult, add_common_arguments, batch_stopped, case_outputs, read_case_outputs, run_cases,
                                run_prepare, write_datalist)
from dira3d.data.splits import assign_folds, write_split_file
from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.files import read_json, read_text

__all__ = ["CSV_COLUMNS", "find_volumes", "read_candidates", "prepare", "main"]

CSV_COLUMNS = ("patient_id", "x", "y", "z", "coords", "label")


def find_volumes(folder: str | Path, problems: dict[str, str] | None = None) -> dict[str, Path]:
    """Patient id → volume file or DICOM folder in ``folder`` (see the module docstring).

    Args:
        problems: when given, a patient with two volumes is recorded here as ``{patient: message}``
            instead of raised (:func:`~dira3d.data.errors.record_or_raise`).

    Raises:
        DataError: ``folder`` is missing or empty; without ``problems``, it holds two volumes of one patient.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "volumes folder not found; put one CTPA per patient in <src>/volumes/ or pass --volumes")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), "")
        if path.is_dir() and any(path.glob("*.dcm")):
            pid = path.name
        elif path.is_file() and suffix:
            pid = path.name[: -len(suffix)]
        else:
            continue
        if pid in found:
            record_or_raise(problems, pid, DataError(path, f"patient {pid} already has volume {found[pid].name}; "
                                                           "keep one volume per patient"))
            continue
        found[pid] = path
    if not found:
        raise DataError(folder, f"holds no volume ({', '.join(IMAGE_SUFFIXES)} files or DICOM folders)")
    return found


def read_candidates(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read the candidates CSV, keeping malformed rows as errors to report with their patient.

    Returns:
        Patient id → rows ``{"row", "xyz", "coords", "label"}`` or ``{"row", "error"}``
        (``row`` = 0-based data row).

    Raises:
        DataError: missing file or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "candidates CSV not found; put candidates.csv in --src or pass --candidates")
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    text = read_text(path, "candidates CSV", "fix it there (the PE-CAD layout: docs/data.md)", encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"lacks column(s) {missing}; the PE-CAD layout needs {','.join(CSV_COLUMNS)}")
    for row, record in enumerate(reader):
        pid = (record["patient_id"] or "").strip()
        coords = (record["coords"] or "").strip().lower()
        try:
            xyz = [float(record[k]) for k in ("x", "y", "z")]
            label = float(record["label"])
        except (TypeError, ValueError):
            out[pid].append({"row": row, "error": "non-numeric x, y, z or label"})
            continue
        if not np.all(np.isfinite(xyz)) or label not in (0, 1) or coords not in ("world", "voxel"):
            out[pid].append({"row": row, "error": f"needs finite x, y, z, coords world|voxel (got {coords!r}) "
                                                  f"and label 0|1 (got {record['label']!r})"})
            continue
        out[pid].append({"row": row, "xyz": xyz, "coords": coords, "label": int(label)})
    return dict(out)


def _manifest_paths(case: Case) -> tuple[Path, Path]:
    done = case.outputs[0]
    return done, done.with_name(done.name.replace(".json", ".partial.json"))


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def _cubes(case: Case, path: Path, fix: str) -> list[dict[str, Any]]:
    """The cubes the manifest ``path`` of ``case`` lists (each a file there, of this patient)."""
    return read_case_manifest(path, "candidates", root=case.params["dst"], case_id=case.case_id,
                              required=("image", "case_id", "label", "candidate"), files=("image",), fix=fix)


def _check_manifest(case: Case) -> None:
    """``check_outputs`` of :func:`run_cases`: a patient whose manifest cannot be used, or was made from
    other CSV rows (a label, coordinate or row added, removed or moved since), is redone.

    A manifest written before the rows were recorded in it is compared by row number and label."""
    fix = "so the patient does not count as done"
    path = case.outputs[0]
    cubes = _cubes(case, path, fix)
    recorded = read_json(path, "case manifest", fix).get("rows")
    if recorded is None:
        changed = sorted((c["candidate"], c["label"]) for c in cubes) != sorted(
            (r["row"], r.get("label")) for r in case.params["rows"])
    else:
        changed = recorded != json.loads(json.dumps(case.params["rows"]))
    if changed:
        raise DataError(path, f"lists the cubes of other rows of {case.params['csv']} for patient {case.case_id} "
                              "(the CSV was changed since), so the patient does not count as done")


def _process_patient(case: Case, window: Sequence[float], spacing: Sequence[float] | None,
                     cube_size: Sequence[int]) -> dict:
    p = case.params
    csv_path = p["csv"]
    done, partial_path = _manifest_paths(case)
    partial_path.unlink(missing_ok=True)  # one of an earlier run; a partial manifest lists this run's cubes
    if p["volume"] is None:
        rows = ", ".join(str(r["row"] + 1) for r in p["rows"])
        raise DataError(csv_path, f"data row(s) {rows} name patient {case.case_id!r}, which has no volume in "
                                  f"{p['volumes']} (expected {case.case_id}.nii.gz or a DICOM folder {case.case_id}/)")
    original = read_image(p["volume"])
    volume = normalise_image(original, "ct", window, spacing=spacing, path=p["volume"])
    array = image_to_xyz(volume)
    size = np.asarray(cube_size, dtype=int)
    written, rejected = [], []
    for cand in p["rows"]:
        if "error" in cand:
            rejected.append(f"row {cand['row'] + 1} (candidate {cand['row']}): {cand['error']}")
            continue
        # Both kinds are checked on the grid they refer to: the volume as stored.
        index = np.asarray(cand["xyz"]) if cand["coords"] == "voxel" else world_to_voxel(original, cand["xyz"])
        if np.any(index < -0.5) or np.any(index >= np.asarray(original.GetSize()) - 0.5):
            rejected.append(f"row {cand['row'] + 1} (candidate {cand['row']}): {cand['coords']} ({', '.join(f'{v:g}' for v in cand['xyz'])}) "
                            f"is outside the volume (size {original.GetSize()})")
            continue
        world = voxel_to_world(original, index)
        centre = np.round(world_to_voxel(volume, world))
        cube = xyz_to_image(crop_cube(array, centre, size, pad_value=0.0))
        cube.SetSpacing(volume.GetSpacing())
        cube.SetDirection(volume.GetDirection())
        cube.SetOrigin(tuple(voxel_to_world(volume, centre - size // 2)))  # the cube keeps its world place
        name = f"{cand['row']:07d}.nii.gz"
        write_nifti(cube, Path(p["dst"]) / "cubes" / case.case_id / name)
        written.append({"image": f"cubes/{case.case_id}/{name}", "case_id": case.case_id, "label": cand["label"],
                        "candidate": cand["row"], "world_mm": [round(float(v), 3) for v in world]})
    manifest = {"case_id": case.case_id, "volume": str(p["volume"]), "candidates": written, "rejected": rejected,
                "rows": p["rows"]}
    if rejected:
        # Not the case's declared output: the patient is redone (and its rows reported) on every run.
        _write_manifest(partial_path, manifest)
        raise DataError(csv_path, f"patient {case.case_id}: {len(rejected)} bad row(s) skipped, "
                                  f"{len(written)} cube(s) written: " + "; ".join(rejected[:5])
                        + ("; …" if len(rejected) > 5 else "") + " — fix or remove these rows")
    _write_manifest(done, manifest)
    return {"candidates": len(written), "positives": sum(c["label"] for c in written)}


def prepare(src: str | Path, dst: str | Path, *, volumes: str | Path | None = None,
            candidates: str | Path | None = None, window: Sequence[float] = (-1000.0, 1000.0),
            spacing: Sequence[float] | None = None, cube_size: Sequence[int] = (64, 64, 64), folds: int = 3,
            seed: int = 0, workers: int = 1, overwrite: bool = False, dry_run: bool = False,
            keep_going: bool = False, report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare PE-CAD candidate cubes and the fold assignment under ``dst``.

    Args:
        volumes: folder of volumes (default ``src/volumes``).
        candidates: candidates CSV (default ``src/candidates.csv``).
        window: HU window mapped to [0, 1]. spacing: resample (mm, x y z); ``None`` = native.
        cube_size: cube size (x, y, z) in voxels.
        folds: number of cross-validation folds (by patient).
        seed: seed of the fold assignment.
        workers, overwrite, dry_run, keep_going, report_path, progress: see :func:`run_cases`.

    Returns:
        One result per patient named in the CSV.

    Raises:
        DataError: missing volumes folder or CSV, missing CSV columns. ValueError: bad settings.
    """
    if len(cube_size) != 3 or min(cube_size) < 1:
        raise ValueError(f"--cube-size must be three positive sizes (x y z), got {list(cube_size)}")
    src, dst = Path(src), Path(dst)
    volume_dir = Path(volumes) if volumes else src / "volumes"
    csv_path = Path(candidates) if candidates else src / "candidates.csv"
    problems: dict[str, str] = {}
    found = find_volumes(volume_dir, problems)
    table = read_candidates(csv_path)
    fold_of = assign_folds(sorted(table), folds, seed)
    cases = []
    for pid, rows in sorted(table.items()):
        outputs, bad_id = case_outputs(pid or "_empty", [(dst / "manifests", ".json")], f"{csv_path} patient_id")
        cases.append(Case(pid or "(empty patient_id)", outputs, {"rows": rows, "volume": found.get(pid), "csv": csv_path,
                                                                 "volumes": volume_dir, "dst": str(dst)},
                          join_errors(bad_id, problems.get(pid, ""))))
    process = partial(_process_patient, window=tuple(window), spacing=None if spacing is None else tuple(spacing),
                      cube_size=tuple(int(s) for s in cube_size))
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="pecad", progress=progress,
                        source=src, datalists=[dst / "pecad_datalist.json"],
                        settings={"window": list(window), "spacing": None if spacing is None else list(spacing),
                                  "cube_size": [int(s) for s in cube_size]}, check_outputs=_check_manifest)
    if dry_run or batch_stopped(results, keep_going):
        return results

    def listed(case: Case, result: CaseResult) -> list[dict[str, Any]]:
        """A done patient's cubes; of a failed one, the good cubes its partial manifest of this run lists."""
        if case.error or not (result.ok or result.status == "failed"):
            return []
        done, partial_path = _manifest_paths(case)
        if not result.ok and not partial_path.is_file():
            return []
        return _cubes(case, done if result.ok else partial_path, f"rerun the same command to redo patient {case.case_id}")

    manifests = read_case_outputs(cases, results, listed, keep_going=keep_going, out_dir=dst, report_path=report_path)
    if manifests is None:  # a manifest that cannot be read failed its patient, and the batch stops there
        return results
    entries = [{**item, "image": dst / item["image"], "fold": fold_of[item["case_id"]]}
               for items in manifests for item in items or ()]
    rule = {"dataset": "pecad", "method": "sorted patient ids permuted by numpy default_rng(seed), fold = position % k",
            "seed": seed, "folds": folds}
    write_split_file(dst / "split.json", {"folds": fold_of}, rule)
    unused = sorted(set(found) - set(table))
    meta = {"dataset": "pecad", "window": list(window), "spacing": None if spacing is None else list(spacing),
            "orientation": "RAS", "cube_size": list(cube_size), "folds": rule, "candidates_csv": str(csv_path.resolve()),
            "volumes_without_candidates": unused, "source": str(src.resolve()), "version": __version__}
    write_datalist(dst / "pecad_datalist.json", {"training": entries}, meta,
                   split_advice="every cube of the patients prepared goes to 'training' (--folds only deals them into "
                                "folds): the FAILED lines say why a patient gave none; check --volumes and --candidates "
                                "(its patient_id rows must name volumes found there)")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare pecad", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--volumes", type=Path, default=None, help="folder of CTPA volumes (default SRC/volumes)")
    parser.add_argument("--candidates", type=Path, default=None, help="candidates CSV (default SRC/candidates.csv)")
    add_ct_arguments(parser, "resample to this spacing in mm (default native)")
    parser.add_argument("--cube-size", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"),
                        help="candidate cube size in voxels (default 64 64 64)")
    parser.add_argument("--folds", type=int, default=3, help="cross-validation folds by patient (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dira3d prepare pecad``: parse options, run :func:`prepare`, print a summary."""
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare pecad", prepare, args, volumes=args.volumes, candidates=args.candidates,
                       window=args.window, spacing=args.spacing, cube_size=args.cube_size, folds=args.folds,
                       seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
