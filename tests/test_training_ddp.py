"""Multi-process training: 2 CPU processes (gloo) against 1 process with the same global batch.

The comparison uses SGD: Adam divides each gradient by its own magnitude, so parameters whose gradient is pure
rounding noise (e.g. conv biases in front of a per-channel GroupNorm) move by +-lr in either topology and cannot be
compared. The losses are compared for every iteration as well.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.test_training_loop import records, tiny_vqfr_v2, tiny_vqgan_v1
from training.recipes import unwrap
from training.trainer import Trainer

ITERS = 3


def _configs(batch_per_rank: int) -> dict[str, dict]:
    """Stage 1 with k-means re-estimation at iteration 2, stage 2 without GANs, and stage 2 with both GANs."""
    stage1 = tiny_vqgan_v1()
    stage1["network_g"]["quantizer_opt"]["Level_4"].update(reestimate_iters=2, reestimate_maxiters=10,
                                                            warmup_iters=-1)
    stage1.pop("network_d")
    stage2 = tiny_vqfr_v2()
    stage2["train"]["gan_start_iter"] = 1000
    stage2["datasets"]["val"] = {"dataroot_gt": "synthetic:2", "max_images": 1}  # rank 0 validates, rank 1 waits
    stage2["val"] = {"val_freq": 2}
    gan = tiny_vqfr_v2()
    gan["train"].update({"gan_start_iter": 0, "net_d_reg_every": 1})
    cfgs = {"stage1": stage1, "stage2": stage2, "gan": gan}
    sgd = {"type": "SGD", "lr": 0.05, "momentum": 0.9}
    for cfg in cfgs.values():
        cfg["train"]["total_iter"] = ITERS
        for key in ("optim_g", "optim_sr_enc", "optim_sr_maindec"):
            if key in cfg["train"]:
                cfg["train"][key] = sgd
        cfg["datasets"]["train"].update(batch_size_per_gpu=batch_per_rank, dataroot_gt="synthetic:8")
    return cfgs


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v.detach().clone() for k, v in unwrap(trainer.net).state_dict().items()}
    for name, d in trainer._discriminators().items():
        out.update({f"{name}.{k}": v.detach().clone() for k, v in d.state_dict().items()})
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))  # a hang becomes an error
    try:
        for name, cfg in _configs(batch_per_rank=2).items():
            trainer = Trainer(cfg, Path(out) / name, device="cpu")
            # The discriminators run on fakes, then reals, then one backward: a buffer broadcast in between would
            # rewrite what the first graph saved (torch 2.11 failed here with "modified by an inplace operation").
            wrapped = [d for b in trainer.recipe.branches.values() for d in b.discriminators().values()]
            assert all(isinstance(d, DDP) and not d.broadcast_buffers for d in wrapped), wrapped
            trainer.train()
            torch.save(_state(trainer), Path(out) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = {name: [torch.load(tmp_path / "ddp" / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)]
           for name in ("stage1", "stage2", "gan")}
    for name, (rank0, rank1) in ddp.items():  # DDP keeps the replicas identical, GANs and R1 included
        for k in rank0:
            if "running_" in k or "num_batches_tracked" in k:
                continue  # BatchNorm statistics of each process's own batches (rank 0's are saved)
            assert torch.equal(rank0[k], rank1[k]), (name, k)

    for name, cfg in _configs(batch_per_rank=4).items():
        if name == "gan":  # BatchNorm and minibatch-stddev statistics are per process: no 1-process twin
            continue
        single = Trainer(cfg, tmp_path / "single" / name, device="cpu")
        before = _state(single)
        single.train()
        one = _state(single)
        for k, v in one.items():
            torch.testing.assert_close(ddp[name][0][k], v, atol=1e-5, rtol=1e-4)
        for a, b in zip(records(tmp_path / "single" / name), records(tmp_path / "ddp" / name), strict=True):
            for k in ("loss_total", "l_rec", "l_g_percep", "l_codebook", "l_quant_feature", "l_quant_index"):
                if k in a:
                    assert b[k] == pytest.approx(a[k], rel=1e-5), (name, a["iter"], k)
        moved = [k for k in one if not torch.equal(one[k], before[k])]
        assert moved, name  # training changed the parameters, so the comparison means something
    codebook = "g.quantizer.quantize_dict.Level_4.embedding.weight"
    assert not torch.allclose(ddp["stage1"][0][codebook], before_codebook(tmp_path)), "k-means did not run"


def before_codebook(tmp_path: Path) -> torch.Tensor:
    """The initial stage-1 codebook (the trainer seeds its initialisation with manual_seed)."""
    trainer = Trainer(_configs(batch_per_rank=4)["stage1"], tmp_path / "init", device="cpu")
    return trainer.recipe.generator.quantizer.quantize_dict["Level_4"].embedding.weight.detach().clone()


def test_discriminator_wrappers_skip_buffer_syncs_without_a_deprecation_warning():
    # torch 2.13 deprecated DDP's broadcast_buffers (a FutureWarning on every rank of every run) for
    # forward_sync_buffers; the wrappers use whichever this torch has.
    import warnings

    from torch import nn

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = Trainer.__new__(Trainer)  # only what _wrap reads
        trainer.world, trainer.device, trainer.cfg = 2, torch.device("cpu"), {}
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            d = trainer._wrap_discriminator(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
            g = trainer._wrap(nn.Linear(2, 2))
        assert isinstance(d, DDP) and not d.broadcast_buffers
        assert isinstance(g, DDP) and g.broadcast_buffers
    finally:
        dist.destroy_process_group()
