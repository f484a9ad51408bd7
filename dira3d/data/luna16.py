"""LUNA16 → pretraining volumes + NCC candidate cubes (nodule false-positive reduction).

Input layout (as downloaded): ``subset0/ … subset9/`` holding ``<seriesuid>.mhd`` + ``.raw``,
``candidates_V2.csv`` (or ``candidates.csv``) with columns ``seriesuid,coordX,coordY,coordZ,class``
and optionally ``annotations.csv`` (``…,diameter_mm``); coordinates are world millimetres (ITK/LPS).

Each scan is read once: it is reoriented to RAS, windowed (HU [−1000, 1000] → [0, 1]), optionally
resampled, written to ``volumes/<seriesuid>.nii.gz``, and every kept candidate of that scan is cut
from it as a 64×64×32 cube centred on the candidate (world → voxel with origin, spacing and
direction) and written to ``cubes/<seriesuid>/<row>.nii.gz`` (``row`` = data row of the CSV).
Datalists: ``pretrain_datalist.json`` (volumes; training / validation / test by subset plus one
``subsetN`` key per subset) and ``ncc_datalist.json`` (cubes with label 0/1). Official split:
subsets 0–4 train, 5–6 validation, 7–9 test.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
import zlib
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from dira3d.data.errors import join_errors, record_or_raise
from dira3d.data.generic import normalise_image
from dira3d.data.geometry import crop_cube, voxel_to_world, world_to_voxel
from dira3d.data.io import DataError, image_to_xyz, read_image, write_nifti, xyz_to_image
from dira3d.data.pipeline import add_ct_arguments
from dira3d.data.runner import Case, CaseResult, add_common_arguments, batch_stopped, run_cases, run_prepare, case_outputs, safe_case_path, write_datalist
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.files import read_text

__all__ = ["OFFICIAL_SPLIT", "find_scans", "read_candidates", "read_annotations", "prepare", "main"]

OFFICIAL_SPLIT = {"training": (0, 1, 2, 3, 4), "validation": (5, 6), "test": (7, 8, 9)}
# the option suffix of each split (--train-subsets, --val-subsets, --test-subsets)
_FLAGS = {"training": "train", "validation": "val", "test": "test"}
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def find_scans(src: str | Path, problems: dict[str, str] | None = None) -> dict[str, tuple[int, Path]]:
    """``{seriesuid: (subset, mhd path)}`` for every ``subsetN/*.mhd`` under ``src``.

    Args:
        problems: when given, a seriesuid found in two subsets is recorded here as
            ``{seriesuid: message}`` instead of raised (:func:`~dira3d.data.errors.record_or_raise`).

    Raises:
        DataError: ``src`` not a folder, no ``subsetN`` folder or no scan in them; without ``problems``, a seriesuid found in two subsets.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must be the LUNA16 root holding subset0/ … subset9/")
    folders = sorted((p for p in src.glob("subset*") if p.is_dir() and re.fullmatch(r"subset\d+", p.name)),
                     key=lambda p: int(p.name[6:]))
    if not folders:
        raise DataError(src, "holds no subset0 … subset9 folders; --src must be the LUNA16 root (extract the subset zips there)")
    scans: dict[str, tuple[int, Path]] = {}
    for folder in folders:
        for mhd in sorted(folder.glob("*.mhd")):
            uid = mhd.name[: -len(".mhd")]
            if uid in scans:
                record_or_raise(problems, uid, DataError(mhd, f"seriesuid {uid} is also in "
                                                              f"{scans[uid][1].parent.name}; remove the duplicate"))
                continue
            scans[uid] = (int(folder.name[6:]), mhd)
    if not scans:  # e.g. each zip extracted into its own subsetN/, giving subsetN/subsetN/*.mhd
        nested = next((p.parent for f in folders for p in sorted(f.glob("*/*.mhd"))), None)
        hint = (f"the scans are one level deeper, in {nested}: move them up into {nested.parent}"
                if nested else "extract the subset zips into --src (each holds its subsetN/ of .mhd/.raw files)")
        raise DataError(src, f"its subset folders ({', '.join(f.name for f in folders)}) hold no .mhd scans; {hint}")
    return scans


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(read_text(path, "LUNA16 CSV", "re-download it", encoding="utf-8-sig"), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"lacks column(s) {missing}; expected a LUNA16 CSV with {', '.join(columns)}")
    return list(enumerate(reader))


def _floats(path: Path, row: int, record: dict[str, str], keys: Sequence[str]) -> list[float]:
    try:
        values = [float(record[k]) for k in keys]
    except (TypeError, ValueError) as err:
        raise DataError(path, f"data row {row + 1} has a non-numeric value in {list(keys)}: {err}") from err
    if not all(np.isfinite(values)):
        raise DataError(path, f"data row {row + 1} has a NaN/Inf value in {list(keys)}")
    return values


def _record_row(problems: dict[str, str] | None, path: Path, row: int, record: dict[str, str], err: DataError) -> None:
    """A malformed data row: a failed case of its own, ``<file name> data row N``."""
    record_or_raise(problems, f"{path.name} data row {row + 1}", err,
                    f" (seriesuid {record['seriesuid']}, candidate {row} in the datalist and cubes/); fix or remove the row")


def read_candidates(path: str | Path, problems: dict[str, str] | None = None
                    ) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """``{seriesuid: [(row, x_mm, y_mm, z_mm, label), ...]}`` from a candidates CSV.

    Args:
        problems: when given, a malformed row is left out and recorded here as
            ``{"<file name> data row N": message}`` instead of raised
            (:func:`~dira3d.data.errors.record_or_raise`).

    Raises:
        DataError: missing columns; without ``problems``, also non-numeric coordinates or a class other than 0/1.
    """
    path = Path(path)
    out: dict[str, list[tuple[int, float, float, float, int]]] = defaultdict(list)
    for row, record in _read_csv(path, CANDIDATE_COLUMNS):
        try:
            x, y, z, label = _floats(path, row, record, ("coordX", "coordY", "coordZ", "class"))
            if label not in (0, 1):
                raise DataError(path, f"data row {row + 1} has class {record['class']!r}; classes must be 0 or 1")
        except DataError as err:
            _record_row(problems, path, row, record, err)
            continue
        out[record["seriesuid"]].append((row, x, y, z, int(label)))
    return dict(out)


def read_annotations(path: str | Path, problems: dict[str, str] | None = None
                     ) -> dict[str, list[tuple[float, float, float, float]]]:
    """``{seriesuid: [(x_mm, y_mm, z_mm, diameter_mm), ...]}`` from ``annotations.csv``; ``problems``
    as in :func:`read_candidates`."""
    path = Path(path)
    out: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for row, record in _read_csv(path, ANNOTATION_COLUMNS):
        try:
            out[record["seriesuid"]].append(tuple(_floats(path, row, record, ANNOTATION_COLUMNS[1:])))
        except DataError as err:
            _record_row(problems, path, row, record, err)
    return dict(out)


def _keep_candidates(uid: str, candidates: list, max_negatives: int | None, seed: int) -> list:
    """All positives and at most ``max_negatives`` negatives, chosen by a generator seeded per scan."""
    if max_negatives is None:
        return candidates
    negatives = [c for c in candidates if c[4] == 0]
    if len(negatives) <= max_negatives:
        return candidates
    rng = np.random.default_rng([seed, zlib.crc32(uid.encode())])  # same choice in every run and worker
    chosen = {negatives[i][0] for i in rng.choice(len(negatives), size=max_negatives, replace=False)}
    return [c for c in candidates if c[4] == 1 or c[0] in chosen]


def _process_scan(case: Case, window: Sequence[float], spacing: Sequence[float] | None,
                  cube_size: Sequence[int]) -> dict:
    mhd = case.params["mhd"]
    volume = normalise_image(read_image(mhd), "ct", window, spacing=spacing, path=mhd)
    write_nifti(volume, case.outputs[0])
    candidates = case.params["candidates"]
    if not candidates:
        return {"candidates": 0, "size": list(volume.GetSize())}
    array = image_to_xyz(volume)
    centres = world_to_voxel(volume, np.array([c[1:4] for c in candidates]))
    half = np.asarray(cube_size) // 2
    outside = 0
    for centre, out_path in zip(centres, case.outputs[1:]):
        index = np.round(centre)
        outside += int(np.any(index < 0) or np.any(index >= array.shape))
        cube = xyz_to_image(crop_cube(array, index, cube_size, pad_value=0.0))
        # the cube keeps its place in the world: origin = world position of its first voxel
        cube.SetSpacing(volume.GetSpacing())
        cube.SetDirection(volume.GetDirection())
        cube.SetOrigin(tuple(voxel_to_world(volume, index - half)))
        write_nifti(cube, out_path)
    return {"candidates": len(candidates), "positives": sum(c[4] for c in candidates),
            "centre_outside_volume": outside, "size": list(volume.GetSize())}


def _diameter(candidate: tuple, nodules: list[tuple[float, float, float, float]]) -> float | None:
    """Diameter of the annotated nodule that contains a positive candidate (within its radius + 1 mm)."""
    best = None
    for x, y, z, d in nodules:
        dist = float(np.linalg.norm(np.subtract(candidate[1:4], (x, y, z))))
        if dist <= d / 2 + 1.0 and (best is None or dist < best[0]):
            best = (dist, d)
    return None if best is None else best[1]


def prepare(src: str | Path, dst: str | Path, *, window: Sequence[float] = (-1000.0, 1000.0),
            spacing: Sequence[float] | None = None, cube_size: Sequence[int] = (64, 64, 32), cubes: bool = True,
            candidates: str | Path | None = None, max_negatives_per_scan: int | None = None, seed: int = 0,
            splits: dict[str, Sequence[int]] | None = None, workers: int = 1, overwrite: bool = False,
            dry_run: bool = False, keep_going: bool = False, report_path: str | Path | None = None,
            progress: bool = True) -> list[CaseResult]:
    """Prepare LUNA16 under ``dst`` (see the module docstring for the outputs).

    Args:
        candidates: the candidates CSV (default ``src/candidates_V2.csv``, else ``src/candidates.csv``).
        max_negatives_per_scan: keep every positive and at most this many negatives per scan
            (seeded random choice); ``None`` keeps all (≈ 750k cubes for the full dataset).
        splits: ``{"training": subsets, "validation": subsets, "test": subsets}``; default official.
        cubes: ``False`` writes the pretraining volumes only.

    A malformed CSV row (non-numeric or NaN coordinate, class not 0/1) is a failed case of its
    own, ``<csv name> data row N``, listed first: it stops the batch unless ``keep_going``, when
    every scan and every good row is still prepared.

    Raises:
        DataError: bad layout, CSV without the LUNA16 columns. ValueError: overlapping splits or bad settings.
    """
    src, dst = Path(src), Path(dst)
    splits = {k: tuple(v) for k, v in (splits or OFFICIAL_SPLIT).items()}
    seen: dict[int, str] = {}
    for name, subsets in splits.items():
        for s in subsets:
            if s in seen:
                raise ValueError(f"subset {s} is in both the {seen[s]} and the {name} split; splits must be disjoint")
            seen[s] = name
    if max_negatives_per_scan is not None and max_negatives_per_scan < 0:
        raise ValueError(f"--max-negatives-per-scan must be >= 0, got {max_negatives_per_scan}")
    problems: dict[str, str] = {}
    scans = find_scans(src, problems)
    table: dict[str, list] = {}
    nodules: dict[str, list] = {}
    csv_path = None
    cases = []
    if cubes:
        csv_path = Path(candidates) if candidates else next(
            (p for p in (src / "candidates_V2.csv", src / "candidates.csv") if p.is_file()), None)
        if csv_path is None or not csv_path.is_file():
            raise DataError(csv_path or src, "candidates CSV not found; put candidates_V2.csv in --src, "
                                             "pass --candidates PATH, or use --no-cubes")
        rows: dict[str, str] = {}  # malformed rows: failed cases of their own, listed first
        table = read_candidates(csv_path, rows)
        if (src / "annotations.csv").is_file():
            nodules = read_annotations(src / "annotations.csv", rows)
        cases += [Case(name, [], error=message) for name, message in rows.items()]
    for uid, (subset, mhd) in scans.items():
        kept = _keep_candidates(uid, table.get(uid, []), max_negatives_per_scan, seed)
        outputs, bad_id = case_outputs(uid, [(dst / "volumes", ".nii.gz")], mhd)
        if not bad_id:
            outputs += [safe_case_path(dst / "cubes" / uid, f"{c[0]:07d}", ".nii.gz") for c in kept]
        cases.append(Case(uid, outputs, {"mhd": mhd, "subset": subset, "candidates": kept},
                          join_errors(bad_id, problems.get(uid, ""))))
    process = partial(_process_scan, window=tuple(window), spacing=None if spacing is None else tuple(spacing),
                      cube_size=tuple(int(s) for s in cube_size))
    results = run_cases(cases, process, out_dir=dst, workers=workers, overwrite=overwrite, dry_run=dry_run,
                        keep_going=keep_going, report_path=report_path, desc="luna16", progress=progress,
                        source=src, datalists=[dst / "pretrain_datalist.json", dst / "ncc_datalist.json"],
                        settings={"window": list(window), "spacing": None if spacing is None else list(spacing),
                                  "cube_size": [int(s) for s in cube_size]})
    if dry_run or batch_stopped(results, keep_going):
        return results

    volumes: dict[str, list[dict]] = {name: [] for name in splits}
    ncc: dict[str, list[dict]] = {name: [] for name in splits}
    by_subset: dict[str, list[dict]] = defaultdict(list)
    for case, result in zip(cases, results):
        if not result.ok:
            continue
        subset = case.params["subset"]
        entry = {"image": case.outputs[0], "case_id": case.case_id, "subset": subset}
        by_subset[f"subset{subset}"].append(entry)
        if subset not in seen:
            continue
        volumes[seen[subset]].append(entry)
        for cand, cube in zip(case.params["candidates"], case.outputs[1:]):
            item = {"image": cube, "case_id": case.case_id, "label": cand[4], "subset": subset,
                    "candidate": cand[0], "world_mm": list(cand[1:4])}
            if cand[4] == 1 and (d := _diameter(cand, nodules.get(case.case_id, []))) is not None:
                item["diameter_mm"] = d
            ncc[seen[subset]].append(item)
    meta = {"dataset": "luna16", "window": list(window), "spacing": None if spacing is None else list(spacing),
            "orientation": "RAS", "splits": {k: list(v) for k, v in splits.items()}, "source": str(src.resolve())}
    asked = ", ".join(f"{name} {' '.join(map(str, subsets))}" for name, subsets in splits.items())
    found = ", ".join(sorted(by_subset, key=lambda s: int(s[6:]))) or "none prepared"
    advice = (f"check --train-subsets / --val-subsets / --test-subsets ({asked}) against the subsets found ({found}): "
              "a partial download fills only the splits of its subsets")
    # a split given no subset (e.g. `--val-subsets` alone) asked for no such list: a note, not the warning
    asked = {name: f"--{_FLAGS[name]}-subsets lists no subset" for name, subsets in splits.items() if not subsets}
    write_datalist(dst / "pretrain_datalist.json", {**volumes, **dict(sorted(by_subset.items()))}, meta,
                   split_advice=advice, asked_empty=asked)
    if cubes:
        unmatched = sorted(set(table) - set(scans))
        write_datalist(dst / "ncc_datalist.json", ncc,
                       {**meta, "cube_size": list(cube_size), "candidates_csv": str(csv_path.resolve()),
                        "max_negatives_per_scan": max_negatives_per_scan, "seed": seed,
                        "candidate_scans_not_found": len(unmatched)}, split_advice=advice, asked_empty=asked)
        if unmatched:
            print(f"note: {len(unmatched)} scan(s) in {csv_path.name} are not in the subsets (e.g. {unmatched[0]})",
                  file=sys.stderr)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare luna16", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    add_ct_arguments(parser, "resample to this spacing in mm (default: native, as the reference)")
    parser.add_argument("--cube-size", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--candidates", type=Path, default=None,
                        help="candidates CSV (default SRC/candidates_V2.csv, else SRC/candidates.csv)")
    parser.add_argument("--no-cubes", action="store_true", help="write the pretraining volumes only")
    parser.add_argument("--max-negatives-per-scan", type=int, default=None,
                        help="keep all positives and at most N negatives per scan (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the negative subsampling")
    for name, default in OFFICIAL_SPLIT.items():
        parser.add_argument(f"--{_FLAGS[name]}-subsets", type=int, nargs="*", default=list(default), metavar="N",
                            help=f"subsets of the {name} split (default {' '.join(map(str, default))})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare luna16", prepare, args, window=args.window, spacing=args.spacing,
                       cube_size=args.cube_size, cubes=not args.no_cubes, candidates=args.candidates,
                       max_negatives_per_scan=args.max_negatives_per_scan, seed=args.seed,
                       splits={"training": args.train_subsets, "validation": args.val_subsets,
                               "test": args.test_subsets})
