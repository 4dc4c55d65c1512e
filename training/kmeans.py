"""Codebook re-estimation by k-means from a reservoir of encoder tokens (the v1 stage-1 recipe, OFFICIAL_VQFR.md §5).

While ``iters < reestimate_maxiters`` every training step's pre-quantization tokens feed a reservoir sampler; every
``reestimate_iters`` steps k-means on the reservoir overwrites the codebook and the reservoir restarts.

Under torch.distributed the tokens of all ranks are all-gathered (rank order, so the stream equals that of one
process with the global batch) and every rank runs the same seeded reservoir and k-means; rank 0's codebook is then
broadcast. Without torch.distributed nothing is gathered (the official code calls ``dist.get_world_size()`` there and
crashes). Pure torch (no scikit-learn), deterministic for a given seed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Reservoir", "kmeans", "CodebookReestimator", "gather_tokens"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_tokens(tokens: Tensor) -> Tensor:
    """[N, C] tokens of this rank -> [world * N, C] tokens of all ranks in rank order (identity in one process)."""
    if not _distributed():
        return tokens
    parts = [torch.empty_like(tokens) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tokens.contiguous())
    return torch.cat(parts)


class Reservoir:
    """Uniform reservoir sample (Algorithm R) of up to ``size`` rows, with its own seeded generator.

    After ``seen`` rows have been offered, each is in the buffer with probability ``size / seen``.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: Tensor | None = None
        self.filled = 0
        self.seen = 0

    def reset(self) -> None:
        """Empty the buffer (the generator keeps its stream)."""
        self.buffer, self.filled, self.seen = None, 0, 0

    def add(self, rows: Tensor) -> None:
        """Offer rows [N, C] (any device; kept on it, detached)."""
        rows = rows.detach()
        if self.buffer is None:
            self.buffer = rows.new_empty(self.size, rows.shape[1])
        take = min(self.size - self.filled, rows.shape[0])
        self.buffer[self.filled:self.filled + take] = rows[:take]
        self.filled += take
        self.seen += take
        rest = rows[take:]
        if rest.shape[0] == 0:
            return
        # Row j of the rest is the (seen + j)-th row offered (0-based): it replaces slot r ~ U{0..seen+j} if r < size.
        counts = torch.arange(self.seen, self.seen + rest.shape[0], dtype=torch.float64) + 1
        slots = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * counts).long()
        self.seen += rest.shape[0]
        keep = torch.nonzero(slots < self.size).flatten()
        if keep.numel() == 0:
            return
        # When several rows hit one slot the last one wins, as in the sequential algorithm.
        slots = slots[keep]
        winner = torch.full((self.size,), -1, dtype=torch.long).scatter_reduce(0, slots, keep, "amax")
        hit = torch.nonzero(winner >= 0).flatten()
        self.buffer[hit.to(self.buffer.device)] = rest[winner[hit].to(rest.device)]

    def contents(self) -> Tensor:
        """The sampled rows [filled, C]."""
        if self.buffer is None:
            raise RuntimeError("the reservoir is empty")
        return self.buffer[:self.filled]

    def state_dict(self) -> dict:
        return {"buffer": None if self.buffer is None else self.buffer.cpu(), "filled": self.filled,
                "seen": self.seen, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.buffer = None if state["buffer"] is None else state["buffer"].to(device)
        self.filled, self.seen = int(state["filled"]), int(state["seen"])
        self.generator.set_state(state["generator"])


def _sq_dists(x: Tensor, centers: Tensor) -> Tensor:
    return (x.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1) - 2 * x @ centers.T).clamp_min_(0)


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with 2 + ln(k) candidates per step (greedy, as scikit-learn)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_dists(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: repeat points
            idx = torch.randint(n, (trials,), generator=generator)
        else:
            u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * total.double()
            idx = torch.searchsorted(torch.cumsum(closest.double(), 0), u).clamp_max_(n - 1)
        cand = x[idx.to(x.device)]
        new_closest = torch.minimum(closest[None], _sq_dists(x, cand).T)  # [trials, n]
        best = int(new_closest.sum(1).argmin())
        centers.append(cand[best])
        closest = new_closest[best]
    return torch.stack(centers)


def kmeans(x: Tensor, k: int, max_iter: int = 300, tol: float = 1e-4, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given seed.

    Stops when the squared centre shift falls below ``tol`` times the mean per-feature variance of x (the
    scikit-learn criterion) or after ``max_iter`` rounds. An empty cluster takes the point farthest from its centre.

    Args:
        x: [N, C] points, N >= k (float; computed in float32 on x's device).
        k: number of clusters.

    Returns:
        [k, C] centres in x's dtype.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    data = x.float()
    threshold = tol * float(data.var(0).mean())
    centers = _kmeans_pp(data, k, generator)
    for _ in range(max_iter):
        d = _sq_dists(data, centers)
        dmin, assign = d.min(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = dmin.topk(empty.numel()).indices
            new[empty] = data[far]
        shift = float((new - centers).pow(2).sum())
        centers = new
        if shift <= threshold:
            break
    return centers.to(x.dtype)


class CodebookReestimator:
    """Drives k-means re-estimation of one codebook from the training loop.

    Args:
        codebook: the embedding weight [K, C] to overwrite (a Parameter of the trained model).
        reservoir_size, reestimate_iters, reestimate_maxiters: the quantizer's official options.
        seed: seeds the reservoir and k-means (same on every rank).
    """

    def __init__(self, codebook: Tensor, reservoir_size: int, reestimate_iters: int, reestimate_maxiters: int,
                 seed: int = 0, kmeans_iters: int = 300):
        self.codebook = codebook
        self.every, self.until = int(reestimate_iters), int(reestimate_maxiters)
        self.reservoir = Reservoir(reservoir_size, seed)
        self.seed, self.kmeans_iters = seed, kmeans_iters
        self.count = 0

    @property
    def active(self) -> bool:
        return self.until > 0 and self.every > 0

    def step(self, iteration: int, tokens: Tensor) -> bool:
        """Feed this step's tokens [N, C] (this rank's; gathered here) and re-estimate when due.

        Returns:
            True when the codebook was overwritten.
        """
        if not self.active or iteration >= self.until:
            return False
        self.reservoir.add(gather_tokens(tokens.detach().float()))
        if iteration % self.every != 0:
            return False
        k = self.codebook.shape[0]
        if self.reservoir.filled < k:
            return False
        centers = kmeans(self.reservoir.contents(), k, max_iter=self.kmeans_iters, seed=self.seed + self.count)
        with torch.no_grad():
            self.codebook.copy_(centers.to(self.codebook.dtype))
            if _distributed():
                dist.broadcast(self.codebook.data, src=0)
        self.reservoir.reset()
        self.count += 1
        return True

    def state_dict(self) -> dict:
        return {"reservoir": self.reservoir.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.reservoir.load_state_dict(state["reservoir"], device)
        self.count = int(state["count"])
