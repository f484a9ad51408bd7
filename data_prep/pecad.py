"""Prepare PE-CAD: `python data_prep/pecad.py --src DOWNLOAD --dst OUT [options]` (see docs/data.md)."""

from dira3d.data.pecad import main

if __name__ == "__main__":
    raise SystemExit(main())
