"""Data preparation: checked readers, geometry, normalisation, the batch runner and datasets.

The core (``io``, ``geometry``, ``normalize``, ``runner``) is re-exported here; dataset modules
(``generic``, ``luna16``, ``lits``, ``lidc``, ``brats``, ``pecad``) and ``synthetic`` are imported
on demand (``dira3d.data.luna16.prepare`` ...). See docs/data.md.
"""

from dira3d.utils.lazy import lazy_exports

# Re-exported lazily (PEP 562): ``import dira3d.data`` (the engine does, for DataError) must not
# load SimpleITK, which training on prepared volumes does not need.
_EXPORTS = {
    "dira3d.data.geometry": ("crop_cube", "resample", "voxel_to_world", "world_to_voxel"),
    "dira3d.data.errors": ("DataError",),
    "dira3d.data.io": ("check_mask_matches", "image_to_xyz", "read_image", "read_mask", "to_ras",
                       "write_nifti", "xyz_to_image"),
    "dira3d.data.normalize": ("normalize_mr", "window_hu"),
    "dira3d.data.runner": ("Case", "CaseResult", "add_common_arguments", "finish", "run_cases", "safe_case_path",
                           "write_datalist", "write_json"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "DataError", "read_image", "read_mask", "write_nifti", "to_ras", "check_mask_matches", "image_to_xyz",
    "xyz_to_image", "world_to_voxel", "voxel_to_world", "resample", "crop_cube", "window_hu", "normalize_mr",
    "Case", "CaseResult", "run_cases", "add_common_arguments", "finish", "safe_case_path", "write_datalist",
    "write_json",
]
