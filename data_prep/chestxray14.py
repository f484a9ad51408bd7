"""Prepare chestxray14: `python data_prep/chestxray14.py --src ... --dst ...` (see docs/data_2d.md; same as `dira3d prepare chestxray14`)."""

from dira3d.data.chestxray14 import main

raise SystemExit(main())
