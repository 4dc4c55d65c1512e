"""``python -m vqfr.inspect_engine ENGINE [--update]``: print and verify an engine's sidecar, or re-record the file.

The command lives apart from :mod:`vqfr.sidecar` because ``import vqfr`` imports that module: run with ``python -m``,
a module the package already imported would be executed a second time (and Python warns about it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vqfr.errors import EngineError, VQFRError
from vqfr.sidecar import read_sidecar, verify_engine_file, write_sidecar

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Print and verify an engine's sidecar (exit 0 when the file matches it), or with ``--update`` record the
    engine's current size and sha256 after a deliberate change. Otherwise exit 1 with one line on stderr naming the
    fix (the sidecar, when it could be read, is still printed on stdout)."""
    p = argparse.ArgumentParser(prog="python -m vqfr.inspect_engine", description=main.__doc__)
    p.add_argument("engine", help="the engine file (.onnx, .engine, .plan, .pt2); its sidecar is ENGINE.json")
    p.add_argument("--update", action="store_true", help="record the engine's current size and sha256")
    args = p.parse_args(argv)
    try:
        meta = read_sidecar(args.engine)
        if args.update:
            if not Path(args.engine).is_file():  # would record no hash at all
                raise EngineError("cannot read the engine (no such file)", path=args.engine,
                                  fix="pass the engine file whose sidecar to update")
            print(f"updated {write_sidecar(args.engine, meta)}")
            return 0
        print(json.dumps(meta.to_dict(), indent=2))
        verify_engine_file(args.engine, meta)
    except VQFRError as exc:  # an unusable sidecar or engine (EngineError), a sidecar that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("ok: the engine matches its sidecar" if meta.file_sha256 else "note: this sidecar records no file hash")
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
