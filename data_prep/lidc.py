"""Prepare LIDC-IDRI: `python data_prep/lidc.py --src DOWNLOAD --dst OUT [options]` (see docs/data.md)."""

from dira3d.data.lidc import main

if __name__ == "__main__":
    raise SystemExit(main())
