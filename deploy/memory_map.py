"""What holds the GPU memory of the fastest path: ``python -m deploy.memory_map --version v2 --batches 8``.

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

Beside them it reports what Inductor itself planned: the compiled graph's peak of live buffers as estimated by its
``reorder_for_peak_memory`` pass (:func:`inductor_plans`), so that the pools can be set against the plan.

Only a CUDA device has a caching allocator to read. ``--device cpu`` compiles the same graph on the CPU and reports
the plan alone, beside the roofline's count of the most activations live at once in an eager run
(``deploy.roofline``): whether the compiled graph keeps more alive than the model's own code, answered without a GPU
(the graph and the scheduler's buffer reuse are the same; the convolutions are external kernels on both devices, so
the CPU plan stands in for the CUDA one). The analysis functions (:func:`peak_live`, :func:`where`,
:func:`summarise`, :func:`report`) work on any snapshot dictionary.
Two remedies can be measured: ``--memory-planning`` (Inductor carves its intermediates out of one pooled allocation
per graph) and ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` set before the command (the allocator maps
segments on demand); ``deploy.gpu_check --steps memory`` runs the map as benchmarked, then with each.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import dataclasses
import linecache
import logging
import math
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Peak", "peak_live", "where", "pool_name", "summarise", "report", "InductorPlan", "inductor_plans",
           "main"]

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


@dataclasses.dataclass
class InductorPlan:
    """Inductor's estimate of one compiled graph's peak memory: the most bytes of its buffers (and of inputs it may
    free) live at once, weights excluded, in its first node order and in each order it tried.

    Attributes:
        baseline: bytes, in the order the graph came in.
        orders: bytes per reordering heuristic tried (``topological_sort_dfs`` ...).
    """

    baseline: int
    orders: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def chosen(self) -> int:
        """Bytes in the order Inductor keeps: the lowest estimate."""
        return min([self.baseline, *self.orders.values()])


class _PlanLog(logging.Handler):
    """Collects the ``Baseline peak memory: N`` and ``<order> peak memory: N`` lines of ``torch._inductor.memory``."""

    def __init__(self, plans: list[InductorPlan]):
        super().__init__(logging.INFO)
        self.plans = plans

    def emit(self, record: logging.LogRecord) -> None:
        name, sep, value = record.getMessage().rpartition(" peak memory: ")
        if not sep or not value.isdigit():
            return
        if name == "Baseline":
            self.plans.append(InductorPlan(int(value)))
        elif self.plans:
            self.plans[-1].orders[name] = int(value)


@contextlib.contextmanager
def inductor_plans() -> Iterator[list[InductorPlan]]:
    """Within the block, record one :class:`InductorPlan` per graph Inductor compiles (in compile order).

    Inductor logs its estimates at INFO when ``torch._inductor.config.reorder_for_peak_memory`` is on (the default
    on every supported torch). Its graph caches are off within the block, since a graph loaded from a cache is not
    planned again; the logger's level, propagation and the caches are restored after it.
    """
    import torch._functorch.config
    import torch._inductor.config

    plans: list[InductorPlan] = []
    logger = logging.getLogger("torch._inductor.memory")
    handler, level, propagate = _PlanLog(plans), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # torch's own handlers would print every estimate
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield plans
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _plan_facts(plans: Sequence[InductorPlan]) -> list[tuple[str, str]]:
    """Report lines for the plans recorded during one batch's first call."""
    if not plans:
        return [("Inductor's plan", "no graph was planned in this call (compiled earlier, or compile off)")]
    return [(f"Inductor's plan of the compiled graph{f' {i + 1}' if len(plans) > 1 else ''} (peak of its live "
             "buffers, weights excluded)",
             f"{p.chosen / MIB:.1f} MiB in the order it kept; {p.baseline / MIB:.1f} MiB in its first order")
            for i, p in enumerate(plans)]


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


def _inputs(batch: int, size: int, fidelity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded faces in [-1, 1] [batch, 3, size, size] and their fidelities [batch]."""
    gen = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, size, size, generator=gen).mul_(2).sub_(1), torch.full((batch,), fidelity)


def _measure(backend: Any, batch: int, size: int, fidelity: float, device: torch.device
             ) -> tuple[dict[str, Any], list[InductorPlan]]:
    """The first call at ``batch`` (compile, warm-up, capture) and three replays; memory statistics after them, and
    Inductor's plans of the graphs compiled meanwhile."""
    x, f = _inputs(batch, size, fidelity)
    torch.cuda.reset_peak_memory_stats(device)
    with inductor_plans() as plans:
        for _ in range(4):
            backend.infer(x, f)
    torch.cuda.synchronize(device)
    from deploy.bench import torch_peak_mb

    return {"max_allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "allocated": torch.cuda.memory_allocated(device), "bench_rule_mb": torch_peak_mb(device)}, plans


def _title(model: Any, args: argparse.Namespace, batch: int, size: int) -> str:
    """A report part's title: the model, precision, batch, size and fidelity, then the options that change the
    compiled graph or its capture."""
    notes = [(args.device == "cpu", "compiled on the CPU"), (args.fused_group_norm, "fused GroupNorm"),
             (args.memory_planning, "Inductor's memory planning"),
             (args.device == "cuda" and args.no_cuda_graphs, "no CUDA graphs")]
    return (f"{model.options['type']} max {args.precision}, batch {batch}, {size}x{size}, fidelity {args.fidelity:g}"
            + "".join(f", {text}" for on, text in notes if on))


def _cpu_plans(model: Any, args: argparse.Namespace, batches: Sequence[int], size: int,
               write: Callable[[list[str]], None]) -> None:
    """``--device cpu``: per batch, compile max mode on the CPU and report Inductor's plan beside the roofline's count
    of the most activations live at once in an eager run; ``write`` gets the Markdown parts so far after each batch."""
    from deploy import roofline
    from deploy.baselines import DTYPES
    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    entry = next(e for e in BACKENDS if e.name == "torch" and e.device == "cpu")
    fast = FastOptions(compile=True, cuda_graphs=False, fused_group_norm=args.fused_group_norm)
    parts = []
    with TorchBackend(entry, model, precision=args.precision, mode="max", fast=fast, device="cpu") as backend:
        for batch in batches:
            with inductor_plans() as plans:
                backend.infer(*_inputs(batch, size, args.fidelity))
            cost = roofline.count(model, batch, size, DTYPES[args.precision], args.fidelity)
            facts = [("device", f"CPU, torch {torch.__version__}: Inductor's plan only (the pools need a GPU)"),
                     ("weights", f"{cost.weight_bytes / MIB:.1f} MiB"),
                     ("the roofline's count of the most activations live at once in an eager run",
                      f"{cost.peak_live_bytes / MIB:.1f} MiB (in {cost.peak_at})"),
                     *_plan_facts(plans)]
            if plans:
                facts.append(("plan / eager count", f"{plans[-1].chosen / max(cost.peak_live_bytes, 1):.2f}"))
            parts.append("\n".join([f"## {_title(model, args, batch, size)}", "", *(f"- {k}: {v}" for k, v in facts)]))
            print(parts[-1], flush=True)
            write(parts)  # after each batch: a run cut short keeps what it measured


def _cuda_maps(model: Any, args: argparse.Namespace, batches: Sequence[int], size: int,
               write: Callable[[list[str]], None]) -> None:
    """Per batch, the first call and three replays in max mode on the GPU with the allocator's history recorded,
    then the pools, the allocations live at each pool's peak and Inductor's plan; ``write`` gets the Markdown parts
    so far after each batch."""
    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    device = torch.device("cuda")
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
            stats, plans = _measure(backend, batch, size, args.fidelity, device)
            snapshot = torch.cuda.memory._snapshot()
            trace = _trace(snapshot, device.index or 0)
            pools = summarise(snapshot, device.index or 0, start, root)
            facts = [
                ("card", f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
                         f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}"),
                ("weights and buffers on the device before any call", f"{weights / MIB:.1f} MiB"),
                ("after the first call and 3 more", f"max allocated {stats['max_allocated'] / MIB:.1f} MiB, "
                                                    f"reserved {stats['reserved'] / MIB:.1f} MiB, allocated "
                                                    f"{stats['allocated'] / MIB:.1f} MiB"),
                ("the benchmark's peak rule (the larger of max allocated and reserved)",
                 f"{stats['bench_rule_mb']:.1f} MiB"),
                ("recorded trace entries for this batch", f"{len(trace) - start}"),
                *_plan_facts(plans),
            ]
            largest = largest_allocations(snapshot, device.index or 0, start, root=root)
            text_parts.append(report(_title(model, args, batch, size), pools, largest, facts))
            print(text_parts[-1], flush=True)
            write(text_parts)  # after each batch: a run cut at a time cap keeps what it measured
            start = len(trace)
        torch.cuda.memory._record_memory_history(enabled=None)
    if args.snapshot:
        with open(args.snapshot, "wb") as handle:
            pickle.dump(snapshot, handle)


def main(argv: list[str] | None = None) -> int:
    from torch._inductor import config as inductor_config

    import vqfr
    from deploy.baselines import seeded_weights_
    from vqfr.atomic import atomic_write_bytes
    from vqfr.backends.torch import _face_size

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
    parser.add_argument("--memory-planning", action="store_true",
                        help="torch._inductor.config.memory_planning: Inductor's intermediates carved out of one "
                             "pooled allocation per graph (external kernels such as cuDNN's still allocate their own)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: compile on the CPU and report Inductor's plan alone (no allocator to read)")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: the memory map reads the CUDA caching allocator, which only a GPU has "
                     "(run it on the GPU machine, e.g. python -m deploy.gpu_check --steps memory; --device cpu "
                     "reports Inductor's plan of the compiled graph alone)")
    model = vqfr.load_model(args.weights, device="cpu") if args.weights else seeded_weights_(
        vqfr.build_model(args.config or args.version))
    model = model.eval()
    size = _face_size(model.options) or args.size or 512

    def write(parts: list[str]) -> None:
        if args.out:
            atomic_write_bytes(args.out, ("\n\n".join(parts) + "\n").encode())

    with inductor_config.patch(memory_planning=args.memory_planning):
        (_cpu_plans if args.device == "cpu" else _cuda_maps)(model, args, batches, size, write)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
