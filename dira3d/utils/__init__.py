"""Small shared utilities: atomic checkpoint I/O, seeding, paths, lazy re-exports.

Re-exported lazily (:mod:`dira3d.utils.lazy`), so that packages which use ``lazy_exports`` (such as
``dira3d.data``) do not import torch through this package.
"""

from dira3d.utils.lazy import lazy_exports

_EXPORTS = {
    "dira3d.utils.atomic": ("atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "check_output_settings",
                            "FolderNotWritableError"),
    "dira3d.utils.checkpoint": ("atomic_save", "load_checkpoint"),
    "dira3d.utils.progress": ("show_progress",),
    "dira3d.utils.seeding": ("check_numbers", "check_ranges", "check_seed", "check_sizes", "check_whole_numbers"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, submodules=True)

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_settings",
    "FolderNotWritableError",
    "atomic_save",
    "load_checkpoint",
    "show_progress",
    "check_numbers",
    "check_seed",
    "check_sizes",
    "check_whole_numbers",
    "check_ranges",
    "lazy_exports",
]
