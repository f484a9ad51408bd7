"""Chest-CT-like phantoms in the LUNA16 layout: the embedded default data of dira3d.

Nothing may be downloaded at run time, so the demo and the tests need data that looks enough like
a chest CT for pretraining and nodule false-positive reduction to mean something:

- an elliptic body of soft tissue (≈ 40 HU) under a fat layer (≈ −100 HU), air (−1000 HU) around;
- two lungs of parenchyma near −850 HU with smooth random texture;
- mediastinum and heart between the lungs, a vertebra of bone (≈ 700 HU) behind;
- branching vessels (≈ 40 HU) that start at each hilum and thin towards the periphery;
- nodules of varied diameter (4–20 mm) and density (solid ≈ 0 HU or ground-glass ≈ −500 HU);
- candidates: every nodule (class 1) and false positives (class 0) on vessel branch points and
  in plain parenchyma, as a CAD system would propose them.

Written exactly as LUNA16 ships: ``subsetK/<seriesuid>.mhd`` + ``.raw`` (int16 HU, LPS world
coordinates with a non-zero origin), ``annotations.csv`` (seriesuid, coordX, coordY, coordZ,
diameter_mm) and ``candidates.csv`` / ``candidates_V2.csv`` (seriesuid, coordX, coordY, coordZ,
class), coordinates in millimetres. Everything is drawn from one seeded NumPy generator.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from dira3d.utils.atomic import FolderNotWritableError, check_writable
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.interrupts import WrittenFiles, interrupt_exit_code, interrupted_word, sigterm_as_interrupt

__all__ = ["MIN_SIZE", "PhantomCase", "make_phantom", "write_luna16_phantoms", "main"]

MIN_SIZE = 24  # voxels per axis of a phantom, below which it cannot hold two lungs

AIR, FAT, SOFT, LUNG, BONE = -1000.0, -100.0, 40.0, -850.0, 700.0


@dataclass
class PhantomCase:
    """One phantom: its HU volume in (x, y, z) order and its findings in voxel coordinates."""

    volume: np.ndarray  # int16 HU, (x, y, z)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    nodules: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (centre voxel, diameter mm)
    false_positives: list[np.ndarray] = field(default_factory=list)  # centre voxels

    def to_world(self, index: np.ndarray) -> np.ndarray:
        """Voxel index → LPS millimetres (identity direction, as in most LUNA16 scans)."""
        return np.asarray(self.origin) + np.asarray(index, dtype=float) * np.asarray(self.spacing)


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32)[tuple(slice(None) if a == i else None for a in range(3))] * s
            for i, (n, s) in enumerate(zip(shape, spacing))]


def _ellipsoid(grid: list[np.ndarray], centre_mm: np.ndarray, radii_mm: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii_mm)) <= 1.0


def _draw_tube(hu: np.ndarray, spacing: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, value: float,
               inside: np.ndarray) -> None:
    """Set voxels within ``radius`` mm of segment a–b (mm) to ``value``, only inside ``inside``."""
    lo = np.maximum(np.floor((np.minimum(a, b) - radius) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((np.maximum(a, b) + radius) / spacing).astype(int) + 1, hu.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    pts = np.stack(np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij"), -1) * spacing
    ab = b - a
    t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    dist = np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1)
    mask = (dist <= radius) & inside[box]
    hu[box][mask] = value


def _grow_vessels(hu, spacing, start, direction, radius, depth, rng, inside, branch_points) -> None:
    """Recursive branching walk: each segment 10–20 mm long, two children with thinner radius."""
    if depth == 0 or radius < 0.5:
        return
    length = rng.uniform(10.0, 20.0)
    end = start + direction * length
    _draw_tube(hu, spacing, start, end, radius, SOFT + rng.normal(0, 5), inside)
    branch_points.append(end)
    for _ in range(2):
        turn = rng.normal(0, 0.6, 3)
        child = direction + turn
        child /= np.linalg.norm(child) + 1e-9
        _grow_vessels(hu, spacing, end, child, radius * 0.75, depth - 1, rng, inside, branch_points)


def make_phantom(rng: np.random.Generator, size: tuple[int, int, int] = (128, 128, 64),
                 spacing: tuple[float, float, float] = (2.5, 2.5, 5.0), max_nodules: int = 3,
                 false_positives: int = 6) -> PhantomCase:
    """Draw one chest phantom of ``size`` voxels (x, y, z) at ``spacing`` mm.

    The field of view is ``size × spacing``; defaults give a 320×320×320 mm chest in a small array.

    Raises:
        ValueError: a size below 24 voxels per axis (too small to hold two lungs).
    """
    if min(size) < MIN_SIZE:
        raise ValueError(f"phantom size {size} is too small: use at least {MIN_SIZE} voxels per axis")
    sp = np.asarray(spacing, dtype=np.float32)
    extent = np.asarray(size) * sp
    grid = _grid(size, spacing)
    centre = extent / 2 + rng.normal(0, 0.02, 3) * extent

    hu = np.full(size, AIR, dtype=np.float32)
    body_r = extent * np.array([rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36), 0.75])
    body = _ellipsoid(grid, centre, body_r)
    hu[body] = FAT
    inner = _ellipsoid(grid, centre, body_r * np.array([0.92, 0.88, 1.0]))
    hu[inner] = SOFT

    lungs = np.zeros(size, dtype=bool)
    hila = []
    for side in (-1, 1):
        lung_c = centre + np.array([side * body_r[0] * rng.uniform(0.42, 0.50), body_r[1] * 0.05, 0.0])
        lung_r = np.array([body_r[0] * rng.uniform(0.36, 0.42), body_r[1] * rng.uniform(0.66, 0.74),
                           extent[2] * rng.uniform(0.38, 0.44)])
        lungs |= _ellipsoid(grid, lung_c, lung_r)
        hila.append(lung_c - np.array([side * lung_r[0] * 0.45, 0.0, 0.0]))
    lungs &= inner
    texture = gaussian_filter(rng.normal(0.0, 1.0, size).astype(np.float32), sigma=1.5)
    texture *= 40.0 / (texture.std() + 1e-6)
    hu[lungs] = LUNG + texture[lungs]

    heart_c = centre + np.array([body_r[0] * 0.08, -body_r[1] * 0.25, -extent[2] * 0.1])
    hu[_ellipsoid(grid, heart_c, np.array([body_r[0] * 0.22, body_r[1] * 0.30, extent[2] * 0.22])) & inner] = SOFT + 10
    spine_c = centre + np.array([0.0, body_r[1] * 0.72, 0.0])  # LPS: +y is posterior
    hu[_ellipsoid(grid, spine_c, np.array([body_r[0] * 0.10, body_r[1] * 0.14, extent[2] * 0.9])) & inner] = BONE

    branch_points: list[np.ndarray] = []
    for hilum in hila:
        for _ in range(4):
            direction = rng.normal(0, 1, 3) * np.array([1.0, 1.0, 1.5])
            direction[0] = abs(direction[0]) * np.sign(centre[0] - hilum[0]) * -1
            direction /= np.linalg.norm(direction) + 1e-9
            _grow_vessels(hu, sp, hilum, direction, rng.uniform(3.5, 4.5), 5, rng, lungs, branch_points)

    case = PhantomCase(volume=hu, spacing=tuple(float(s) for s in spacing),
                       origin=(float(-extent[0] / 2 + rng.normal(0, 5)), float(-extent[1] / 2 + rng.normal(0, 5)),
                               float(-extent[2] + rng.normal(0, 10))))
    lung_idx = np.argwhere(gaussian_filter(lungs.astype(np.float32), 2.0) > 0.99)
    if len(lung_idx) == 0:
        raise ValueError(f"phantom size {size} at spacing {spacing} leaves no room inside the lungs")
    for _ in range(int(rng.integers(1, max_nodules + 1)) if max_nodules > 0 else 0):
        diameter = float(rng.uniform(4.0, 20.0))
        idx = lung_idx[rng.integers(len(lung_idx))]
        density = SOFT - 30 + rng.normal(0, 20) if rng.random() < 0.75 else -500.0 + rng.normal(0, 40)
        ball = _ellipsoid(grid, idx * sp, np.full(3, diameter / 2))
        hu[ball] = density + texture[ball] * 0.5
        case.nodules.append((idx.astype(float), diameter))
    inside_lung = [p for p in branch_points if lungs[tuple(np.clip((p / sp).astype(int), 0, np.array(size) - 1))]]
    for k in range(false_positives):
        if k % 2 == 0 and inside_lung:
            point = inside_lung[rng.integers(len(inside_lung))] / sp
        else:
            point = lung_idx[rng.integers(len(lung_idx))].astype(float)
        case.false_positives.append(np.asarray(point, dtype=float))

    noise = rng.normal(0.0, 12.0, size).astype(np.float32)
    case.volume = np.clip(hu + noise, -1024, 3071).astype(np.int16)
    return case


def _series_uid(seed: int, index: int) -> str:
    return f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{seed:06d}{index:06d}"


def write_luna16_phantoms(out_dir: str | Path, count: int = 10, size: tuple[int, int, int] = (128, 128, 64),
                          spacing: tuple[float, float, float] = (2.5, 2.5, 5.0), subsets: int = 10, seed: int = 0,
                          max_nodules: int = 3, false_positives: int = 6, overwrite: bool = False) -> Path:
    """Write ``count`` phantoms as a LUNA16 tree under ``out_dir``; returns ``out_dir``.

    Case ``i`` goes to ``subset{i % subsets}``, so any count spreads over the official split.

    Raises:
        FileExistsError: ``out_dir`` is a file, or already holds a LUNA16 file (``annotations.csv``,
            ``candidates.csv``, ``candidates_V2.csv`` or ``subsetN/*.mhd``) and ``overwrite`` is false.
        FolderNotWritableError: ``out_dir`` cannot be created or written to (before any phantom is made).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose a folder for the LUNA16 tree (--out)")
    existing = [out / n for n in ("annotations.csv", "candidates.csv", "candidates_V2.csv") if (out / n).exists()]
    existing += sorted(out.glob("subset*/*.mhd"))[:1]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a LUNA16 tree ({existing[0].name} and maybe more); "
                              "pass overwrite=True (--overwrite) to replace it, or choose another --out")
    if count < 1 or subsets < 1:
        raise ValueError(f"count ({count}) and subsets ({subsets}) must be at least 1")
    check_writable(out, what="output folder (--out)", advice="choose another --out")  # one line, not a traceback
    rng = np.random.default_rng(seed)
    annotations, candidates = [], []
    for i in range(count):
        case = make_phantom(rng, size, spacing, max_nodules, false_positives)
        uid = _series_uid(seed, i)
        folder = out / f"subset{i % subsets}"
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(np.ascontiguousarray(case.volume.transpose(2, 1, 0)))
        image.SetSpacing(case.spacing)
        image.SetOrigin(case.origin)
        sitk.WriteImage(image, str(folder / f"{uid}.mhd"))
        for centre, diameter in case.nodules:
            world = case.to_world(centre)
            annotations.append([uid, *np.round(world, 4), round(diameter, 4)])
            candidates.append([uid, *np.round(world, 4), 1])
        for point in case.false_positives:
            candidates.append([uid, *np.round(case.to_world(point), 4), 0])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], *annotations])
    for name in ("candidates.csv", "candidates_V2.csv"):
        with open(out / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["seriesuid", "coordX", "coordY", "coordZ", "class"], *candidates])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dira3d synthetic", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the LUNA16-layout tree into")
    parser.add_argument("--count", type=int, default=10, help="number of phantoms (default 10)")
    parser.add_argument("--size", type=int, nargs=3, default=(128, 128, 64), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 2.5, 5.0), metavar=("SX", "SY", "SZ"))
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--max-nodules", type=int, default=3)
    parser.add_argument("--false-positives", type=int, default=6, help="false-positive candidates per scan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    written = WrittenFiles(args.out)
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: the same one line, exit 143
            out = write_luna16_phantoms(args.out, args.count, tuple(args.size), tuple(args.spacing), args.subsets,
                                        args.seed, args.max_nodules, args.false_positives, args.overwrite)
    except (FileExistsError, ValueError, FolderNotWritableError) as err:
        parser.error(str(err))
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was written, in one line, not a traceback
        files = written.since()
        phantoms = sum(p.suffix == ".mhd" for p in files)
        what = (f"nothing was written to {args.out}" if not files else
                f"{len(files)} file(s) written to {args.out} ({phantoms} of {args.count} phantoms), an incomplete "
                "LUNA16 tree: rerun with --overwrite to write it whole")
        print(f"dira3d synthetic: {interrupted_word(err)}; {what}", file=sys.stderr)
        return interrupt_exit_code(err)
    print(f"wrote {args.count} phantoms in the LUNA16 layout to {out}")
    print(f"next:     dira3d prepare luna16 --src {shlex.quote(str(out))} --dst prepared/luna16 (docs/data.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
