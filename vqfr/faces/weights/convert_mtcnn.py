"""Rebuild ``mtcnn.safetensors`` from the MTCNN weights in the facenet-pytorch wheel (see PROVENANCE.md).

    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp
    python -m vqfr.faces.weights.convert_mtcnn /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl

What the conversion does: the three state dicts (``data/pnet.pt``, ``rnet.pt``, ``onet.pt``) are read with
``torch.load(weights_only=True)`` and stored under the prefixes ``pnet.``, ``rnet.``, ``onet.``. The first dense layer
of R-Net and O-Net is reordered from the TensorFlow port's (W, H, C) flattening to PyTorch's (C, H, W) flattening, so
the networks in ``vqfr/faces/mtcnn.py`` flatten their feature maps without a permute. Nothing else changes.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import torch

#: (network, first dense layer, feature map (C, H, W) it flattens)
_DENSE = {"rnet": ("dense4", (64, 3, 3)), "onet": ("dense5", (128, 3, 3))}


def convert(wheel: str | Path) -> dict[str, torch.Tensor]:
    """The combined, reordered state dict from a facenet-pytorch wheel."""
    out: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(wheel) as zf:
        for net in ("pnet", "rnet", "onet"):
            sd = torch.load(io.BytesIO(zf.read(f"facenet_pytorch/data/{net}.pt")), weights_only=True,
                            map_location="cpu")
            if net in _DENSE:
                layer, (c, h, w) = _DENSE[net]
                weight = sd[f"{layer}.weight"]
                # TF port: input index = (x * H + y) * C + c  ->  ours: (c * H + y) * W + x
                sd[f"{layer}.weight"] = weight.reshape(-1, w, h, c).permute(0, 3, 2, 1).reshape(weight.shape[0], -1)
            out.update({f"{net}.{k}": v.contiguous() for k, v in sd.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="facenet_pytorch-2.6.0-py3-none-any.whl")
    parser.add_argument("-o", "--output", default=str(Path(__file__).with_name("mtcnn.safetensors")))
    args = parser.parse_args()
    from safetensors.torch import save_file

    save_file(convert(args.wheel), args.output, metadata={"source": Path(args.wheel).name, "format": "vqfr-mtcnn/1"})
    print(args.output)


if __name__ == "__main__":
    main()
