"""The training loop shared by both stages and both versions.

One :class:`Trainer` runs a recipe (``training/recipes.py``): it sets up torch.distributed from the torchrun
environment (DistributedDataParallel for the generator and every discriminator), the data, the optimisers and the
learning-rate schedule, AMP (bf16 or fp16 with loss scaling), an EMA of the generator, k-means codebook
re-estimation (VQGANv1), logging (``metrics.jsonl``, optional TensorBoard), validation (``val.metrics``: PSNR and
SSIM by default, after ``crop_border``), fsync'd checkpoints in the released layout and exact resume (which cuts the
``*.jsonl`` logs back to the resumed iteration).

Output folder::

    config.yml                      the merged config (vqfr.load_model(checkpoint, "config.yml") rebuilds the net)
    models/net_{g|sr}_{iter}.pth    {"params": ..., "params_ema": ...}, the released layout
    training_states/{iter}.state    everything needed to resume (nets, EMA, optimisers, scalers, k-means)
    metrics.jsonl                   one JSON object per logged iteration: iter, loss_total, every loss term, lr, timing
    val_metrics.jsonl               one JSON object per validation: iter, each val.metrics (psnr, ssim), images
    profile_iter_{iter}.md          with --profile-iters: that step's GPU kernels and host operators by self time
    visualization/{iter}/           validation outputs
    tb/                             TensorBoard events (logger.use_tb_logger)
    train.log
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

from training.config import build_optimizer, val_metrics
from training.data import EpochSampler, FaceDataset, PairedDataset, resolve_root
from training.degradations import DegradationParams
from training.kmeans import CodebookReestimator
from training.metrics import finite_mean
from training.recipes import RECIPES, Recipe, unwrap
from vqfr._optional import require
from vqfr.atomic import atomic_path, atomic_write_bytes, fsync_path
from vqfr.errors import BackendUnavailable, CheckpointError, ConfigError, InputError, OutputError, VQFRError

__all__ = ["Trainer", "EMA", "DivergedError", "init_distributed", "latest_state", "saved_states", "error_message"]

log = logging.getLogger("training")

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Unreadable training images are skipped (each named once in the log, another image drawn in its place) until they
#: are more than this share of the images drawn and either at least UNREADABLE_LEAST files or most of those drawn;
#: then the run stops.
UNREADABLE_SHARE = 0.01
UNREADABLE_LEAST = 10


def too_many_unreadable(bad: int, total: int) -> bool:
    """Whether ``bad`` unreadable files of ``total`` are too many to skip (see :data:`UNREADABLE_SHARE`)."""
    return bad > UNREADABLE_SHARE * total and (bad >= UNREADABLE_LEAST or 2 * bad > total)


class DivergedError(VQFRError, RuntimeError):
    """The generator's weights are no longer finite (the training diverged); nothing of that iteration is saved."""


def init_distributed(backend: str | None = None) -> tuple[int, int, int, bool]:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*).

    Returns:
        (rank, world size, local rank, whether this call created the group).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1, 0, False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank, True


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied): ``ema = decay*ema + (1-decay)*p``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p: list[Tensor] = list(self.model.parameters())
        own_p: list[Tensor] = list(model.parameters())
        torch._foreach_lerp_(ema_p, own_p, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()


def step_profile_table(events: Any, it: int, wall_s: float, cuda: bool, top: int = 25) -> str:
    """Markdown of one profiled training step from ``prof.key_averages()``: the ``top`` GPU kernels by self device
    time (on CUDA), then the ``top`` host operators (``aten::``, ``vqfr::``, ``autograd``) by self CPU time, each with
    its calls and its share of the table's total."""
    def table(title: str, rows: list[tuple[str, float, int]]) -> list[str]:
        total = sum(ms for _, ms, _ in rows)
        lines = ["", f"## {title}: {total:.2f} ms in all", "", "| name | self ms | calls | share |",
                 "|---|---|---|---|"]
        for name, ms, calls in sorted(rows, key=lambda r: -r[1])[:top]:
            short = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{short}` | {ms:.2f} | {calls} | {ms / total:.1%} |" if total else
                         f"| `{short}` | {ms:.2f} | {calls} | - |")
        return lines

    lines = [f"# Training step {it}", "", f"Wall time of the profiled step: {wall_s:.3f} s (profiler overhead "
             "included)."]
    if cuda:
        kernels = [(e.key, e.self_device_time_total / 1e3, int(e.count)) for e in events
                   if e.self_device_time_total and e.device_type != torch.autograd.DeviceType.CPU]
        lines += table("GPU kernels by self time", kernels)
    host = [(e.key, e.self_cpu_time_total / 1e3, int(e.count)) for e in events
            if e.key.startswith(("aten::", "vqfr::", "autograd::", "Optimizer."))]
    lines += table("Host operators by self CPU time", host)
    return "\n".join(lines) + "\n"


def error_message(exc: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker (torch writes the worker's traceback into
    the message), the worker's original message only."""
    text = str(exc)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if text.startswith(f"Caught {type(exc).__name__} in DataLoader worker") and name in text:
        return text[text.rindex(name) + len(name):].strip()
    return text


def _brief(exc: BaseException, lines: int = 1) -> str:
    """The first ``lines`` lines of an exception's message, joined (load_state_dict lists every mismatch)."""
    return " ".join(line.strip() for line in str(exc).strip().splitlines()[:lines]) or type(exc).__name__


def saved_states(out_dir: str | Path) -> list[Path]:
    """The ``training_states/<iter>.state`` files of an output folder, oldest first (the hidden temporary file of an
    interrupted save, or any other name, is not a state)."""
    states = Path(out_dir) / "training_states"
    return sorted((p for p in states.glob("*.state") if p.stem.isdigit()), key=lambda p: int(p.stem))


def latest_state(path: str | Path) -> Path:
    """A ``.state`` file as given, or the newest one in ``path/training_states``."""
    path = Path(path)
    if path.is_file():
        return path
    states = saved_states(path)
    if not states:
        raise ConfigError("holds no training state to resume from", path=path,
                          fix="pass a training_states/<iter>.state file or an output folder that has one")
    return states[-1]


def _drop_records_after(path: Path, it: int, aside: Path | None = None) -> None:
    """Rewrite a ``*.jsonl`` log of the run without the records of iterations after ``it`` (and without lines cut
    off by a killed run), so that a run resumed at ``it`` appends to one consistent history. With ``aside`` (the
    folder the later states were moved to), the records dropped are written there under the same name."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept: list[str] = []
    later: list[str] = []
    for line in lines:
        try:
            (kept if int(json.loads(line)["iter"]) <= it else later).append(line + "\n")
        except (ValueError, KeyError, TypeError):  # not a record: a cut-off write or a blank line
            continue
    if aside is not None and later:
        atomic_write_bytes(aside / path.name, "".join(later).encode())
    atomic_write_bytes(path, "".join(kept).encode())
    if len(kept) < len(lines):
        log.info("%s: dropped %d lines after iteration %d (or cut off)", path, len(lines) - len(kept), it)


class Trainer:
    """Train the network of ``cfg`` (a validated training config) into ``out_dir``.

    Args:
        cfg: the config dict (:func:`training.config.load_config`).
        out_dir: the output folder (created).
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available; ``cuda:LOCAL_RANK`` under torchrun).
        resume: a training state or an output folder to continue from.
    """

    def __init__(self, cfg: dict, out_dir: str | Path, device: str | None = None, resume: str | Path | None = None,
                 profile_iters: Iterable[int] = ()):
        #: iterations run under torch.profiler, each writing ``profile_iter_{it}.md`` (:meth:`_profiled_step`)
        self.profile_iters = frozenset(int(i) for i in profile_iters)
        try:
            self._init(cfg, out_dir, device, resume)
        except BaseException as exc:
            self._log_stop(exc)
            self.close()  # detach train.log: later runs in this process must not write into it
            raise

    def _init(self, cfg: dict, out_dir: str | Path, device: str | None, resume: str | Path | None) -> None:
        """The body of ``__init__`` (which closes what this has opened when it raises)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world, local_rank, self._owns_group = init_distributed(
            (cfg.get("dist_params") or {}).get("backend") if torch.cuda.is_available() else None)
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r}: CUDA is not available here",
                                     fix="use --device cpu, or check the GPU driver (torch.cuda.is_available())")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.train_opt = cfg["train"]
        self.total_iter = int(self.train_opt["total_iter"])
        self.seed = int(cfg.get("manual_seed", 0))
        amp = str(cfg.get("amp", "none"))
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp is {amp!r}", fix=f"use one of {sorted(AMP_DTYPES)}")
        self.amp_dtype = AMP_DTYPES[amp]
        if resume is None and saved_states(self.out):
            raise ConfigError("already holds a training run (its checkpoints would be overwritten)", path=self.out,
                              fix=f"continue it with --resume {self.out}, or choose another --out")
        state_path, state = None, None
        if resume is not None:  # read first: a wrong path or file is refused before anything is written
            state_path = latest_state(resume)
            state = self._read_state(state_path)
            own = (self.out / "training_states").resolve()
            if saved_states(self.out) and state_path.resolve().parent != own:
                raise ConfigError(f"already holds another training run (resuming {state_path} here would overwrite "
                                  "its checkpoints and states)", path=self.out,
                                  fix=f"resume into {state_path.parent.parent} or a new --out"
                                  if state_path.parent.name == "training_states" else "resume into a new --out")
        self._setup_output()
        self._check_data_roots()
        torch.manual_seed(self.seed)  # identical initialisation on every rank

        self.recipe: Recipe = RECIPES[cfg["model_type"]](cfg)
        generator = self.recipe.build_generator().to(self.device)
        if self.recipe.stage1 is not None:
            self.recipe.stage1.to(self.device)
        if self.recipe.perceptual is not None:
            self.recipe.perceptual.to(self.device)
        self.net = self._wrap(generator, cfg.get("find_unused_parameters", False))
        self.recipe.build_branches(self._wrap_discriminator)

        self.g_optimizers = {name: build_optimizer(params, opts)
                             for name, (params, opts) in self.recipe.param_groups().items()}
        trained = {id(p) for opt in self.g_optimizers.values() for g in opt.param_groups for p in g["params"]}
        # Frozen parameters that still need a gradient (v2's conv_out, for the adaptive weight): no optimiser zeroes
        # their .grad, so the step drops it instead of letting it pile up.
        self._untrained = [p for p in generator.parameters() if p.requires_grad and id(p) not in trained]
        for branch in self.recipe.branches.values():
            for kind, d in branch.discriminators().items():
                opts = self.train_opt.get("optim_d")
                if not opts:
                    raise ConfigError("train.optim_d is missing but discriminators are configured")
                branch.optimizers[kind] = build_optimizer(list(d.parameters()), opts)
        sched = self.train_opt.get("scheduler") or {"type": "MultiStepLR", "milestones": [], "gamma": 1.0}
        if sched.get("type", "MultiStepLR") != "MultiStepLR":
            raise ConfigError(f"scheduler type {sched.get('type')!r} is not supported", fix="use MultiStepLR")
        self.milestones = sorted(int(float(m)) for m in sched.get("milestones", []))
        self.gamma = float(sched.get("gamma", 0.1))  # as basicsr's MultiStepRestartLR and torch's MultiStepLR
        if int(float(self.train_opt.get("warmup_iter", -1))) > 0:
            raise ConfigError(f"train.warmup_iter is {self.train_opt['warmup_iter']}: learning-rate warm-up is not "
                              "supported", fix="set warmup_iter: -1 (no warm-up, as in every official config)")
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self._all_optimizers().items()}
        scaler_on = self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
        decay = float(self.train_opt.get("ema_decay", 0.0))
        self.ema = EMA(generator, decay) if decay > 0 else None
        self.reestimators = self._build_reestimators(generator)
        self._setup_data()
        self.start_iter = 0
        if state_path is not None and state is not None:
            self._resume(state_path, state)
        tensorboard = None  # checked before the resume below moves anything: a run that cannot start changes nothing
        if self.is_main and (cfg.get("logger") or {}).get("use_tb_logger", False):
            tensorboard = require("torch.utils.tensorboard", "TensorBoard logging (logger.use_tb_logger)")
        if self.is_main:  # only now: a resume that does not fit leaves the run's config.yml and logs as they were
            if resume is not None:
                aside = self._set_aside_after(self.start_iter)
                for name in ("metrics.jsonl", "val_metrics.jsonl"):
                    _drop_records_after(self.out / name, self.start_iter, aside)
            with atomic_path(self.out / "config.yml") as tmp:
                Path(tmp).write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        # purge_step: TensorBoard hides the events of earlier sessions from the first iteration trained again on
        # (an abandoned future, or the iterations after the state that a killed run had logged)
        self.tb = None if tensorboard is None else tensorboard.SummaryWriter(
            str(self.out / "tb"), purge_step=self.start_iter + 1 if resume is not None else None)

    # --- setup ----------------------------------------------------------------------------------------------------
    def _setup_output(self) -> None:
        self._log_handler: logging.FileHandler | None = None
        if self.is_main:
            fix = "choose a folder for --out (it is created when missing)"
            if self.out.exists() and not self.out.is_dir():
                raise OutputError("is a file, not an output folder", path=self.out, fix=fix)
            try:
                for sub in ("models", "training_states"):
                    (self.out / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a parent that is a file, no permission, a read-only disk ...
                raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", path=self.out,
                                  fix=fix) from exc
            self._log_handler = logging.FileHandler(self.out / "train.log")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._log_handler)
            if log.level == logging.NOTSET:
                log.setLevel(logging.INFO)
        if self.world > 1:
            dist.barrier()

    def _wrap(self, module: nn.Module, find_unused: bool = False, sync_buffers: bool = True) -> nn.Module:
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        kwargs: dict[str, Any] = {}
        if not sync_buffers:  # torch 2.13 renamed broadcast_buffers (deprecated there, with a FutureWarning)
            renamed = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
            kwargs["forward_sync_buffers" if renamed else "broadcast_buffers"] = False
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused,
                                                   **kwargs)

    def _wrap_discriminator(self, d: nn.Module) -> nn.Module:
        """DDP without buffer broadcasts: a discriminator runs on fake, then on real, then one backward. DDP's
        broadcast before the second forward rewrites buffers in place that the first forward's graph saved
        (BatchNorm's running statistics, the blur kernels; torch 2.11 on the CPU: "modified by an inplace
        operation"). Nothing needs it: the spectral-norm vectors follow the weights, which DDP keeps equal, and the
        running statistics (per process without SyncBatchNorm) serve only eval mode, which training never uses."""
        if self.world > 1 and self.device.type == "cuda" and self.cfg.get("syncbn", True):
            d = nn.SyncBatchNorm.convert_sync_batchnorm(d)
        return self._wrap(d.to(self.device).train(), sync_buffers=False)

    def _build_reestimators(self, generator: nn.Module) -> dict[str, CodebookReestimator]:
        quantizer: Any = getattr(generator, "quantizer", None)
        if self.cfg["model_type"] != "VQGANModel" or not hasattr(quantizer, "quantize_dict"):
            return {}
        out = {}
        for level, q in quantizer.quantize_dict.items():
            r = CodebookReestimator(q.embedding.weight, q.reservoir_size, q.reestimate_iters, q.reestimate_maxiters,
                                    seed=self.seed, kmeans_iters=int(self.train_opt.get("kmeans_iters", 300)))
            if r.active and q.reservoir_size < q.num_code:
                raise ConfigError(f"network_g.quantizer_opt.{level}.reservoir_size is {q.reservoir_size}, fewer than "
                                  f"its {q.num_code} codes: k-means could never re-estimate the codebook",
                                  fix="set reservoir_size to at least num_code (official: 16384 for 1024 codes)")
            if r.active:
                out[level] = r
        return out

    def _check_data_roots(self) -> None:
        """Refuse a missing data folder now, before the networks are built (which takes a while at full size)."""
        datasets = self.cfg["datasets"]
        resolve_root(datasets["train"]["dataroot_gt"], "datasets.train.dataroot_gt")
        val = datasets.get("val") or {}
        if val and self.is_main:  # only rank 0 validates
            resolve_root(val["dataroot_gt"], "datasets.val.dataroot_gt")
            lq = val.get("dataroot_lq")
            if lq and not Path(lq).is_dir():
                raise ConfigError(f"datasets.val.dataroot_lq: {lq} is not a folder", fix="point it at the LQ "
                                  "validation images (named as their HQ ones), or remove it to degrade the HQ images")

    def _setup_data(self) -> None:
        ds = self.cfg["datasets"]["train"]
        size = int(ds.get("out_size", 512))
        degradation = None
        if self.cfg["model_type"] != "VQGANModel":
            degradation = DegradationParams.from_options(ds)
        self.train_set = FaceDataset(ds["dataroot_gt"], size, bool(ds.get("use_hflip", True)), degradation, self.seed)
        batch = int(ds.get("batch_size_per_gpu", 2))
        self.sampler = EpochSampler(len(self.train_set), batch, self.world, self.rank, self.seed,
                                    bool(ds.get("use_shuffle", True)))
        workers = int(ds.get("num_worker_per_gpu", 0))
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
        log.info("training data: %s (%d images, %d batches of %d per GPU x %d GPUs per epoch)", self.train_set.root,
                 len(self.train_set), self.sampler.batches_per_epoch, batch, self.world)
        self._unreadable: dict[str, str] = {}  # file -> reason, in the order found (this process, this session)
        self._drawn = 0  # images this process tried to read, the replacements included
        self.val_set = None
        self.val_metrics = val_metrics(self.cfg)
        val = self.cfg["datasets"].get("val")
        self.val_enabled = bool(val)  # on every rank: the others wait for rank 0 at a barrier
        if val and self.is_main:
            val_deg = None
            if self.cfg["model_type"] != "VQGANModel" and not val.get("dataroot_lq"):
                val_deg = DegradationParams.from_options(val, "datasets.val") if "degradation" in val else degradation
            self.val_set = PairedDataset(val["dataroot_gt"], int(val.get("out_size", size)), val.get("dataroot_lq"),
                                         val_deg, int(val.get("seed", 1234)), val.get("max_images"))
            self._drop_unreadable_validation_images()

    def _drop_unreadable_validation_images(self) -> None:
        """Read the validation set once, now: its unreadable files are named in the log and left out of every
        validation, under the training set's limit (:data:`UNREADABLE_SHARE`); beyond it the run does not start."""
        assert self.val_set is not None
        total = len(self.val_set)
        dropped = self.val_set.drop_unreadable()
        for file, reason in dropped.items():
            log.warning("validation image %s cannot be read (%s); it is left out of every validation", file, reason)
        log.info("validation data: %s (%d of %d images readable)", self.val_set.gt.root, len(self.val_set), total)
        if dropped and too_many_unreadable(len(dropped), total):
            named = ", ".join(list(dropped)[:3]) + (" ..." if len(dropped) > 3 else "")
            raise InputError(f"{len(dropped)} of the {total} validation images could not be read ({named})",
                             path=self.val_set.gt.root, fix="re-copy or remove the files named in train.log; up to "
                             f"{UNREADABLE_SHARE:.0%} unreadable files are skipped with a warning")

    def _all_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = dict(self.g_optimizers)
        for bname, branch in self.recipe.branches.items():
            for kind, opt in branch.optimizers.items():
                opts[f"optim_d_{bname}_{kind}"] = opt
        return opts

    def _discriminators(self) -> dict[str, nn.Module]:
        return {f"net_d_{bname}_{kind}": unwrap(d) for bname, branch in self.recipe.branches.items()
                for kind, d in branch.discriminators().items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until ``train.total_iter``. Returns the last logged metrics. The trainer is closed afterwards, also
        when this raises (the reason is written to ``train.log`` first)."""
        it = self.start_iter
        if it >= self.total_iter:
            log.warning("nothing to train: the run is at iteration %d and train.total_iter is %d; raise --max-iters "
                        "(or train.total_iter) to train further", it, self.total_iter)
        self.net.train()
        try:
            last = self._loop(it)
        except BaseException as exc:
            self._log_stop(exc)
            self.close()
            raise
        self.close()
        return last

    def _loop(self, it: int) -> dict:
        """The iterations from ``it`` to ``train.total_iter`` (the body of :meth:`train`)."""
        logger_opt = self.cfg.get("logger") or {}
        print_freq = int(logger_opt.get("print_freq", 100))
        save_freq = int(float(logger_opt.get("save_checkpoint_freq", 5000)))
        val_freq = int(float((self.cfg.get("val") or {}).get("val_freq", 5000)))
        last: dict = {}
        timer, timed = time.perf_counter(), 0
        bpe = self.sampler.batches_per_epoch
        while it < self.total_iter:
            epoch = it // bpe
            self.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch, it % bpe)
            for batch in self.loader:
                it += 1
                self._count_unreadable(batch, it)
                terms = self._profiled_step(batch, it) if it in self.profile_iters else self.step(batch, it)
                timed += 1
                if it % print_freq == 0 or it == self.total_iter:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    last = self._log(it, epoch, terms, (now - timer) / timed)
                    timer, timed = time.perf_counter(), 0
                # Save before validating, as basicsr: a validation that fails does not cost this checkpoint.
                if it % save_freq == 0 or it == self.total_iter:
                    self.save(it)
                if self.val_enabled and (it % val_freq == 0 or it == self.total_iter):
                    self.validate(it)
                if it >= self.total_iter:
                    break
        return last

    def _count_unreadable(self, batch: dict, it: int) -> None:
        """Name each unreadable file that a sample of ``batch`` replaced (once per file) and stop the run when they
        are too many (:data:`UNREADABLE_SHARE`)."""
        skipped = [entry for text in batch.get("skipped", ()) for entry in json.loads(text)]
        self._drawn += len(batch["gt"]) + len(skipped)
        for file, reason in skipped:
            if file not in self._unreadable:
                self._unreadable[file] = reason
                log.warning("iter %d: training image %s cannot be read (%s); another image was drawn in its place "
                            "(unreadable files so far: %d)", it, file, reason, len(self._unreadable))
        bad = len(self._unreadable)
        # distinct files, at most: the whole folder, also under torchrun (each epoch deals each rank another slice)
        drawn = min(self._drawn, len(self.train_set))
        if skipped and too_many_unreadable(bad, drawn):
            named = ", ".join(list(self._unreadable)[:3]) + (" ..." if bad > 3 else "")
            raise InputError(f"{bad} of the {drawn} training images drawn so far could not be read ({named})",
                             path=self.train_set.root, fix="re-copy or remove the files named in train.log; up to "
                             f"{UNREADABLE_SHARE:.0%} unreadable files are skipped with a warning")

    def _profiled_step(self, batch: dict, it: int) -> dict[str, Tensor]:
        """:meth:`step` under torch.profiler. Rank 0 writes ``profile_iter_{it}.md``: the step's wall time (profiler
        overhead included), then the GPU kernels (on CUDA) and the host operators, each by self time."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            terms = self.step(batch, it)
            if cuda:
                torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        if self.is_main:
            path = self.out / f"profile_iter_{it}.md"
            atomic_write_bytes(path, step_profile_table(prof.key_averages(), it, wall, cuda).encode())
            log.info("iter %d: profiled (%.2f s with the profiler): %s", it, wall, path)
        return terms

    def step(self, batch: dict, it: int) -> dict[str, Tensor]:
        """One iteration: generator step, k-means, discriminator steps, EMA. Returns detached terms."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}
        self._set_lr(it)
        for opt in self.g_optimizers.values():
            opt.zero_grad(set_to_none=True)
        grad_scale = float(self.scaler_g.get_scale()) if self.scaler_g.is_enabled() else 1.0
        with self.autocast():
            terms, extra, fakes, out = self.recipe.generator_step(self.net, batch, it, grad_scale)
            loss_total = sum(t.float() for t in terms.values())
        self.scaler_g.scale(loss_total).backward()
        for opt in self.g_optimizers.values():
            self.scaler_g.step(opt)
        self.scaler_g.update()
        for p in self._untrained:
            p.grad = None
        for level, r in self.reestimators.items():
            z = out["feat_dict"][level]["z_conv"]
            if r.step(it, z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])):
                log.info("iter %d: k-means re-estimated the %s codebook", it, level)
                if self.ema is not None:
                    ema_quantizer: Any = self.ema.model.quantizer
                    ema_quantizer.quantize_dict[level].embedding.weight.copy_(r.codebook)
        d_terms: dict[str, Tensor] = {}
        for name, fake in fakes.items():
            d_terms.update(self.recipe.branches[name].discriminator_step(fake, batch["gt"], it, self.scaler_d,
                                                                         self.autocast()))
        if fakes:
            self.scaler_d.update()
        if self.ema is not None:
            self.ema.update(unwrap(self.net))
        out_terms = {"loss_total": loss_total.detach()}
        out_terms.update({k: v.detach().float() for k, v in terms.items()})
        out_terms.update({k: v.detach().float() for k, v in {**extra, **d_terms}.items()})
        return out_terms

    def _set_lr(self, it: int) -> None:
        """MultiStepLR as a function of the iteration: base lr * gamma ** (milestones passed before ``it``).

        As basicsr (and torch's MultiStepLR stepped after each iteration): iteration m still runs at the old rate,
        iteration m + 1 at the decayed one.
        """
        factor = self.gamma ** sum(it > m for m in self.milestones)
        for name, opt in self._all_optimizers().items():
            for group, base in zip(opt.param_groups, self.base_lrs[name], strict=True):
                group["lr"] = base * factor

    def _log(self, it: int, epoch: int, terms: dict[str, Tensor], seconds_per_iter: float) -> dict:
        keys = sorted(terms)
        values = torch.stack([terms[k].reshape(()) for k in keys])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        record = {"iter": it, "epoch": epoch, "loss_total": float(values[keys.index("loss_total")])}
        record.update({k: float(v) for k, v in zip(keys, values.tolist(), strict=True) if k != "loss_total"})
        record.update({f"lr_{n}": opt.param_groups[0]["lr"] for n, opt in self._all_optimizers().items()})
        record["seconds_per_iter"] = seconds_per_iter
        finite = all(math.isfinite(v) for k, v in record.items() if isinstance(v, float))
        if self.is_main:
            if not finite:
                log.warning("iter %d: non-finite values in %s", it, record)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = " ".join(f"{k} {record[k]:.4g}" for k in ["loss_total"] + [k for k in keys if k.startswith("l_")])
            log.info("[iter %d/%d] %s (%.3f s/iter)", it, self.total_iter, shown, seconds_per_iter)
            if self.tb is not None:
                for k, v in record.items():
                    if k not in ("iter", "epoch"):
                        self.tb.add_scalar(f"train/{k}", v, it)
        if not finite:
            # Every rank sees the same reduced values, so every rank stops together. With fp16 AMP a non-finite
            # loss is usually a step the GradScaler skipped, and the weights are still finite: then the warning only.
            self._refuse_non_finite(unwrap(self.net), it)
        return record

    # --- validation ----------------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The network validation and checkpoints evaluate: the EMA when enabled, else the trained one."""
        return self.ema.model if self.ema is not None else unwrap(self.net)

    @torch.no_grad()
    def restore(self, model: nn.Module, lq: Tensor, gt: Tensor) -> Tensor:
        """The validation output of ``model`` for one batch, per ``val.test_which`` and ``val.fidelity_ratio``."""
        val_opt = self.cfg.get("val") or {}
        which = val_opt.get("test_which", "main_branch")
        if self.cfg["model_type"] == "VQGANModel":
            return model(gt)
        kwargs = {"fidelity": float(val_opt.get("fidelity_ratio", 1.0))} if model.arch == "VQFRv2" else {}
        if which == "main_branch":
            return model(lq, **kwargs)
        if which != "texture_branch":
            raise ConfigError(f"val.test_which is {which!r}", fix="use main_branch or texture_branch")
        out = model(lq, return_all=True, **kwargs)
        return out["texture_dec"] if "texture_dec" in out else out["dec"]

    def validate(self, it: int) -> dict | None:
        """The ``val.metrics`` (default PSNR and SSIM) on the validation set (rank 0; the others wait). Appends to
        ``val_metrics.jsonl``."""
        from vqfr.imaging import save_image, to_images

        result: dict | None = None
        if self.is_main and self.val_set is not None:
            model = self.eval_model()
            was_training = model.training
            model.eval()
            save = (self.cfg.get("val") or {}).get("save_img", False)
            limit = len(self.val_set) if save is True else int(save or 0)
            if limit:
                (self.out / "visualization" / str(it)).mkdir(parents=True, exist_ok=True)
            scores: dict[str, list[float]] = {name: [] for name in self.val_metrics}
            for i in range(len(self.val_set)):
                item = self.val_set[i]
                lq, gt = item["lq"][None].to(self.device), item["gt"][None].to(self.device)
                with self.autocast():
                    pred = self.restore(model, lq, gt)
                img, ref = to_images(pred.float().cpu())[0], to_images(gt.cpu())[0]
                for name, (function, crop) in self.val_metrics.items():
                    scores[name].append(function(img, ref, crop))
                if i < limit:
                    save_image(self.out / "visualization" / str(it) / f"{item['name']}.png", img)
            model.train(was_training)
            means = {name: finite_mean(v, empty=0.0) for name, v in scores.items()}
            result = {"iter": it, **means, "images": len(self.val_set)}
            with open(self.out / "val_metrics.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            log.info("[iter %d] validation: %s (%d images)", it,
                     ", ".join(f"{name} {result[name]:.4f}" for name in scores), len(self.val_set))
            if self.tb is not None:
                for name in scores:
                    self.tb.add_scalar(f"val/{name}", result[name], it)
        if self.world > 1:
            dist.barrier()
        return result

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_path(self, it: int) -> Path:
        return self.out / "models" / f"{self.recipe.generator_name}_{it}.pth"

    def _refuse_non_finite(self, net: nn.Module, it: int) -> None:
        """Stop on weights that are NaN or inf, checked before every save (a checkpoint of them is useless, and the
        state would be the one ``--resume <run>`` takes) and whenever a logged loss is not finite (so a diverged run
        does not train on until its next save)."""
        named = [("", net)] + ([] if self.ema is None else [("EMA ", self.ema.model)])
        bad = [f"{what}{name}" for what, module in named for name, t in module.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            states = [p for p in saved_states(self.out) if int(p.stem) < it]
            go_on = (f"resume from {states[-1]} with a lower learning rate" if states else
                     "start again with a lower learning rate")
            raise DivergedError(f"at iteration {it} the generator's weights are not finite ({len(bad)} tensors, e.g. "
                                f"{bad[0]}): the training diverged, and this iteration was not saved", path=self.out,
                                fix=f"{go_on} (or amp: bf16 / none instead of fp16); metrics.jsonl shows where the "
                                    "losses left the finite range")

    def save(self, it: int) -> None:
        """Write the released-layout generator checkpoint and the full training state (rank 0)."""
        from vqfr.checkpoint import save_released

        if self.is_main:
            net = unwrap(self.net)
            self._refuse_non_finite(net, it)
            save_released(self.checkpoint_path(it), net.state_dict(),
                          None if self.ema is None else self.ema.state_dict())
            state = {
                "iter": it,
                "global_batch": self.sampler.batch_size * self.world,
                "nets": {self.recipe.generator_name: net.state_dict(),
                         **{k: d.state_dict() for k, d in self._discriminators().items()}},
                "ema": None if self.ema is None else self.ema.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self._all_optimizers().items()},
                "scalers": {"g": self.scaler_g.state_dict(), "d": self.scaler_d.state_dict()},
                "kmeans": {k: r.state_dict() for k, r in self.reestimators.items()},
                # so that a resumed run goes on counting towards UNREADABLE_SHARE (rank 0's record)
                "unreadable": {"files": dict(self._unreadable), "drawn": self._drawn},
            }
            with atomic_path(self.out / "training_states" / f"{it}.state") as tmp:
                torch.save(state, tmp)
            for folder in ("models", "training_states"):  # the files were fsync'd before their renames
                fsync_path(self.out / folder)
            log.info("[iter %d] saved %s", it, self.checkpoint_path(it))
        if self.world > 1:
            dist.barrier()

    def _set_aside_after(self, it: int) -> Path | None:
        """Move what the run saved after iteration ``it`` (training states, checkpoints of the generator,
        validation images) to a new ``superseded/after_<it>_<time>/`` folder, under the same relative paths, so that
        a run resumed from an older state cannot later be taken back to the future it abandoned (``--resume <run>``
        picks the newest state). Nothing is deleted. Returns that folder, or None when nothing was newer."""
        def iteration(text: str) -> int:
            return int(text) if text.isdigit() else -1

        prefix = f"{self.recipe.generator_name}_"
        newer = [p for p in saved_states(self.out) if int(p.stem) > it]
        newer += [p for p in sorted((self.out / "models").glob(f"{prefix}*.pth"))
                  if iteration(p.stem[len(prefix):]) > it]
        visuals = self.out / "visualization"
        newer += [p for p in sorted(visuals.iterdir()) if p.is_dir() and iteration(p.name) > it] \
            if visuals.is_dir() else []
        if not newer:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.out / "superseded" / f"after_{it}_{stamp}"
        n = 1
        while aside.exists():  # two resumes within one second
            n += 1
            aside = self.out / "superseded" / f"after_{it}_{stamp}_{n}"
        for path in newer:
            target = aside / path.relative_to(self.out)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        moved_into = {aside / p.relative_to(self.out).parent for p in newer}
        for folder in moved_into | {p.parent for p in newer} | {aside, aside.parent}:
            fsync_path(folder)  # a crash must not bring the abandoned states back
        log.warning("moved the training states and checkpoints after iteration %d to %s: this resume abandons them "
                    "(%d files and folders, nothing deleted)", it, aside, len(newer))
        return aside

    def _read_state(self, path: Path) -> dict:
        """The training state saved at ``path``, or CheckpointError when the file is not one."""
        where = "pass a training_states/<iter>.state file, or the output folder to resume from its latest state"
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch.load on other bytes raises many types (UnpicklingError, RuntimeError ...)
            reason = "not a pickle of tensors" if isinstance(exc, pickle.UnpicklingError) else _brief(exc)
            raise CheckpointError(f"cannot be read as a training state ({reason})", path=path, fix=where) from exc
        if not isinstance(state, dict) or "nets" not in state:
            raise CheckpointError("is not a training state (a models/*.pth checkpoint?)", path=path, fix=where)
        return state

    def _resume(self, path: Path, state: dict) -> None:
        """Load ``state`` (read from ``path`` by :meth:`_read_state`) into the networks, optimisers and scalers."""
        fix = "resume with the config the run was started with"
        nets = {self.recipe.generator_name, *self._discriminators()}
        if set(state["nets"]) != nets:
            raise ConfigError(f"does not match this config: it holds the networks {sorted(state['nets'])}, the "
                              f"config trains {sorted(nets)}", path=path, fix=fix)
        if self.ema is not None and state.get("ema") is None:
            raise ConfigError("has no EMA weights but this config sets train.ema_decay", path=path, fix=fix)
        try:
            unwrap(self.net).load_state_dict(state["nets"][self.recipe.generator_name])
            for name, d in self._discriminators().items():
                d.load_state_dict(state["nets"][name])
            if self.ema is not None:
                self.ema.model.load_state_dict(state["ema"])
            for k, o in self._all_optimizers().items():
                o.load_state_dict(state["optimizers"][k])
            self.scaler_g.load_state_dict(state["scalers"]["g"])
            self.scaler_d.load_state_dict(state["scalers"]["d"])
            for k, r in self.reestimators.items():
                r.load_state_dict(state["kmeans"][k], self.device)
        except (KeyError, RuntimeError, ValueError) as exc:  # other shapes, optimiser groups or k-means levels
            raise ConfigError(f"does not match this config ({_brief(exc, 2)})", path=path, fix=fix) from exc
        self.start_iter = int(state["iter"])
        unreadable = state.get("unreadable") or {}  # absent from states saved before it was recorded
        self._unreadable = {str(k): str(v) for k, v in (unreadable.get("files") or {}).items()}
        self._drawn = int(unreadable.get("drawn", 0))
        if self._unreadable:
            log.warning("the run has met %d unreadable training images so far (%s): they are skipped, and counted "
                        "towards the limit", len(self._unreadable), ", ".join(list(self._unreadable)[:3]) +
                        (" ..." if len(self._unreadable) > 3 else ""))
        if state.get("global_batch") != self.sampler.batch_size * self.world:
            log.warning("resuming with a global batch of %d instead of %s: the data order differs from the original "
                        "run", self.sampler.batch_size * self.world, state.get("global_batch"))
        log.info("resumed from %s at iteration %d", path, self.start_iter)

    def _log_stop(self, exc: BaseException) -> None:
        """Write why the run stopped into ``train.log``, and only there: the console has it already (``main``
        prints the error on stderr, Python an unexpected error's traceback), so it does not go through the root
        logger a second time."""
        handler: logging.Handler | None = getattr(self, "_log_handler", None)  # absent if __init__ failed early
        if handler is None:
            return
        level, exc_info = logging.ERROR, None
        if isinstance(exc, KeyboardInterrupt):
            states = saved_states(self.out)
            level, message = logging.WARNING, "interrupted (Ctrl-C); " + (
                f"the latest saved state is {states[-1]}" if states else "no training state was saved yet")
        elif isinstance(exc, (VQFRError, ImportError)):  # named with the fix
            message = f"stopped: {error_message(exc)}"
        else:  # a bug: its traceback belongs in the log too
            message = f"stopped by an unexpected {type(exc).__name__}: {exc}"
            exc_info = (type(exc), exc, exc.__traceback__)
        handler.handle(log.makeRecord(log.name, level, __file__, 0, message, (), exc_info))

    def close(self) -> None:
        """Flush logs and leave the process group this trainer created."""
        tb = getattr(self, "tb", None)  # absent if __init__ failed
        if tb is not None:
            tb.close()
            self.tb = None
        handler: logging.Handler | None = getattr(self, "_log_handler", None)  # absent if __init__ failed early
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
            self._log_handler = None
        if getattr(self, "_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
