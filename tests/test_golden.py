"""Parity with the official code on the golden small models (../shared/reference/golden), fp32.

Tolerances: every float output within 1e-4 (the official code itself moves by 1.4e-5 across thread counts), code
indices exactly equal, and the deformable conv within 1e-5 of the recorded DCN outputs.

The models run on the CPU; ``VQFR_TEST_DEVICE=cuda`` runs them on a GPU instead, where the model dispatches to the
Triton kernels (TF32 off: fp32 means fp32), and checks that the Triton paths ran.
"""

import os

import pytest
import torch

import kernels
import vqfr
from kernels import dispatch
from tests.conftest import golden, needs_golden

pytestmark = [needs_golden, pytest.mark.shared]
ATOL = 1e-4
DEVICE = torch.device(os.environ.get("VQFR_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module", autouse=True)
def full_fp32():
    """No TF32 in cuDNN convolutions or matmuls while these tests run (torch allows it in cuDNN by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _load(version: str):
    info, ckpt, io = golden(version)
    return info, vqfr.load_model(ckpt, info["network_options"], device=DEVICE), {k: v.to(DEVICE) for k, v in io.items()}


@pytest.fixture(scope="module")
def v1():
    return _load("v1")


@pytest.fixture(scope="module")
def v2():
    return _load("v2")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="VQFR_TEST_DEVICE is not cuda")
def test_the_triton_kernels_ran_on_the_gpu(v1, v2):
    dispatch.LAUNCHES.clear()
    for version, (_, model, io) in (("v1", v1), ("v2", v2)):
        with torch.no_grad():
            model(io["input"]) if version == "v1" else model(io["input"], fidelity=1.0)
    assert dispatch.LAUNCHES["modulated_deform_conv2d:triton"] > 0, dispatch.LAUNCHES


def test_v1_outputs_and_codes(v1):
    info, model, io = v1
    with torch.no_grad():
        out = model(io["input"], return_all=True)
    torch.testing.assert_close(out["dec"], io["outputs/dec"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["main_dec"], io["outputs/main_dec"], atol=ATOL, rtol=0)
    feats = out["feat_dict"]["Level_32"]
    torch.testing.assert_close(feats["z_conv"], io["outputs/feat_dict/Level_32/z_conv"], atol=ATOL, rtol=0)
    torch.testing.assert_close(feats["z_quant_before_conv"], io["outputs/feat_dict/Level_32/z_quant_before_conv"],
                               atol=ATOL, rtol=0)
    assert out["code_indices"]["Level_32"][0].cpu().tolist() == info["info"]["code_indices"]
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), out["main_dec"], atol=0, rtol=0)


@pytest.mark.parametrize("fidelity", [0.0, 0.5, 1.0])
def test_v2_outputs_and_codes(v2, fidelity):
    info, model, io = v2
    with torch.no_grad():
        out = model(io["input"], fidelity=fidelity, return_all=True)
    for key in ("enc_feat", "quant_logit", "texture_dec", "main_dec"):
        torch.testing.assert_close(out[key], io[f"outputs/fidelity_{fidelity}/{key}"], atol=ATOL, rtol=0, msg=key)
    assert out["code_indices"].cpu().tolist() == info["info"]["code_indices"]


def test_v2_fidelity_zero_is_texture_branch(v2):
    _, model, io = v2
    with torch.no_grad():
        out = model(io["input"], fidelity=0.0, return_all=True)
    assert torch.equal(out["main_dec"], out["texture_dec"])
    assert torch.equal(io["outputs/fidelity_0.0/main_dec"], io["outputs/fidelity_0.0/texture_dec"])


@pytest.mark.parametrize("version,prefix", [("v1", "main_decoder"), ("v2", "main_branch")])
@pytest.mark.parametrize("level", ["Level_32", "Level_16", "Level_8", "Level_4"])
def test_reference_and_dispatched_dcn_match_recorded_outputs(version, prefix, level):
    """The reference DCN, and the public op on DEVICE (Triton on a GPU, the CPU path elsewhere), against the official
    DCN outputs recorded at this level."""
    _, ckpt, io = golden(version)
    sd = torch.load(ckpt, weights_only=True)["params"]
    rec = {name: io[f"intermediates/{level}/{name}"] for name in
           ("dcn_input_x", "dcn_input_feat", "conv_offset_output", "dcn_output")}
    dcn = f"{prefix}.align_func_dict.{level}.dcn"
    raw = torch.nn.functional.conv2d(rec["dcn_input_feat"], sd[f"{dcn}.conv_offset.weight"],
                                     sd[f"{dcn}.conv_offset.bias"], padding=1)
    torch.testing.assert_close(raw, rec["conv_offset_output"], atol=ATOL, rtol=0)
    n_off = 2 * 4 * 9
    out = rec["conv_offset_output"]
    args = (rec["dcn_input_x"], out[:, :n_off], torch.sigmoid(out[:, n_off:]), sd[f"{dcn}.weight"], sd[f"{dcn}.bias"])
    y = kernels.deform_conv2d_reference(*args, 1, 1, 1)
    torch.testing.assert_close(y, rec["dcn_output"], atol=1e-5, rtol=0)
    y = kernels.modulated_deform_conv2d(*(t.to(DEVICE) for t in args), 1, 1, 1)
    torch.testing.assert_close(y.cpu(), rec["dcn_output"], atol=1e-5, rtol=0)

