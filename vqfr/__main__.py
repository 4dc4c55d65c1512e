"""``python -m vqfr``: see :mod:`vqfr.cli`."""

from vqfr.cli import main

raise SystemExit(main())
