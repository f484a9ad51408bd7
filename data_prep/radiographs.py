"""Prepare a folder of chest X-rays: `python data_prep/radiographs.py --src ... --dst ...` (see docs/data_2d.md; same as `dira3d prepare radiographs`)."""

from dira3d.data.radiographs import main

raise SystemExit(main())
