"""Triton kernel of the nearest-code search: a fused distance GEMM and running argmin, no N x K matrix in memory.

Imported lazily by :mod:`kernels.dispatch` (triton is an optional dependency); the reference is
:func:`kernels.nearest_code.nearest_code_reference`. One program owns BLOCK_N tokens and walks the whole codebook in
BLOCK_K-row tiles. For each tile it computes ``(|z|^2 + |e|^2) - 2 z.e`` (the official formula, same evaluation
order) with fp32 accumulation, takes the tile's argmin, and keeps the running minimum. A later tile replaces it only
when strictly smaller, and the tile's argmin takes the lowest index among equals, so exact ties go to the lowest index,
as ``torch.argmin`` does. A NaN distance (a NaN token or code) is the minimum, also as in ``torch.argmin``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import dispatch
from kernels.dispatch import Launch

__all__ = ["nearest_code", "nearest_code_launch"]

# Builtins only (tl.full, tl.reduce with triton's standard combine functions): see kernels/deform_conv_triton.py.


@triton.jit
def _nearest_code_kernel(
    # pointers
    z_ptr,  # [N, D] tokens, any strides
    e_ptr,  # [K, D] codebook, any strides
    idx_ptr,  # [N] int64 out: index of the nearest code
    dist_ptr,  # [N] fp32 out: its squared distance
    # sizes
    N, K,
    # strides (elements)
    szn, szd,
    sek, sed,
    # meta-parameters
    D: tl.constexpr,  # the code dimension, a compile-time constant: the loops over it unroll (see below)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (official indices need exact fp32 dots), None otherwise
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rd0 = tl.arange(0, BLOCK_D)
    rk0 = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    z_rows = z_ptr + rn.to(tl.int64)[:, None] * szn

    # |z|^2 once per token, fp32.
    zz = tl.full((BLOCK_N,), 0.0, tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        rd = d0 + rd0
        zf = tl.load(z_rows + rd[None, :] * szd, mask=n_ok[:, None] & (rd < D)[None, :], other=0.0).to(tl.float32)
        zz += tl.reduce(zf * zf, 1, tl.standard._sum_combine)

    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_idx = tl.full((BLOCK_N,), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        k_ok = rk < K
        e_rows = e_ptr + rk.to(tl.int64)[:, None] * sek
        dots = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        ee = tl.full((BLOCK_K,), 0.0, tl.float32)
        # Unrolled (static_range), so that the loop over codebook tiles is the innermost loop, the one Triton
        # software-pipelines: the loads of tile k0 + BLOCK_K are then in flight while tile k0 is reduced. As a runtime
        # loop this one was innermost instead, and its one to four steps were all Triton could overlap.
        for d0 in tl.static_range(0, D, BLOCK_D):
            rd = d0 + rd0
            d_ok = (rd < D)[None, :]
            z = tl.load(z_rows + rd[None, :] * szd, mask=n_ok[:, None] & d_ok, other=0.0)
            e = tl.load(e_rows + rd[None, :] * sed, mask=k_ok[:, None] & d_ok, other=0.0)
            dots = tl.dot(z, tl.trans(e), dots, input_precision=DOT_PRECISION)
            ef = e.to(tl.float32)
            ee += tl.reduce(ef * ef, 1, tl.standard._sum_combine)  # |e|^2: cheap next to the dot, saves a launch
        dist = (zz[:, None] + ee[None, :]) - 2.0 * dots
        # torch.argmin takes the first NaN as the minimum. NaN ranks as -inf here (a real distance never is: |z|^2 +
        # |e|^2 >= 2 z.e), so the reduce and the strict test below see no NaN: compiled, the argmin combine would let
        # a NaN swallow its tile or not depending on its position, and the interpreter's nanargmin raises on NaN rows.
        dist = tl.where(dist != dist, float("-inf"), dist)
        dist = tl.where(k_ok[None, :], dist, float("inf"))
        # Row minimum and its column, lowest column among equal values (what tl.argmin(tie_break_left=True) does).
        cols = tl.full((BLOCK_N, BLOCK_K), 0, tl.int32) + rk0[None, :]
        tile_best, tile_col = tl.reduce((dist, cols), 1, tl.standard._argmin_combine_tie_break_left)
        tile_idx = tile_col + k0
        better = tile_best < best  # strict: an earlier (lower-index) tile keeps exact ties
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)

    tl.store(idx_ptr + rn, best_idx.to(tl.int64), mask=n_ok)
    tl.store(dist_ptr + rn, tl.where(best == float("-inf"), float("nan"), best), mask=n_ok)  # NaN back


# --- autotune configs -------------------------------------------------------------------------------------------
# H100-class GPUs: the codebook (1024 x 256 fp16 = 512 KB) stays in L2, so every program re-reads it from L2.
# Small BLOCK_N gives enough programs at one image's 256 tokens; large BLOCK_N cuts L2 traffic at 64 x 256 tokens.
# The codebook loop is pipelined, so each stage holds a whole [BLOCK_K, D] codebook tile in shared memory
# (BLOCK_K * D * element size; 32 KiB at BLOCK_K 64, D 256, fp16). fp32 gets its own small tiles: it runs on CUDA
# cores (exact FMA or TF32 operands in registers), and the fp16 tiles would spill or overflow shared memory
# (``python -m kernels.aot_check``). Under the interpreter a single config (never benchmarked) keeps CPU tests fast.

def _cfg(bn: int, bk: int, bd: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


HALF_CONFIGS = [
    _cfg(16, 128, 64, 4, 3), _cfg(16, 64, 128, 4, 3), _cfg(16, 64, 256, 4, 3), _cfg(32, 128, 64, 4, 3),
    _cfg(32, 64, 64, 4, 3), _cfg(64, 128, 64, 4, 3), _cfg(64, 64, 128, 4, 3), _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 8, 3),
]
FP32_CONFIGS = [_cfg(16, 32, 64, 4, 2), _cfg(16, 64, 64, 4, 2), _cfg(32, 32, 64, 4, 2), _cfg(16, 32, 32, 4, 3)]
CONFIGS = [_cfg(64, 32, 32, 4, 1)] if dispatch.interpreting() else HALF_CONFIGS + FP32_CONFIGS


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The fp32 configs for fp32 inputs, the others for fp16/bf16 (always at least one config)."""
    fp32 = named_args["z_ptr"].dtype == torch.float32
    kept = [c for c in configs if (c in FP32_CONFIGS) == fp32]
    return kept or configs[:1]


# DOT_PRECISION is in the key (as in the DCN kernels): a config tuned for TF32 must not be reused for exact fp32.
_kernel = triton.autotune(CONFIGS, key=["N", "K", "D", "DOT_PRECISION"],
                          prune_configs_by={"early_config_prune": _prune})(_nearest_code_kernel)


def nearest_code_launch(z: Tensor, codebook: Tensor) -> tuple[tuple[Tensor, Tensor], Launch]:
    """Allocate (idx, dist) and describe the launch; both inputs are promoted to their common dtype, at most fp32."""
    n, d = z.shape
    k = codebook.shape[0]
    common = torch.promote_types(z.dtype, codebook.dtype)
    if common == torch.float64:  # a float64 codebook beside non-fp64 tokens: the reference computes in fp32 too,
        common = torch.float32  # and an fp64 tl.dot into the fp32 accumulators does not compile
    z, codebook = z.to(common), codebook.to(common)
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    dist = torch.empty(n, dtype=torch.float32, device=z.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    args = [z, codebook, idx, dist, n, k, *z.stride(), *codebook.stride()]
    return (idx, dist), Launch(_kernel, grid, args, dict(D=d, DOT_PRECISION=dispatch.dot_precision(common)))


def nearest_code(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codebook row of every token with the Triton kernel. Arguments already validated.

    Args:
        z: [N, D] float16, bfloat16 or float32.
        codebook: [K, D]; both are promoted to their common dtype, at most fp32.

    Returns:
        ([N] int64 indices, [N] fp32 squared distances).
    """
    (idx, dist), launch = nearest_code_launch(z, codebook)
    if idx.numel() > 0:
        dispatch.launchable(launch.kernel)[launch.grid](*launch.args, **launch.constexprs)
    return idx, dist
