"""Prepare chexpert: `python data_prep/chexpert.py --src ... --dst ...` (see docs/data_2d.md; same as `dira3d prepare chexpert`)."""

from dira3d.data.chexpert import main

raise SystemExit(main())
