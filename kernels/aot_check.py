"""Compile every Triton kernel and autotune config for a GPU target, without a GPU.

``python -m kernels.aot_check`` builds the launches the launchers would make at VQFR's largest shapes (from meta
tensors: no memory, no device), compiles each config to a cubin with Triton's own compiler and the ptxas it ships,
and prints, per config, the registers per thread, spilled bytes, shared memory and the occupancy limit these imply.
It catches what the CPU interpreter cannot: code that does not compile for the target, configs whose shared memory
does not fit, register spills. It uses Triton's compiler API (``ASTSource``, ``GPUTarget``), which is internal.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kernels import dispatch

#: compute capability -> (shared memory per SM in bytes, registers per SM).
SM_LIMITS = {90: (233472, 65536), 80: (167936, 65536), 89: (102400, 65536)}
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32"}


def vqfr_launches(dtype: torch.dtype) -> Iterator[tuple[str, dispatch.Launch]]:
    """The launches at VQFR's largest shapes: DCN 1x128x512x512 (4 groups, 3x3; forward also at 1x256x128x128,
    where 256-wide output tiles are allowed), 64x256 tokens against a 1024x256 codebook, and GroupNorm + SiLU on
    1x128x512x512 channels-last (the model's layout) and NCHW."""
    deform = dispatch.triton_module("deform_conv_triton")
    nearest = dispatch.triton_module("nearest_code_triton")
    meta: dict[str, Any] = dict(device="meta", dtype=dtype)
    x = torch.empty(1, 128, 512, 512, **meta)
    offset, mask = torch.empty(1, 72, 512, 512, **meta), torch.empty(1, 36, 512, 512, **meta)
    weight, bias = torch.empty(128, 128, 3, 3, **meta), torch.empty(128, **meta)
    conv = ((1, 1), (1, 1), (1, 1))
    _, fwd = deform.forward_launch(x, offset, mask, weight, bias, *conv)
    yield "deform_conv forward", fwd
    x256, o256, m256 = (torch.empty(1, c, 128, 128, **meta) for c in (256, 72, 36))
    _, fwd256 = deform.forward_launch(x256, o256, m256, torch.empty(256, 256, 3, 3, **meta), None, *conv)
    yield "deform_conv forward, 256 channels", fwd256
    _, (bwd_input, bwd_weight) = deform.backward_launches(torch.empty(1, 128, 512, 512, **meta), x, offset, mask,
                                                          weight, *conv)
    yield "deform_conv backward (x, offset, mask)", bwd_input
    yield "deform_conv backward (weight)", bwd_weight
    _, code = nearest.nearest_code_launch(torch.empty(64 * 256, 256, **meta), torch.empty(1024, 256, **meta))
    yield "nearest_code", code
    group_norm = dispatch.triton_module("group_norm_triton")
    for layout, memory_format in (("channels-last", torch.channels_last), ("NCHW", torch.contiguous_format)):
        xf = x.contiguous(memory_format=memory_format).flatten(2)
        _, stats = group_norm.stats_launch(xf, 2048)  # the pixels per program of batch 1 on 132 SMs
        yield f"group_norm stats, {layout}", stats
        scale = torch.empty(1, 128, device="meta", dtype=torch.float32)
        yield f"group_norm apply, {layout}", group_norm.apply_launch(xf, scale, scale, xf, silu=True)


def _signature(fn, args: Sequence, constexprs: dict) -> tuple[dict, dict, dict]:
    """Triton's specialisation of these argument values: types, constants (ints equal to 1 and constexprs) and
    16-divisibility of pointers and ints, as the JIT would derive it at launch."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[i] if i < len(args) else constexprs[name]
        if fn.params[i].is_constexpr:
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constants[(i,)] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={value!r}")
    return signature, constants, attrs


def _resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    """(registers per thread, spill bytes) from ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if regs is None or stack is None:
        raise RuntimeError(f"{cuobjdump} -res-usage printed no REG/STACK counts: {text.strip()[:200]!r}")
    return int(regs.group(1)), int(stack.group(1))


def check(capability: int = 90, dtypes: Sequence[torch.dtype] = (torch.float16, torch.float32),
          only: str = "", max_configs: int | None = None) -> list[dict]:
    """Compile every (kernel, autotune config, dtype) for ``sm_<capability>``; one result dict per compile.

    ``only`` keeps the kernels whose name contains it; ``max_configs`` compiles only the first configs of each.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dispatch.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    smem_per_sm, regs_per_sm = SM_LIMITS.get(capability, SM_LIMITS[90])
    results = []
    for dtype in dtypes:
        for name, launch in vqfr_launches(dtype):
            if only not in name:
                continue
            tuner = launch.kernel
            named = dict(zip(tuner.arg_names, launch.args, strict=False))
            configs = tuner.configs
            if tuner.early_config_prune:
                configs = tuner.early_config_prune(configs, named, **launch.constexprs)
            for config in configs[:max_configs]:
                row = dict(kernel=name, dtype=_TYPES[dtype], config=str(config.kwargs), num_warps=config.num_warps,
                           num_stages=config.num_stages)
                signature, constants, attrs = _signature(tuner.fn, launch.args,
                                                         {**launch.constexprs, **config.kwargs})
                try:
                    compiled = triton.compile(ASTSource(tuner.fn, signature, constants, attrs),
                                              target=GPUTarget("cuda", capability, 32),
                                              options=dict(num_warps=config.num_warps,
                                                           num_stages=config.num_stages))
                except Exception as exc:  # report every failing config, then carry on with the next
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
                    results.append(row)
                    continue
                regs, spill = _resource_usage(compiled.asm["cubin"], cuobjdump)
                smem = compiled.metadata.shared
                threads = 32 * config.num_warps
                blocks = min(regs_per_sm // max(1, regs * threads), smem_per_sm // max(1, smem) if smem else 32)
                row.update(ok=smem <= smem_per_sm, registers=regs, spill_bytes=spill, shared_bytes=smem,
                           blocks_per_sm=blocks)
                results.append(row)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--dtypes", nargs="+", choices=("fp16", "bf16", "fp32"), default=["fp16", "fp32"])
    parser.add_argument("--only", default="", help="check only the kernels whose name contains this")
    args = parser.parse_args(argv)
    by_name = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    results = check(args.capability, [by_name[d] for d in args.dtypes], args.only)
    print(f"sm_{args.capability}: registers/thread, spill bytes, shared memory and blocks per SM of every config\n")
    print("| kernel | dtype | config | warps | stages | ok | regs | spill B | smem KiB | blocks/SM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
                  f"no: {r['error']} | | | | |")
        else:
            print(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
                  f"{'yes' if r['ok'] else 'no'} | {r['registers']} | {r['spill_bytes']} | "
                  f"{r['shared_bytes'] / 1024:.0f} | {r['blocks_per_sm']} |")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
