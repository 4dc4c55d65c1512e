"""Where a forward's time goes: ``python -m deploy.profile_model --version v2 --batch 8 --mode max``.

Runs the torch backend (``--mode eager`` or ``max``; CUDA graphs off, so that the profiler sees each kernel) under
``torch.profiler`` for a few calls after warm-up, and prints the kernels grouped by what they do (convolutions,
deformable convs, nearest-code search, normalisation, attention, elementwise, copies), then the top kernels, each as
time per forward, beside the roofline floors of :mod:`deploy.roofline`. On the CPU it profiles the aten operators
instead (use a small ``--config`` there).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch

__all__ = ["CATEGORIES", "category", "profile", "main"]

#: (category, substrings of a kernel or operator name), first match wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nearest-code search", ("nearest_code",)),
    ("normalisation", ("group_norm", "layer_norm", "welford", "native_norm")),
    # before the deformable conv (FlashAttention's flash_fwd_kernel holds that conv's Triton kernel name) and the
    # convolutions (cuDNN's attention kernels are named cudnn_..._sdpa_...)
    ("attention", ("fmha", "flash", "attention", "softmax", "sdpa")),
    ("deformable conv", ("deform", "_fwd_kernel", "grid_sampler")),
    ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "winograd", "fprop", "dgrad", "mkldnn")),
    ("matrix product", ("gemm", "cublas", "mm", "matmul", "cutlass")),
    ("copy / layout", ("copy", "memcpy", "memset", "cat", "pad", "permute", "contiguous", "nchwtonhwc",
                       "nhwctonchw", "transpose", "clone")),
    ("elementwise (fused)", ("triton_poi", "triton_per", "triton_red", "elementwise", "vectorized", "silu", "add",
                             "mul", "sigmoid", "upsample", "interpolate", "index")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return label
    return "other"


@dataclasses.dataclass
class Profile:
    """Per-forward milliseconds by category and by kernel, and the device that ran them."""

    device: str
    per_category: dict[str, float]
    top: list[tuple[str, float, int]]
    total_ms: float
    calls: int
    #: the VQFR custom ops' own totals, children included (on the CPU, category times split an op into its aten
    #: children: the deformable conv's bmm counts as a matrix product there)
    vqfr_ops: dict[str, float] = dataclasses.field(default_factory=dict)


def profile(model, device: str, precision: str, batch: int, size: int, mode: str, fidelity: float = 1.0,
            iters: int = 5, warmup: int = 3, compile: bool | None = None, fused_group_norm: bool = False) -> Profile:
    """Profile ``iters`` forwards of ``model`` through the torch backend (after ``warmup`` calls); max mode with
    ``fused_group_norm`` replaces the GroupNorms by ``kernels.group_norm_silu`` (``FastOptions.fused_group_norm``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from vqfr.backends import BACKENDS
    from vqfr.backends.torch import TorchBackend
    from vqfr.backends.torch_fast import FastOptions

    dev = torch.device(device)
    entry = next(e for e in BACKENDS if e.name == "torch" and e.device == dev.type)
    fast = FastOptions(compile=compile, cuda_graphs=False, fused_group_norm=fused_group_norm)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1).to(dev)
    f = torch.full((batch,), fidelity)
    cuda = dev.type == "cuda"
    with TorchBackend(entry, model, precision=precision, mode=mode, fast=fast, device=device) as be:
        for _ in range(warmup):
            be.infer(x, f)
        if cuda:
            torch.cuda.synchronize(dev)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(iters):
                be.infer(x, f)
            if cuda:
                torch.cuda.synchronize(dev)
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    events = prof.key_averages()
    vqfr_ops = {e.key: (e.device_time_total if cuda and hasattr(e, "device_time_total") else e.cpu_time_total)
                / 1e3 / iters for e in events if e.key.startswith("vqfr::")}
    for event in events:
        if cuda:
            us = event.self_device_time_total
            if not us or getattr(event, "device_type", None) == torch.autograd.DeviceType.CPU:
                continue
        else:
            if not event.key.startswith(("aten::", "vqfr::")):
                continue
            us = event.self_cpu_time_total
        per_kernel[event.key][0] += us / 1e3 / iters
        per_kernel[event.key][1] += event.count // iters
    per_category: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        per_category[category(name)] += ms
    top = sorted(((n, ms, int(c)) for n, (ms, c) in per_kernel.items()), key=lambda t: -t[1])[:25]
    return Profile(str(dev), dict(per_category), top, sum(per_category.values()), iters, vqfr_ops)


def report(p: Profile, title: str, floors: dict[str, float] | None = None) -> str:
    lines = [f"## {title}", "", f"{p.total_ms:.3f} ms of {'kernel' if 'cuda' in p.device else 'operator'} time "
             f"per forward ({p.calls} profiled)."]
    if floors:
        lines.append(f"Roofline floors: compute {floors['compute_ms']:.2f} ms, ideal bytes "
                     f"{floors['ideal_bytes_ms']:.2f} ms, eager bytes {floors['eager_bytes_ms']:.2f} ms.")
    for name, ms in sorted(p.vqfr_ops.items()):
        lines.append(f"`{name}` in total (children included): {ms:.3f} ms per forward"
                     + (f", {ms / p.total_ms:.1%} of the time." if p.total_ms else "."))
    lines += ["", "| category | ms / forward | share |", "|---|---|---|"]
    for name, ms in sorted(p.per_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {ms:.3f} | {ms / p.total_ms:.1%} |" if p.total_ms else f"| {name} | {ms:.3f} | - |")
    lines += ["", "| kernel | category | ms / forward | launches / forward |", "|---|---|---|---|"]
    for name, ms, calls in p.top:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {category(name)} | {ms:.3f} | {calls} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import vqfr
    from deploy.baselines import seeded_weights_
    from deploy.roofline import count, floors
    from vqfr.backends.torch import _face_size

    parser = argparse.ArgumentParser(prog="python -m deploy.profile_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", choices=("v1", "v2"), default="v2")
    parser.add_argument("--config", help="model options (a yml path) instead of --version")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                        help="default: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="v1 face size (default 512)")
    parser.add_argument("--fidelity", type=float, default=1.0)
    parser.add_argument("--mode", choices=("eager", "max"), default="max")
    parser.add_argument("--no-compile", action="store_true", help="max mode without torch.compile")
    parser.add_argument("--fused-group-norm", action="store_true",
                        help="max mode with the fused GroupNorm + SiLU (the torch-max-gn backend of deploy.bench)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.iters < 1:  # the times are per profiled forward
        parser.error(f"--iters must be at least 1, got {args.iters}")
    if args.batch < 1:  # used to end in an IndexError from the backend, the model built
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU; use --device cpu (with a small --config)")
    precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    model = seeded_weights_(vqfr.build_model(args.config or args.version)).eval()
    size = _face_size(model.options) or args.size or 512
    result = profile(model, args.device, precision, args.batch, size, args.mode, args.fidelity, args.iters,
                     args.warmup, compile=False if args.no_compile else None, fused_group_norm=args.fused_group_norm)
    cost = count(model, args.batch, size, fidelity=args.fidelity)
    title = (f"{model.options['type']} {args.mode} {precision}, batch {args.batch}, {size}x{size}, fidelity "
             f"{args.fidelity:g}, on {torch.cuda.get_device_name() if result.device.startswith('cuda') else 'CPU'}")
    text = report(result, title, floors(cost) if result.device.startswith("cuda") else None)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
