"""Time VQFR's two kernels against what torch offers for the same work.

``python -m deploy.bench_kernels`` (on a CUDA GPU) times, in fp16 and fp32, at batch 1 and 8:

- modulated deformable conv, 4 offset groups, 3x3, at VQFR's warping levels (C x H x W 128x512², 128x256²,
  256x128², 512x16²): our Triton kernel, ``torchvision.ops.deform_conv2d`` when torchvision is installed, a dense
  ``conv2d`` of the same shape (the floor a deformable conv can hope for) and, with ``--reference``, our pure-torch
  reference;
- nearest-code search with a 1024x256 codebook for 256 tokens (one 512² image) and 64x256 tokens: our Triton kernel
  against torch's distance matrix + argmin (the official formula);
- on request (``--ops group_norm``), GroupNorm(32 groups, eps 1e-6) + SiLU on channels-last activations at VQFR's
  shapes (C x H x W 128x512², 256x256², 512x64²): ``kernels.group_norm_silu`` eagerly and inside torch.compile,
  against the fp32 island it replaces, ``F.silu(F.group_norm(x.float())).to(x.dtype)``, eager and compiled.

Timing: every implementation gets warm-up calls, then ``--iters`` calls each timed on its own (CUDA events on a GPU,
``perf_counter`` on the CPU) while cycling through several copies of the inputs, so that small problems do not run
from a cache the previous call warmed. The table reports the median and the 20th/80th percentiles.

``--device cpu`` runs what the CPU can (the reference, dense conv, torch argmin; Triton only under
``TRITON_INTERPRET=1``) with small iteration counts, so the script itself is testable without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import kernels
from kernels.dispatch import dot_precision

#: VQFR's warping levels at a 512 input: (channels, height, width).
DEFORM_LEVELS = ((128, 512, 512), (128, 256, 256), (256, 128, 128), (512, 16, 16))
#: GroupNorm shapes (channels, height, width): VQFR's finest levels and its widest one.
GN_LEVELS = ((128, 512, 512), (256, 256, 256), (512, 64, 64))
GN_GROUPS, GN_EPS = 32, 1e-6
#: Tokens of one 512² image and of a batch of 64.
TOKENS = (256, 64 * 256)
CODEBOOK = (1024, 256)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
#: Inputs kept alive for rotation are capped at this many bytes (per implementation and case).
ROTATION_BUDGET = 4 << 30


@dataclasses.dataclass(frozen=True)
class Timing:
    """One implementation on one case; times in milliseconds."""

    op: str
    case: str
    dtype: str
    impl: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    iters: int
    note: str = ""
    config: str = ""  # the autotuner's choice, for the Triton rows


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_calls(fn: Callable[[int], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Milliseconds of ``iters`` calls ``fn(i)`` after ``warmup`` calls (``i`` picks the rotating input copy)."""
    for i in range(warmup):
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_graph_replays(fn: Callable[[int], object], device: torch.device, iters: int, warmup: int,
                       calls_per_graph: int) -> list[float]:
    """Device milliseconds per call, from CUDA-graph replays.

    ``warmup`` eager calls first (Triton's autotuning happens there, outside the capture), then ``calls_per_graph``
    calls ``fn(i)`` captured into one graph, then ``iters`` replays, each between two CUDA events and divided by
    ``calls_per_graph``. The host-side cost of an eager call (Python, dispatch, the autotuner's lookup, allocation) is
    paid once at capture, so small problems report the GPU's time rather than the host's.
    """
    if device.type != "cuda":
        raise ValueError("CUDA-graph timing needs a CUDA device")
    for i in range(warmup):
        fn(i)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # a call on a side stream before capture, as torch's CUDA-graph notes advise
        fn(0)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_graph):
            fn(i)
    graph.replay()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / calls_per_graph for s, e in zip(starts, ends, strict=True)]


def _copies(make: Callable[[], list[torch.Tensor]], rotate: int) -> list[list[torch.Tensor]]:
    first = make()
    size = sum(t.numel() * t.element_size() for t in first)
    count = max(1, min(rotate, ROTATION_BUDGET // max(size, 1)))
    return [first] + [make() for _ in range(count - 1)]


def deform_inputs(b: int, c: int, h: int, w: int, dtype: torch.dtype, device: torch.device,
                  channels_last: bool = False) -> list[torch.Tensor]:
    """x, offset (about +-2 px), mask (sigmoid), weight, bias of a 3x3 DCN with 4 offset groups."""
    g, k = 4, 9
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    offset = 2 * torch.randn(b, 2 * g * k, h, w, device=device, dtype=dtype)
    mask = torch.sigmoid(torch.randn(b, g * k, h, w, device=device, dtype=dtype))
    weight = torch.randn(c, c, 3, 3, device=device, dtype=dtype) / (9 * c) ** 0.5
    bias = torch.randn(c, device=device, dtype=dtype)
    return [x, offset, mask, weight, bias]


def _torchvision_deform() -> tuple[Callable | None, str]:
    """torchvision.ops.deform_conv2d, or None and why not (it is optional here and never required)."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "torchvision not installed"
    try:
        ops = importlib.import_module("torchvision.ops")
    except (ImportError, RuntimeError) as exc:  # a torchvision built for another torch fails at import
        return None, f"torchvision does not import: {exc}"
    return ops.deform_conv2d, ""


def _mode_fn(mode: str, fn: Callable) -> Callable:
    def call(*args):
        with kernels.use(mode):
            return fn(*args)

    return call


def _vqfr_deform(x, offset, mask, weight, bias):
    return kernels.modulated_deform_conv2d(x, offset, mask, weight, bias, 1, 1, 1)


def bench_deform(levels, batches, dtypes, device, iters, warmup, rotate, reference, channels_last,
                 graphs: int = 0) -> list[Timing]:
    tv_deform, tv_note = _torchvision_deform()
    rows = []
    for (c, h, w), b, dname in ((lvl, b, d) for lvl in levels for b in batches for d in dtypes):
        dtype = DTYPES[dname]
        case = f"{b}x{c}x{h}x{w}"
        copies = _copies(lambda: deform_inputs(b, c, h, w, dtype, device, channels_last), rotate)  # noqa: B023
        why = kernels.why_not_triton(copies[0][0])
        impls: dict[str, tuple[Callable | None, str]] = {
            # (x, offset, mask, weight, bias) -> out; stride 1, padding 1, dilation 1 as in VQFR.
            "vqfr triton": (None, why) if why else (_mode_fn("triton", _vqfr_deform), ""),
            "torchvision": ((lambda x, o, m, wt, bs: tv_deform(x, o, wt, bs, 1, 1, 1, m)) if tv_deform else None,
                            tv_note),
            "dense conv2d": (lambda x, o, m, wt, bs: F.conv2d(x, wt, bs, padding=1), ""),
        }
        if reference:
            impls["vqfr reference"] = (_mode_fn("reference", _vqfr_deform), "")
        for name, (fn, note) in impls.items():
            row = _run("deform_conv", case, dname, name, fn, note, copies, device, iters, warmup, graphs)
            rows.append(_progress(_with_config(row, "deform_conv_triton", "_fwd")))
    return rows


def _torch_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The official quantizer's search: the full N x K distance matrix, then argmin."""
    d = (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1) - 2 * z @ codebook.t()
    return d.argmin(1)


def bench_nearest(tokens, codebook, dtypes, device, iters, warmup, rotate, graphs: int = 0) -> list[Timing]:
    rows = []
    k, d = codebook
    for n, dname in ((n, dn) for n in tokens for dn in dtypes):
        dtype = DTYPES[dname]
        case = f"{n} tokens, {k}x{d} codebook"
        copies = _copies(lambda: [torch.randn(n, d, device=device, dtype=dtype),  # noqa: B023
                                  torch.randn(k, d, device=device, dtype=dtype)], rotate)  # noqa: B023
        why = kernels.why_not_triton(copies[0][0])
        impls = {
            "vqfr triton": (None, why) if why else (_mode_fn("triton", kernels.nearest_code), ""),
            "torch distance+argmin": (_torch_nearest, ""),
        }
        for name, (fn, note) in impls.items():
            row = _run("nearest_code", case, dname, name, fn, note, copies, device, iters, warmup, graphs)
            rows.append(_progress(_with_config(row, "nearest_code_triton", "_kernel")))
    return rows


def _torch_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fp32 island the fused op replaces: GroupNorm and SiLU in fp32, cast back."""
    return F.silu(F.group_norm(x.float(), GN_GROUPS, weight.float(), bias.float(), GN_EPS)).to(x.dtype)


def _vqfr_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return kernels.group_norm_silu(x, weight, bias, GN_GROUPS, GN_EPS)


def bench_group_norm(levels, batches, dtypes, device, iters, warmup, rotate, graphs: int = 0) -> list[Timing]:
    """GroupNorm + SiLU, x channels-last (the layout of the torch-max model): ours eager and compiled against torch's
    fp32 island eager and compiled (torch.compile: CUDA only here; a CPU compile would only time Inductor's C++)."""
    rows = []
    for (c, h, w), b, dname in ((lvl, b, d) for lvl in levels for b in batches for d in dtypes):
        dtype = DTYPES[dname]
        case = f"{b}x{c}x{h}x{w}, {GN_GROUPS} groups, channels-last"
        copies = _copies(lambda: [  # noqa: B023
            torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last),  # noqa: B023
            1 + 0.1 * torch.randn(c, device=device), 0.1 * torch.randn(c, device=device)], rotate)  # noqa: B023
        why = kernels.why_not_triton(copies[0][0])
        no_compile = "" if device.type == "cuda" else "torch.compile is timed on CUDA only"

        def compiled(fn: Callable) -> Callable:
            return torch.compile(fn, fullgraph=True, dynamic=False)

        impls: dict[str, tuple[Callable | None, str]] = {
            "vqfr triton": (None, why) if why else (_mode_fn("triton", _vqfr_group_norm_silu), ""),
            "vqfr triton, compiled": (None, why or no_compile) if why or no_compile else
            (compiled(_vqfr_group_norm_silu), ""),
            "torch fp32 island": (_torch_group_norm_silu, ""),
            "torch fp32 island, compiled": (None, no_compile) if no_compile else (compiled(_torch_group_norm_silu), ""),
        }
        for name, (fn, note) in impls.items():
            row = _run("group_norm", case, dname, name, fn, note, copies, device, iters, warmup, graphs)
            rows.append(_progress(_with_config(row, "group_norm_triton", "_stats", "_apply")))
    return rows


def _progress(row: Timing) -> Timing:
    """Print ``row`` as soon as it is measured (a run cut short by a time limit keeps what its log shows)."""
    value = f"{row.median_ms:.4g} ms" if row.median_ms is not None else f"n/a ({row.note})"
    print(f"{row.op} {row.case} {row.dtype} {row.impl}: {value}" + (f" [{row.config}]" if row.config else ""),
          flush=True)
    return row


def _with_config(row: Timing, module: str, *tuners: str) -> Timing:
    """``row`` with the autotune config its last call ran (of each of ``tuners``, named when several), if it is a
    timed Triton row (else unchanged)."""
    if row.impl != "vqfr triton" or row.median_ms is None:
        return row
    chosen = []
    for tuner in tuners:
        config = getattr(getattr(kernels.dispatch.triton_module(module), tuner), "best_config", None)
        if config is not None:
            sizes = ", ".join(f"{k} {v}" for k, v in config.kwargs.items())
            text = f"{sizes}, {config.num_warps} warps, {config.num_stages} stages"
            chosen.append(f"{tuner.strip('_')}: {text}" if len(tuners) > 1 else text)
    return dataclasses.replace(row, config="; ".join(chosen)) if chosen else row


def _run(op, case, dname, name, fn, note, copies, device, iters, warmup, graphs=0) -> Timing:
    """Time one implementation on one case; ``graphs`` > 0 times CUDA-graph replays of that many calls instead."""
    if fn is None:
        return Timing(op, case, dname, name, None, None, None, 0, note)
    call = lambda i: fn(*copies[i % len(copies)])  # noqa: E731
    try:
        if graphs:
            times = time_graph_replays(call, device, iters, warmup, graphs)
            note = (note + "; " if note else "") + f"CUDA graph of {graphs} calls"
        else:
            times = time_calls(call, device, iters, warmup)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return Timing(op, case, dname, name, None, None, None, 0, f"out of memory: {str(exc).splitlines()[0]}")
    except RuntimeError as exc:  # e.g. an implementation that syncs with the host cannot be captured
        if not graphs:
            raise
        return Timing(op, case, dname, name, None, None, None, 0,
                      f"CUDA graph capture failed: {str(exc).splitlines()[0]}")
    return Timing(op, case, dname, name, statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8),
                  iters, note)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "triton": importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None,
        "fp32_dot_precision": dot_precision(torch.float32)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def markdown(rows: Sequence[Timing], env: dict) -> str:
    """One table per op: a row per (case, dtype), a column per implementation (median ms [p20-p80])."""
    lines = [f"Measured {env['date']} on {env.get('gpu') or env.get('cpu')}, torch {env['torch']}, "
             f"triton {env['triton']}. Median ms of timed calls [p20-p80]."]
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        impls = list(dict.fromkeys(r.impl for r in op_rows))
        lines += ["", f"### {op}", "", "| case | dtype | " + " | ".join(impls) + " |",
                  "|---|---|" + "---|" * len(impls)]
        for case, dname in dict.fromkeys((r.case, r.dtype) for r in op_rows):
            cells = []
            for impl in impls:
                r = next((r for r in op_rows if (r.case, r.dtype, r.impl) == (case, dname, impl)), None)
                if r is None:
                    cells.append("")
                elif r.median_ms is None:
                    cells.append(f"n/a ({r.note})")
                else:
                    cells.append(f"{r.median_ms:.4g} [{r.p20_ms:.4g}-{r.p80_ms:.4g}]")
            lines.append(f"| {case} | {dname} | " + " | ".join(cells) + " |")
        tuned = [r for r in op_rows if r.config]
        if tuned:
            lines += ["", "Autotuned configs of the Triton rows:", ""]
            lines += [f"- {r.case} {r.dtype}: {r.config}" for r in tuned]
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes like 128x512x512, got {text!r}") from exc


def main(argv: Sequence[str] | None = None) -> list[Timing]:
    parser = argparse.ArgumentParser(prog="python -m deploy.bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=("deform", "nearest", "group_norm"), default=["deform", "nearest"],
                        help="default: deform nearest (group_norm on request)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: fp16 fp32 on a GPU, fp32 on the CPU")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--levels", nargs="+", type=_shape, default=list(DEFORM_LEVELS),
                        help="deformable-conv levels as CxHxW (default: VQFR's four)")
    parser.add_argument("--gn-levels", nargs="+", type=_shape, default=list(GN_LEVELS),
                        help=f"GroupNorm shapes as CxHxW, C divisible by {GN_GROUPS} (default: 128x512x512 "
                             "256x256x256 512x64x64)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--codebook", type=_shape, default=CODEBOOK, help="KxD (default 1024x256)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 50 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 / 1)")
    parser.add_argument("--rotate", type=int, default=4, help="input copies cycled through (memory permitting)")
    parser.add_argument("--reference", action="store_true", help="also time the pure-torch reference (CPU: always)")
    parser.add_argument("--channels-last", action="store_true", help="x in channels-last memory format")
    parser.add_argument("--graphs", type=int, default=0, metavar="N",
                        help="time CUDA-graph replays of N calls (device time without the host's per-call cost; "
                             "CUDA only)")
    parser.add_argument("--json", type=Path, help="also write the timings and the environment here")
    args = parser.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cuda, cuda:N or cpu")
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if args.graphs and not on_gpu:
        parser.error("--graphs needs a CUDA device (CUDA graphs)")
    if args.iters is not None and args.iters < 1:  # 0 used to mean the default, a negative count a crash
        parser.error(f"--iters must be at least 1, got {args.iters}")
    if len(args.codebook) != 2 or min(args.codebook) < 1:  # 0x256 ended in argmin's IndexError, 1024x0 timed nothing
        parser.error(f"--codebook must be KxD (codes x dimension, each at least 1), got "
                     f"{'x'.join(map(str, args.codebook))}")
    dtypes = args.dtypes or (["fp16", "fp32"] if on_gpu else ["fp32"])
    iters = args.iters if args.iters is not None else (50 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    for flag, values, least in (("--batches", args.batches, 1), ("--tokens", args.tokens, 1),
                                ("--rotate", [args.rotate], 1), ("--warmup", [warmup], 0)):
        if min(values) < least:  # an empty tensor times nothing
            parser.error(f"{flag} must be at least {least}, got {' '.join(map(str, values))}")
    for level in args.levels:
        if len(level) != 3 or level[0] % 4 or min(level) < 1:
            parser.error(f"level {'x'.join(map(str, level))}: give CxHxW with C divisible by 4 (4 offset groups)")

    for level in args.gn_levels:
        if len(level) != 3 or level[0] % GN_GROUPS or min(level) < 1:
            parser.error(f"--gn-levels {'x'.join(map(str, level))}: give CxHxW with C divisible by {GN_GROUPS}")

    rows: list[Timing] = []
    with torch.inference_mode():
        if "deform" in args.ops:
            rows += bench_deform(args.levels, args.batches, dtypes, device, iters, warmup, args.rotate,
                                 args.reference or not on_gpu, args.channels_last, args.graphs)
        if "nearest" in args.ops:
            rows += bench_nearest(args.tokens, args.codebook, dtypes, device, iters, warmup, args.rotate,
                                  args.graphs)
        if "group_norm" in args.ops:
            rows += bench_group_norm(args.gn_levels, args.batches, dtypes, device, iters, warmup, args.rotate,
                                     args.graphs)
    env = environment(device)
    print(markdown(rows, env))
    if args.json:
        from vqfr.atomic import atomic_write_bytes

        report = {"environment": env, "timings": [dataclasses.asdict(r) for r in rows]}
        atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())
        print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
