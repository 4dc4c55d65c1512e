"""VGG16 feature extractor (the convolutional part of torchvision's ``vgg16``), written here without torchvision.

Layer indices match torchvision's ``vgg16().features``, so a torchvision-format ImageNet checkpoint
(``vgg16-397923af.pth``, keys ``features.N.weight`` / ``features.N.bias``) loads directly. Nothing is downloaded:
the user supplies the file.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from vqfr.checkpoint import read_state_dict
from vqfr.errors import CheckpointError, ConfigError

__all__ = ["VGG16Features", "LPIPS_TAPS", "load_vgg16", "VGG16_URL"]

#: Where torchvision publishes the ImageNet weights (for the error message only; nothing is fetched).
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# Channels per conv, "M" for a 2x2 max-pool; each conv is followed by a ReLU (torchvision's configuration "D").
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

#: Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, the layers LPIPS reads.
LPIPS_TAPS = (3, 8, 15, 22, 29)


class VGG16Features(nn.Module):
    """``features.0`` .. ``features.29`` of VGG16 (up to relu5_3; the last max-pool is not needed).

    ``forward(x, taps)`` takes a normalised image [B, 3, H, W] and returns the outputs of the layers at ``taps``.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor, taps: tuple[int, ...] = LPIPS_TAPS) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
                if len(out) == len(taps):
                    break
        return out


def load_vgg16(path: str | Path | None) -> VGG16Features:
    """VGG16 features with ImageNet weights from a torchvision-format file (``.pth`` or ``.safetensors``).

    Raises:
        ConfigError: no path given, or the file does not exist (the message says where to get it).
        CheckpointError: the file cannot be read, lacks the ``features.N`` keys or has other shapes.
    """
    fix = (f"download torchvision's ImageNet VGG16 weights ({VGG16_URL}) and set perceptual_opt.vgg_weights to the "
           "file, or set perceptual_weight and style_weight to 0 to train without the perceptual loss")
    if path is None:
        raise ConfigError("the perceptual loss needs ImageNet VGG16 weights but perceptual_opt.vgg_weights is not set",
                          fix=fix)
    path = Path(path)
    if not path.is_file():
        raise ConfigError("VGG16 weights file not found", path=path, fix=fix)
    try:  # as VQFR checkpoints are read: pickles that run code refused, ``module.`` prefixes stripped
        sd, _ = read_state_dict(path, param_key="state_dict")
    except CheckpointError as exc:
        raise CheckpointError(exc.reason, path=path, fix=f"{exc.fix}; {fix}") from exc
    model = VGG16Features()
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"lacks {len(missing)} VGG16 keys (e.g. {missing[:3]}); it is not a torchvision vgg16 "
                              "checkpoint", path=path, fix=fix)
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"has other shapes than VGG16 for {bad[:3]}", path=path, fix=fix)
    model.load_state_dict({k: sd[k].float() for k in own})
    return model
