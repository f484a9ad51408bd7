"""Montgomery County chest X-rays → resized 8-bit PNGs + merged lung masks + a segmentation datalist.

Input (``--src``: ``MontgomerySet/`` or a folder above it): ``CXR_png/MCUCXR_0001_0.png`` (the
last digit: 0 normal, 1 tuberculosis), ``ManualMask/leftMask/<same name>`` and
``ManualMask/rightMask/<same name>``. The lung mask is left ∪ right (any non-zero pixel).

Output (``--dst``): ``images/MCUCXR_0001_0.png``, ``masks/MCUCXR_0001_0.png`` (values 0/1) and
``montgomery_datalist.json`` with ``{"image", "label": mask, "case_id": "MCUCXR_0001",
"tuberculosis": 0|1}``; training / validation / test are a seeded split of the patients
(default 70 / 10 / 20 %, recorded in ``split.json``).
"""

from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path

import numpy as np

from dira3d.data.cxr import (
    check_size,
    read_grey,
    read_radiograph,
    resize_image,
    resize_mask,
    write_png,
)
from dira3d.data.cxr_splits import (
    earlier_patient_split,
    fraction_split_parser,
    patient_split,
    run_fraction_prepare,
    split_entries,
    write_fraction_datalist,
)
from dira3d.data.errors import record_or_raise
from dira3d.data.io import DataError
from dira3d.data.runner import Case, CaseResult, batch_stopped, run_cases, safe_case_path

__all__ = ["find_cases", "merge_lungs", "prepare", "main"]

_NAME = re.compile(r"(MCUCXR_\d+)_([01])\.png")


def find_cases(src: str | Path, problems: dict[str, str] | None = None) -> dict[str, dict]:
    """``{stem: {"image", "left", "right", "patient", "tuberculosis"}}`` for every ``CXR_png`` image.

    Args:
        problems: when given, a lung mask an image lacks is recorded here as ``{stem: message}``
            instead of raised (:func:`~dira3d.data.errors.record_or_raise`): that image is a failed
            case of its own (docs/data.md), the others are still prepared with ``--keep-going``.

    Raises:
        DataError: no ``CXR_png`` folder or no image in it; without ``problems``, also a missing lung mask.
    """
    src = Path(src)
    folders = sorted(src.rglob("CXR_png")) if src.is_dir() else []
    if src.name == "CXR_png":
        folders = [src]
    if not folders:
        raise DataError(src, "holds no CXR_png folder; point --src at MontgomerySet (with CXR_png and ManualMask)")
    root = folders[0].parent
    cases: dict[str, dict] = {}
    for path in sorted(folders[0].glob("*.png")):
        match = _NAME.fullmatch(path.name)
        if not match:
            continue
        masks = {side: root / "ManualMask" / f"{side}Mask" / path.name for side in ("left", "right")}
        for side, mask in masks.items():
            if not mask.is_file():
                record_or_raise(problems, path.stem, DataError(mask, f"is missing: {path.name} needs its {side} lung "
                                                                     f"mask in ManualMask/{side}Mask"))
        cases[path.stem] = {"image": path, **masks, "patient": match.group(1), "tuberculosis": int(match.group(2))}
    if not cases:
        raise DataError(folders[0], "holds no MCUCXR_NNNN_D.png image")
    return cases


def merge_lungs(left: np.ndarray, right: np.ndarray, where: str = "") -> np.ndarray:
    """Union of the left and right lung masks (non-zero = lung) as ``uint8`` 0/1.

    Raises:
        DataError: the two masks differ in shape (``where`` names the files).
    """
    if left.shape != right.shape:
        raise DataError(where or None, f"left mask {left.shape} and right mask {right.shape} differ in size")
    return ((left > 0) | (right > 0)).astype(np.uint8)


def _process(case: Case, size: int) -> dict:
    image = read_radiograph(case.params["image"])  # as the bundles' inference reads it
    left, right = read_grey(case.params["left"]), read_grey(case.params["right"])
    lungs = merge_lungs(left, right, f"{case.params['left']} / {case.params['right']}")
    if lungs.shape != image.shape:
        raise DataError(case.params["left"], f"mask size {lungs.shape} differs from the image's {image.shape} "
                                             f"({case.params['image']})")
    if not lungs.any():
        raise DataError(case.params["left"], "left and right lung masks are both empty")
    write_png(case.outputs[1], resize_mask(lungs, size))
    write_png(case.outputs[0], resize_image(image, size))
    return {"lung_pixels": int(lungs.sum())}


def prepare(src: str | Path, dst: str | Path, *, size: int = 512, val_fraction: float = 0.1,
            test_fraction: float = 0.2, seed: int = 0, workers: int = 1, overwrite: bool = False,
            dry_run: bool = False, keep_going: bool = False, report_path: str | Path | None = None,
            progress: bool = True) -> list[CaseResult]:
    """Prepare the Montgomery set under ``dst`` (see the module docstring for the outputs).

    Raises:
        DataError: bad layout. ValueError: bad settings.
    """
    src, dst = Path(src), Path(dst)
    size = check_size(size)
    patient_split([], val_fraction, test_fraction)  # validates the fractions before any work
    problems: dict[str, str] = {}
    found = find_cases(src, problems)
    cases = [Case(stem, [safe_case_path(dst / "images", stem, ".png"), safe_case_path(dst / "masks", stem, ".png")],
                  info, error=problems.get(stem, "")) for stem, info in found.items()]
    results = run_cases(cases, partial(_process, size=size), out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="montgomery",
                        progress=progress, source=src, datalists=[dst / "montgomery_datalist.json"],
                        settings={"size": size})
    if dry_run or batch_stopped(results, keep_going):
        return results
    done = [case for case, result in zip(cases, results) if result.ok]
    split, lists = split_entries(
        [(case.params["patient"], {"image": case.outputs[0], "label": case.outputs[1], "case_id": case.params["patient"],
                                   "tuberculosis": case.params["tuberculosis"]}) for case in done],
        val_fraction, test_fraction, seed,  # a rerun keeps its patients' parts
        earlier_patient_split(dst, seed, val_fraction=val_fraction, test_fraction=test_fraction))
    meta = {"dataset": "montgomery", "size": size, "image_format": "png uint8 grey", "mask_format": "png uint8 0/1",
            "label": "left ∪ right lung", "split": {"method": "patient-level", "val_fraction": val_fraction,
                                                    "test_fraction": test_fraction, "seed": seed},
            "source": str(src.resolve())}
    write_fraction_datalist(dst / "montgomery_datalist.json", lists, meta, split, seed, val_fraction, test_fraction)
    return results


def build_parser() -> argparse.ArgumentParser:
    return fraction_split_parser("dira3d prepare montgomery", __doc__)


def main(argv: list[str] | None = None) -> int:
    return run_fraction_prepare("dira3d prepare montgomery", prepare, build_parser().parse_args(argv))
