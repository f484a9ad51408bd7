"""dira3d.visual_words (see docs/architecture.md)."""
