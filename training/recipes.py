"""What each stage optimises: the generator losses of VQGAN (stage 1), VQFR v1 and VQFR v2 (stage 2), and the
adversarial branches they share (OFFICIAL_VQFR.md §8).

A recipe builds its networks from the config, says which parameters each generator optimiser trains, and computes
one generator step's losses. The training loop (``training/trainer.py``) does the rest: backward, optimiser steps,
the discriminator steps of each :class:`AdversarialBranch`, EMA, logging, checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

import vqfr
from training.discriminators import build_discriminator
from training.losses import (
    PerceptualLoss,
    adaptive_weight,
    check_gan_type,
    code_index_loss,
    gan_loss,
    l1_loss,
    mse_loss,
    r1_penalty,
)
from vqfr.errors import ConfigError
from vqfr.models import Network

__all__ = ["AdversarialBranch", "Recipe", "VQGANRecipe", "VQFRv1Recipe", "VQFRv2Recipe", "RECIPES", "unwrap",
           "frozen"]

log = logging.getLogger("training")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Turn off gradients of ``module``'s parameters (a discriminator during the generator step)."""
    if module is None:
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _loss_weight(opt: dict | None, key: str = "loss_weight") -> float:
    return float(opt.get(key, 1.0)) if opt else 0.0


class AdversarialBranch:
    """One generator output judged by a global discriminator (logistic loss + lazy R1) and optionally a local
    PatchGAN (hinge loss, scaled by the adaptive weight against the reconstruction losses).

    Args:
        suffix: appended to the logged names ("" or "_main").
        d_global, d_local: the discriminators (possibly DDP-wrapped); ``d_local`` may be None.
        start_iter: the branch is active for iterations > start_iter.
        global_gan, local_gan: the ``gan_opt``-style blocks (``gan_type``, ``loss_weight``).
        global_weight, local_weight: ``generator_d_global_weight`` / ``generator_d_local_weight``.
        d_local_loss_weight: factor of the local discriminator's own loss (0.5 in v1, 1 in v2).
        r1_weight, r1_every: lazy R1 on the global discriminator: ``r1_weight / 2 * R1 * r1_every`` every
            ``r1_every`` iterations.
    """

    def __init__(self, suffix: str, d_global: nn.Module, d_local: nn.Module | None, start_iter: int,
                 global_gan: dict, local_gan: dict | None, global_weight: float, local_weight: float,
                 d_local_loss_weight: float, r1_weight: float, r1_every: int):
        self.suffix = suffix
        self.d_global, self.d_local = d_global, d_local
        self.start_iter = int(start_iter)
        self.global_type, self.global_lw = global_gan.get("gan_type", "wgan_softplus"), _loss_weight(global_gan)
        self.local_type = (local_gan or {}).get("gan_type", "hinge")
        self.local_lw = _loss_weight(local_gan) if local_gan else 1.0
        for kind in (self.global_type, self.local_type):  # refused now, not when the GAN starts
            check_gan_type(kind)
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)
        self.d_local_loss_weight = float(d_local_loss_weight)
        self.r1_weight, self.r1_every = float(r1_weight), int(r1_every)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def discriminators(self) -> dict[str, nn.Module]:
        out = {"global": self.d_global}
        if self.d_local is not None:
            out["local"] = self.d_local
        return out

    def active(self, iteration: int) -> bool:
        return iteration > self.start_iter

    def generator_terms(self, fake: Tensor, nll: Tensor | None, last_layer: Tensor | None,
                        grad_scale: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The generator's adversarial losses on ``fake`` (discriminators frozen).

        Returns:
            (loss terms to add to the total, diagnostics such as the adaptive weight).
        """
        s = self.suffix
        terms, extra = {}, {}
        d_global = unwrap(self.d_global)
        with frozen(d_global):
            g = gan_loss(d_global(fake), True, False, self.global_type)
            terms[f"l_g_gan_global{s}"] = self.global_weight * self.global_lw * g
        if self.d_local is not None:
            d_local = unwrap(self.d_local)
            with frozen(d_local):
                g_local = self.local_lw * gan_loss(d_local(fake), True, False, self.local_type)
            if nll is None or last_layer is None:
                raise ConfigError("the local discriminator needs reconstruction losses for its adaptive weight")
            weight = adaptive_weight(nll * grad_scale, g_local * grad_scale, last_layer, grad_scale)
            terms[f"l_g_gan_local{s}"] = self.local_weight * weight * g_local
            extra[f"d_weight_local{s}"] = weight
        return terms, extra

    def discriminator_step(self, fake: Tensor, real: Tensor, iteration: int, scaler: torch.amp.GradScaler,
                           autocast: contextlib.AbstractContextManager) -> dict[str, Tensor]:
        """One optimisation step of each discriminator on detached ``fake`` and ``real`` [B, 3, H, W].

        Gradients are zeroed first on every step (the official v2 code never zeroes its global D's gradients).
        """
        s = self.suffix
        fake = fake.detach()
        out = {}
        opt = self.optimizers["global"]
        opt.zero_grad(set_to_none=True)
        with autocast:
            fake_pred, real_pred = self.d_global(fake), self.d_global(real)
            l_d = gan_loss(real_pred, True, True, self.global_type) + gan_loss(fake_pred, False, True, self.global_type)
        scaler.scale(l_d).backward()
        out.update({f"l_d_global{s}": l_d.detach(), f"real_score_global{s}": real_pred.detach().float().mean(),
                    f"fake_score_global{s}": fake_pred.detach().float().mean()})
        if self.r1_weight > 0 and iteration % self.r1_every == 0:
            real_in = real.detach().float().requires_grad_(True)
            pred = self.d_global(real_in)  # in fp32: the penalty's second derivatives overflow easily in fp16
            r1 = r1_penalty(pred, real_in)
            # The 0 * pred term keeps every discriminator parameter in the graph (the last bias has no R1
            # gradient), which DistributedDataParallel requires.
            scaler.scale(self.r1_weight / 2 * r1 * self.r1_every + 0 * pred.sum()).backward()
            out[f"l_d_r1{s}"] = (self.r1_weight / 2 * r1 * self.r1_every).detach()
        scaler.step(opt)
        if self.d_local is not None:
            opt = self.optimizers["local"]
            opt.zero_grad(set_to_none=True)
            with autocast:
                fake_pred, real_pred = self.d_local(fake), self.d_local(real)
                l_d = self.d_local_loss_weight * (gan_loss(real_pred, True, True, self.local_type)
                                                  + gan_loss(fake_pred, False, True, self.local_type))
            scaler.scale(l_d).backward()
            scaler.step(opt)
            out.update({f"l_d_local{s}": l_d.detach(), f"real_score_local{s}": real_pred.detach().float().mean(),
                        f"fake_score_local{s}": fake_pred.detach().float().mean()})
        return out


def build_perceptual(train_opt: dict) -> PerceptualLoss | None:
    """The LPIPS/style loss from ``perceptual_opt``, or None when absent or both weights are 0."""
    opt = dict(train_opt.get("perceptual_opt") or {})
    if not opt or (float(opt.get("perceptual_weight", 1.0)) == 0 and float(opt.get("style_weight", 0.0)) == 0):
        return None
    kind = opt.pop("type", "LPIPS")
    if kind != "LPIPS":
        raise ConfigError(f"perceptual_opt.type {kind!r} is not supported", fix="use type: LPIPS")
    if opt.get("random_vgg"):
        log.warning("perceptual_opt.random_vgg is set: the perceptual and style losses use a RANDOMLY initialised "
                    "VGG16, not ImageNet features. This is for smoke tests only.")
    try:
        return PerceptualLoss(**opt)
    except TypeError as exc:  # an option PerceptualLoss does not take (load_config names it with the file)
        raise ConfigError(f"train.perceptual_opt: {exc}", fix="use the options of training/configs/*.yml") from exc


class Recipe:
    """Base class: networks, parameter groups and the generator step of one stage.

    Attributes set by ``build``: ``generator`` (the trained network, unwrapped), ``stage1`` (frozen HQ network or
    None), ``branches`` ({name: AdversarialBranch}), ``perceptual`` (PerceptualLoss or None).
    """

    generator_name = "net_sr"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.train_opt = cfg["train"]
        self.generator: Network
        self.stage1: nn.Module | None = None
        self.branches: dict[str, AdversarialBranch] = {}
        blocks = [(k, v) for k, v in self.train_opt.items() if k.endswith("_opt") and isinstance(v, dict)]
        blocks += [(f"{k}.{lv}", b) for k, v in list(blocks) for lv, b in v.items() if isinstance(b, dict)]
        for name, block in blocks:  # every loss here is a mean (the official configs say reduction: mean)
            if block.get("reduction", "mean") != "mean":
                raise ConfigError(f"train.{name}.reduction is {block['reduction']!r}; only 'mean' is supported",
                                  fix="use reduction: mean")
        self.perceptual = build_perceptual(self.train_opt)

    # --- construction -------------------------------------------------------------------------------------------
    def build_generator(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self) -> dict[str, tuple[list[nn.Parameter], dict]]:
        """{optimiser name: (parameters, optimiser options)} for the generator."""
        raise NotImplementedError

    def branch_specs(self) -> list[dict]:
        """One dict per adversarial branch: ``name``, ``suffix`` (of logged names), ``global``/``local`` (config
        keys of the discriminators; local may be None), ``start`` (key of the start iteration), ``global_gan`` /
        ``local_gan`` (loss blocks), ``global_gan_key`` (the ``train`` key of ``global_gan``),
        ``d_local_loss_weight``. A branch without its global D block is skipped."""
        raise NotImplementedError

    def build_branches(self, wrap) -> None:
        """Create the discriminators (``wrap`` moves one to its device and wraps it for DDP).

        Raises:
            ConfigError: a global discriminator block without its loss block (``gan_opt``, v1 ``global_gan_opt``):
                the official trainer then trains no GAN at all; here its generator term would weigh 0 while the
                discriminators still trained.
        """
        t = self.train_opt
        for spec in self.branch_specs():
            if spec["global"] not in self.cfg:
                continue
            if not spec["global_gan"]:
                key = spec["global_gan_key"]
                raise ConfigError(f"{spec['global']} is given but train.{key} is not, so that discriminator's "
                                  "generator loss would weigh 0", fix=f"add train.{key} (the released configs have "
                                  f"{{type: GANLoss, gan_type: wgan_softplus, loss_weight: 1.0}}), or remove "
                                  f"{spec['global']} to train without a GAN")
            local = spec.get("local")
            d_local = wrap(build_discriminator(self.cfg[local])) if local and local in self.cfg else None
            self.branches[spec["name"]] = AdversarialBranch(
                suffix=spec["suffix"], d_global=wrap(build_discriminator(self.cfg[spec["global"]])), d_local=d_local,
                start_iter=t.get(spec["start"], 0), global_gan=spec["global_gan"],
                local_gan=spec.get("local_gan"), global_weight=t.get("generator_d_global_weight", 1.0),
                local_weight=t.get("generator_d_local_weight", 1.0),
                d_local_loss_weight=spec.get("d_local_loss_weight", 1.0), r1_weight=t.get("r1_reg_weight", 10),
                r1_every=t.get("net_d_reg_every", 16))
        specs = self.branch_specs()
        given = sorted({f"train.{k}" for spec in specs for k in (spec["global_gan_key"], "patch_gan_opt") if t.get(k)})
        if not self.branches and given:  # a GAN loss block, but no discriminator to use it
            blocks = sorted({spec["global"] for spec in specs})
            log.warning("no discriminator block (%s) is given, so this run trains without a GAN and ignores %s; add "
                        "the block(s) to train one", ", ".join(blocks), ", ".join(given))

    # --- one step -----------------------------------------------------------------------------------------------
    def generator_step(self, net: nn.Module, batch: dict, iteration: int, grad_scale: float):
        """Losses of one generator step.

        Args:
            net: the (possibly DDP-wrapped) generator to call.
            batch: ``gt`` [B,3,H,W] (and ``lq``), on the device.
            iteration: the 1-based iteration.
            grad_scale: the AMP loss scale (1 without fp16), for the adaptive weight.

        Returns:
            (loss terms {name: scalar}, diagnostics {name: scalar}, fakes {branch name: image for its D}, outputs).
        """
        raise NotImplementedError

    def _add_perceptual(self, terms: dict, pred: Tensor, gt: Tensor, suffix: str = "") -> Tensor:
        """Adds l_g_percep{suffix} / l_g_style{suffix}; returns their sum (0 when off)."""
        total = pred.new_zeros((), dtype=torch.float32)
        if self.perceptual is None:
            return total
        percep, style = self.perceptual(pred, gt)
        if percep is not None:
            terms[f"l_g_percep{suffix}"] = percep
            total = total + percep
        if style is not None:
            terms[f"l_g_style{suffix}"] = style
            total = total + style
        return total

    def _adversarial(self, name: str, terms: dict, extra: dict, fakes: dict, fake: Tensor, nll: Tensor,
                     last_layer: str, iteration: int, grad_scale: float) -> None:
        branch = self.branches.get(name)
        if branch is None or not branch.active(iteration):
            return
        layer = self.generator.get_parameter(last_layer) if branch.d_local is not None else None
        g_terms, g_extra = branch.generator_terms(fake, nll, layer, grad_scale)
        terms.update(g_terms)
        extra.update(g_extra)
        fakes[name] = fake


def _load_weights(model: nn.Module, path: str, strict: bool, what: str, param_key: str | None = None) -> int:
    """Load a released-layout checkpoint into ``model``; non-strict loads take the keys with equal shapes.

    ``param_key`` (the official ``param_key_g`` / ``param_key_sr``) picks ``params`` or ``params_ema`` of a file
    that holds it; otherwise ``params_ema`` is preferred over ``params``.
    """
    from vqfr.checkpoint import read_state_dict

    sd, _ = read_state_dict(path, param_key)
    if strict:
        model.load_state_dict(sd, strict=True)
        return len(sd)
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise ConfigError(f"shares no weights with the {what}", path=path, fix="pass the stage-1 checkpoint")
    model.load_state_dict(usable, strict=False)
    return len(usable)


def _optim_opts(opt: dict | None, where: str) -> dict:
    if not opt:
        raise ConfigError(f"train.{where} is missing", fix="add an optimiser block: {type: Adam, lr: ..., betas: ...}")
    return dict(opt)


class VQGANRecipe(Recipe):
    """Stage 1: the codebook VQGAN reconstructs HQ faces. L1 + LPIPS + codebook loss + global GAN (R1).

    VQGANv1 adds k-means re-estimation of the codebook (driven by the trainer) and the quantization warm-up.
    """

    generator_name = "net_g"

    def build_generator(self) -> nn.Module:
        self.generator = vqfr.build_model(self.cfg["network_g"])
        path = (self.cfg.get("path") or {}).get("pretrain_network_g")
        if path:
            n = _load_weights(self.generator, path, bool(self.cfg["path"].get("strict_load_g", True)), "VQGAN",
                              self.cfg["path"].get("param_key_g"))
            log.info("loaded %d tensors of network_g from %s", n, path)
        return self.generator

    def param_groups(self):
        params = [p for p in self.generator.parameters() if p.requires_grad]
        return {"optim_g": (params, _optim_opts(self.train_opt.get("optim_g"), "optim_g"))}

    def branch_specs(self):
        return [{"name": "recon", "suffix": "", "global": "network_d", "start": "gan_start_iter",
                 "global_gan_key": "gan_opt", "global_gan": self.train_opt.get("gan_opt")}]

    def generator_step(self, net, batch, iteration, grad_scale):
        gt = batch["gt"]
        kwargs = {"iters": iteration} if self.generator.arch == "VQGANv1" else {}
        out = net(gt, return_all=True, **kwargs)
        terms: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        fakes: dict[str, Tensor] = {}
        pix = self.train_opt.get("pixel_opt")
        nll = gt.new_zeros((), dtype=torch.float32)
        if pix:
            terms["l_rec"] = l1_loss(out["dec"].float(), gt, _loss_weight(pix))
            nll = nll + terms["l_rec"]
        nll = nll + self._add_perceptual(terms, out["dec"], gt)
        terms["l_codebook"] = float(self.train_opt.get("codebook_loss_weight", 1.0)) * out["quant_loss"]
        if self._bypassing_quantizer(iteration):
            # During the warm-up the codebook is unused; a zero term keeps it in the graph so that DDP (without
            # find_unused_parameters) still receives a gradient for every parameter.
            terms["l_codebook"] = terms["l_codebook"] + sum(
                0 * q.embedding.weight.sum() for q in self.generator.quantizer.quantize_dict.values())
        self._adversarial("recon", terms, extra, fakes, out["dec"], nll, "decoder.conv_out.2.weight", iteration,
                          grad_scale)
        return terms, extra, fakes, out

    def _bypassing_quantizer(self, iteration: int) -> bool:
        if self.generator.arch != "VQGANv1":
            return False
        quantizer: Any = self.generator.quantizer  # v1's GeneralizedQuantizer
        return any(iteration < q.warmup_iters for q in quantizer.quantize_dict.values())


class _Stage2(Recipe):
    """Stage 2: a frozen stage-1 VQGAN (``network_g``) gives the HQ codes; the restoration network starts from the
    stage-1 weights (``path.pretrain_network_sr``, else the loaded/initialised stage-1 network, non-strict)."""

    def build_generator(self) -> nn.Module:
        paths = self.cfg.get("path") or {}
        self.stage1 = vqfr.build_model(self.cfg["network_g"])
        if paths.get("pretrain_network_g"):
            n = _load_weights(self.stage1, paths["pretrain_network_g"], True, "stage-1 VQGAN", paths.get("param_key_g"))
            log.info("loaded the stage-1 VQGAN (%d tensors) from %s", n, paths["pretrain_network_g"])
        else:
            log.warning("path.pretrain_network_g is not set: the HQ codes come from a RANDOMLY initialised VQGAN. "
                        "Use a trained stage-1 checkpoint for real training.")
        self.stage1.requires_grad_(False).eval()
        self.generator = vqfr.build_model(self.cfg["network_sr"])
        if paths.get("pretrain_network_sr"):
            n = _load_weights(self.generator, paths["pretrain_network_sr"],
                              bool(paths.get("strict_load_sr", False)), "restoration network",
                              paths.get("param_key_sr"))
            log.info("initialised network_sr from %s (%d tensors)", paths["pretrain_network_sr"], n)
        else:
            own = self.generator.state_dict()
            shared = {k: v for k, v in self.stage1.state_dict().items()
                      if k in own and tuple(v.shape) == tuple(own[k].shape)}
            self.generator.load_state_dict(shared, strict=False)
            log.info("initialised network_sr from the stage-1 network (%d tensors)", len(shared))
        return self.generator


class VQFRv1Recipe(_Stage2):
    """VQFR v1: everything but the codebook trains (``fix_keys: [embedding]``); latent MSE to the HQ
    ``z_quant_before_conv``; L1/LPIPS/style on the texture output ``dec`` and LPIPS/style (L1 weight 0) on
    ``main_dec``; a global + local GAN on each branch."""

    def param_groups(self):
        params = [p for p in self.generator.parameters() if p.requires_grad]
        return {"optim_sr": (params, _optim_opts(self.train_opt.get("optim_sr"), "optim_sr"))}

    def branch_specs(self):
        t = self.train_opt
        common = {"global_gan_key": "global_gan_opt", "global_gan": t.get("global_gan_opt"),
                  "local_gan": t.get("patch_gan_opt"),
                  "d_local_loss_weight": t.get("d_local_loss_weight", 0.5)}
        return [{"name": "texture", "suffix": "", "global": "network_d_global", "local": "network_d_local",
                 "start": "gan_start_iter", **common},
                {"name": "main", "suffix": "_main", "global": "network_d_main_global", "local": "network_d_main_local",
                 "start": "main_gan_start_iter", **common}]

    def generator_step(self, net, batch, iteration, grad_scale):
        lq, gt = batch["lq"], batch["gt"]
        t = self.train_opt
        with torch.no_grad():
            hq = self.stage1(gt, return_all=True)
        out = net(lq, return_all=True)
        terms: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        fakes: dict[str, Tensor] = {}
        nll = gt.new_zeros((), dtype=torch.float32)
        nll_main = gt.new_zeros((), dtype=torch.float32)
        if _loss_weight(t.get("pixel_opt")) > 0:
            terms["l_rec"] = l1_loss(out["dec"].float(), gt, _loss_weight(t["pixel_opt"]))
            nll = nll + terms["l_rec"]
        if _loss_weight(t.get("pixel_main_opt")) > 0:
            terms["l_main_rec"] = l1_loss(out["main_dec"].float(), gt, _loss_weight(t["pixel_main_opt"]))
            nll_main = nll_main + terms["l_main_rec"]
        latent = t.get("latent_opt")
        if latent:
            levels = out["feat_dict"].keys()
            terms["l_latent"] = sum(
                mse_loss(out["feat_dict"][lv]["z_conv"].float(), hq["feat_dict"][lv]["z_quant_before_conv"],
                         _loss_weight(latent.get(lv, {"loss_weight": 1.0})))
                for lv in levels)
        nll = nll + self._add_perceptual(terms, out["dec"], gt)
        nll_main = nll_main + self._add_perceptual(terms, out["main_dec"], gt, "_main")
        self._adversarial("texture", terms, extra, fakes, out["dec"], nll, "decoder.conv_out.2.weight", iteration,
                          grad_scale)
        self._adversarial("main", terms, extra, fakes, out["main_dec"], nll_main, "main_decoder.conv_out.0.weight",
                          iteration, grad_scale)
        return terms, extra, fakes, out


#: Which VQFRv2 parameters each optimiser trains (substring of the name), as the official optimiser groups.
V2_GROUPS = {"optim_sr_enc": ("encoder", "feat2index"), "optim_sr_maindec": ("main_branch", "inpfeat_extraction")}
V2_LAST_LAYER = "decoder.conv_out.2.weight"


class VQFRv2Recipe(_Stage2):
    """VQFR v2: only the encoder + feat2index and the main branch + input features train (two optimisers); the
    codebook and the texture decoder (including the shared ``conv_out``) are frozen. Losses on ``main_dec`` at
    fidelity 1: L1, LPIPS, MSE(enc_feat, HQ codes), cross-entropy(logits, HQ indices), global + local GAN (the
    local adaptive weight is taken against the perceptual loss alone, as in the official code)."""

    def build_generator(self) -> nn.Module:
        super().build_generator()
        needs_last = "network_d_local" in self.cfg and "network_d" in self.cfg
        for name, p in self.generator.named_parameters():
            trained = any(k in name for keys in V2_GROUPS.values() for k in keys)
            # The frozen last layer still needs a gradient for the adaptive weight of the local discriminator.
            p.requires_grad_(trained or (needs_last and name == V2_LAST_LAYER))
        if needs_last and self.perceptual is None:
            log.warning("the local discriminator's adaptive weight is taken against the perceptual loss, which is "
                        "off: the local GAN term will be 0")
        return self.generator

    def param_groups(self):
        groups = {}
        for opt_name, keys in V2_GROUPS.items():
            params = [p for n, p in self.generator.named_parameters() if any(k in n for k in keys)]
            groups[opt_name] = (params, _optim_opts(self.train_opt.get(opt_name), opt_name))
        return groups

    def branch_specs(self):
        t = self.train_opt
        return [{"name": "main", "suffix": "", "global": "network_d", "local": "network_d_local",
                 "start": "gan_start_iter", "global_gan_key": "gan_opt", "global_gan": t.get("gan_opt"),
                 "local_gan": t.get("patch_gan_opt"),
                 "d_local_loss_weight": t.get("d_local_loss_weight", 1.0)}]

    def generator_step(self, net, batch, iteration, grad_scale):
        lq, gt = batch["lq"], batch["gt"]
        t = self.train_opt
        out = net(lq, fidelity=float(t.get("fidelity_ratio", 1.0)), return_all=True)
        terms: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        fakes: dict[str, Tensor] = {}
        if _loss_weight(t.get("pixel_opt")) > 0:
            terms["l_rec"] = l1_loss(out["main_dec"].float(), gt, _loss_weight(t["pixel_opt"]))
        if t.get("quant_feature_opt") or t.get("quant_index_opt"):
            with torch.no_grad():
                hq = self.stage1(gt, return_all=True)
            if t.get("quant_feature_opt"):
                terms["l_quant_feature"] = mse_loss(out["enc_feat"].float(), hq["quant_feat"],
                                                    _loss_weight(t["quant_feature_opt"]))
            if t.get("quant_index_opt"):
                terms["l_quant_index"] = code_index_loss(out["quant_logit"], hq["code_indices"],
                                                         _loss_weight(t["quant_index_opt"]))
        self._add_perceptual(terms, out["main_dec"], gt)
        # Without a perceptual loss the adaptive weight is 0.
        nll = terms.get("l_g_percep", gt.new_zeros((), dtype=torch.float32))
        self._adversarial("main", terms, extra, fakes, out["main_dec"], nll, V2_LAST_LAYER, iteration, grad_scale)
        return terms, extra, fakes, out


RECIPES = {"VQGANModel": VQGANRecipe, "VQFRv1Model": VQFRv1Recipe, "VQFRv2Model": VQFRv2Recipe}
