"""Prepare lits: `python data_prep/lits.py --src ... --dst ...` (see docs/data.md; same as `dira3d prepare lits`)."""

from dira3d.data.lits import main

raise SystemExit(main())
