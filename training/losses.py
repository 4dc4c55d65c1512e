"""The losses of the VQFR recipe (OFFICIAL_VQFR.md §8).

Pixel, code-alignment and code-index losses are plain functions; the perceptual/style loss is a frozen module
(LPIPS on VGG16 features); GAN losses, lazy R1 and the adaptive weight of the local discriminator are functions of
the discriminator's outputs. The codebook/commitment loss lives with the quantizer
(:func:`vqfr.models.quantizer.codebook_loss`, weights 1 and 0.25) and is returned by the model in train mode.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from training.vgg import LPIPS_TAPS, VGG16Features, load_vgg16
from vqfr.errors import CheckpointError, ConfigError

__all__ = ["l1_loss", "mse_loss", "code_index_loss", "gan_loss", "GAN_TYPES", "check_gan_type", "r1_penalty",
           "adaptive_weight", "gram_matrix", "PerceptualLoss", "LPIPS_CHANNELS"]

LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input normalisation (the ImageNet statistics expressed for inputs in [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def l1_loss(pred: Tensor, target: Tensor, weight: float = 1.0) -> Tensor:
    """``weight * mean(|pred - target|)``."""
    return weight * F.l1_loss(pred, target)


def mse_loss(pred: Tensor, target: Tensor, weight: float = 1.0) -> Tensor:
    """``weight * mean((pred - target)^2)`` (code alignment: LQ encoder features to the HQ codes)."""
    return weight * F.mse_loss(pred, target)


def code_index_loss(logits: Tensor, target: Tensor, weight: float = 1.0) -> Tensor:
    """Cross-entropy of code logits [B, hw, K] against the HQ code indices [B, hw] (v2), mean over tokens."""
    return weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def _softplus_loss(pred: Tensor, real: bool, is_disc: bool) -> Tensor:
    # Non-saturating logistic: -log(sigmoid(x)) = softplus(-x) for "real", softplus(x) for "fake".
    return F.softplus(-pred).mean() if real else F.softplus(pred).mean()


def _hinge_loss(pred: Tensor, real: bool, is_disc: bool) -> Tensor:
    if not is_disc:
        return -pred.mean()
    return F.relu(1.0 - pred).mean() if real else F.relu(1.0 + pred).mean()


#: gan_type -> loss(pred, target_is_real, is_disc). "wgan_softplus" is StyleGAN2's logistic loss.
GAN_TYPES = {"wgan_softplus": _softplus_loss, "hinge": _hinge_loss}


def check_gan_type(gan_type: str) -> None:
    """Raise ConfigError unless ``gan_type`` is one of :data:`GAN_TYPES`."""
    if gan_type not in GAN_TYPES:
        raise ConfigError(f"unknown gan_type {gan_type!r}", fix=f"use one of {sorted(GAN_TYPES)}")


def gan_loss(pred: Tensor, target_is_real: bool, is_disc: bool, gan_type: str) -> Tensor:
    """The adversarial loss of discriminator outputs ``pred`` (any shape; averaged).

    For the generator pass ``target_is_real=True, is_disc=False``: softplus(-D(G(z))) or -D(G(z)) for hinge.
    For the discriminator: softplus(-D(x)) + softplus(D(G(z))), or relu(1 - D(x)) + relu(1 + D(G(z))).
    """
    check_gan_type(gan_type)
    return GAN_TYPES[gan_type](pred.float(), target_is_real, is_disc)


def r1_penalty(real_pred: Tensor, real_img: Tensor) -> Tensor:
    """R1: ``mean_b ||d sum(D(x)) / d x_b||^2`` over the batch. ``real_img`` must require grad; the graph is
    kept (create_graph) so the penalty can be back-propagated into the discriminator."""
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def adaptive_weight(nll: Tensor, gan: Tensor, last_layer: Tensor, grad_scale: float = 1.0) -> Tensor:
    """``||d nll/d W|| / (||d gan/d W|| + 1e-4)`` at the generator's last layer W, clamped to [0, 1e4], detached.

    The losses may be pre-multiplied by an AMP loss scale ``grad_scale`` (the gradients are unscaled first). Under
    torch.distributed the two gradients are averaged over ranks first, so the weight is that of the global batch
    and does not depend on the number of GPUs (the official code uses each GPU's own gradients).
    """
    def grad(loss: Tensor) -> Tensor:
        if not loss.requires_grad:  # a loss that is switched off: no gradient
            return torch.zeros_like(last_layer, dtype=torch.float32)
        (g,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        return torch.zeros_like(last_layer, dtype=torch.float32) if g is None else g.float()

    grads = torch.stack([grad(nll), grad(gan)]) / grad_scale
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
    weight = grads[0].norm() / (grads[1].norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def gram_matrix(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, C] Gram matrix divided by C*H*W."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def _unit_normalise(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


def _default_lpips_weights() -> dict[str, Tensor]:
    from safetensors.torch import load

    data = resources.files("training.weights").joinpath("lpips_vgg_v0.1.safetensors").read_bytes()
    return load(data)


class PerceptualLoss(nn.Module):
    """LPIPS(VGG16) perceptual loss and the Gram-matrix style loss on the same normalised features.

    ``percep = perceptual_weight * mean_b sum_l mean_hw(sum_c w_lc (f_l(x) - f_l(y))^2)`` with unit-normalised
    features f_l at relu1_2 .. relu5_3 and the LPIPS linear weights w; ``style = style_weight * sum_l
    L1(gram(f_l(x)), gram(f_l(y)))``. Inputs are images in [-1, 1]. All parameters are frozen.

    Args:
        perceptual_weight, style_weight: loss weights; a weight of 0 switches its term off (returned as None).
        vgg_weights: torchvision-format ImageNet VGG16 file (required unless ``random_vgg``).
        lpips_weights: ``"default"`` (the LPIPS v0.1 weights packaged in training/weights), a file with ``lin0.weight``
            .. ``lin4.weight``, or ``"none"`` (uniform weights: the un-learned LPIPS baseline).
        random_vgg: use a randomly initialised VGG16 (seeded): for smoke tests only; the loss is then not a
            perceptual loss, and a warning says so.
        style_measure: ``"L1"`` (official) or ``"L2"``.
    """

    shift: Tensor  # [1, 3, 1, 1] buffer
    scale: Tensor  # [1, 3, 1, 1] buffer

    def __init__(self, perceptual_weight: float = 1.0, style_weight: float = 0.0, vgg_weights: str | None = None,
                 lpips_weights: str = "default", random_vgg: bool = False, style_measure: str = "L1"):
        super().__init__()
        self.perceptual_weight, self.style_weight = float(perceptual_weight), float(style_weight)
        if style_measure not in ("L1", "L2"):
            raise ConfigError(f"style_measure must be 'L1' or 'L2', got {style_measure!r}")
        self.style_measure = style_measure
        if random_vgg:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.vgg = VGG16Features()
        else:
            self.vgg = load_vgg16(vgg_weights)
        self.random_vgg = random_vgg
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.lin = nn.ParameterList(nn.Parameter(w) for w in self._lin_weights(lpips_weights))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _lin_weights(spec: str) -> list[Tensor]:
        if spec == "none":
            return [torch.ones(1, c, 1, 1) for c in LPIPS_CHANNELS]
        if spec == "default":
            sd = _default_lpips_weights()
        else:
            path = Path(spec)
            if not path.is_file():
                raise ConfigError("LPIPS linear-layer weights file not found", path=path,
                                  fix="set perceptual_opt.lpips_weights to 'default', 'none' or an existing file")
            from vqfr.checkpoint import read_state_dict

            sd, _ = read_state_dict(path)
        try:
            return [sd[f"lin{i}.weight"].float().reshape(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)]
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"is not an LPIPS VGG weights file ({exc})", path=spec,
                                  fix="use keys lin0.weight .. lin4.weight shaped [1, C, 1, 1]") from exc

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always evaluation mode: a fixed metric

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised VGG16 features at the five LPIPS layers."""
        return [_unit_normalise(f) for f in self.vgg((x - self.shift) / self.scale, LPIPS_TAPS)]

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """pred, target [B, 3, H, W] in [-1, 1] -> (perceptual loss or None, style loss or None)."""
        fp = self.features(pred)
        with torch.no_grad():
            ft = self.features(target.detach())
        percep = style = None
        if self.perceptual_weight > 0:
            per_layer = [((a - b) ** 2 * w).sum(1).mean((1, 2)) for a, b, w in zip(fp, ft, self.lin, strict=True)]
            percep = self.perceptual_weight * torch.stack(per_layer).sum(0).mean()
        if self.style_weight > 0:
            dist_fn = F.l1_loss if self.style_measure == "L1" else F.mse_loss
            terms = [dist_fn(gram_matrix(a.float()), gram_matrix(b.float())) for a, b in zip(fp, ft, strict=True)]
            style = self.style_weight * torch.stack(terms).sum()
        return percep, style
