"""FLOPs and bytes of one VQFR forward, counted op by op on meta tensors, and the time floors they imply.

``python -m deploy.roofline --version v2 --batch 1,8`` prints, per batch: the FLOPs of the convolutions, matrix
products, attention, deformable convolutions and the nearest-code search; the bytes moved (an ideal that reads each
compute op's activations and weights once and writes its output once, everything else fused away; and the eager
sum over every op); the time floors at the card's rates (default: an H100 SXM's ~790 TFLOP/s dense fp16 and ~3.0
TB/s, the figures measured on this workplace's H100); and where the FLOPs are, by feature-map size.

Nothing is allocated: the model is built on the ``meta`` device and run under a dispatch mode that counts. FLOPs
follow ``torch.utils.flop_counter`` (2 per multiply-add), with the deformable conv added as ``2*C_out*C_in*9*H*W``
(OFFICIAL_VQFR.md section 10 counts it the same way).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from vqfr.models import Network

__all__ = ["Cost", "count", "floors", "floors_by_kind", "H100", "main"]

#: (dense fp16 tensor FLOP/s, HBM bytes/s) of an H100 SXM, as measured on this workplace's card (KINDS.md).
H100 = (790e12, 3.0e12)
_COMPUTE = ("conv", "matmul", "attention", "deform_conv", "nearest_code")


@dataclasses.dataclass
class Cost:
    """What one forward costs.

    Attributes:
        flops: by kind (``conv``, ``matmul``, ``attention``, ``deform_conv``, ``nearest_code``).
        flops_by_size: compute FLOPs by the op's output feature-map size (``"512x512"``; ``"tokens"`` for matrices).
        ideal_bytes: weights + the activations each compute op reads and writes, once each.
        eager_bytes: inputs + outputs of every op, as an unfused eager run moves them.
        weight_bytes: parameters, once.
        peak_live_bytes: the most bytes of op outputs alive at once in an eager run (weights excluded): what the
            activations need at peak before allocator rounding and fragmentation.
        peak_at: the module running when that peak was reached.
        ops: op counts by kind (``other`` included).
        bytes_by_kind: the least bytes each kind must move: a compute op's inputs (weights included) and output once
            each; a normalisation (``norm``: GroupNorm, LayerNorm) its input twice (statistics, then normalise) and
            its output once, the activation that follows fused in. ``other`` ops are taken as fused away.
    """

    flops: dict[str, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    flops_by_size: dict[str, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    ideal_bytes: float = 0.0
    eager_bytes: float = 0.0
    weight_bytes: float = 0.0
    peak_live_bytes: float = 0.0
    peak_at: str = ""
    ops: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    bytes_by_kind: dict[str, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))


def _kind(func: Any) -> str:
    name = str(func)
    if "vqfr.modulated_deform_conv2d" in name:
        return "deform_conv"
    if "vqfr.nearest_code" in name:
        return "nearest_code"
    if "convolution" in name:
        return "conv"
    if "native_group_norm." in name or "native_layer_norm." in name:
        return "norm"
    if "scaled_dot_product" in name:
        return "attention"
    if any(f"aten.{op}." in name for op in ("mm", "addmm", "bmm", "baddbmm")):
        return "matmul"
    return "other"


def _flops(kind: str, args: tuple, out: Any) -> float:
    if kind == "conv":
        weight, result = args[1], out
        return 2.0 * result.numel() * math.prod(weight.shape[1:])
    if kind == "deform_conv":
        x, weight = args[0], args[3]
        return 2.0 * out.numel() * x.shape[1] * weight.shape[2] * weight.shape[3]
    if kind == "nearest_code":
        z, codebook = args
        return 2.0 * z.shape[0] * codebook.shape[0] * codebook.shape[1]
    if kind == "attention":
        q, k, v = args[:3]
        return 2.0 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if kind == "matmul":  # mm(a, b), addmm(c, a, b), bmm(a, b), baddbmm(c, a, b)
        a, b = args[-2], args[-1]
        return 2.0 * a.shape[:-1].numel() * b.shape[-1] * a.shape[-1]
    return 0.0


class _Counter(TorchDispatchMode):
    def __init__(self, cost: Cost, weights: set[int]):
        super().__init__()
        self.cost, self.weights = cost, weights
        self.live = 0
        self.modules: list[str] = []

    def _track(self, func: Any, out: Any) -> None:
        """Count fresh output tensors as alive until Python frees them (views share their base's memory, and an
        in-place op's output is its input)."""
        if any(r.alias_info is not None for r in func._schema.returns):
            return
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:
                size = t.numel() * t.element_size()
                self.live += size
                weakref.finalize(t, self._free, size)
        if self.live > self.cost.peak_live_bytes:
            self.cost.peak_live_bytes = self.live
            self.cost.peak_at = self.modules[-1] if self.modules else ""

    def _free(self, size: int) -> None:
        self.live -= size

    def _is_weight(self, t: torch.Tensor) -> bool:
        return id(t) in self.weights or (t._base is not None and id(t._base) in self.weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._track(func, out)
        kind = _kind(func)
        moved = _bytes((args, kwargs)) + _bytes(out)
        self.cost.ops[kind] += 1
        self.cost.eager_bytes += moved
        if kind in _COMPUTE:
            activations = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs))[0]
                              if isinstance(t, torch.Tensor) and not self._is_weight(t))
            self.cost.ideal_bytes += activations + _bytes(out)
            self.cost.bytes_by_kind[kind] += moved
            flops = _flops(kind, tuple(args), out)
            self.cost.flops[kind] += flops
            size = "x".join(map(str, out.shape[-2:])) if kind in ("conv", "deform_conv") else "tokens"
            self.cost.flops_by_size[size] += flops
        elif kind == "norm":  # (output, mean, rstd): the statistics pass and the normalising pass read the input
            self.cost.bytes_by_kind[kind] += 2 * _bytes(args[0]) + _bytes(out[0])
        return out


def count(model: Network | dict[str, Any], batch: int, size: int, dtype: torch.dtype = torch.float16,
          fidelity: float = 1.0) -> Cost:
    """Count one forward of ``model``'s architecture (rebuilt on the meta device in ``dtype``) at [batch, 3, size,
    size]. ``model`` is a model or its options; the model itself is not run or changed."""
    import vqfr

    with torch.device("meta"):
        meta = vqfr.build_model(model if isinstance(model, dict) else model.options).to(dtype).eval()
    cost = Cost()
    cost.weight_bytes = float(sum(p.numel() * p.element_size() for p in meta.parameters()))
    cost.ideal_bytes = cost.weight_bytes
    weights = {id(p) for p in meta.parameters()}
    x = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)
    kwargs = {"fidelity": fidelity} if meta.options["type"] == "VQFRv2" else {}
    names = {id(m): name for name, m in meta.named_modules()}
    counter = _Counter(cost, weights)

    def enter(module: nn.Module, args: Any) -> None:
        counter.modules.append(names.get(id(module), type(module).__name__))

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        counter.modules.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        with torch.no_grad(), counter:
            meta(x, **kwargs)
    finally:
        pre.remove()
        post.remove()
    return cost


def floors(cost: Cost, rates: tuple[float, float] = H100) -> dict[str, float]:
    """Milliseconds at the FLOP rate and at the bandwidth (ideal and eager bytes)."""
    flop_rate, bandwidth = rates
    return {"compute_ms": cost.total_flops / flop_rate * 1e3, "ideal_bytes_ms": cost.ideal_bytes / bandwidth * 1e3,
            "eager_bytes_ms": cost.eager_bytes / bandwidth * 1e3}


def floors_by_kind(cost: Cost, rates: tuple[float, float] = H100) -> dict[str, tuple[float, float, float]]:
    """Per kind of :attr:`Cost.bytes_by_kind`: (GFLOP, GB, floor ms), the floor being the larger of the time at the
    FLOP rate and the time at the bandwidth."""
    flop_rate, bandwidth = rates
    return {kind: (cost.flops.get(kind, 0.0) / 1e9, moved / 1e9,
                   max(cost.flops.get(kind, 0.0) / flop_rate, moved / bandwidth) * 1e3)
            for kind, moved in sorted(cost.bytes_by_kind.items(), key=lambda kv: -kv[1])}


def _kind_table(title: str, cost: Cost, rates: tuple[float, float]) -> str:
    """Markdown: per kind of op of ``cost``, the op count, FLOPs, least bytes and floor, then the floors' sum."""
    lines = [f"### {title}", "",
             "| kind | ops | GFLOP | least GB | compute ms | bytes ms | floor ms |", "|---|---|---|---|---|---|---|"]
    total = 0.0
    for kind, (gflop, gb, floor) in floors_by_kind(cost, rates).items():
        total += floor
        lines.append(f"| {kind} | {cost.ops[kind]} | {gflop:.1f} | {gb:.3f} | {gflop * 1e9 / rates[0] * 1e3:.3f} | "
                     f"{gb * 1e9 / rates[1] * 1e3:.3f} | {floor:.3f} |")
    lines.append(f"| sum of floors | | | | | | {total:.3f} |")
    return "\n".join(lines)


def _table(version: str, batches: list[int], fidelity: float, rates: tuple[float, float],
           by_kind: bool = False) -> str:
    """Markdown: the counts and floors per batch; with ``by_kind``, then a :func:`_kind_table` per batch."""
    import vqfr
    from vqfr.backends.torch import _face_size

    options = vqfr.models.official_options(version)
    size = _face_size(options) or 512
    lines = [f"### VQFR{version} at {size}x{size}, fp16, fidelity {fidelity:g} ({rates[0] / 1e12:.0f} TFLOP/s, "
             f"{rates[1] / 1e12:.1f} TB/s)", "",
             "| batch | GFLOP | conv | deform conv | attention + matmul | ideal GB | eager GB | compute floor ms "
             "| ideal-bytes floor ms | eager-bytes floor ms | weights + peak live activations GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_size = None
    costs = []
    for batch in batches:
        cost = count(options, batch, size, fidelity=fidelity)
        costs.append(cost)
        f = floors(cost, rates)
        mm = cost.flops["attention"] + cost.flops["matmul"] + cost.flops["nearest_code"]
        lines.append(f"| {batch} | {cost.total_flops / 1e9:.1f} | {cost.flops['conv'] / 1e9:.1f} | "
                     f"{cost.flops['deform_conv'] / 1e9:.1f} | {mm / 1e9:.2f} | {cost.ideal_bytes / 1e9:.2f} | "
                     f"{cost.eager_bytes / 1e9:.2f} | {f['compute_ms']:.2f} | {f['ideal_bytes_ms']:.2f} | "
                     f"{f['eager_bytes_ms']:.2f} | {(cost.weight_bytes + cost.peak_live_bytes) / 1e9:.2f} |")
        by_size = by_size or cost
        last = cost
    assert by_size is not None
    total = by_size.total_flops
    sizes = sorted(by_size.flops_by_size.items(), key=lambda kv: -kv[1])
    lines += ["", f"FLOPs by feature-map size (batch {batches[0]}): " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in sizes if v / total >= 0.005) + ".",
              f"Peak live activations (batch {batches[-1]}) while running `{last.peak_at}`."]
    for batch, cost in zip(batches, costs, strict=True) if by_kind else ():
        title = f"VQFR{version} at {size}x{size}, fp16, batch {batch}, fidelity {fidelity:g}: by kind of op"
        lines += ["", _kind_table(title, cost, rates)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", nargs="+", choices=("v1", "v2"), default=["v2", "v1"])
    parser.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    parser.add_argument("--fidelity", type=float, default=1.0, help="v2 only; 0 skips the main branch")
    parser.add_argument("--tflops", type=float, default=H100[0] / 1e12, help="dense fp16 TFLOP/s (default 790)")
    parser.add_argument("--tbps", type=float, default=H100[1] / 1e12, help="memory TB/s (default 3.0)")
    parser.add_argument("--by-kind", action="store_true", help="also a table per batch by kind of op (conv, norm, "
                                                                "deform_conv ...): FLOPs, least bytes and floor")
    args = parser.parse_args(argv)
    rates = (args.tflops * 1e12, args.tbps * 1e12)
    for version in args.version:
        print(_table(version, args.batch, args.fidelity if version == "v2" else 1.0, rates, args.by_kind))
        print()
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
