"""Prepare generic: `python data_prep/generic.py --src ... --dst ...` (see docs/data.md; same as `dira3d prepare generic`)."""

from dira3d.data.generic import main

raise SystemExit(main())
