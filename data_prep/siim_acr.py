"""Prepare siim: `python data_prep/siim_acr.py --src ... --dst ...` (see docs/data_2d.md; same as `dira3d prepare siim`)."""

from dira3d.data.siim import main

raise SystemExit(main())
