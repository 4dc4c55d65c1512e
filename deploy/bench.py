"""Latency of every backend, measured the same way, with its error beside it: ``python -m deploy.bench``.

    python -m deploy.bench --version v2 --device cpu --backends torch,onnxruntime        # CPU, a few minutes
    python -m deploy.bench --version v2 --backends torch,torch-max --precision fp16 --batch 1,8 --fidelity 1,0
    python -m deploy.bench --weights VQFR_v2.pth --out bench_out
    python -m deploy.bench --version v2 --backends torch-max,torch-max-gn --batch 1,8   # A/B the fused GroupNorm

What a run measures, for each backend x precision x batch x fidelity:

- ``forward``: the model alone, ``backend.infer(x, fidelity)`` on a float32 batch already on the device;
- ``restore``: ``vqfr.Runtime.restore_batch`` of aligned BGR uint8 faces, with the official pre- and
  post-processing (uint8 -> tensor -> model -> uint8), as users call it.

How it times: the first call is timed on its own (``first_call_s``: compilation, autotuning, CUDA-graph capture),
then warm-up calls, then ``--iters`` timed calls rotating among ``--inputs`` input sets. On a GPU each forward call
is timed by CUDA events; restore calls (and every CPU call) by the host clock after a synchronisation. Rows report
the median, 10th and 90th percentiles, images/s (batch / median), the process CPU time per call (CPU runs: other
jobs on the machine show up as wall time above CPU time), peak GPU memory, the build time of the backend, and the
max abs error and PSNR against the fp32 reference output on the same inputs.

Baseline rows run in every run: the reference model eager (``model.to(dtype)``, like the official code) with the
reference deformable conv (no Triton, no grid_sample: ``kernels.use("reference")``) in fp32 and, on a GPU, fp16;
and, when torchvision imports, the same with ``torchvision.ops.deform_conv2d`` swapped in as the official code calls
it (including its per-call offset-magnitude check, a host sync). The fp32 reference is the error reference of every
other row and the denominator of ``x ref fp32``.

Without ``--weights`` the official architecture gets seeded random weights (N(0, 1/fan_in) convolutions, so that
activations, offsets and errors are of realistic size); the run says so. Without ``--faces`` and without the sample
faces it times synthetic inputs, and a CPU run that starts on a busy machine with OpenMP's threads spinning
(``OMP_WAIT_POLICY`` unset) may be many times slower: both are said before any timing and kept in the results'
``notes``. Results go to ``--out``: ``results.json``, ``results.md``, ``results.png`` (needs matplotlib:
``pip install 'vqfr-deploy[bench]'``), and the table is printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import kernels
from deploy import report
from deploy.baselines import DTYPES, SEED, EagerBaseline, seeded_weights_, torchvision_problem
from deploy.engines import EngineCache
from deploy.measure import Timing, compare_images, compare_outputs, percentile, time_calls
from vqfr.backends import BACKENDS, Backend
from vqfr.backends.torch import TorchBackend
from vqfr.backends.torch_fast import FastOptions
from vqfr.errors import BackendUnavailable, ConfigError, VQFRError
from vqfr.models import Network

__all__ = ["BenchConfig", "Row", "Subject", "run", "run_subject", "make_subjects", "make_faces", "load_bench_model",
           "main", "BASELINES", "CANDIDATES"]

BASELINES = ("reference", "torchvision")
#: Backends a run can time, in the order they run.
CANDIDATES = ("torch", "torch-max", "torch-max-gn", "onnxruntime", "tensorrt", "aoti")
PRECISIONS = tuple(DTYPES)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- configuration
def _flag(field: str) -> str:
    """The CLI flag of a :class:`BenchConfig` field, for errors that read right in both (``batches`` -> ``--batch``)."""
    return "--batch" if field == "batches" else "--" + field.replace("_", "-")


@dataclasses.dataclass
class BenchConfig:
    """Everything a run needs (the CLI fills it; tests build it directly).

    Attributes:
        weights: a checkpoint, or None for seeded random weights.
        config: model options (``"v1"``, ``"v2"``, a yml path or a dict); None: from the checkpoint, else v2.
        backends: candidate backends (see :data:`CANDIDATES`), or ``["auto"]``.
        precisions: precisions of the candidates.
        batches: batch sizes.
        fidelities: v2 fidelities (v1 has none).
        device: ``cpu``, ``cuda`` or ``auto``.
        iters, warmup: timed and untimed calls per row (None: 30/5 on a GPU, 2/1 on the CPU).
        restore_iters: timed restore calls (None: 10 on a GPU, 1 on the CPU); 0 skips the restore rows.
        inputs: input sets rotated through (None: 4 on a GPU, 2 on the CPU).
        row_seconds: cap on the timed calls of one row (fewer iterations for slow rows; None: no cap).
        size: face size for v1 (v2 fixes it).
        faces: folder of aligned faces for the inputs (None: ../shared/faces/aligned if present, else synthetic
            inputs, said in the log and in the results' notes).
        out: output folder.
        threads: torch CPU threads (None: torch's default).
        fast: options of the ``torch-max`` backend (``torch-max-gn`` is the same with ``fused_group_norm``).
        tf32: allow TF32 in fp32 rows on the GPU (default off: fp32 means fp32).
        rebuild: rebuild cached engines.
        chart: write the PNG chart.
    """

    weights: str | Path | None = None
    config: Any = None
    backends: Sequence[str] = ("auto",)
    precisions: Sequence[str] | None = None
    batches: Sequence[int] | None = None
    fidelities: Sequence[float] = (1.0,)
    device: str = "auto"
    iters: int | None = None
    warmup: int | None = None
    restore_iters: int | None = None
    inputs: int | None = None
    row_seconds: float | None = None
    size: int | None = None
    faces: str | Path | None = None
    out: str | Path = "bench_out"
    threads: int | None = None
    fast: FastOptions = dataclasses.field(default_factory=FastOptions)
    tf32: bool = False
    rebuild: bool = False
    chart: bool = True

    def __post_init__(self) -> None:
        # Checked here so a config built in code is refused like the CLI's flags: a row with no timed call has no
        # median, the first call (timed alone) is the least warm-up, zero input sets or threads were taken for the
        # defaults without a word, and a row_seconds of 0 or less silently capped every row at 3 calls while inf and
        # nan failed inside the timing loop (OverflowError, ValueError).
        for name, value, least in (("iters", self.iters, 1), ("restore_iters", self.restore_iters, 0),
                                   ("warmup", self.warmup, 1), ("inputs", self.inputs, 1),
                                   ("threads", self.threads, 1)):
            if value is not None and value < least:
                raise ValueError(f"{_flag(name)} must be at least {least}, got {value}")
        batches = list(self.batches or [])
        if any(b < 1 for b in batches):
            raise ValueError(f"{_flag('batches')} sizes must be at least 1, got {','.join(map(str, batches))}")
        if self.row_seconds is not None and not 0 < self.row_seconds < math.inf:
            raise ValueError(f"{_flag('row_seconds')} must be a positive number of seconds, got {self.row_seconds:g}")

    def resolved(self, device: torch.device) -> BenchConfig:
        """A copy with the device-dependent defaults filled in."""
        gpu = device.type == "cuda"
        return dataclasses.replace(
            self,
            precisions=list(self.precisions or (["fp16"] if gpu else ["fp32"])),
            batches=list(self.batches or ([1, 8] if gpu else [1])),
            iters=self.iters if self.iters is not None else (30 if gpu else 2),
            warmup=max(1, self.warmup if self.warmup is not None else (5 if gpu else 1)),
            restore_iters=self.restore_iters if self.restore_iters is not None else (10 if gpu else 1),
            inputs=max(1, self.inputs or (4 if gpu else 2)),
            row_seconds=self.row_seconds if self.row_seconds is not None else (20.0 if gpu else None),
        )


@dataclasses.dataclass
class Row:
    """One line of results (times in ms, memory in MiB; None where not measured)."""

    backend: str
    precision: str
    batch: int
    device: str
    what: str = "forward"
    fidelity: float | None = None
    baseline: bool = False
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    img_per_s: float | None = None
    cpu_ms: float | None = None
    peak_mem_mb: float | None = None
    build_s: float | None = None
    first_call_s: float | None = None
    max_abs_err: float | None = None
    psnr_db: float | None = None
    error_unit: str = ""
    speedup: float | None = None
    iters: int = 0
    status: str = "ok"
    note: str = ""
    paths: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- model and inputs
def load_bench_model(weights: str | Path | None, config: Any) -> tuple[Network, str]:
    """(the model, eval, CPU fp32; a description of its weights)."""
    import vqfr

    if weights is not None:
        from vqfr.checkpoint import file_sha256

        model = vqfr.load_model(weights, config)
        return model.eval(), f"{weights} (sha256 {file_sha256(weights)[:12]})"
    model = seeded_weights_(vqfr.build_model(config if config is not None else "v2"), SEED).eval()
    return model, f"RANDOM (seed {SEED}, N(0, 1/fan_in)): no --weights given; speed is that of the real model, " \
                  "outputs are meaningless"


def face_size(model: Network, requested: int | None) -> int:
    from vqfr.backends.torch import _face_size

    fixed = _face_size(model.options)
    if fixed is not None:
        if requested is not None and requested != fixed:
            raise VQFRError(f"--size {requested}: this {model.options['type']} works at {fixed} only",
                            fix="leave --size out")
        return fixed
    size = requested or 512
    if size < 32 or size % 32:
        raise VQFRError(f"--size must be a positive multiple of 32, got {size}")
    return size


def default_faces() -> Path:
    """Where the sample aligned faces are looked for without ``--faces``: ``$VQFR_SHARED/faces/aligned``
    (``../shared`` next to the checkout by default); it may be absent."""
    return Path(os.environ.get("VQFR_SHARED", ROOT.parent / "shared")) / "faces" / "aligned"


def face_files(folder: str | Path) -> list[Path]:
    """The .png and .jpg images in ``folder``, sorted; none when it is not a folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
        if folder.is_dir() else []


def make_faces(count: int, size: int, folder: str | Path | None, seed: int = SEED) -> tuple[np.ndarray, str]:
    """``count`` aligned BGR uint8 faces [count, size, size, 3] and where they came from.

    From the images in ``folder`` (resized; reused with horizontal flips when there are fewer than ``count``), or
    with ``folder=None`` seeded smooth synthetic images.

    Raises:
        VQFRError: ``folder`` is not a folder, holds no images or an image that cannot be read.
    """
    import cv2

    files = face_files(folder) if folder is not None else []
    if folder is not None and not files:
        raise VQFRError("holds no .png or .jpg images" if Path(folder).is_dir() else "is not a folder", path=folder,
                        fix="pass --faces DIR, a folder of aligned faces")
    out = np.empty((count, size, size, 3), np.uint8)
    if files:
        images = []
        for path in files:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise VQFRError("cannot be read as an image", path=path, fix="remove it or pass another --faces")
            images.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if img.shape[0] > size
                                     else cv2.INTER_LINEAR))
        for i in range(count):
            img = images[i % len(images)]
            out[i] = img[:, ::-1] if (i // len(images)) % 2 else img
        return out, f"{len(files)} aligned faces from {folder} (flipped copies when reused)"
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.normal(0, 1, (max(size // 16, 2), max(size // 16, 2), 3)).astype(np.float32)
        smooth = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        detail = rng.normal(0, 0.15, (size, size, 3)).astype(np.float32)
        out[i] = np.clip(128 + 50 * smooth + 40 * detail, 0, 255).astype(np.uint8)
    return out, f"synthetic smooth noise (seed {seed})"


# ---------------------------------------------------------------------------------------------------- subjects
@dataclasses.dataclass
class Subject:
    """One way of running the model: a backend at a precision, built by ``make`` (timed as ``build_s``)."""

    backend: str
    precision: str
    baseline: bool
    make: Callable[[], Any]
    note: str = ""
    unavailable: str | None = None


def _entry(name: str, device: torch.device):
    return next(e for e in BACKENDS if e.name == name and e.device == device.type and e.provider is None)


def _engine_backend(built: tuple[Path, float | None], name: str, device: torch.device) -> Backend:
    """The first usable table row of ``name`` that loads the engine on ``device`` (as vqfr.Runtime picks it), with a
    note saying whether the engine was built in this run."""
    import vqfr

    path, seconds = built
    backend = vqfr.Runtime(path, backend=name, device=device.type).backend
    # read back by run_subject with getattr: the note belongs to the benchmark, not to the Backend protocol
    backend.bench_note = (f"engine {path.name} built in {seconds:.0f} s"  # type: ignore[attr-defined]
                          if seconds is not None else f"engine {path.name} reused (build_s is the load time)")
    return backend


def expand_backends(names: Sequence[str], device: torch.device) -> list[str]:
    """``auto`` -> what is worth timing on this device; other names are checked (:func:`check_backend_names`)."""
    check_backend_names(names)
    out: list[str] = []
    for name in names:
        if name == "auto":
            auto = ["torch", "torch-max", "onnxruntime", "tensorrt"] if device.type == "cuda" else \
                ["torch", "onnxruntime"]
            out += [n for n in auto if n not in out]
        elif name not in out:
            out.append(name)
    return out


def check_backend_names(names: Sequence[str]) -> None:
    """Refuse a ``--backends`` name that is neither ``auto`` nor one of :data:`CANDIDATES` (VQFRError)."""
    for name in names:
        if name != "auto" and name not in CANDIDATES:
            raise VQFRError(f"unknown backend {name!r} in --backends",
                            fix=f"use auto or a comma-separated list of {', '.join(CANDIDATES)}")


def make_subjects(cfg: BenchConfig, model: Network, device: torch.device, engines: EngineCache) -> list[Subject]:
    """The fp32 reference first (it provides the reference outputs), then the candidates, then the other baselines
    (so that a run cut short by a time limit has measured what it was run for)."""
    assert cfg.precisions is not None and cfg.batches is not None
    base_precisions = ["fp32"] + [p for p in PRECISIONS[1:] if p in cfg.precisions or
                                  (p == "fp16" and device.type == "cuda")]
    subjects = [Subject("reference", p, True, functools.partial(EagerBaseline, model, device, p),
                        "eager model.to(dtype), reference deformable conv") for p in base_precisions]
    subjects += [Subject("torchvision", p, True, functools.partial(EagerBaseline, model, device, p, "torchvision"),
                         "eager, torchvision.ops.deform_conv2d as the official code calls it",
                         torchvision_problem(device, p))
                 for p in base_precisions]
    max_batch = max(cfg.batches)
    fast = cfg.fast.resolved(device)
    factories: dict[str, Callable[[str], Callable[[], Any]]] = {
        "torch": lambda p: lambda: _loaded(TorchBackend(_entry("torch", device), model, precision=p, mode="eager",
                                                        device=str(device))),
        "torch-max": lambda p: lambda: _loaded(TorchBackend(_entry("torch", device), model, precision=p, mode="max",
                                                            fast=cfg.fast, device=str(device))),
        # torch-max plus the fused GroupNorm + SiLU (opt-in, not yet measured on a GPU): one run A/Bs the two
        "torch-max-gn": lambda p: lambda: _loaded(TorchBackend(
            _entry("torch", device), model, precision=p, mode="max",
            fast=dataclasses.replace(cfg.fast, fused_group_norm=True), device=str(device))),
        "onnxruntime": lambda p: lambda: _engine_backend(engines.onnx(p), "onnxruntime", device),
        "tensorrt": lambda p: lambda: _engine_backend(engines.tensorrt(p, max_batch), "tensorrt", device),
        "aoti": lambda p: lambda: _engine_backend(engines.aoti(p, device), "aoti", device),
    }
    max_note = ", ".join(k for k, on in (("compile" + (f" ({fast.compile_mode})" if fast.compile_mode else ""),
                                          fast.compile), ("CUDA graphs", fast.cuda_graphs),
                                         ("channels_last", fast.channels_last),
                                         ("fp32 islands", fast.fp32_islands)) if on) or "no extras"
    notes = {
        "torch": "eager; " + ("Triton kernels" if device.type == "cuda" else "pure torch (grid_sample DCN in fp32)")
                 + "; fp32 islands in fp16/bf16",
        "torch-max": max_note,
        "torch-max-gn": f"{max_note}, fused GroupNorm+SiLU (kernels.group_norm_silu)",
    }
    candidates = [Subject(name, p, False, factories[name](p), notes.get(name, ""))
                  for name in expand_backends(cfg.backends, device) for p in cfg.precisions]
    return subjects[:1] + candidates + subjects[1:]


def _loaded(backend: Backend) -> Backend:
    backend.load()
    return backend


def _fill_timing(row: Row, timing: Timing) -> None:
    row.iters = len(timing.ms)
    row.first_call_s = timing.first_s
    if timing.ms:
        row.median_ms = statistics.median(timing.ms)
        row.p10_ms, row.p90_ms = percentile(timing.ms, 0.1), percentile(timing.ms, 0.9)
        row.img_per_s = row.batch / (row.median_ms / 1e3) if row.median_ms > 0 else None
    if timing.cpu_ms:
        row.cpu_ms = statistics.median(timing.cpu_ms)



# ---------------------------------------------------------------------------------------------------- running rows
def _device_used_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def _launch_delta(before: collections.Counter) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in kernels.LAUNCHES.items() if v - before.get(k, 0)}


@dataclasses.dataclass
class _Context:
    cfg: BenchConfig
    device: torch.device
    model: Network
    size: int
    face_sets: dict[int, list[np.ndarray]]  # batch -> sets of [B, S, S, 3] uint8
    x_sets: dict[int, list[Tensor]]  # batch -> sets of [B, 3, S, S] float32 on the device
    fidelities: list[float | None]
    references: dict[tuple, dict[int, Any]]  # (what, batch, fidelity) -> {input set: reference output}
    log: Callable[[str], None]


def _forward_row(ctx: _Context, subject: Subject, runner: Any, batch: int, fid: float | None, row: Row,
                 mem_base: float | None) -> None:
    cfg, device = ctx.cfg, ctx.device
    assert cfg.warmup is not None and cfg.iters is not None
    xs = ctx.x_sets[batch]
    f = torch.full((batch,), 0.0 if fid is None else fid, dtype=torch.float32)
    outs: dict[int, Tensor] = {}

    def call(i: int) -> None:
        outs[i % len(xs)] = runner.infer(xs[i % len(xs)], f)

    before = collections.Counter(kernels.LAUNCHES)
    timing = time_calls(call, warmup=cfg.warmup, iters=cfg.iters, device=device, row_seconds=cfg.row_seconds,
                        on_warm=_reset_peak(device))
    for i in range(len(xs)):  # every input set gets compared, also when fewer calls ran
        if i not in outs:
            call(i)
    _fill_timing(row, timing)
    row.paths = _launch_delta(before)
    _memory(row, runner, device, mem_base)
    outputs = [outs[i].detach().float().cpu() for i in range(len(xs))]
    _errors(ctx, subject, row, ("forward", batch, fid), outputs, compare_outputs, "model output, [-1, 1]")


def _restore_row(ctx: _Context, subject: Subject, runner: Any, batch: int, fid: float | None, row: Row,
                 mem_base: float | None) -> None:
    import vqfr

    cfg, device = ctx.cfg, ctx.device
    assert cfg.restore_iters is not None
    sets = ctx.face_sets[batch]
    rt = vqfr.Runtime(ctx.model, backend="torch", device="cpu", max_batch=batch,
                      fidelity=0.0 if fid is None else fid, face_size=None if fid is not None else ctx.size)
    rt.backend.close()
    rt.backend = runner  # time this subject's backend inside the user-facing pipeline
    outs: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        outs[i % len(sets)] = np.stack(rt.restore_batch(list(sets[i % len(sets)]), aligned=True))

    before = collections.Counter(kernels.LAUNCHES)
    warm = 1 if device.type == "cuda" else 0  # the forward row already warmed the backend up
    timing = time_calls(call, warmup=warm, iters=cfg.restore_iters, device=device, events=False,
                        row_seconds=cfg.row_seconds, on_warm=_reset_peak(device))
    _fill_timing(row, timing)
    row.first_call_s = None
    row.paths = _launch_delta(before)
    _memory(row, runner, device, mem_base)
    ran = sorted(outs)
    _errors(ctx, subject, row, ("restore", batch, fid), [outs[i] for i in ran], compare_images, "8-bit image",
            sets_run=ran)


def _reset_peak(device: torch.device) -> Callable[[], None] | None:
    """Peak memory is that of the timed calls (weights, CUDA-graph pools and activations), not of the compilation or
    autotuning that the first call may do: after the warm-up, cached blocks are released and the peak is reset."""
    if device.type != "cuda":
        return None

    def reset() -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    return reset


def torch_peak_mb(device: torch.device) -> float:
    """Device memory a torch backend needed over the timed calls, in MiB.

    ``max_memory_allocated`` alone misses a CUDA graph's private pool: a replay allocates nothing, so the graph's
    intermediate activations never show up as allocated. The memory reserved at the end (after the cache was emptied
    at the warm-up) holds those pools, so the larger of the two counts them.
    """
    return max(torch.cuda.max_memory_allocated(device), torch.cuda.memory_reserved(device)) / 2**20


def _memory(row: Row, runner: Any, device: torch.device, mem_base: float | None) -> None:
    if device.type != "cuda":
        return
    if isinstance(runner, (TorchBackend, EagerBaseline)):
        row.peak_mem_mb = torch_peak_mb(device)
    else:  # onnxruntime / TensorRT allocate outside torch: device memory in use, less what was in use before
        used = _device_used_mb(device)
        row.peak_mem_mb = None if used is None or mem_base is None else used - mem_base
        row.note = (row.note + "; " if row.note else "") + "memory: device in use after the row (not a peak)"


def _errors(ctx: _Context, subject: Subject, row: Row, key: tuple, outputs: list, compare, unit: str,
            sets_run: list[int] | None = None) -> None:
    row.error_unit = unit
    if subject.backend == "reference" and subject.precision == "fp32":
        ctx.references[key] = dict(zip(sets_run if sets_run is not None else range(len(outputs)), outputs,
                                       strict=True))
        row.max_abs_err, row.psnr_db = 0.0, math.inf
        row.note = (row.note + "; " if row.note else "") + "the error reference"
        return
    refs = ctx.references.get(key)
    if refs is None:
        row.note = (row.note + "; " if row.note else "") + "no fp32 reference output to compare with"
        return
    ids = sets_run if sets_run is not None else list(range(len(outputs)))
    pairs = [(o, refs[i]) for o, i in zip(outputs, ids, strict=True) if i in refs]
    if pairs:
        row.max_abs_err, row.psnr_db = compare([p[0] for p in pairs], [p[1] for p in pairs])


def _label(subject: Subject, runner: Any) -> str:
    entry = getattr(runner, "entry", None)
    if subject.backend in ("onnxruntime", "tensorrt", "aoti") and entry is not None:
        return entry.label
    return subject.backend


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


#: Errors that make a row "failed" (recorded with the reason; the exit status is then 1) instead of ending the run.
ROW_ERRORS = (VQFRError, RuntimeError, ValueError, ImportError, OSError, AssertionError)


def run_subject(ctx: _Context, subject: Subject, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Build one subject, then time its rows (forward, and restore unless disabled) for every batch and fidelity;
    ``on_row(rows so far)`` after each row."""
    cfg, device = ctx.cfg, ctx.device
    assert cfg.batches is not None
    batches = cfg.batches

    def rows(**kw: Any) -> list[Row]:
        whats = ["forward"] + (["restore"] if cfg.restore_iters else [])
        kw.setdefault("note", subject.note)
        return [Row(subject.backend, subject.precision, b, str(device), what=w, fidelity=f,
                    baseline=subject.baseline, **kw)
                for b in batches for f in ctx.fidelities for w in whats]

    def skipped(status: str, note: str) -> list[Row]:  # one row says it for the whole subject
        return [Row(subject.backend, subject.precision, batches[0], str(device), baseline=subject.baseline,
                    status=status, note=note)]

    if subject.unavailable:
        return skipped("skipped", subject.unavailable)
    mem_base = _device_used_mb(device)
    start = time.perf_counter()
    try:
        runner = subject.make()
    except ROW_ERRORS as exc:
        status = "skipped" if isinstance(exc, (ImportError, BackendUnavailable, ConfigError)) else "failed"
        ctx.log(f"  {subject.backend} {subject.precision}: {status}: {_one_line(exc)}")
        return skipped(status, _one_line(exc))
    build_s = time.perf_counter() - start
    out: list[Row] = []
    extra_note = getattr(runner, "bench_note", "")
    try:
        label = _label(subject, runner)
        for row in rows(build_s=build_s, note="; ".join(n for n in (subject.note, extra_note) if n)):
            row.backend = label
            maker = _forward_row if row.what == "forward" else _restore_row
            try:
                maker(ctx, subject, runner, row.batch, row.fidelity, row, mem_base)
            except ROW_ERRORS as exc:  # e.g. out of memory at batch 8: record it, go on with the other rows
                row.status, row.note = "failed", _one_line(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out.append(row)
            ctx.log("  " + _progress(row))
            if on_row is not None:
                on_row(out)
    finally:
        runner.close()
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _progress(row: Row) -> str:
    fid = "" if row.fidelity is None else f" f{row.fidelity:g}"
    if row.status != "ok":
        return f"{row.backend} {row.precision} b{row.batch}{fid} {row.what}: {row.status}: {row.note}"
    err = "-" if row.max_abs_err is None else f"{row.max_abs_err:.2e}"
    return (f"{row.backend} {row.precision} b{row.batch}{fid} {row.what}: median {row.median_ms:.4g} ms "
            f"({row.img_per_s:.3g} img/s), max abs err {err}")


def _speedups(rows: list[Row]) -> None:
    ref = {(r.what, r.batch, r.fidelity): r.median_ms for r in rows
           if r.baseline and r.backend == "reference" and r.precision == "fp32" and r.median_ms}
    for r in rows:
        base = ref.get((r.what, r.batch, r.fidelity))
        if base and r.median_ms:
            r.speedup = base / r.median_ms


# ---------------------------------------------------------------------------------------------------- environment
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


#: Environment variables that change what is measured (recorded in the results).
_ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "VQFR_KERNELS",
             "VQFR_TORCH_MODE", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR")


def environment(device: torch.device) -> dict:
    """Hardware and software facts for the report."""
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for package in ("triton", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "torchvision", "tensorrt"):
        v = _version(package)
        if v:
            versions[package] = v
    info: dict[str, Any] = {"host": f"{platform.system()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores",
                            "versions": versions, "threads": torch.get_num_threads(),
                            "environment": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = f"CPU: {_cpu_name()}"
    return info


def _load_average() -> str | None:
    with contextlib.suppress(OSError, AttributeError):
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return None


def busy_cpu_note(device: torch.device, threads: int) -> str | None:
    """A warning when a CPU run starts while other jobs hold the cores (1-minute load average above the cores our
    threads leave free) and OpenMP's threads spin while waiting (``OMP_WAIT_POLICY`` unset): spinning threads fight
    those jobs, which can make the torch rows many times slower (docs/BENCHMARKS.md, "CPU results")."""
    if device.type != "cpu" or "OMP_WAIT_POLICY" in os.environ:
        return None
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cores = os.cpu_count() or 1
    if load <= cores - threads + 0.5:
        return None
    return (f"the machine looks busy (1-minute load average {load:.2f} on {cores} cores, {threads} torch threads) and "
            "OpenMP threads spin while waiting: torch rows can be several times slower than on a quiet machine; "
            "measure on a quiet machine, or set OMP_WAIT_POLICY=PASSIVE before Python starts")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch's own message lists twenty device types: say what this tool takes
        raise VQFRError(f"--device {name!r} is not a device", fix="use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise VQFRError(f"--device {name!r} is not a device this benchmark times", fix="use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VQFRError("--device cuda: torch sees no CUDA GPU", fix="use --device cpu, or a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VQFRError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)",
                        fix="use cuda:0 up to the last one, or check CUDA_VISIBLE_DEVICES")
    return device


# ---------------------------------------------------------------------------------------------------- the run
def run(cfg: BenchConfig, log: Callable[[str], None] | None = None,
        extra: Callable[[Network, torch.device], Sequence[Subject]] | None = None,
        on_subject: Callable[[dict, list[Row]], None] | None = None) -> tuple[dict, list[Row]]:
    """Run the benchmark; returns (meta, rows). Writes nothing (see :func:`main` and :mod:`deploy.report`).

    Args:
        cfg: what to run.
        log: progress lines (default: stderr).
        extra: ``extra(model, device)`` -> more subjects to time after the configured ones (your own runner: any
            object with ``infer(x, fidelity)``, ``close()`` and ``max_batch``), measured and compared the same way.
        on_subject: called with (meta, rows so far) after each subject and each row (``main`` saves partial results
            with it: a run killed while compiling batch 8 keeps the batch-1 rows of that backend).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    device = resolve_device(cfg.device)
    cfg = cfg.resolved(device)
    assert cfg.batches is not None and cfg.inputs is not None and cfg.warmup is not None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True
    load_before = _load_average()
    folder, notes = cfg.faces, []
    busy = busy_cpu_note(device, torch.get_num_threads())
    if busy:
        notes.append(busy)
        log(f"deploy.bench: {busy}")
    if folder is None:
        folder = default_faces()
        if not face_files(folder):  # said first, not only in the report minutes later
            notes.append(f"no sample faces at {folder}: timing on synthetic inputs; pass --faces DIR")
            log(f"deploy.bench: {notes[-1]}")
            folder = None
    model, weights_note = load_bench_model(cfg.weights, cfg.config)
    if cfg.weights is None:
        log(f"deploy.bench: {weights_note}")
    arch = model.options["type"]
    size = face_size(model, cfg.size)
    fidelities: list[float | None] = [float(f) for f in cfg.fidelities] if arch == "VQFRv2" else [None]
    faces, faces_note = make_faces(cfg.inputs * max(cfg.batches), size, folder)
    from vqfr.imaging import to_tensor

    face_sets = {b: [faces[s * b:(s + 1) * b] for s in range(cfg.inputs)] for b in cfg.batches}
    x_sets = {b: [to_tensor(f).to(device) for f in sets] for b, sets in face_sets.items()}
    engines = EngineCache(Path(cfg.out) / "engines", model, cfg.weights, rebuild=cfg.rebuild)
    ctx = _Context(cfg, device, model, size, face_sets, x_sets, fidelities, {}, log)
    subjects = make_subjects(cfg, model, device, engines) + list(extra(model, device) if extra else ())
    command = None
    if Path(sys.argv[0]).stem in ("bench", "__main__"):  # run as python -m deploy.bench
        command = "python -m deploy.bench " + " ".join(sys.argv[1:])
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "model": f"{arch} at {size}x{size}",
        "options": model.options,
        "weights": weights_note,
        "input_size": f"[B, 3, {size}, {size}]",
        "device": str(device),
        "timing": (f"first call timed alone, then {cfg.warmup - 1} warm-up, then up to {cfg.iters} timed calls "
                   f"(restore: {cfg.restore_iters}) rotating over {cfg.inputs} input sets"
                   + ("; CUDA events for forward calls, host clock after synchronize for restore"
                      if device.type == "cuda" else "; host clock (perf_counter) and process CPU time")
                   + (f"; at most {cfg.row_seconds:g} s of timed calls per row" if cfg.row_seconds else "")
                   + ("; cudnn.benchmark on, TF32 " + ("allowed" if cfg.tf32 else "off")
                      if device.type == "cuda" else "")),
        "inputs": faces_note,
        **({"notes": notes} if notes else {}),
        **environment(device),
    }
    started = time.perf_counter()
    rows: list[Row] = []

    def progress(current: list[Row]) -> None:  # current: the rows of the subject being measured
        _speedups(rows + current)
        meta["load_average"] = f"before {load_before}, now {_load_average()} (1/5/15 min)"
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        if on_subject is not None:
            on_subject(meta, rows + current)

    for subject in subjects:
        log(f"deploy.bench: {subject.backend} {subject.precision} on {device}")
        rows += run_subject(ctx, subject, on_row=progress)
        progress([])
    return meta, rows


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {text!r}") from exc

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--weights", type=Path, help="a released .pth or .safetensors (default: seeded random weights)")
    model.add_argument("--version", choices=("v1", "v2"), help="official architecture with random weights")
    parser.add_argument("--config", help="model options: v1, v2 or a yml path (with --weights: overrides the guess)")
    parser.add_argument("--backends", type=_csv(str), default=["auto"],
                        help=f"auto, or a comma-separated list of {', '.join(CANDIDATES)}")
    parser.add_argument("--precision", type=_csv(str), default=None, help="e.g. fp32,fp16 (default: fp16 on a GPU, "
                        "fp32 on the CPU)")
    parser.add_argument("--batch", type=_csv(int), default=None, help="e.g. 1,8 (default: 1,8 on a GPU, 1 on the CPU)")
    parser.add_argument("--fidelity", type=_csv(float), default=[1.0], help="v2 fidelities, e.g. 1,0 (default 1: the "
                        "whole network runs; 0 skips the main branch)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--iters", type=int, help="timed calls per row (default 30 on a GPU, 2 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first, the first one timed alone (default 5 / 1)")
    parser.add_argument("--restore-iters", type=int, help="timed restore calls (default 10 / 1; 0: no restore rows)")
    parser.add_argument("--inputs", type=int, help="input sets rotated through (default 4 / 2)")
    parser.add_argument("--row-seconds", type=float, help="cap on timed seconds per row (default 20 on a GPU)")
    parser.add_argument("--size", type=int, help="face size for v1 (default 512; v2 fixes it)")
    parser.add_argument("--faces", type=Path, help="folder of aligned faces (default ../shared/faces/aligned; "
                        "without it, synthetic inputs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out)")
    parser.add_argument("--no-compile", action="store_true", help="torch-max(-gn): no torch.compile")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="torch-max(-gn): no CUDA graphs")
    parser.add_argument("--no-channels-last", action="store_true", help="torch-max(-gn): NCHW")
    parser.add_argument("--compile-mode", help="torch-max(-gn): torch.compile mode, e.g. max-autotune-no-cudagraphs "
                        "(reduce-overhead and max-autotune, which capture CUDA graphs themselves, need "
                        "--no-cuda-graphs)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 rows on the GPU")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached engines in OUT/engines")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart (no matplotlib needed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for p in args.precision or []:
        if p not in PRECISIONS:
            build_parser().error(f"unknown precision {p!r}; use {', '.join(PRECISIONS)}")
    try:  # BenchConfig refuses bad counts and --row-seconds, before the model is built
        cfg = BenchConfig(
            weights=args.weights, config=args.config or args.version, backends=args.backends,
            precisions=args.precision, batches=args.batch, fidelities=args.fidelity, device=args.device,
            iters=args.iters, warmup=args.warmup, restore_iters=args.restore_iters, inputs=args.inputs,
            row_seconds=args.row_seconds, size=args.size, faces=args.faces, out=args.out, threads=args.threads,
            tf32=args.tf32, rebuild=args.rebuild, chart=not args.no_chart,
            fast=FastOptions(compile=False if args.no_compile else None, compile_mode=args.compile_mode,
                             cuda_graphs=False if args.no_cuda_graphs else None,
                             channels_last=not args.no_channels_last))
    except ValueError as exc:
        build_parser().error(str(exc))
    try:
        check_backend_names(args.backends)  # before the model is built
    except VQFRError as exc:
        build_parser().error(str(exc))
    if args.out.exists() and not args.out.is_dir():  # found before the model is built, not at the first save
        build_parser().error(f"--out {args.out} is a file; pass a folder (new, or one of an earlier run)")
    if not args.no_chart:
        try:  # before the run: without matplotlib it used to fail after timing everything
            report.check_chart()
        except ImportError as exc:
            build_parser().error(f"{exc}; or pass --no-chart")

    def save_partial(meta: dict, rows: list[Row]) -> None:  # a run killed by a time limit keeps what it measured
        report.write_all(cfg.out, {**meta, "partial": True}, [r.as_dict() for r in rows], chart=False)
        stale_chart.unlink(missing_ok=True)

    # An --out that holds an earlier run: its table is rewritten with the JSON, and its chart, which would
    # contradict the new results until (or, with --no-chart, after) the end, is removed.
    stale_chart = Path(cfg.out) / "results.png"
    try:
        meta, rows = run(cfg, on_subject=save_partial)
    except VQFRError as exc:
        print(f"deploy.bench: error: {exc}", file=sys.stderr)
        return 2
    dicts = [r.as_dict() for r in rows]
    paths = report.write_all(cfg.out, meta, dicts, chart=cfg.chart)
    if not cfg.chart:
        stale_chart.unlink(missing_ok=True)
    print(report.markdown(meta, dicts))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
