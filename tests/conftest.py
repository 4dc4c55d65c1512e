"""Shared fixtures: the ../shared folder (skipped cleanly when absent) and tiny model configurations."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VQFR_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
FACES = SHARED / "faces"

# Tiny configurations of the official architectures: every code path, seconds on a CPU, 64x64 inputs.
TINY_V1 = {
    "type": "VQFRv1", "base_channels": 32, "proj_patch_size": 32, "resolution_scale_rates": [1, 2, 2, 2, 2, 2],
    "channel_multipliers": [1, 1, 1, 1, 1, 2], "encoder_num_blocks": 1, "decoder_num_blocks": 1,
    "quant_level": ["Level_32"], "fix_keys": ["embedding"], "inpfeat_extraction_opt": {"in_dim": 3, "out_dim": 32},
    "align_from_patch": 32,
    "align_opt": {f"Level_{r}": {"cond_channels": 32, "cond_downscale_rate": r, "deformable_groups": 4}
                  for r in (32, 16, 8, 4, 2, 1)},
    "quantizer_opt": {"Level_32": {"type": "L2VectorQuantizerKmeans", "in_dim": 64, "num_code": 32, "code_dim": 16,
                                   "reservoir_size": 256, "reestimate_iters": 2000, "reestimate_maxiters": -1,
                                   "warmup_iters": -1}},
}
TINY_V2 = {
    "type": "VQFRv2", "base_channels": 32, "channel_multipliers": [1, 1, 1, 1, 1, 2], "num_enc_blocks": 1,
    "use_enc_attention": True, "num_dec_blocks": 1, "use_dec_attention": True, "code_dim": 16, "inpfeat_dim": 32,
    "align_opt": {"cond_channels": 32, "deformable_groups": 4}, "code_selection_mode": "Predict",
    "quantizer_opt": {"type": "L2VectorQuantizer", "num_code": 32, "code_dim": 16, "spatial_size": [2, 2]},
}


def golden_available() -> bool:
    return (GOLDEN / "vqfr_v1_small.pth").is_file()


needs_golden = pytest.mark.skipif(not golden_available(),
                                  reason=f"golden data not found at {GOLDEN} (../shared absent)")
needs_faces = pytest.mark.skipif(not (FACES / "aligned").is_dir(), reason=f"sample faces not found at {FACES}")


@pytest.fixture
def tiny_v1_options() -> dict:
    return copy.deepcopy(TINY_V1)


@pytest.fixture
def tiny_v2_options() -> dict:
    return copy.deepcopy(TINY_V2)


def seeded_model(options: dict, seed: int = 0) -> torch.nn.Module:
    """A tiny model with non-trivial random weights (norm affines and biases perturbed), in eval mode."""
    import vqfr

    torch.manual_seed(seed)
    model = vqfr.build_model(copy.deepcopy(options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif p.dim() == 1:
                p.normal_(1, 0.1)
            elif "embedding" in name:
                p.normal_(0, 1)
            else:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5)
    return model.eval()


def golden(version: str) -> tuple[dict, Path, dict]:
    """(json description, checkpoint path, io tensors) of a golden small model."""
    from safetensors.torch import load_file

    info = json.loads((GOLDEN / f"vqfr_{version}_small.json").read_text())
    return info, GOLDEN / f"vqfr_{version}_small.pth", load_file(str(GOLDEN / f"vqfr_{version}_small.io.safetensors"))


@pytest.fixture(autouse=True)
def _two_threads():
    # The golden data was generated with 2 threads; CI machines have 2 cores.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def read_only_folder(monkeypatch):
    """``read_only_folder(path)``: from now on a temporary file cannot be created in ``path`` (PermissionError), as
    in a read-only folder; the write probes of the CLI and the exporters try one. Running as root ignores
    permissions, so the refusal is simulated there."""
    import tempfile

    real = tempfile.TemporaryFile
    folders: set[Path] = set()

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) in folders:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    return lambda path: folders.add(Path(path))


@pytest.fixture
def triton_path(monkeypatch):
    """Run the Triton kernels: natively on a GPU, else under the interpreter; never fall back silently."""
    from kernels import dispatch

    if not torch.cuda.is_available():
        if dispatch.interpreter_problem():
            pytest.skip(dispatch.interpreter_problem())
        # triton.language's own @jit helpers (the combine functions our tl.reduce calls use) are frozen as compiled
        # or interpreted when triton is first imported: import it before the interpreter is on, so that later
        # compiled kernels in this process (kernels.aot_check's test) still find compiled helpers.
        import triton.language  # noqa: F401
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VQFR_KERNELS", "triton")
    dispatch.LAUNCHES.clear()


@pytest.fixture(scope="module")
def v1():
    """The tiny v1 model, seeded (one per test module)."""
    return seeded_model(TINY_V1, seed=1)


@pytest.fixture(scope="module")
def v2():
    """The tiny v2 model, seeded (one per test module)."""
    return seeded_model(TINY_V2, seed=2)


def export_onnx_program(module: torch.nn.Module, args: tuple, path: Path) -> Path:
    """``module`` exported to ONNX at ``path`` with our custom-op translations (opset 19, dynamo)."""
    from export.onnx import translation_table

    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=19, verbose=False,
                                    custom_translation_table=translation_table())
    program.save(str(path))
    return path


def deform_inputs(c: int, h: int, w: int, groups: int, k: int, stride=1, padding=1, dilation=1, *, spread: float,
                  c_out: int, b: int, seed: int = 0) -> list[torch.Tensor]:
    """Random CPU float32 inputs of a modulated deformable conv: [x, offset, mask, weight, bias]. ``stride``,
    ``padding`` and ``dilation`` are ints or (h, w) pairs; ``spread`` is the largest offset in pixels (uniform in
    [-spread, spread])."""
    gen = torch.Generator().manual_seed(seed)
    (sh, sw), (ph, pw), (dh, dw) = ((v, v) if isinstance(v, int) else v for v in (stride, padding, dilation))
    ho = (h + 2 * ph - dh * (k - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (k - 1) - 1) // sw + 1
    x = torch.randn(b, c, h, w, generator=gen)
    offset = (torch.rand(b, 2 * groups * k * k, ho, wo, generator=gen) * 2 - 1) * spread
    mask = torch.rand(b, groups * k * k, ho, wo, generator=gen)
    weight = torch.randn(c_out, c, k, k, generator=gen) / (c * k * k) ** 0.5
    bias = torch.randn(c_out, generator=gen)
    return [x, offset, mask, weight, bias]
