"""What holds the GPU memory of the fastest path: ``python -m deploy.memory_map --version v2 --batch 8``.

The benchmark reports one number per row (``peak_mem_mb``: the larger of the peak allocated memory and the memory
reserved after the timed calls, so that a CUDA graph's private pool counts). This tool says what that number is made
of. It loads the torch backend in max mode (seeded random weights of the official architecture unless ``--weights``),
records the CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``) while the first call of
each batch size compiles, warms up and captures its CUDA graph, then reads the snapshot:

- memory reserved and allocated per pool (the default pool, which holds the weights and the warm-up's cached blocks,
  and the CUDA graphs' private pool), and the benchmark's number beside them;
- per pool, the peak of live allocations over the recorded history, and which allocations were live at that peak,
  grouped by where they were made: the innermost frame in Inductor's generated code or in this package, with its
  source line (``buf12 = empty_strided_cuda((8, 64, 512, 512), ...)``, ``extern_kernels.convolution(...)``); a
  cuDNN workspace shows as an allocation at a convolution's line that is not its output;
- the largest single allocations, and the gap between the private pool's reserved segments and its live peak
  (fragmentation: blocks that a later, larger request could not reuse).

Only a CUDA device has a caching allocator to read; on the CPU the command stops with that reason. The analysis
functions (:func:`peak_live`, :func:`where`, :func:`summarise`, :func:`report`) work on any snapshot dictionary.
Setting ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` before the command measures the allocator that maps
segments on demand instead; ``deploy.gpu_check --steps memory`` runs both.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import linecache
import math
import os
import pickle
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Peak", "peak_live", "where", "pool_name", "summarise", "report", "main"]

MIB = 2**20
#: Path fragments of frames that say nothing about which tensor was allocated (torch's and Triton's own Python, the
#: standard library); the first frame outside them names the allocation.
_LIBRARY_PARTS = (f"{os.sep}torch{os.sep}", f"{os.sep}triton{os.sep}", f"{os.sep}lib{os.sep}python",
                  f"{os.sep}contextlib.py", f"{os.sep}functools.py")


@dataclasses.dataclass
class Peak:
    """The most bytes live at once among a set of allocations, and those live then.

    Attributes:
        bytes: the peak, in bytes (block sizes, allocator rounding included).
        index: position in the trace of the allocation that reached it (-1: nothing allocated).
        live: the trace entries (``action == "alloc"``) live at that moment.
    """

    bytes: int
    index: int
    live: list[dict]


def pool_name(pool_id: Any) -> str:
    """``"default"`` for the caching allocator's own pool ((0, 0) or None), else ``"private (a, b)"``."""
    if pool_id is None or tuple(pool_id) == (0, 0):
        return "default"
    return f"private {tuple(pool_id)}"


def _segment_pools(segments: Iterable[dict]) -> list[tuple[int, int, str]]:
    """(start, end, pool name) of each segment, sorted by address (segments do not overlap)."""
    return sorted((s["address"], s["address"] + s["total_size"], pool_name(s.get("segment_pool_id")))
                  for s in segments)


def _pool_of(entry: dict, segments: list[tuple[int, int, str]]) -> str:
    """The pool of a trace entry: its own ``pool_id`` (newer torch), else the segment of the final snapshot that holds
    its address (a binary search: traces hold tens of thousands of entries), else ``"unknown"`` (a segment released
    before the snapshot)."""
    if "pool_id" in entry:
        return pool_name(entry["pool_id"])
    addr = entry.get("addr", -1)
    i = bisect.bisect_right(segments, (addr, math.inf)) - 1
    if i >= 0 and segments[i][0] <= addr < segments[i][1]:
        return segments[i][2]
    return "unknown"


def peak_live(trace: Sequence[dict], pool: str | None = None, segments: Iterable[dict] = (),
              start: int = 0) -> Peak:
    """The peak of live allocations in ``trace[start:]`` (one device's trace entries, oldest first).

    An ``alloc`` makes a block live and ``free_requested`` ends it (the tensor is gone; ``free_completed`` only says
    when another stream may reuse it). Frees of blocks allocated before ``start`` or before recording began are
    ignored, so the peak counts the recorded allocations only (not, say, the weights loaded earlier).

    Args:
        pool: count only this pool's allocations (:func:`pool_name`); None counts every pool.
        segments: the snapshot's segments, to find the pool of entries without ``pool_id``.
    """
    seg = _segment_pools(segments)
    live: dict[int, dict] = {}
    total = best = 0
    best_index = -1
    for i in range(start, len(trace)):
        entry = trace[i]
        action = entry.get("action")
        if action == "alloc" and (pool is None or _pool_of(entry, seg) == pool):
            live[entry["addr"]] = entry
            total += entry["size"]
            if total > best:
                best, best_index = total, i
        elif action == "free_requested" and entry.get("addr") in live:
            total -= live.pop(entry["addr"])["size"]
    if best_index < 0:
        return Peak(0, -1, [])
    at_peak: dict[int, dict] = {}
    for i in range(start, best_index + 1):  # replay up to the peak for the set live then
        entry = trace[i]
        action = entry.get("action")
        if action == "alloc" and (pool is None or _pool_of(entry, seg) == pool):
            at_peak[entry["addr"]] = entry
        elif action == "free_requested":
            at_peak.pop(entry.get("addr", -1), None)
    return Peak(best, best_index, list(at_peak.values()))


def where(frames: Sequence[dict], root: str | None = None) -> str:
    """Where an allocation was made: the innermost frame outside torch, Triton and the standard library (Inductor's
    generated code or this package), as ``file:line name: source``; ``root`` is cut from file names under it.
    Without such a frame, the innermost frame; without frames, ``"(no Python frame)"``."""
    if not frames:
        return "(no Python frame)"
    chosen = next((f for f in frames if not any(part in f.get("filename", "") for part in _LIBRARY_PARTS)),
                  frames[0])
    filename, line = chosen.get("filename", "?"), int(chosen.get("line", 0))
    source = linecache.getline(filename, line).strip() if line > 0 else ""
    shown = os.path.relpath(filename, root) if root and filename.startswith(root + os.sep) else filename
    if "torchinductor" in filename:
        shown = f"(inductor) {os.path.basename(filename)}"
    text = f"{shown}:{line} {chosen.get('name', '?')}"
    return f"{text}: {source[:120]}" if source else text


@dataclasses.dataclass
class PoolSummary:
    """One pool: reserved and allocated after the recorded calls, its live peak and what was live then."""

    name: str
    reserved: int
    allocated: int
    segments: int
    peak: Peak
    #: (where, bytes, blocks) live at the peak, largest first
    groups: list[tuple[str, int, int]]


def _trace(snapshot: dict, device_index: int) -> list[dict]:
    """One device's trace entries of a snapshot (empty when that device recorded none)."""
    traces = snapshot.get("device_traces", [])
    return traces[device_index] if device_index < len(traces) else []


def summarise(snapshot: dict, device_index: int = 0, start: int = 0, root: str | None = None) -> list[PoolSummary]:
    """Per pool of ``snapshot`` (``torch.cuda.memory._snapshot()``): segments after the calls, and the peak of
    ``device_traces[device_index][start:]`` with its live allocations grouped by :func:`where`. Pools without
    segments that had allocations in the trace are listed too (with 0 reserved)."""
    segments = snapshot.get("segments", [])
    trace = _trace(snapshot, device_index)
    seg = _segment_pools(segments)
    names = {pool_name(s.get("segment_pool_id")) for s in segments}
    names |= {_pool_of(e, seg) for e in trace[start:] if e.get("action") == "alloc"}
    out = []
    for name in sorted(names, key=lambda n: (n != "default", n)):
        own = [s for s in segments if pool_name(s.get("segment_pool_id")) == name]
        peak = peak_live(trace, name, segments, start)
        grouped: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for entry in peak.live:
            key = where(entry.get("frames", []), root)
            grouped[key][0] += entry["size"]
            grouped[key][1] += 1
        groups = sorted(((k, b, n) for k, (b, n) in grouped.items()), key=lambda g: -g[1])
        out.append(PoolSummary(name, sum(s["total_size"] for s in own), sum(s["allocated_size"] for s in own),
                               len(own), peak, groups))
    return out


def largest_allocations(snapshot: dict, device_index: int = 0, start: int = 0, count: int = 10,
                        root: str | None = None) -> list[tuple[int, str, str]]:
    """The ``count`` largest ``alloc`` entries of the trace as (bytes, pool, where), largest first."""
    trace = _trace(snapshot, device_index)
    seg = _segment_pools(snapshot.get("segments", []))
    allocs = sorted((e for e in trace[start:] if e.get("action") == "alloc"), key=lambda e: -e["size"])[:count]
    return [(e["size"], _pool_of(e, seg), where(e.get("frames", []), root)) for e in allocs]


def report(title: str, pools: Sequence[PoolSummary], largest: Sequence[tuple[int, str, str]],
           facts: Sequence[tuple[str, str]] = (), top: int = 15) -> str:
    """Markdown: the facts, the pools' table, then per pool the allocations live at its peak, then the largest
    single allocations."""
    lines = [f"## {title}", ""]
    lines += [f"- {k}: {v}" for k, v in facts]
    lines += ["", "| pool | reserved MiB | allocated MiB | segments | live peak MiB | reserved - live peak MiB |",
              "|---|---|---|---|---|---|"]
    for p in pools:
        lines.append(f"| {p.name} | {p.reserved / MIB:.1f} | {p.allocated / MIB:.1f} | {p.segments} | "
                     f"{p.peak.bytes / MIB:.1f} | {(p.reserved - p.peak.bytes) / MIB:.1f} |")
    for p in pools:
        if not p.groups:
            continue
        lines += ["", f"### Live at the peak of the {p.name} pool ({p.peak.bytes / MIB:.1f} MiB, "
                      f"{len(p.peak.live)} blocks; trace entry {p.peak.index})", "",
                  "| MiB | blocks | allocated at |", "|---|---|---|"]
        for key, size, n in p.groups[:top]:
            lines.append(f"| {size / MIB:.1f} | {n} | `{key}` |")
        rest = p.groups[top:]
        if rest:
            lines.append(f"| {sum(g[1] for g in rest) / MIB:.1f} | {sum(g[2] for g in rest)} | "
                         f"({len(rest)} other places) |")
    if largest:
        lines += ["", "### Largest single allocations", "", "| MiB | pool | allocated at |", "|---|---|---|"]
        lines += [f"| {size / MIB:.1f} | {pool} | `{at}` |" for size, pool, at in largest]
    return "\n".join(lines)


def _measure(backend: Any, batch: int, size: int, fidelity: float, device: torch.device) -> dict[str, Any]:
    """The first call at ``batch`` (compile, warm-up, capture) and three replays; memory statistics after them."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, size, size, generator=gen).mul_(2).sub_(1)
    f = torch.full((batch,), fidelity)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(4):
        backend.infer(x, f)
    torch.cuda.synchronize(device)
    return {"max_allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device), "allocated": torch.cuda.memory_allocated(device)}


def main(argv: list[str] | None = None) -> int:
    import vqfr
    from deploy.baselines import seeded_weights_
    from vqfr.atomic import atomic_write_bytes
    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend, _face_size
    from vqfr.backends.torch_fast import FastOptions

    parser = argparse.ArgumentParser(prog="python -m deploy.memory_map", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", choices=("v1", "v2"), default="v2")
    parser.add_argument("--config", help="model options (a yml path) instead of --version")
    parser.add_argument("--weights", help="a checkpoint instead of seeded random weights")
    parser.add_argument("--batches", default="8", help="comma-separated batch sizes, run in this order in one "
                                                         "process (their graphs share one pool, as in the benchmark)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--fidelity", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=None, help="v1 face size (default 512)")
    parser.add_argument("--fused-group-norm", action="store_true", help="FastOptions(fused_group_norm=True)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="compiled, without CUDA graphs")
    parser.add_argument("--max-entries", type=int, default=2_000_000, help="allocator history kept (entries)")
    parser.add_argument("--snapshot", type=Path, help="also pickle the raw snapshot here (for "
                                                      "https://pytorch.org/memory_viz); large")
    parser.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes comma-separated whole numbers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        parser.error(f"--batches must be at least 1, got {args.batches}")
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: the memory map reads the CUDA caching allocator, which only a GPU has "
                     "(run it on the GPU machine, e.g. python -m deploy.gpu_check --steps memory)")
    device = torch.device("cuda")
    model = vqfr.load_model(args.weights, device="cpu") if args.weights else seeded_weights_(
        vqfr.build_model(args.config or args.version))
    model = model.eval()
    size = _face_size(model.options) or args.size or 512
    entry = next(e for e in BACKENDS if e.name == "torch" and e.device == "cuda")
    fast = FastOptions(fused_group_norm=args.fused_group_norm, cuda_graphs=False if args.no_cuda_graphs else None)
    root = str(Path(__file__).resolve().parents[1])
    text_parts = []
    with TorchBackend(entry, model, precision=args.precision, mode="max", fast=fast, device="cuda") as backend:
        torch.cuda.synchronize(device)
        weights = torch.cuda.memory_allocated(device)
        torch.cuda.memory._record_memory_history(max_entries=args.max_entries, stacks="python")
        start = 0
        snapshot: dict = {}
        for batch in batches:
            stats = _measure(backend, batch, size, args.fidelity, device)
            snapshot = torch.cuda.memory._snapshot()
            trace = _trace(snapshot, device.index or 0)
            pools = summarise(snapshot, device.index or 0, start, root)
            bench_rule = max(stats["max_allocated"], stats["reserved"])
            facts = [
                ("card", f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
                         f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}"),
                ("weights and buffers on the device before any call", f"{weights / MIB:.1f} MiB"),
                ("after the first call and 3 more", f"max allocated {stats['max_allocated'] / MIB:.1f} MiB, "
                                                    f"reserved {stats['reserved'] / MIB:.1f} MiB, allocated "
                                                    f"{stats['allocated'] / MIB:.1f} MiB"),
                ("the benchmark's peak rule (the larger of max allocated and reserved)", f"{bench_rule / MIB:.1f} MiB"),
                ("recorded trace entries for this batch", f"{len(trace) - start}"),
            ]
            title = (f"{model.options['type']} max {args.precision}, batch {batch}, {size}x{size}, fidelity "
                     f"{args.fidelity:g}" + (", fused GroupNorm" if args.fused_group_norm else "")
                     + (", no CUDA graphs" if args.no_cuda_graphs else ""))
            text_parts.append(report(title, pools, largest_allocations(snapshot, device.index or 0, start,
                                                                       root=root), facts))
            print(text_parts[-1], flush=True)
            if args.out:  # after each batch: a run cut at a time cap keeps what it measured
                atomic_write_bytes(args.out, ("\n\n".join(text_parts) + "\n").encode())
            start = len(trace)
        torch.cuda.memory._record_memory_history(enabled=None)
    if args.snapshot:
        with open(args.snapshot, "wb") as handle:
            pickle.dump(snapshot, handle)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
