"""Folder throughput of the CLI: ``python -m deploy.bench_folder [--count 64] [--io-threads 1,8] [--identity]``.

Runs ``python -m vqfr --aligned`` in this process on a folder of 512x512 PNG faces (copies of the embedded demo
photo, each shifted a little so that no two files are alike) once per ``--io-threads`` value, and prints, per run,
the faces per second of the whole run (read, model, write) beside the faces per second of the model alone (the CLI's
own figure: faces per second of restoration time).

With ``--identity`` the model is replaced by one that returns its crops, so the table shows what reading and
writing alone sustain: the ceiling of a folder run however fast the model (a GPU restores a v2 face in under 10 ms,
while PNG-encoding its three outputs takes tens of milliseconds on one core). ``--identity-ms`` makes it wait that
long per face, as the CPU does while a GPU computes: a CPU-only machine then shows what a folder run on a GPU of that
speed would sustain. Without it, the model is what the CLI
would load (``--weights``/``--engine``, else random weights of the official architecture: slow on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["make_faces", "time_run", "main"]


def make_faces(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 512x512 PNG faces in ``folder``: the demo photo rolled by a few pixels each."""
    import cv2
    import numpy as np

    from vqfr.demo import demo_photo

    photo = cv2.imread(str(demo_photo()))
    assert photo is not None, "the packaged demo photo does not decode"
    photo = cv2.resize(photo, (512, 512), interpolation=cv2.INTER_AREA)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"face{i:04d}.png")
        cv2.imwrite(str(paths[-1]), np.roll(photo, (i % 7, i // 7 % 5), axis=(0, 1)))
    return paths


@contextlib.contextmanager
def _identity_model(ms_per_face: float = 0.0) -> Iterator[None]:
    """The runtime's model step returns its crops, after sleeping ``ms_per_face`` per face (a GPU's forward: the
    CPU is free meanwhile), for this process until the block ends."""
    import time

    from vqfr.runtime import Runtime

    def restore(self, crops, fidelity):
        time.sleep(ms_per_face * len(crops) / 1e3)
        return crops.copy()

    real = Runtime._restore_crops
    Runtime._restore_crops = restore  # type: ignore[method-assign]
    try:
        yield
    finally:
        Runtime._restore_crops = real  # type: ignore[method-assign]


def time_run(inputs: Path, out: Path, cli_args: list[str]) -> dict:
    """One CLI run over ``inputs``: {"faces", "faces_per_s" (the whole run), "model_faces_per_s", "exit"}, as the
    CLI's summary gives them (the model's loading is not counted)."""
    from vqfr.cli import main

    shutil.rmtree(out, ignore_errors=True)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(["-i", str(inputs), "-o", str(out), "--aligned", "-q", *cli_args])
        except SystemExit as exc:  # the CLI's argparse refusals (a mistyped flag passed on, --batch 0) exit
            code = exc.code if isinstance(exc.code, int) else 2
    match = re.search(r"(\d+) faces restored, \d+ failed.* in [\d.]+ s \(([\d.]+) faces/s; the model alone ([\d.]+)\)",
                      stdout.getvalue())
    if code != 0 or match is None:
        raise RuntimeError(f"the CLI run failed (exit {code}):\n{stdout.getvalue()}{stderr.getvalue()}")
    return {"exit": code, "faces": int(match[1]), "faces_per_s": float(match[2]), "model_faces_per_s": float(match[3])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.bench_folder", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=64, help="faces in the folder (default: 64)")
    p.add_argument("--io-threads", default="1,8", help="comma-separated --io-threads values (default: 1,8)")
    p.add_argument("--batch", type=int, default=8, help="CLI --batch (default: 8)")
    p.add_argument("--identity", action="store_true", help="replace the model by one that returns its input")
    p.add_argument("--identity-ms", type=float, default=0.0,
                   help="with --identity, wait this many ms per face, as for a GPU forward (H100, v2, batch 8: 8.6)")
    p.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest is kept (default: 2)")
    p.add_argument("--work", type=Path, help="folder for the inputs and outputs (default: a temporary one)")
    args, cli_args = p.parse_known_args(argv)  # the rest goes to the CLI: --weights, --engine, --device, ...
    for flag, value, least in (("--count", args.count, 1), ("--repeat", args.repeat, 1),
                               ("--identity-ms", args.identity_ms, 0)):
        if value < least:  # --repeat 0 ended in "max() arg is an empty sequence" after writing the faces
            p.error(f"{flag} must be at least {least}, got {value:g}")
    threads = [int(t) for t in args.io_threads.split(",")]
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vqfr_bench_folder_")))
        make_faces(work / "inputs", args.count)
        if args.identity:
            stack.enter_context(_identity_model(args.identity_ms))
        rows = []
        for n in threads:
            runs = [time_run(work / "inputs", work / "results", [*cli_args, "--batch", str(args.batch),
                                                                 "--io-threads", str(n)])
                    for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r["faces_per_s"])
            rows.append((n, best["faces_per_s"], best["model_faces_per_s"], best["faces"] / best["faces_per_s"]))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; {args.count} faces of "
          f"512x512, --batch {args.batch}; model: "
          f"{(f'identity, {args.identity_ms:g} ms a face' if args.identity else 'as loaded')}")
    print("| --io-threads | faces/s, whole run | faces/s, model alone | run (s) |")
    print("|---|---|---|---|")
    for n, whole, model, wall in rows:
        print(f"| {n} | {whole:.1f} | {model:.1f} | {wall:.2f} |")
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
