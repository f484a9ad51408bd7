"""Small shared utilities: atomic checkpoint I/O, seeding, paths."""

from dira3d.utils.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text
from dira3d.utils.checkpoint import atomic_save, load_checkpoint

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save",
    "load_checkpoint",
]
