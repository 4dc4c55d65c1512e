"""The two official vector quantizers (OFFICIAL_VQFR.md §5).

At inference they do one nearest-code search (or a plain lookup) and nothing else: no Python loop over the codebook
and no usage bookkeeping. The training-time parts (straight-through estimator, codebook and commitment losses, the
warm-up bypass) only run in ``train()`` mode. K-means re-estimation lives in ``training/kmeans.py`` and writes the
codebook from outside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels

#: Weight of the ``mean((e - sg(z))^2)`` term; the other term has weight 1 (the reverse of the usual VQ-VAE).
CODEBOOK_BETA = 0.25


class Quantized(NamedTuple):
    """What a quantizer returns.

    Attributes:
        z_q: [B, C, h, w] quantized feature (after ``post_quant_conv`` for the k-means quantizer).
        loss: scalar codebook + commitment loss (0 in eval mode).
        indices: [B, h*w] int64 code indices, tokens in row-major (h outer) order.
        z_conv: [B, code_dim, h, w] tokens before quantization.
        z_quant_before_conv: [B, code_dim, h, w] quantized tokens before ``post_quant_conv``.
    """

    z_q: Tensor
    loss: Tensor
    indices: Tensor
    z_conv: Tensor
    z_quant_before_conv: Tensor


def codebook_loss(e: Tensor, z: Tensor) -> Tensor:
    """The official ``mean((sg(e) - z)^2) + 0.25 * mean((e - sg(z))^2)``."""
    return torch.mean((e.detach() - z) ** 2) + CODEBOOK_BETA * torch.mean((e - z.detach()) ** 2)


def _to_tokens(z: Tensor) -> Tensor:
    """[B, C, h, w] -> [B*h*w, C], rows in (b, h, w) order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _from_tokens(t: Tensor, like: Tensor) -> Tensor:
    """[B*h*w, C] -> [B, C, h, w] shaped like ``like``, contiguous as the official ``rearrange(...).contiguous()``.

    The permuted view would be channels-last for B > 1, and that layout carries through the convs to every
    GroupNorm of the decoder, whose CPU channels-last kernel computes the variance in one pass and loses precision.
    """
    b, c, h, w = like.shape
    return t.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def quantize_tokens(z: Tensor, codebook: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-code quantization of ``z`` [B, C, h, w] against ``codebook`` [K, C].

    Returns:
        (quantized [B, C, h, w], loss scalar, indices [B, h*w]). The quantized value is computed as ``z + (e - z)``
        (the official straight-through form; in fp32 it differs from ``e`` by an ulp, which the golden data records).
    """
    tokens = _to_tokens(z)
    idx = kernels.nearest_code(tokens, codebook)
    e = F.embedding(idx, codebook)
    if training:
        loss = codebook_loss(e, tokens)
        q = tokens + (e - tokens).detach()
    else:
        loss = z.new_zeros(())
        q = tokens + (e - tokens)
    return _from_tokens(q, z), loss, idx.reshape(z.shape[0], -1)


class L2VectorQuantizerKmeans(nn.Module):
    """v1 quantizer: 1x1 ``quant_conv``, nearest code, 1x1 ``post_quant_conv``.

    Keys: ``quant_conv``, ``post_quant_conv``, ``embedding`` [num_code, code_dim]. The k-means options are kept so
    the trainer can read them; ``warmup_iters`` bypasses quantization while training.
    """

    def __init__(
        self,
        num_code: int,
        in_dim: int,
        code_dim: int,
        reservoir_size: int = 16384,
        reestimate_iters: int = 2000,
        reestimate_maxiters: int = -1,
        warmup_iters: int = -1,
    ):
        super().__init__()
        self.num_code, self.code_dim = num_code, code_dim
        self.reservoir_size = reservoir_size
        self.reestimate_iters = reestimate_iters
        self.reestimate_maxiters = reestimate_maxiters
        self.warmup_iters = warmup_iters
        self.quant_conv = nn.Conv2d(in_dim, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, in_dim, 1)
        self.embedding = nn.Embedding(num_code, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_code, 1.0 / num_code)

    def forward(self, z: Tensor, iters: int = -1) -> Quantized:
        """z: [B, in_dim, h, w] -> :class:`Quantized` with ``z_q`` [B, in_dim, h, w]."""
        z_conv = self.quant_conv(z)
        if self.training and iters < self.warmup_iters:
            zq, loss = z_conv, z_conv.new_zeros(())
            idx = torch.zeros(z.shape[0], z.shape[2] * z.shape[3], dtype=torch.long, device=z.device)
        else:
            zq, loss, idx = quantize_tokens(z_conv, self.embedding.weight, self.training)
        return Quantized(self.post_quant_conv(zq), loss, idx, z_conv, zq)


class L2VectorQuantizer(nn.Module):
    """v2 quantizer: a plain codebook (key ``embedding.weight`` [num_code, code_dim]).

    ``spatial_size`` is the latent grid of the configured input (16x16 at 512); lookups take the actual grid from
    their caller, so other input sizes that are multiples of 32 work too.
    """

    def __init__(self, num_code: int, code_dim: int, spatial_size: list[int] | tuple[int, int] = (16, 16)):
        super().__init__()
        self.num_code, self.code_dim = num_code, code_dim
        self.spatial_size = tuple(spatial_size)
        self.embedding = nn.Embedding(num_code, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_code, 1.0 / num_code)

    def get_feature(self, indices: Tensor, h: int, w: int) -> Tensor:
        """indices [B, h*w] -> codebook rows as [B, code_dim, h, w] (exactly the rows, no straight-through)."""
        q = F.embedding(indices, self.embedding.weight)
        return q.reshape(indices.shape[0], h, w, self.code_dim).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> Quantized:
        """Nearest-code quantization of z [B, code_dim, h, w] (VQGANv2 and the unused "Nearest" mode)."""
        zq, loss, idx = quantize_tokens(z, self.embedding.weight, self.training)
        return Quantized(zq, loss, idx, z, zq)


QUANTIZERS: dict[str, type[nn.Module]] = {
    "L2VectorQuantizerKmeans": L2VectorQuantizerKmeans,
    "L2VectorQuantizer": L2VectorQuantizer,
}


def build_quantizer(options: dict) -> nn.Module:
    """Build a quantizer from its official option block (``type`` plus arguments)."""
    options = dict(options)
    kind = options.pop("type", None)
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer type {kind!r}; expected one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[kind](**options)
