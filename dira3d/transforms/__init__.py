"""dira3d.transforms (see docs/architecture.md)."""
