"""Training configuration: official-style yml files (the option names of TencentARC/VQFR's training ymls).

The network blocks are read by the model code (:func:`vqfr.build_model` takes ``network_sr``, else ``network_g``),
so ``vqfr.load_model(checkpoint, config_yml)`` rebuilds the trained network from the same file. The official v1
stage-2 yml uses names that no longer exist at the official HEAD; they are reported with the fix (§8).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import yaml
from torch import nn

from training.degradations import DegradationParams
from training.discriminators import DISCRIMINATORS
from training.losses import GAN_TYPES, PerceptualLoss
from training.metrics import psnr, ssim
from vqfr.errors import ConfigError

__all__ = ["MODEL_TYPES", "VAL_METRIC_TYPES", "load_config", "check_config", "network_key", "val_metrics",
           "build_optimizer"]

#: model_type -> the block holding the trained generator.
MODEL_TYPES = {"VQGANModel": "network_g", "VQFRv1Model": "network_sr", "VQFRv2Model": "network_sr"}

#: (model_type, expected arch of the generator, expected arch of the stage-1 network or None)
_ARCH_OF = {"VQGANModel": ("VQGANv1", "VQGANv2"), "VQFRv1Model": ("VQFRv1",), "VQFRv2Model": ("VQFRv2",)}
_STAGE1_OF = {"VQFRv1Model": "VQGANv1", "VQFRv2Model": "VQGANv2"}

#: Whole-number options and their least value. A number or a numeric string is accepted: YAML reads ``5e3`` (no
#: dot) as a string, which is why the official files write ``!!float 5e3``.
#: A start iteration of -1 (the official v1 texture GAN) starts at once.
_WHOLE_NUMBERS = {("train", "total_iter"): 1, ("logger", "print_freq"): 1, ("logger", "save_checkpoint_freq"): 1,
                  ("val", "val_freq"): 1, ("datasets", "train", "batch_size_per_gpu"): 1,
                  ("datasets", "train", "num_worker_per_gpu"): 0, ("datasets", "train", "out_size"): 1,
                  ("datasets", "val", "out_size"): 1,
                  ("train", "gan_start_iter"): -1, ("train", "main_gan_start_iter"): -1,
                  ("train", "net_d_reg_every"): 1, ("train", "kmeans_iters"): 1,
                  # the data seeds (numpy refuses a negative one when the first batch loads)
                  ("manual_seed",): 0, ("datasets", "val", "seed"): 0, ("datasets", "val", "max_images"): 1}

#: Options that must be numbers (a numeric string such as ``1e-4`` too); the trainer reads them with float(), some
#: only at the first validation. The loss blocks' weights are checked too (:func:`_check_numbers`).
_NUMBERS = (("train", "r1_reg_weight"), ("train", "generator_d_global_weight"), ("train", "generator_d_local_weight"),
            ("train", "d_local_loss_weight"), ("train", "fidelity_ratio"), ("train", "codebook_loss_weight"),
            ("train", "scheduler", "gamma"), ("val", "fidelity_ratio"))
_LOSS_WEIGHTS = ("loss_weight", "perceptual_weight", "style_weight")

#: basicsr's validation metric types (``val.metrics.<name>.type``) -> their functions in ``training.metrics``.
VAL_METRIC_TYPES: dict[str, Callable[..., float]] = {"calculate_psnr": psnr, "calculate_ssim": ssim}
_DEFAULT_VAL_METRICS = {"psnr": {"type": "calculate_psnr"}, "ssim": {"type": "calculate_ssim"}}

# Names in the official ymls that the official code itself no longer accepts, with their fixes.
_STALE_MODEL_TYPES = {"VQFRModel": "VQFRv1Model"}
_STALE_ARCHS = {"VQGAN": "VQGANv1"}

#: The network blocks each model_type reads; another ``network_*`` block (a misspelt discriminator) is refused.
_NETWORKS_OF = {"VQGANModel": ("network_g", "network_d"),
                "VQFRv1Model": ("network_sr", "network_g", "network_d_global", "network_d_local",
                                "network_d_main_global", "network_d_main_local"),
                "VQFRv2Model": ("network_sr", "network_g", "network_d", "network_d_local")}

#: The loss blocks of ``train`` and the official loss type of each (a block may leave ``type`` out).
_LOSS_TYPES = {"pixel_opt": "L1Loss", "pixel_main_opt": "L1Loss", "latent_opt": "MultiQuantMatchLoss",
               "quant_feature_opt": "MSELoss", "quant_index_opt": "CrossEntropyLoss", "perceptual_opt": "LPIPS",
               "gan_opt": "GANLoss", "global_gan_opt": "GANLoss", "patch_gan_opt": "GANLoss"}

#: The options each loss type takes (``reduction`` is refused later unless ``mean``; basicsr's GANLoss label values
#: do not change the wgan_softplus and hinge losses). LPIPS: the arguments of PerceptualLoss; MultiQuantMatchLoss:
#: one MSELoss block per level besides ``type``.
_LOSS_OPTIONS = {"L1Loss": {"type", "loss_weight", "reduction"}, "MSELoss": {"type", "loss_weight", "reduction"},
                 "CrossEntropyLoss": {"type", "loss_weight", "reduction"},
                 "GANLoss": {"type", "gan_type", "loss_weight", "real_label_val", "fake_label_val"},
                 "LPIPS": {"type", *list(inspect.signature(PerceptualLoss).parameters)}}

#: Every option of ``train`` that a recipe or the trainer reads; another one (a misspelt name) is refused.
_TRAIN_KEYS = frozenset({
    "total_iter", "warmup_iter", "scheduler", "optim_g", "optim_sr", "optim_sr_enc", "optim_sr_maindec", "optim_d",
    "ema_decay", "fidelity_ratio", "codebook_loss_weight", "kmeans_iters", "generator_d_global_weight",
    "generator_d_local_weight", "d_local_loss_weight", "r1_reg_weight", "net_d_reg_every", "gan_start_iter",
    "main_gan_start_iter", *_LOSS_TYPES})

_TEST_WHICH = ("main_branch", "texture_branch")

#: The options of the sections other than ``train`` and the network blocks that the trainer reads; with
#: :data:`_OFF_ONLY`, every other name (a misspelt one) is refused. ``()`` is the top level, where ``network_*``
#: blocks are checked by :func:`_check_names`.
_DEGRADATION_KEYS = frozenset({"degradation", *(f.name for f in dataclasses.fields(DegradationParams))})
_SECTION_KEYS: dict[tuple[str, ...], frozenset[str]] = {
    (): frozenset({"name", "model_type", "manual_seed", "amp", "syncbn", "find_unused_parameters", "dist_params",
                   "datasets", "path", "train", "val", "logger"}),
    ("datasets",): frozenset({"train", "val"}),
    ("datasets", "train"): frozenset({"name", "type", "dataroot_gt", "out_size", "use_hflip", "use_shuffle",
                                      "batch_size_per_gpu", "num_worker_per_gpu", *_DEGRADATION_KEYS}),
    ("datasets", "val"): frozenset({"name", "type", "dataroot_gt", "dataroot_lq", "out_size", "max_images", "seed",
                                    *_DEGRADATION_KEYS}),
    # param_key_d / strict_load_d only qualify pretrain_network_d, which must stay unset
    ("path",): frozenset({"pretrain_network_g", "param_key_g", "strict_load_g", "pretrain_network_sr",
                          "param_key_sr", "strict_load_sr", "param_key_d", "strict_load_d"}),
    ("val",): frozenset({"val_freq", "save_img", "test_which", "fidelity_ratio", "metrics"}),
    ("logger",): frozenset({"print_freq", "save_checkpoint_freq", "use_tb_logger"}),
    # torchrun's --master_port sets the port; the official ymls' ``port`` is accepted and unused, as under torchrun
    ("dist_params",): frozenset({"backend", "port"}),
}

_NORMALISATION = [0.5, 0.5, 0.5]
_DISK = ({"type": "disk"}, None)
_DISK_FIX = "images are read from the folder dataroot_gt (LMDB is not supported): remove it or set it to {type: disk}"
_NORM_FIX = ("the normalisation is fixed at (x - 0.5) / 0.5, as in the official files: "
             "remove it or set it to [0.5, 0.5, 0.5]")
_D_FIX = "remove it: the discriminators start from random weights (no official discriminator weights were released)"
#: Options of the official ymls, FFHQDegradationDataset and basicsr that are not implemented here: accepted only
#: with a value that means "off" (the first is the one suggested; in a mapping, a ``~`` entry counts as absent),
#: each with its fix (None: remove it or set it to that value).
_OFF_ONLY: dict[tuple[str, ...], dict[str, tuple[tuple, str | None]]] = {
    (): {"num_gpu": (("auto", None), "remove it: one process per GPU, started with torchrun --nproc_per_node=N "
                                     "(docs/TRAINING.md)"),
         "scale": ((1, None), None)},
    ("datasets", "train"): {
        "color_jitter_prob": ((0, None), None), "color_jitter_pt_prob": ((0, None), None),
        "gray_prob": ((0, None), None), "recon_prob": ((0, None), None), "crop_components": ((False,), None),
        "dataset_enlarge_ratio": ((1,), None), "prefetch_mode": ((None,), None),
        "io_backend": (_DISK, _DISK_FIX), "mean": ((_NORMALISATION, None), _NORM_FIX),
        "std": ((_NORMALISATION, None), _NORM_FIX)},
    ("datasets", "val"): {"scale": ((1, None), None), "io_backend": (_DISK, _DISK_FIX),
                          "mean": ((_NORMALISATION, None), _NORM_FIX), "std": ((_NORMALISATION, None), _NORM_FIX)},
    ("path",): {"resume_state": ((None,), "remove it and resume with --resume <run>/training_states/<iter>.state "
                                          "(or --resume <run> for its latest state)"),
                "ignore_resume_networks": ((None, [], ["network_g"]), "remove it: --resume restores every trained "
                                                                      "network, never the frozen stage-1 network_g"),
                **{f"pretrain_network_{d}": ((None,), _D_FIX)
                   for d in ("d", "d_global", "d_local", "d_main_global", "d_main_local")}},
    ("logger",): {"wandb": (({}, None), "remove it or set project: ~ (Weights & Biases logging is not implemented; "
                                        "logger.use_tb_logger writes TensorBoard events)")},
}


def network_key(cfg: dict) -> str:
    """The block of the trained generator: ``network_g`` for VQGAN configs, ``network_sr`` for VQFR configs."""
    return MODEL_TYPES[cfg["model_type"]]


def _stale_quantizer(block: dict) -> list[str]:
    bad = []
    for level, q in (block.get("quantizer_opt") or {}).items():
        if isinstance(q, dict) and q.get("type") == "L2VectorQuantizer" and "reservoir_size" in q:
            bad.append(level)
    return bad


def _block(cfg: dict, keys: Iterable[str]) -> object:
    """The value at the nested ``keys`` of ``cfg``; None where a level is missing or not a mapping."""
    block: object = cfg
    for key in keys:
        block = block.get(key) if isinstance(block, dict) else None
    return block


def _present(cfg: dict, paths: Iterable[tuple[str, ...]]) -> Iterator[tuple[str, dict, str]]:
    """(dotted name, the mapping holding it, its key) of each option of ``paths`` that ``cfg`` sets (not None)."""
    for keys in paths:
        parent = _block(cfg, keys[:-1])
        if isinstance(parent, dict) and parent.get(keys[-1]) is not None:
            yield ".".join(keys), parent, keys[-1]


#: Options read as true/false: a quoted "false" is a non-empty string, which bool() takes for true.
_BOOLEANS = (("syncbn",), ("find_unused_parameters",), ("datasets", "train", "use_hflip"),
             ("datasets", "train", "use_shuffle"), ("logger", "use_tb_logger"), ("path", "strict_load_g"),
             ("path", "strict_load_sr"), ("train", "perceptual_opt", "random_vgg"))


def _check_booleans(cfg: dict, source: str) -> None:
    """Refuse an option of :data:`_BOOLEANS` that is not a YAML boolean, and a ``val.save_img`` that is neither a
    boolean nor a count of images (it failed at the first validation)."""
    for name, parent, key in _present(cfg, _BOOLEANS):
        if not isinstance(parent[key], bool):
            raise ConfigError(f"{name} is {parent[key]!r}, not true or false", path=source,
                              fix="write true or false, without quotes")
    save = (cfg.get("val") or {}).get("save_img")
    if save is not None and not isinstance(save, bool) and not (isinstance(save, int) and save >= 0):
        raise ConfigError(f"val.save_img is {save!r}", path=source,
                          fix="write true (every validation image), false, or how many images to save")


def _check_whole_numbers(cfg: dict, source: str) -> None:
    """Turn the options of :data:`_WHOLE_NUMBERS` into ints, or raise ConfigError naming the option."""
    for keys, least in _WHOLE_NUMBERS.items():
        for name, parent, key in _present(cfg, [keys]):
            value = parent[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, bool) or not number.is_integer() or number < least:
                raise ConfigError(f"{name} is {value!r}", path=source, fix=f"use a whole number >= {least}")
            parent[key] = int(number)


def _is_number(value: object) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _check_numbers(cfg: dict, source: str) -> None:
    """Refuse an option of :data:`_NUMBERS`, a loss weight or a ``scheduler.milestones`` entry that is not a number
    (a whole number >= 0 for the milestones), naming it; they used to fail as an unnamed ValueError or TypeError
    once training started, ``val.fidelity_ratio`` only at the first validation."""
    found: list[tuple[str, object]] = [(name, parent[key]) for name, parent, key in _present(cfg, _NUMBERS)]
    train = cfg["train"]
    for key in _LOSS_TYPES:
        block = train.get(key)
        levels = [(f"{key}.{k}", v) for k, v in block.items() if isinstance(v, dict)] if isinstance(block, dict) else []
        for name, opts in [(key, block), *levels]:
            if isinstance(opts, dict):
                found += [(f"train.{name}.{w}", opts[w]) for w in _LOSS_WEIGHTS if opts.get(w) is not None]
    for name, value in found:
        if not _is_number(value):
            raise ConfigError(f"{name} is {value!r}", path=source, fix="use a number")
    scheduler = train.get("scheduler")
    milestones = scheduler.get("milestones", []) if isinstance(scheduler, dict) else []
    if not isinstance(milestones, list) or not all(_is_number(m) and float(m).is_integer() and float(m) >= 0
                                                   for m in milestones):
        raise ConfigError(f"train.scheduler.milestones is {milestones!r}", path=source,
                          fix="use a list of iterations, e.g. milestones: [500000, 650000]")


def val_metrics(cfg: dict, source: str = "config") -> dict[str, tuple[Callable[..., float], int]]:
    """The validation metrics: {logged name: (function of ``training.metrics``, crop_border)}; each function is
    called as ``function(img, ref, crop_border)`` on HxWx3 uint8 images.

    ``val.metrics`` uses basicsr's layout, as the official ymls do (``psnr: {type: calculate_psnr, crop_border: 4,
    test_y_channel: false}``): each listed metric is computed after cutting ``crop_border`` pixels from every side
    of both images, on all three channels or, with ``test_y_channel: true``, on BT.601 luma. Without it, PSNR and
    SSIM on the whole image.

    Raises:
        ConfigError: an unknown type or option, a crop_border that is not a whole number >= 0 or leaves too little
            of the validation images (SSIM needs 11x11 pixels; so do validation images without a crop), or a
            ``test_y_channel`` that is not true or false.
    """
    val = cfg.get("val") or {}
    if not isinstance(val, dict):
        raise ConfigError("val is not a mapping", path=source, fix="copy the val block of training/configs/*.yml")
    metrics = val.get("metrics") or _DEFAULT_VAL_METRICS
    if not isinstance(metrics, dict):
        raise ConfigError("val.metrics is not a mapping", path=source,
                          fix="write it as basicsr does: metrics: {psnr: {type: calculate_psnr, crop_border: 0}}")
    datasets = cfg.get("datasets") or {}
    size = (datasets.get("val") or {}).get("out_size") or (datasets.get("train") or {}).get("out_size", 512)
    out = {}
    for name, opt in metrics.items():
        key = f"val.metrics.{name}"
        if not isinstance(opt, dict) or opt.get("type") not in VAL_METRIC_TYPES:
            kind = opt.get("type") if isinstance(opt, dict) else opt
            raise ConfigError(f"{key}.type is {kind!r}", path=source, fix=f"use one of {sorted(VAL_METRIC_TYPES)}")
        unknown = sorted(set(opt) - {"type", "crop_border", "test_y_channel"})
        if unknown:
            raise ConfigError(f"{key} has options {unknown} that are not supported", path=source,
                              fix="remove them (supported: type, crop_border, test_y_channel)")
        y_only = opt.get("test_y_channel", False)
        if not isinstance(y_only, bool):
            raise ConfigError(f"{key}.test_y_channel is {y_only!r}", path=source,
                              fix="use true (luma only) or false (all three channels, as the official ymls)")
        crop = opt.get("crop_border", 0)
        if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
            raise ConfigError(f"{key}.crop_border is {crop!r}", path=source, fix="use a whole number >= 0")
        function = VAL_METRIC_TYPES[opt["type"]]
        least = 11 if function is ssim else 1  # SSIM needs one whole 11x11 window
        if isinstance(size, int) and size - 2 * crop < least:
            if not crop:  # too small whatever the crop: SSIM on images under 11x11 (found at the first validation)
                raise ConfigError(f"{key} needs validation images of at least {least}x{least} pixels; they are "
                                  f"{size}x{size}", path=source,
                                  fix=f"set datasets.val.out_size to {least} or more, or leave {name} out of "
                                      "val.metrics")
            raise ConfigError(f"{key}.crop_border is {crop}: it leaves less than {least}x{least} pixels of the "
                              f"{size}x{size} validation images", path=source,
                              fix=f"use a crop_border of at most {max(0, (size - least) // 2)}")
        out[str(name)] = (functools.partial(function, test_y_channel=True) if y_only else function, crop)
    return out


def build_optimizer(params: list[nn.Parameter], opts: dict) -> torch.optim.Optimizer:
    """The optimiser of a ``train.optim_*`` block (``type`` Adam, AdamW or SGD, and its arguments) over ``params``."""
    opts = dict(opts)
    kind = opts.pop("type", "Adam")
    classes = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
    if kind not in classes:
        raise ConfigError(f"optimiser type {kind!r} is not supported", fix=f"use one of {sorted(classes)}")
    if "betas" in opts:
        opts["betas"] = tuple(opts["betas"])
    floats = ("lr", "weight_decay", "eps", "momentum")
    return classes[kind](params, **{k: float(v) if k in floats else v for k, v in opts.items()})


def _check_values(cfg: dict, source: str) -> None:
    """Refuse what would otherwise fail only once the networks are built or the GAN starts, or would train on with
    a broken result: an optimiser block torch refuses (a negative lr, betas outside [0, 1), a misspelt option), an
    ``ema_decay`` outside [0, 1) (1 keeps the initial weights, which ``load_model`` prefers; above 1 diverges), and a
    discriminator whose ``out_size`` is not that of the training images."""
    train = cfg["train"]
    for key, opts in train.items():
        if not str(key).startswith("optim_") or opts is None:
            continue
        fix = "write it as training/configs/*.yml do, e.g. {type: Adam, lr: !!float 1e-4, betas: [0.9, 0.99]}"
        if not isinstance(opts, dict):
            raise ConfigError(f"train.{key} is not a mapping", path=source, fix=fix)
        try:
            build_optimizer([nn.Parameter(torch.zeros(1))], opts)
        except ConfigError as exc:
            raise ConfigError(f"train.{key}: {exc.reason}", path=source, fix=exc.fix) from exc
        except (TypeError, ValueError) as exc:  # torch's own checks: "Invalid learning rate: -0.0001", ...
            raise ConfigError(f"train.{key}: {exc}", path=source, fix=fix) from exc
    decay = train.get("ema_decay")
    if decay is not None and not (_is_number(decay) and 0 <= float(decay) < 1):  # type: ignore[arg-type]
        raise ConfigError(f"train.ema_decay is {decay!r}", path=source,
                          fix="use a decay in [0, 1): 0 trains without EMA (as the official run), 0.999 is ours")
    size = cfg["datasets"]["train"].get("out_size", 512)
    for name in _NETWORKS_OF[cfg["model_type"]]:
        block = cfg.get(name)
        if not (name.startswith("network_d") and isinstance(block, dict) and "out_size" in block):
            continue
        if block["out_size"] != size:
            raise ConfigError(f"{name}.out_size is {block['out_size']!r} but the training images are {size}x{size} "
                              "(datasets.train.out_size): the discriminator would fail when the GAN starts",
                              path=source, fix=f"set {name}.out_size: {size}")
        least = getattr(DISCRIMINATORS.get(str(block.get("type"))), "MIN_SIZE", 8)
        if not (isinstance(size, int) and least <= size <= 1024 and size & (size - 1) == 0):
            raise ConfigError(f"datasets.train.out_size is {size!r}, but {name} ({block.get('type')}) takes square "
                              f"images whose side is a power of two in [{least}, 1024]", path=source,
                              fix="use 512 (the official size), or another power of two"
                                  + (" (StyleGAN2Discriminator also takes 8)" if least > 8 else ""))


def _patchgan_side(size: int, n_layers: int) -> int:
    """Side of :class:`~training.discriminators.NLayerDiscriminator`'s patch map for ``size`` x ``size`` images:
    a 4x4/2 conv, ``n_layers - 1`` more, then two 4x4/1 convs, all padded by 1."""
    side = size
    for stride in [2] * n_layers + [1, 1]:
        side = (side + 2 - 4) // stride + 1
    return side


def _check_sizes(cfg: dict, source: str) -> None:
    """Refuse a training image size (``datasets.train.out_size``) that a network cannot take, which would otherwise
    fail at the first iteration or, for a discriminator, only when the GAN starts:

    - a generator needs a multiple of its patch (v1 ``proj_patch_size``; v2 2^(levels - 1); 32 when released);
    - a v2 generator in Predict mode is run by ``vqfr.load_model``, the runtime and export at ``spatial_size`` x its
      patch, so it must be trained at that size;
    - a PatchGAN's patch map must keep at least one pixel;
    - the perceptual loss's VGG16 pools four times before relu5_3.
    """
    size = cfg["datasets"]["train"].get("out_size", 512)
    if not _is_number(size) or not float(size).is_integer():  # type: ignore[arg-type]
        return  # refused by _check_whole_numbers
    size = int(float(size))  # type: ignore[arg-type]
    where = f"datasets.train.out_size is {size}"
    for name in _NETWORKS_OF[cfg["model_type"]]:
        block = cfg.get(name)
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        levels = block.get("channel_multipliers")
        if isinstance(levels, list) and levels:
            patch = block.get("proj_patch_size", 2 ** (len(levels) - 1))  # v1 names it, v2 has one level a factor 2
            if not isinstance(patch, int) or patch < 1:
                continue
            for key, side in (("train", size), ("val", (cfg["datasets"].get("val") or {}).get("out_size"))):
                if isinstance(side, int) and side % patch:
                    # a validation side suggested must also hold SSIM's 11x11 window (a default metric)
                    least = patch if key == "train" else -(-11 // patch) * patch
                    raise ConfigError(f"datasets.{key}.out_size is {side}, but {name} ({kind}) downsamples by {patch}: "
                                      f"the side must be a multiple of {patch}", path=source,
                                      fix=f"use a multiple of {patch}, such as {max(least, side // patch * patch)}")
            grid = (block.get("quantizer_opt") or {}).get("spatial_size")
            if kind == "VQFRv2" and block.get("code_selection_mode", "Predict") == "Predict" \
                    and isinstance(grid, list) and grid and _is_number(grid[0]) and int(grid[0]) * patch != size:
                face = int(grid[0]) * patch
                raise ConfigError(f"{where}, but {name} (VQFRv2, Predict mode) restores {face}x{face} faces "
                                  f"(quantizer_opt.spatial_size {grid} x {patch}): load_model, the runtime and export "
                                  f"would run the trained network at {face}x{face}", path=source,
                                  fix=f"set datasets.train.out_size: {face}, or spatial_size: [{size // patch}, "
                                      f"{size // patch}] in the quantizer_opt of {name} and network_g")
        if kind == "NLayerDiscriminator":
            n_layers = block.get("n_layers", 3)
            if isinstance(n_layers, int) and n_layers >= 1 and _patchgan_side(size, n_layers) < 1:
                least = 3 * 2 ** n_layers
                raise ConfigError(f"{where}, but {name} (NLayerDiscriminator, n_layers {n_layers}) needs images of "
                                  f"at least {least}x{least}: it would fail when the GAN starts", path=source,
                                  fix=f"use larger images, or fewer n_layers (n_layers {n_layers - 1} takes "
                                      f"{3 * 2 ** (n_layers - 1)}x{3 * 2 ** (n_layers - 1)})"
                                  if n_layers > 1 else "use larger images")
    percep = cfg["train"].get("perceptual_opt")
    if isinstance(percep, dict) and size < 16 and any(
            _is_number(percep.get(k, d)) and float(percep.get(k, d)) > 0  # type: ignore[arg-type]
            for k, d in (("perceptual_weight", 1.0), ("style_weight", 0.0))):
        raise ConfigError(f"{where}, but the perceptual loss's VGG16 needs images of at least 16x16 (it pools four "
                          "times before relu5_3)", path=source,
                          fix="use larger images, or switch the loss off (perceptual_weight: 0, style_weight: 0)")


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _off(value: object) -> object:
    """``value`` with the ``~`` entries of a mapping left out (``wandb: {project: ~}`` is off)."""
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def _is_off(value: object, off: object) -> bool:
    """Whether ``value`` is the "off" value ``off``; a YAML ``true``/``false`` is not 1/0 (Python says it is)."""
    if isinstance(value, bool) != isinstance(off, bool):
        return False
    return _off(value) == _off(off)


def _check_sections(cfg: dict, source: str) -> None:
    """Refuse an unknown option of the sections of :data:`_SECTION_KEYS` (a misspelt name would be ignored), a
    section that is not a mapping, and an official option of :data:`_OFF_ONLY` that is not off."""
    for where, known in _SECTION_KEYS.items():
        section = _block(cfg, where)
        name = ".".join(where)
        if section is None:  # absent, or `logger: ~`
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name} is not a mapping", path=source,
                              fix=f"write it as the {name} block of training/configs/*.yml")
        off_only = _OFF_ONLY.get(where, {})
        allowed = known | set(off_only)
        for key, value in section.items():
            option = f"{name}.{key}" if name else str(key)
            if str(key).startswith("network_") and not where:
                continue
            if key not in allowed:
                fix = ("use datasets.train and one validation set, datasets.val" if where == ("datasets",) else
                       f"correct or remove it (the options: {', '.join(sorted(allowed))})")
                raise ConfigError(f"{option} is not an option{_did_you_mean(str(key), allowed)}", path=source,
                                  fix=fix)
            if key in off_only:
                accepted, off_fix = off_only[key]
                if not any(_is_off(value, a) for a in accepted):
                    raise ConfigError(f"{option} is {value!r}: this official option is not implemented",
                                      path=source, fix=off_fix or f"remove it or set it to {accepted[0]!r}")


def _check_names(cfg: dict, source: str) -> None:
    """Refuse what a misspelt name would otherwise switch off or change silently: an unknown ``train`` option or
    ``network_*`` block, a loss block of another type, an unknown ``gan_type`` or ``val.test_which``."""
    model_type = cfg["model_type"]
    networks = _NETWORKS_OF[model_type]
    for key in cfg:
        if str(key).startswith("network_") and key not in networks:
            raise ConfigError(f"{key} is not a network block of {model_type}{_did_you_mean(str(key), networks)}",
                              path=source, fix=f"use the blocks {list(networks)}, or remove it")
    train = cfg["train"]
    for key in train:
        if key not in _TRAIN_KEYS:
            raise ConfigError(f"train.{key} is not an option{_did_you_mean(str(key), _TRAIN_KEYS)}", path=source,
                              fix="correct or remove it (the options are those of training/configs/*.yml)")
    for key, kind in _LOSS_TYPES.items():
        block = train.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"train.{key} is not a mapping", path=source, fix=f"write it as {{type: {kind}, ...}}")
        if block.get("type", kind) != kind:
            raise ConfigError(f"train.{key}.type is {block['type']!r}, but {key} takes type {kind}", path=source,
                              fix=f"use type: {kind}")
        if kind == "GANLoss" and block.get("gan_type", "wgan_softplus") not in GAN_TYPES:
            raise ConfigError(f"train.{key}.gan_type is {block['gan_type']!r}", path=source,
                              fix=f"use one of {sorted(GAN_TYPES)}")
        levels = {name: opt for name, opt in block.items() if name != "type"} if kind == "MultiQuantMatchLoss" else {}
        for name, opts, allowed in [(f"train.{key}", block, _LOSS_OPTIONS.get(kind, {"type", *levels}))] + [
                (f"train.{key}.{level}", opt, _LOSS_OPTIONS["MSELoss"]) for level, opt in levels.items()]:
            if not isinstance(opts, dict):
                raise ConfigError(f"{name} is not a mapping", path=source, fix="write it as {type: MSELoss, ...}")
            for option in opts:
                if option not in allowed:
                    raise ConfigError(f"{name}.{option} is not an option{_did_you_mean(str(option), allowed)}",
                                      path=source, fix=f"use {sorted(allowed)}")
            if opts is not block and opts.get("type", "MSELoss") != "MSELoss":
                raise ConfigError(f"{name}.type is {opts['type']!r}", path=source, fix="use type: MSELoss")
    val = cfg.get("val")
    which = val.get("test_which", _TEST_WHICH[0]) if isinstance(val, dict) else _TEST_WHICH[0]
    if model_type != "VQGANModel" and which not in _TEST_WHICH:
        raise ConfigError(f"val.test_which is {which!r}", path=source, fix=f"use one of {list(_TEST_WHICH)}")


def check_config(cfg: dict, source: str = "config") -> dict:
    """Validate the parts every recipe needs (whole-number options become ints); raise ConfigError naming the key
    and the fix."""
    if not isinstance(cfg, dict):
        raise ConfigError("is not a YAML mapping", path=source)
    model_type = cfg.get("model_type")
    if model_type in _STALE_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is the stale name of the official v1 yml", path=source,
                          fix=f"use model_type: {_STALE_MODEL_TYPES[model_type]}")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type is {model_type!r}", path=source, fix=f"use one of {sorted(MODEL_TYPES)}")
    key = MODEL_TYPES[model_type]
    blocks = [key] + (["network_g"] if model_type in _STAGE1_OF else [])
    for name in blocks:
        block = cfg.get(name)
        if not isinstance(block, dict):
            raise ConfigError(f"{model_type} needs a {name} block", path=source,
                              fix="copy one from training/configs/*.yml")
        if block.get("type") in _STALE_ARCHS:
            raise ConfigError(f"{name}.type {block['type']!r} is the stale name of the official v1 yml", path=source,
                              fix=f"use type: {_STALE_ARCHS[block['type']]}")
        if block.get("type") == "VQGANv1" and _stale_quantizer(block):
            raise ConfigError(f"{name}.quantizer_opt uses type L2VectorQuantizer with k-means options (the stale "
                              "official v1 yml)", path=source, fix="use type: L2VectorQuantizerKmeans")
    if cfg[key].get("type") not in _ARCH_OF[model_type]:
        raise ConfigError(f"{key}.type is {cfg[key].get('type')!r} but {model_type} trains {_ARCH_OF[model_type]}",
                          path=source, fix="match model_type and the network type")
    if model_type in _STAGE1_OF and cfg["network_g"].get("type") != _STAGE1_OF[model_type]:
        raise ConfigError(f"network_g (the frozen stage-1 model) must be {_STAGE1_OF[model_type]}, got "
                          f"{cfg['network_g'].get('type')!r}", path=source,
                          fix="use the stage-1 network of this version")
    datasets = cfg.get("datasets") or {}
    train_ds = datasets.get("train") if isinstance(datasets, dict) else None
    if not isinstance(train_ds, dict) or "dataroot_gt" not in train_ds:
        raise ConfigError("needs datasets.train.dataroot_gt", path=source, fix="point it at a folder of aligned faces")
    val_ds = datasets.get("val")
    if val_ds and (not isinstance(val_ds, dict) or "dataroot_gt" not in val_ds):
        raise ConfigError("datasets.val needs dataroot_gt", path=source,
                          fix="point it at the validation HQ faces (LQ ones go in dataroot_lq), or remove datasets.val")
    if not isinstance(cfg.get("train"), dict) or "total_iter" not in cfg["train"]:
        raise ConfigError("needs train.total_iter", path=source)
    _check_sections(cfg, source)
    _check_whole_numbers(cfg, source)
    _check_names(cfg, source)
    _check_numbers(cfg, source)
    _check_booleans(cfg, source)
    _check_values(cfg, source)
    _check_sizes(cfg, source)
    if model_type in _STAGE1_OF:  # the degradations of stage 2, refused now rather than when the data loads
        for name in ("train", "val"):
            opts = datasets.get(name)
            if isinstance(opts, dict) and (name == "train" or "degradation" in opts):
                try:
                    DegradationParams.from_options(opts, f"datasets.{name}")
                except ConfigError as exc:
                    raise ConfigError(exc.reason, path=source, fix=exc.fix) from exc
    val_metrics(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate a training yml; ``overrides`` are merged into it (nested dicts merge key by key)."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the config ({exc.strerror})", path=path, fix="check the path") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"is not valid YAML ({exc})", path=path, fix="fix the YAML syntax") from exc
    cfg = cfg or {}
    if isinstance(cfg, dict):  # anything else is reported by check_config
        cfg = merge(cfg, overrides or {})
    return check_config(cfg, str(path))


def merge(base: dict, update: dict) -> dict:
    """A deep copy of ``base`` with ``update`` merged in (dicts recursively, anything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
