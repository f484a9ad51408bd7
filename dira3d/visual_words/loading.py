"""Reading the pretraining datalist and streaming its volumes through MONAI transforms.

Volumes are loaded one at a time (optionally prefetched by a few DataLoader workers), so the
memory held at any moment is a handful of volumes, whatever the number of classes and instances.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
)
from torch.utils.data import DataLoader

from dira3d.data.datalist import datalist_entries, more_training_advice, read_datalist_json

__all__ = ["SPLITS", "read_datalist", "case_ids", "CheckIntensityd", "volume_transform", "iterate_volumes", "volume_shapes"]

SPLITS = ("training", "validation")


def read_datalist(path: str | os.PathLike, splits: Sequence[str] = SPLITS) -> dict[str, list[dict]]:
    """Read a decathlon-style pretraining datalist.

    Args:
        path: the JSON datalist; ``"image"`` paths are relative to its folder (resolved as
            MONAI's ``load_decathlon_datalist`` does, :func:`dira3d.data.datalist.datalist_entries`).
        splits: keys to read; ``"training"`` is required, the others may be absent or empty.

    Returns:
        ``{split: [entry, ...]}`` with absolute ``"image"`` paths and a ``"case_id"`` on every entry.

    Raises:
        FileNotFoundError: the datalist or one of its images does not exist (every missing image listed).
        ValueError: the datalist is not JSON, has no ``"training"`` entries or an entry lacks ``"image"``.
    """
    content = read_datalist_json(path, required=("training",))
    out: dict[str, list[dict]] = {}
    for split in splits:
        entries = datalist_entries(path, split, content=content, optional=split != "training", check_files="file")
        for entry in entries:
            entry.setdefault("case_id", Path(entry["image"]).name.split(".")[0])
        out[split] = entries
    if not out["training"]:
        raise ValueError(f"datalist {path} has an empty 'training' list; visual words need training volumes: add "
                         f"scans, or {more_training_advice(path)}")
    return out


def case_ids(entries: Sequence[dict]) -> list[str]:
    """The ``case_id`` of every entry, in order."""
    return [str(e["case_id"]) for e in entries]


class CheckIntensityd(MapTransform):
    """Refuse a volume whose intensities do not fit how it is loaded, naming the file.

    Prepared volumes (``raw_hu=False``) must lie in [0, 1]: raw HU would pass the lung filter
    (its threshold is in [0, 1] units) and be written to the shards as HU, silently. With
    ``raw_hu=True`` a volume already in [0, 1] would be windowed a second time (everything ≈ 0.5).

    Args:
        keys: image keys.
        raw_hu: whether the volumes are loaded as raw HU (``--raw-hu``).
    """

    def __init__(self, keys: Sequence[str], raw_hu: bool = False) -> None:
        super().__init__(keys)
        self.raw_hu = bool(raw_hu)

    def __call__(self, data: dict) -> dict:
        from dira3d.data.errors import DataError
        from dira3d.engines.inputs import source_of

        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            lo, hi = float(img.min()), float(img.max())
            in_unit = lo >= -1e-3 and hi <= 1 + 1e-3
            if self.raw_hu and in_unit:
                raise DataError(source_of(d, key), f"has intensities from {lo:g} to {hi:g}, already in [0, 1], but --raw-hu "
                                                 "windows it as HU a second time; drop --raw-hu for prepared volumes")
            if not self.raw_hu and not in_unit:
                raise DataError(source_of(d, key), f"has intensities from {lo:g} to {hi:g}, not the [0, 1] of a prepared "
                                                 "volume (raw HU?); pass --raw-hu (and --hu-window LO HI) to window it on "
                                                 "loading, or prepare the scans with `dira3d prepare` (docs/data.md)")
        return d


def volume_transform(
    orient: bool = True,
    raw_hu_window: tuple[float, float] | None = None,
    keys: Sequence[str] = ("image",),
    check_intensity: bool = True,
) -> Compose:
    """Load → channel first → (RAS) → (HU window) → float32, as MONAI dictionary transforms.

    Args:
        orient: reorient to RAS (prepared volumes already are; cheap when nothing changes).
        raw_hu_window: when the images are raw HU rather than prepared [0, 1] volumes, the
            ``(lo, hi)`` window that maps them to [0, 1]; ``None``: they must already be in [0, 1].
            Either way :class:`CheckIntensityd` refuses a volume that does not fit, naming it.
        keys: the image keys.
        check_intensity: add :class:`CheckIntensityd` (off only where the shape alone is read).

    Returns:
        A MONAI ``Compose``.
    """
    from dira3d.engines.inputs import LoadVolumed  # NRRD / MetaImage through SimpleITK; errors name the file

    steps: list[Any] = [LoadVolumed(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys)]
    if check_intensity:
        steps.append(CheckIntensityd(keys=keys, raw_hu=raw_hu_window is not None))
    if orient:
        # explicit labels: the standard L/R, P/A, I/S meaning of "RAS" (and no MONAI deprecation warning)
        steps.append(Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if raw_hu_window is not None:
        lo, hi = raw_hu_window
        steps.append(ScaleIntensityRanged(keys=keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    steps.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return Compose(steps)


def _keep_as_is(item: Any) -> Any:
    # module-level so DataLoader workers can pickle it
    return item


def iterate_volumes(
    entries: Sequence[dict], transform: Compose, workers: int = 0, order: Sequence[int] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, transformed entry)`` for the given entries, one volume at a time.

    Args:
        entries: datalist entries.
        transform: e.g. :func:`volume_transform`.
        workers: DataLoader worker processes that prefetch volumes (0 = in this process).
        order: indices into ``entries`` to load, in this order (default: all).

    Returns:
        An iterator; at most ``1 + 2 * workers`` volumes are alive at once.
    """
    order = list(range(len(entries))) if order is None else list(order)
    data = [dict(entries[i], _index=i) for i in order]
    dataset = Dataset(data=data, transform=transform)
    if workers <= 0:
        for item in dataset:
            yield int(item.pop("_index")), item
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep_as_is, prefetch_factor=2)
    for item in loader:
        yield int(item.pop("_index")), item


def _nifti_shape(path: str, orient: bool) -> tuple[int, int, int] | None:
    """Spatial shape of a NIfTI file after :func:`volume_transform`, from its header (no voxels read).

    MONAI reads NIfTI with nibabel and reorients with ``io_orientation`` of the same affine, so the
    axes are permuted exactly as here. ``None`` for anything nibabel cannot open lazily.
    """
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        image = nib.load(str(path))
    except Exception:  # noqa: BLE001 - fall back to loading the volume through MONAI
        return None
    shape = tuple(int(s) for s in image.shape[:3])
    if len(shape) != 3:
        return None
    if not orient:
        return shape  # type: ignore[return-value]
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(nib.orientations.io_orientation(image.affine)[:3]):
        out[int(target)] = shape[axis]
    return tuple(out)  # type: ignore[return-value]


def volume_shapes(entries: Sequence[dict], orient: bool = True) -> list[tuple[int, int, int]]:
    """Spatial ``(x, y, z)`` shape of every entry's image as :func:`volume_transform` loads it.

    NIfTI files (what ``dira3d prepare`` writes) are read from their headers; anything else
    (NRRD, MetaImage, DICOM folders) is loaded through MONAI, one volume at a time.
    """
    shapes: list[tuple[int, int, int] | None] = [_nifti_shape(e["image"], orient) for e in entries]
    missing = [i for i, s in enumerate(shapes) if s is None]
    if missing:
        for index, item in iterate_volumes([entries[i] for i in missing], volume_transform(orient, check_intensity=False)):
            shapes[missing[index]] = tuple(int(s) for s in item["image"].shape[1:4])  # type: ignore[assignment]
    return shapes  # type: ignore[return-value]
