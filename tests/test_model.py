"""Self-contained model behaviour on tiny random configurations (no ../shared needed)."""

import copy

import pytest
import torch
import yaml

import vqfr
from tests.conftest import TINY_V1, TINY_V2, seeded_model
from vqfr.models.v2 import fidelity_weights


def _x(b=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_batch_independence(which, v1, v2):
    model = v1 if which == "v1" else v2
    x = _x()
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 3, 64, 64)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_inference_and_autograd_forwards_agree_exactly(which, v1, v2):
    """Without autograd the forward frees activations early and runs SiLU in place; the values must not change."""
    model = v1 if which == "v1" else v2
    x = _x(b=2)
    with torch.no_grad():
        inference = model(x)
    with torch.enable_grad():
        training_path = model(x.requires_grad_()).detach()
    assert torch.equal(inference, training_path)


def test_v2_per_image_fidelity_equals_separate_runs(v2):
    x, f = _x(), torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        batched = v2(x, fidelity=f)
        single = torch.cat([v2(x[i:i + 1], fidelity=float(f[i])) for i in range(3)])
        zero_d = v2(x, fidelity=torch.tensor(0.5))
        scalar = v2(x, fidelity=0.5)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    torch.testing.assert_close(zero_d, scalar, atol=0, rtol=0)
    assert not torch.allclose(batched[0], v2(x[:1], fidelity=1.0)[0], atol=1e-3)


def test_v2_fidelity_zero_shortcut_equals_full_computation(v2):
    x = _x()
    with torch.no_grad():
        out = v2(x, fidelity=0.0, return_all=True)
        texture, feats = v2.decoder(v2.select_codes(v2.encoder(x))[0])
        residual = v2.main_branch(feats, v2.inpfeat_extraction(x))
        full = v2.decoder.conv_out(feats["Level_1"] + 0.0 * residual)
        assert residual.abs().max() > 0.01  # the skipped branch is not trivially zero
        assert torch.equal(out["main_dec"], full)
        assert torch.equal(v2(x, fidelity=torch.zeros(3)), full)


def test_v2_fidelity_zero_keeps_the_training_graph():
    """In training the texture decoder runs without autograd, so the eval-mode f=0 shortcut would return an output
    with no graph; the official ``conv_out(texture + 0 * x)`` keeps one (zero gradients to the main branch)."""
    model = seeded_model(TINY_V2, seed=2).train()
    x = _x(b=2)
    out = model(x, fidelity=0.0, return_all=True)
    torch.testing.assert_close(out["main_dec"], out["texture_dec"], atol=0, rtol=0)
    out["main_dec"].mean().backward()
    grad = model.main_branch.decoder_dict["Level_1"].conv1.weight.grad
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


def test_v2_wrong_length_zero_fidelity_is_refused(v2):
    with torch.no_grad(), pytest.raises(ValueError, match="fidelity"):
        v2(_x(), fidelity=torch.zeros(2))  # all zeros skips the main branch: the shape must still be checked


def test_v1_batched_output_as_exact_as_single_images():
    """The official quantizer returns ``rearrange(...).contiguous()``. A channels-last view instead (what a permute
    gives for a batch > 1) reaches every decoder GroupNorm, whose CPU channels-last kernel loses precision on features
    with a large mean."""
    model = seeded_model(TINY_V1, seed=1)
    with torch.no_grad():
        model.quantizer.quantize_dict["Level_32"].post_quant_conv.bias += 100.0
        exact = copy.deepcopy(model).double()
        x = _x(b=2)
        out = model(x, return_all=True)
        reference = exact(x.double())
    torch.testing.assert_close(out["main_dec"].double(), reference, atol=2e-5, rtol=0)
    assert out["feat_dict"]["Level_32"]["z_quant_before_conv"].is_contiguous()


def test_fidelity_shape_is_checked(v2):
    with pytest.raises(ValueError, match="fidelity"):
        fidelity_weights(torch.ones(2), 3, _x())


def test_v2_quantized_vectors_are_codebook_rows(v2):
    x = _x(b=2)
    with torch.no_grad():
        out = v2(x, return_all=True)
        feat, _, idx = v2.select_codes(out["enc_feat"])
    rows = v2.quantizer.embedding.weight[idx]  # [B, hw, C]
    assert torch.equal(feat.permute(0, 2, 3, 1).reshape(rows.shape), rows)
    assert torch.equal(idx, out["quant_logit"].argmax(-1))


def test_v1_quantized_vectors_are_codebook_rows(v1):
    x = _x(b=2)
    with torch.no_grad():
        out = v1(x, return_all=True)
    zq = out["feat_dict"]["Level_32"]["z_quant_before_conv"]
    idx = out["code_indices"]["Level_32"]
    rows = v1.quantizer.quantize_dict["Level_32"].embedding.weight[idx]
    torch.testing.assert_close(zq.permute(0, 2, 3, 1).reshape(rows.shape), rows, atol=1e-6, rtol=0)
    z = out["feat_dict"]["Level_32"]["z_conv"].permute(0, 2, 3, 1).reshape(-1, rows.shape[-1])
    dist = torch.cdist(z.double(), v1.quantizer.quantize_dict["Level_32"].embedding.weight.double())
    assert torch.equal(idx.reshape(-1), dist.argmin(1))


def test_v1_fix_keys_freeze_codebook():
    model = vqfr.build_model(dict(TINY_V1))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["quantizer.quantize_dict.Level_32.embedding.weight"]


@pytest.mark.parametrize("options", [TINY_V1, TINY_V2])
def test_vqgan_reconstructs_input_shape(options):
    vq = dict(options)
    vq = {k: v for k, v in vq.items() if k not in ("inpfeat_extraction_opt", "align_opt", "align_from_patch",
                                                    "inpfeat_dim", "code_selection_mode", "fix_keys")}
    vq["type"] = "VQGANv1" if options["type"] == "VQFRv1" else "VQGANv2"
    model = seeded_model(vq)
    x = _x(b=2)
    with torch.no_grad():
        out = model(x, return_all=True)
    assert out["dec"].shape == x.shape and out["dec"].isfinite().all()


def test_training_mode_gives_codebook_loss_and_gradients():
    model = seeded_model(TINY_V1).train()
    out = model(_x(b=2), return_all=True)
    assert out["quant_loss"] > 0
    (out["main_dec"].mean() + out["quant_loss"]).backward()
    enc = model.encoder.conv_in.weight.grad
    assert enc is not None and enc.abs().sum() > 0  # straight-through estimator passes gradients to the encoder
    assert model.quantizer.quantize_dict["Level_32"].embedding.weight.grad is None  # frozen by fix_keys


def test_build_model_from_official_style_yml(tmp_path):
    path = tmp_path / "opt.yml"
    path.write_text(yaml.safe_dump({"name": "x", "network_g": {"type": "VQGANv2"}, "network_sr": TINY_V2}))
    model = vqfr.build_model(path)
    assert isinstance(model, vqfr.models.VQFRv2) and model.options == TINY_V2


def test_a_yml_path_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """``--config=~/opt.yml`` reaches the tools unexpanded (the shell expands ~ only at the start of a word); it was
    "neither a version alias nor an existing yml file"."""
    (tmp_path / "opt.yml").write_text(yaml.safe_dump({"network_sr": TINY_V2}))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert vqfr.build_model("~/opt.yml").options == TINY_V2


@pytest.mark.parametrize("bad,match", [({"type": "VQFRv3"}, "type"), ("v7", "v7"),
                                       ({**TINY_V2, "bogus": 1}, "bogus"),
                                       ({**TINY_V2, "align_opt": {"cond_channels": 32}}, "deformable_groups"),
                                       ({**TINY_V2, "quantizer_opt": {"num_code": 32, "code_dim": 16}}, "quantizer"),
                                       ({**TINY_V2, "base_channels": 48}, "divisible by 32")])
def test_bad_options_raise_config_error(bad, match):
    with pytest.raises(vqfr.ConfigError, match=match):
        vqfr.build_model(bad)


def test_bad_options_in_a_yml_name_the_file(tmp_path):
    path = tmp_path / "opt.yml"
    path.write_text(yaml.safe_dump({"network_sr": {**TINY_V2, "align_opt": {"cond_channels": 32}}}))
    with pytest.raises(vqfr.ConfigError, match="opt.yml: invalid options for VQFRv2: missing option 'deformable_gr"):
        vqfr.build_model(path)


def test_no_host_sync_or_python_branch_in_forward(v2):
    # torch.export fails on .item(), data-dependent branches and in-place writes to inputs.
    x = _x(b=2)
    f = torch.tensor([0.3, 0.7])
    x_before, f_before = x.clone(), f.clone()
    ep = torch.export.export(v2, (x,), {"fidelity": f})
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, fidelity=f), v2(x, fidelity=f), atol=1e-5, rtol=0)
    assert torch.equal(x, x_before) and torch.equal(f, f_before)


def test_import_does_not_pull_heavy_dependencies():
    import subprocess
    import sys

    code = ("import sys, vqfr; heavy = {'onnx', 'onnxruntime', 'tensorrt', 'triton', 'cv2'} & set(sys.modules); "
            "print(sorted(heavy)); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
