"""Whether a datalist's images are of the dimensions of a bundle's network, told before any image is loaded.

A 2D datalist (PNGs) given to a 3D bundle failed while the data were cached with ``3D pretraining needs 3D volumes``,
and a 3D datalist (NIfTI volumes) given to a 2D bundle with an error about its labels (a classification bundle) or
while caching (a segmentation one), none naming the datalist nor the ``dira3d prepare`` that writes one that fits.
:func:`other_dims_entry` finds the first image of the other dimensions (told by its name: NIfTI, MetaImage, NRRD are 3D
volumes; PNG, JPEG, BMP, TIFF are 2D images; a volume file of one slice is a 2D image, read from its header), and
:func:`fitting_datalist` says which datalist fits. :func:`dira3d.evaluation.load_split` (``spatial_dims=``, the task
bundles' ``train.json`` and ``evaluate.json``; ``dira3d finetune``) and ``dira3d experiment``
(:func:`dira3d.evaluation.experiment_method_checks.check_datalist_dims`) refuse such a datalist with these.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "is_volume", "other_dims_entry", "fitting_datalist"]

# the file names of each dimensionality's images
IMAGE_SUFFIXES = {3: (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr"),
                  2: (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")}


def is_volume(image: str | Path) -> bool:
    """Whether ``image`` (a NIfTI, MetaImage or NRRD file) holds more than one slice, read from its header alone."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        reader.ReadImageInformation()
        size = reader.GetSize()
    except Exception:  # noqa: BLE001  (not readable: the runs name the file)
        return False
    return len(size) >= 3 and size[2] > 1


def other_dims_entry(entries: list, dims: int) -> tuple[int, str] | None:
    """``(index, image)`` of the first entry whose ``image`` is a file of the other dimensions than ``dims`` (2 or 3),
    or None: none is, ``dims`` is neither, or (``dims`` 2) the first volume file is of one slice, or not readable (the
    runs name it), so the datalist is taken as 2D."""
    if dims not in IMAGE_SUFFIXES:
        return None
    other = IMAGE_SUFFIXES[5 - dims]
    for index, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(image, (str, Path)) and str(image).lower().endswith(other):
            if dims == 2 and not is_volume(image):
                return None
            return index, str(image)
    return None


def fitting_datalist(dims: int) -> str:
    """The datalists a bundle of ``dims`` takes, for an error's advice."""
    if dims == 2:
        return ("one that `dira3d prepare chestxray14`, `chexpert`, `siim`, `montgomery` or `radiographs` wrote "
                "(docs/data_2d.md)")
    return ("one that `dira3d prepare` wrote for a 3D dataset (`luna16`, `lits`, `lidc`, `brats`, `pecad` or "
            "`generic`; docs/data.md)")
