"""Prepare montgomery: `python data_prep/montgomery.py --src ... --dst ...` (see docs/data_2d.md; same as `dira3d prepare montgomery`)."""

from dira3d.data.montgomery import main

raise SystemExit(main())
