"""Small shared utilities: atomic checkpoint I/O, seeding, paths."""

from dira3d.utils.checkpoint import atomic_save, load_checkpoint

__all__ = ["atomic_save", "load_checkpoint"]
