"""``dira3d prepare <dataset> [options]``: dispatch to one dataset module's ``main(argv)``.

Dataset modules are imported only when named, so a missing optional dependency of one dataset
does not break the others.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["DATASETS", "main"]

# name -> (module with main(argv) -> int, one-line help)
DATASETS: dict[str, tuple[str, str]] = {
    "generic": ("dira3d.data.generic", "any folder of NIfTI / NRRD / MetaImage / DICOM series (CT or MR)"),
    "luna16": ("dira3d.data.luna16", "LUNA16 subsets + candidates: pretraining volumes and NCC cubes"),
    "lits": ("dira3d.data.lits", "LiTS-2017 volumes + liver masks (LCS)"),
    "lidc": ("dira3d.data.lidc", "LIDC-IDRI DICOM + XML reads: nodule crops (NCS)"),
    "brats": ("dira3d.data.brats", "BraTS 2018: four MR sequences + tumour masks (BMS)"),
    "pecad": ("dira3d.data.pecad", "PE-CAD CTPA + candidate lists (ECC)"),
    "siim": ("dira3d.data.siim", "SIIM-ACR pneumothorax DICOM + RLE masks (2D segmentation)"),
    "montgomery": ("dira3d.data.montgomery", "Montgomery CXR PNG + left/right lung masks (2D segmentation)"),
    "chestxray14": ("dira3d.data.chestxray14", "ChestX-ray14 (2D): PNGs + multi-label datalist"),
    "chexpert": ("dira3d.data.chexpert", "CheXpert (2D): PNGs + multi-label datalist"),
    "radiographs": ("dira3d.data.radiographs", "any folder of chest X-rays (PNG / JPEG / TIFF / BMP / DICOM, 2D): "
                                               "PNGs + a 2D pretraining datalist"),
}


def _usage() -> str:
    width = max(map(len, DATASETS))
    lines = ["usage: dira3d prepare <dataset> --src SRC --dst DST [options]", "", "datasets:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in DATASETS.items()]
    lines += ["", "Run `dira3d prepare <dataset> --help` for its options; see docs/data.md (3D datasets, shared "
                  "options) and docs/data_2d.md (2D chest X-ray: siim, montgomery, chestxray14, chexpert, radiographs)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``dira3d prepare``; returns the dataset command's exit code (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in DATASETS:
        print(f"dira3d prepare: unknown dataset {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = DATASETS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"dira3d prepare: dataset {name!r} is not available in this installation ({module_name} is missing)",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
