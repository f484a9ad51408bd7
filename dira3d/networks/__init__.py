"""dira3d.networks (see docs/architecture.md)."""
