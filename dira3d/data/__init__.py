"""Data preparation: checked readers, geometry, normalisation, the batch runner and datasets.

The core (``io``, ``geometry``, ``normalize``, ``runner``) is re-exported here; dataset modules
(``generic``, ``luna16``, ``lits``, ``lidc``, ``brats``, ``pecad``) and ``synthetic`` are imported
on demand (``dira3d.data.luna16.prepare`` ...). See docs/data.md.
"""

from dira3d.data.geometry import crop_cube, resample, voxel_to_world, world_to_voxel
from dira3d.data.io import (
    DataError,
    check_mask_matches,
    image_to_xyz,
    read_image,
    read_mask,
    to_ras,
    write_nifti,
    xyz_to_image,
)
from dira3d.data.normalize import normalize_mr, window_hu
from dira3d.data.runner import (
    Case,
    CaseResult,
    add_common_arguments,
    finish,
    run_cases,
    safe_case_path,
    write_datalist,
    write_json,
)

__all__ = [
    "DataError", "read_image", "read_mask", "write_nifti", "to_ras", "check_mask_matches", "image_to_xyz",
    "xyz_to_image", "world_to_voxel", "voxel_to_world", "resample", "crop_cube", "window_hu", "normalize_mr",
    "Case", "CaseResult", "run_cases", "add_common_arguments", "finish", "safe_case_path", "write_datalist",
    "write_json",
]
