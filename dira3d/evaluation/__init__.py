"""dira3d.evaluation (see docs/architecture.md)."""
