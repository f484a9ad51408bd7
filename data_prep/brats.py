"""Prepare BraTS 2018: `python data_prep/brats.py --src DOWNLOAD --dst OUT [options]` (see docs/data.md)."""

from dira3d.data.brats import main

if __name__ == "__main__":
    raise SystemExit(main())
