"""``python -m vqfr`` and the ``vqfr`` command: see :mod:`vqfr.cli`."""

from __future__ import annotations

import sys


def run() -> int:
    """Import the CLI (torch with it, a few seconds) and run it; Ctrl-C meanwhile exits 130 without a traceback."""
    from vqfr.errors import exit_status

    try:
        from vqfr.cli import main
    except KeyboardInterrupt:
        print("vqfr: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return exit_status(main)


if __name__ == "__main__":
    raise SystemExit(run())
