"""``python -m dira3d ...``: the ``dira3d`` command where its console script is not on PATH (e.g. with only
``PYTHONPATH`` set to a checkout)."""

from dira3d.cli import main

raise SystemExit(main())
