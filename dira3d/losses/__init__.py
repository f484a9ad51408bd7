"""dira3d.losses (see docs/architecture.md)."""
