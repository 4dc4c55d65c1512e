"""Folder soak: ``python -m deploy.soak --count 1000 --bad-fraction 0.05 --out DIR``.

Generates a folder of small aligned faces at the face size of a micro VQFRv2 (16 px, seeded random weights: the
real architecture, tiny), a fraction of them broken in the ways :data:`BAD_KINDS` lists, and runs the real CLI on it
as a subprocess (``python -m vqfr -i DIR/inputs -o DIR/results --aligned ...``), sampling the process's resident
memory (VmRSS) and the number of finished outputs every ``--interval`` seconds. Then it checks what a user relies on:

- exit code 3 (some inputs failed), one ``FAILED`` line naming each bad input, none for the good ones, and nothing
  else on stderr (no traceback, no libpng/libjpeg/OpenCV messages);
- one complete, decodable output set per good input, no temporary files, inputs byte-identical to before;
- resident memory flat after warm-up: the peak after the first ``--warmup`` of the images is within ``--rss-tolerance``
  of the RSS at that point. The window ends when the CLI prints its summary line: what the process does after that is
  the interpreter's exit (torch's CUDA builds grow by about 128 MiB while unloading, even after ``import torch``
  alone), not a leak per image.

It prints a summary and writes ``DIR/soak.json``. Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vqfr.atomic import atomic_write_bytes

__all__ = ["MICRO_V2", "BAD_KINDS", "GOOD_KINDS", "SoakResult", "make_folder", "run_soak", "main"]

#: A micro VQFRv2: 4 levels, no attention, 16 px faces. Same code paths as the released model, ~15 ms a face on a CPU.
MICRO_V2 = {
    "type": "VQFRv2", "base_channels": 32, "channel_multipliers": [1, 1, 1, 2], "num_enc_blocks": 1,
    "use_enc_attention": False, "num_dec_blocks": 1, "use_dec_attention": False, "code_dim": 16, "inpfeat_dim": 32,
    "align_opt": {"cond_channels": 32, "deformable_groups": 4}, "code_selection_mode": "Predict",
    "quantizer_opt": {"type": "L2VectorQuantizer", "num_code": 16, "code_dim": 16, "spatial_size": [2, 2]},
}
FACE_SIZE = 16


def _face(rng: np.random.Generator, size: int = FACE_SIZE) -> np.ndarray:
    """A smooth random BGR uint8 [size, size, 3] image (compresses like a photo, unlike white noise)."""
    import cv2

    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _encode(ext: str, img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, img)
    assert ok, ext
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int = 30000, height: int = 30000) -> bytes:
    """A valid-looking PNG whose header claims width x height pixels (8-bit RGB) but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


#: Good inputs: name -> writer(folder/stem, rng) -> path. Odd but valid formats are converted, not refused.
GOOD_KINDS: dict[str, Callable[[Path, np.random.Generator], Path]] = {
    "png": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r))),
    "jpg": lambda p, r: _write(p.with_suffix(".jpg"), _encode(".jpg", _face(r))),
    "png16": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r).astype(np.uint16) * 257)),
    "grey": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r)[:, :, 0])),
    "bgra": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", np.dstack([_face(r), _face(r)[:, :, :1]]))),
    "larger": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r, 2 * FACE_SIZE))),  # resized
}

#: Bad inputs: name -> writer(folder/stem, rng) -> path. Each must be reported and skipped.
BAD_KINDS: dict[str, Callable[[Path, np.random.Generator], Path]] = {
    "truncated_png": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r))[:-40]),
    "truncated_jpeg": lambda p, r: _write(p.with_suffix(".jpg"), _encode(".jpg", _face(r))[:200]),
    "empty": lambda p, r: _write(p.with_suffix(".png"), b""),
    "text_as_jpg": lambda p, r: _write(p.with_suffix(".jpg"), b"this is not an image\n"),
    "huge_header": lambda p, r: _write(p.with_suffix(".png"), huge_png_header()),
    "not_square": lambda p, r: _write(p.with_suffix(".png"), _encode(".png", _face(r, FACE_SIZE)[:, :-3])),
    "nan_tiff": lambda p, r: _write(p.with_suffix(".tif"), _encode(".tiff", np.full((FACE_SIZE,) * 2 + (3,), np.nan,
                                                                                     np.float32))),
}


def make_folder(folder: Path, count: int, bad_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Write ``count`` inputs into ``folder``, ``round(count * bad_fraction)`` of them bad, spread evenly and cycling
    through :data:`BAD_KINDS`; good ones cycle through :data:`GOOD_KINDS`. Returns (good paths, bad paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_bad = round(count * bad_fraction)
    bad_at = set(np.linspace(0, count - 1, n_bad).round().astype(int).tolist()) if n_bad else set()
    good: list[Path] = []
    bad: list[Path] = []
    goods, bads = list(GOOD_KINDS.items()), list(BAD_KINDS.items())
    for i in range(count):
        if i in bad_at:
            name, writer = bads[len(bad) % len(bads)]
            bad.append(writer(folder / f"img{i:05d}_{name}", rng))
        else:
            name, writer = goods[len(good) % len(goods)]
            good.append(writer(folder / f"img{i:05d}_{name}", rng))
    return good, bad


#: The CLI's last line on stdout: "vqfr: N images, M faces restored, ..." (vqfr/cli.py).
_SUMMARY = re.compile(r"^vqfr: \d+ images, ", re.M)


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _count_files(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError:
        return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class SoakResult:
    """What the soak found. ``samples`` are (seconds since start, outputs finished, VmRSS KiB); the RSS figures count
    those up to ``work_end_s``, when the CLI printed its summary (None: it never did; then every sample counts)."""

    count: int
    good: int
    bad: int
    exit_code: int
    outputs: int
    reported: int
    problems: list[str]
    samples: list[tuple[float, int, int]]
    wall_s: float
    warmup_images: int
    rss_at_warmup_kib: int | None
    rss_peak_after_kib: int | None
    rss_final_kib: int | None
    rss_growth: float | None
    rss_slope_kib_per_image: float | None
    command: list[str]
    work_end_s: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        def mib(kib: int | None) -> str:
            return f"{kib / 1024:.1f} MiB" if kib is not None else "n/a"

        lines = [
            f"inputs: {self.count} ({self.good} good, {self.bad} bad); exit code {self.exit_code}; "
            f"{self.outputs} outputs; {self.reported} reported; {self.wall_s:.1f} s",
            f"RSS: {mib(self.rss_at_warmup_kib)} after {self.warmup_images} images (warm-up), peak after "
            f"{mib(self.rss_peak_after_kib)}, final {mib(self.rss_final_kib)}, growth "
            f"{'n/a' if self.rss_growth is None else f'{100 * self.rss_growth:+.1f}%'}, slope "
            f"{'n/a' if self.rss_slope_kib_per_image is None else f'{self.rss_slope_kib_per_image:+.2f} KiB/image'}"
            f" ({len(self.work_samples())} samples{self._exit_note()})",
        ]
        series = self.rss_series()
        if series:
            lines.append("RSS by outputs done: " + ", ".join(f"{done}: {kib / 1024:.1f}" for done, kib in series)
                         + " MiB")
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["all checks passed"]
        return "\n".join(lines)

    def work_samples(self) -> list[tuple[float, int, int]]:
        """The samples taken before the CLI printed its summary line."""
        return _before(self.samples, self.work_end_s)

    def _exit_note(self) -> str:
        after = len(self.samples) - len(self.work_samples())
        return f"; {after} more during the process's exit, not counted" if after else ""

    def rss_series(self, steps: int = 10) -> list[tuple[int, int]]:
        """(outputs done, VmRSS KiB) at the first sample past each tenth of the good inputs."""
        out: list[tuple[int, int]] = []
        for k in range(1, steps + 1):
            target = round(k * self.good / steps)
            hit = next(((done, rss) for _, done, rss in self.work_samples() if done >= target), None)
            if hit is not None and (not out or hit[0] > out[-1][0]):
                out.append(hit)
        return out


def _before(samples: list[tuple[float, int, int]], end: float | None) -> list[tuple[float, int, int]]:
    return [s for s in samples if end is None or s[0] <= end]


def _rss_stats(samples: list[tuple[float, int, int]], warmup_images: int):
    """(RSS at warm-up, peak after it, growth, slope per image) over ``samples`` (those of the work, not the exit)."""
    after = [(done, rss) for _, done, rss in samples if done >= warmup_images]
    if len(after) < 2:
        return None, None, None, None
    base = after[0][1]
    peak = max(rss for _, rss in after)
    done = np.array([d for d, _ in after], np.float64)
    rss = np.array([r for _, r in after], np.float64)
    slope = float(np.polyfit(done, rss, 1)[0]) if np.ptp(done) > 0 else None
    return base, peak, peak / base - 1, slope


def run_soak(count: int, bad_fraction: float, out: str | Path, *, batch: int = 8, warmup: float = 0.1,
             rss_tolerance: float = 0.10, interval: float = 0.1, seed: int = 0,
             python: str = sys.executable) -> SoakResult:
    """Generate the folder under ``out`` and run the CLI on it; see the module docstring."""
    import cv2
    import torch

    import vqfr

    out = Path(out)
    inputs, results = out / "inputs", out / "results"
    if results.exists() and any(results.rglob("*")):
        raise SystemExit(f"{results} is not empty; pass a fresh --out")
    good, bad = make_folder(inputs, count, bad_fraction, seed)
    before = {p: _sha256(p) for p in inputs.iterdir()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = vqfr.build_model(dict(MICRO_V2)).eval()
    weights = vqfr.save_safetensors(model, out / "micro_v2.safetensors")
    command = [python, "-m", "vqfr", "-i", str(inputs), "-o", str(results), "--weights", str(weights), "--aligned",
               "--batch", str(batch), "-q"]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1",  # the summary line reaches the file when printed
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    samples: list[tuple[float, int, int]] = []
    work_end = None
    start = time.perf_counter()
    with open(out / "cli.stdout.txt", "w") as stdout, open(out / "cli.stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=root)
        while proc.poll() is None:
            rss = _rss_kib(proc.pid)
            now = time.perf_counter() - start
            if work_end is None and _SUMMARY.search((out / "cli.stdout.txt").read_text()):
                work_end = now
            if rss is not None:
                samples.append((now, _count_files(results / "restored_faces"), rss))
            time.sleep(interval)
    wall = time.perf_counter() - start
    err_lines = (out / "cli.stderr.txt").read_text().splitlines()
    failed = [line for line in err_lines if line.startswith("vqfr: FAILED")]

    problems = []
    if proc.returncode != (3 if bad else 0):
        problems.append(f"exit code {proc.returncode}, expected {3 if bad else 0}")
    for path in bad:
        hits = sum(str(path) in line for line in failed)
        if hits != 1:
            problems.append(f"{path.name}: reported {hits} times, expected once")
    if len(failed) != len(bad):
        problems.append(f"{len(failed)} FAILED lines for {len(bad)} bad inputs")
    if any("Traceback" in line for line in err_lines):
        problems.append("a traceback was printed")
    if stray_lines := [line for line in err_lines if line.strip() and not line.startswith("vqfr: ")]:
        problems.append(f"{len(stray_lines)} stderr lines besides the CLI's own (decoder chatter?): {stray_lines[:3]}")
    outputs = 0
    for path in good:
        group = [results / g / f"{path.stem}_00.png" for g in ("restored_faces", "cropped_faces", "cmp")]
        decoded = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in group]
        if any(img is None for img in decoded):
            problems.append(f"{path.name}: missing or undecodable output")
            continue
        shapes = [getattr(img, "shape", None) for img in decoded]
        if shapes[0] != (FACE_SIZE, FACE_SIZE, 3) or shapes[2] != (FACE_SIZE, 2 * FACE_SIZE, 3):
            problems.append(f"{path.name}: outputs of the wrong size {shapes}")
        outputs += 1
    names = {p.name for p in results.rglob("*") if p.is_file()}
    expected = {f"{p.stem}_00.png" for p in good}
    if stray := sorted(names - expected):
        problems.append(f"{len(stray)} unexpected files in the results (temporary or extra): {stray[:5]}")
    if {p: _sha256(p) for p in inputs.iterdir()} != before:
        problems.append("the input folder changed")

    warmup_images = max(int(round(warmup * len(good))), 1)
    work = _before(samples, work_end)
    base, peak, growth, slope = _rss_stats(work, warmup_images)
    if growth is None:
        problems.append(f"too few RSS samples after warm-up ({len(samples)} samples in all)")
    elif growth > rss_tolerance:
        problems.append(f"RSS grew {100 * growth:.1f}% after warm-up (tolerance {100 * rss_tolerance:.0f}%)")
    return SoakResult(count, len(good), len(bad), proc.returncode, outputs, len(failed), problems, samples, wall,
                      warmup_images, base, peak, work[-1][2] if work else None, growth, slope, command, work_end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.soak", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000, help="images in the folder (default: 1000)")
    p.add_argument("--bad-fraction", type=float, default=0.05, help="fraction of broken inputs (default: 0.05)")
    p.add_argument("--out", required=True, help="work folder (inputs/, results/, soak.json); must be fresh")
    p.add_argument("--batch", type=int, default=8, help="CLI --batch (default: 8)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of images counted as warm-up (default: 0.1)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth after warm-up (0.10)")
    p.add_argument("--interval", type=float, default=0.1, help="RSS sampling period in seconds (default: 0.1)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be at least 1, got {args.count}")
    if not 0 <= args.bad_fraction <= 1:  # a negative one crashed in numpy, one above 1 was taken as 1
        p.error(f"--bad-fraction must be between 0 and 1, got {args.bad_fraction}")
    if args.count - round(args.count * args.bad_fraction) < 1:  # the memory is measured over the good inputs
        p.error(f"--bad-fraction {args.bad_fraction:g} of --count {args.count} leaves no good input to measure the "
                "memory over; lower --bad-fraction or raise --count")
    result = run_soak(args.count, args.bad_fraction, args.out, batch=args.batch, warmup=args.warmup,
                      rss_tolerance=args.rss_tolerance, interval=args.interval)
    import torch

    record = dataclasses.asdict(result) | {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}", "ok": result.ok}
    atomic_write_bytes(Path(args.out, "soak.json"), (json.dumps(record, indent=1) + "\n").encode())
    print(result.summary())
    print(f"details: {Path(args.out, 'soak.json')}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
