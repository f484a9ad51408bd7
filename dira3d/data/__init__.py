"""dira3d.data (see docs/architecture.md)."""
