"""Prepare luna16: `python data_prep/luna16.py --src ... --dst ...` (see docs/data.md; same as `dira3d prepare luna16`)."""

from dira3d.data.luna16 import main

raise SystemExit(main())
