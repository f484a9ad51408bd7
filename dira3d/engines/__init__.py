"""dira3d.engines (see docs/architecture.md)."""
