"""Model behaviours the suite left to the golden data, or did not check at all (found by mutation testing).

The golden tests skip in a clone without ../shared. Here each official block is compared, on the CPU in float64,
with an independent formulation of OFFICIAL_VQFR.md: slices for the bilinear /s resize, explicit 0.75/0.25 weights
for the bilinear x2, einsum attention, and a grid_sample deformable conv (§2's check). The other tests check behaviours
a user relies on: the straight-through estimator, the texture decoder frozen in training, the f=0 shortcut, the
official initialisation, the version aliases and the option checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kernels
import vqfr
from tests.conftest import TINY_V1, TINY_V2, seeded_model
from vqfr.models.blocks import AttnBlock, Downsample, UpDownSample, Upsample
from vqfr.models.quantizer import L2VectorQuantizer, L2VectorQuantizerKmeans
from vqfr.models.warping import TextureWarpingModule, upsample_offset_feature

EXACT = dict(atol=1e-10, rtol=0)  # float64: only rounding differs between the two formulations


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The module in float64 with random weights, norm affines and biases (none left at their 0/1 init)."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module


def _bilinear_x2_last(y: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 along the last dim, align_corners=False: output 2i reads 0.75 y[i] + 0.25 y[i-1], output 2i+1
    reads 0.75 y[i] + 0.25 y[i+1], the edge sample repeated outside."""
    prev = torch.cat([y[..., :1], y[..., :-1]], -1)
    nxt = torch.cat([y[..., 1:], y[..., -1:]], -1)
    return torch.stack([0.75 * y + 0.25 * prev, 0.75 * y + 0.25 * nxt], -1).flatten(-2)


def _bilinear_x2(y: torch.Tensor) -> torch.Tensor:
    return _bilinear_x2_last(_bilinear_x2_last(y).transpose(-1, -2)).transpose(-1, -2)


def _bilinear_down(x: torch.Tensor, s: int) -> torch.Tensor:
    """Bilinear /s (s even, align_corners=False, no antialias): the mean of the 2x2 pixels around s*i + s/2 - 0.5."""
    a = s // 2 - 1
    rows = (x[..., a::s, :] + x[..., a + 1::s, :]) / 2
    return (rows[..., a::s] + rows[..., a + 1::s]) / 2


# --- shared blocks (OFFICIAL_VQFR.md §1, §11) ----------------------------------------------------------------------


@pytest.mark.parametrize("options", [TINY_V1, TINY_V2])
def test_every_groupnorm_has_32_groups_and_eps_1e_6_and_the_layernorm_keeps_eps_1e_5(options):
    """GN(32, eps 1e-6) everywhere; feat2index's LayerNorm keeps torch's default eps 1e-5 (§4, §11). Without
    ../shared nothing else sees a changed eps or group count: the tiny-model tests compare the model with itself."""
    model = vqfr.build_model(copy.deepcopy(options))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 and m.affine for m in norms)
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert [m.eps for m in layer_norms] == ([1e-5] if options["type"] == "VQFRv2" else [])


def test_attention_is_the_scaled_softmax_over_tokens_plus_the_input():
    block = _perturbed(AttnBlock(64))
    x = _rand(2, 64, 3, 5)
    c = x.shape[1]
    t = F.group_norm(x, 32, block.norm.weight, block.norm.bias, eps=1e-6)
    q, k, v = (torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t).flatten(2)
               + conv.bias[None, :, None] for conv in (block.q, block.k, block.v))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * int(c) ** -0.5, dim=-1)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
    expected = x + F.conv2d(attended, block.proj_out.weight, block.proj_out.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **EXACT)


@pytest.mark.parametrize("scale", [2, 4, 32])
def test_v1_downsampling_is_a_plain_bilinear_resize_then_the_conv(scale):
    """A bilinear /32 reads just the 2x2 pixels around 32i+15.5: no antialias, not a box average (§1)."""
    block = _perturbed(UpDownSample(32, 64, scale, "down"))
    x = _rand(1, 32, 2 * scale, 3 * scale)
    expected = F.conv2d(_bilinear_down(x, scale), block.conv.weight, block.conv.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **EXACT)


def test_v1_upsampling_is_the_conv_at_low_resolution_then_bilinear_x2():
    block = _perturbed(UpDownSample(64, 32, 2, "up"))
    x = _rand(1, 64, 3, 4)
    expected = _bilinear_x2(F.conv2d(x, block.conv.weight, block.conv.bias, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **EXACT)
    assert not hasattr(UpDownSample(64, 64, 1, "up"), "conv")  # scale 1: identity, no keys


def test_v2_downsample_pads_right_and_bottom_only():
    """Zero-pad (0, 1, 0, 1), then a 3x3 stride-2 conv: output (i, j) is the window centred on (2i+1, 2j+1)."""
    block = _perturbed(Downsample(32))
    x = _rand(1, 32, 6, 8)
    centred = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), centred[..., 1::2, 1::2], **EXACT)


def test_v2_upsample_is_nearest_x2_then_the_conv():
    block = _perturbed(Upsample(32))
    x = _rand(1, 32, 3, 4)
    repeated = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.conv2d(repeated, block.conv.weight, block.conv.bias, padding=1),
                                   **EXACT)


# --- texture warping module (§1-2) ---------------------------------------------------------------------------------


def test_the_previous_offset_feature_is_bilinear_x2_times_two():
    """Official quirk kept: the feature handed to the next level is doubled as if it were a displacement."""
    feat = _rand(1, 32, 3, 5)
    torch.testing.assert_close(upsample_offset_feature(feat), 2 * _bilinear_x2(feat), **EXACT)


def _deform_conv(x, offset, mask, weight, bias):
    """3x3 modulated deformable conv, padding 1, as §2 verifies it: per group and tap, grid_sample (bilinear, zeros,
    align_corners=True on pixel coordinates) at (y - 1 + ky + dy, x - 1 + kx + dx), dy and dx interleaved per tap,
    times the mask, then the weights."""
    b, c, h, w = x.shape
    groups = mask.shape[1] // 9
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    taps = []
    for k in range(9):
        ky, kx = divmod(k, 3)
        parts = []
        for g in range(groups):
            py = ys - 1 + ky + offset[:, 18 * g + 2 * k]
            px = xs - 1 + kx + offset[:, 18 * g + 2 * k + 1]
            grid = torch.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], -1)
            sampled = F.grid_sample(x[:, g * c // groups:(g + 1) * c // groups], grid, mode="bilinear",
                                    padding_mode="zeros", align_corners=True)
            parts.append(sampled * mask[:, 9 * g + k, None])
        taps.append(torch.cat(parts, 1))
    cols = torch.stack(taps, 2)  # [B, C, 9, H, W]
    return torch.einsum("ock,bckhw->bohw", weight.flatten(2), cols) + bias[None, :, None, None]


def _twm(cond_conv: bool = False, rate: int = 2) -> TextureWarpingModule:
    return _perturbed(TextureWarpingModule(64, 32, rate, 4, previous_offset_channel=64, cond_conv=cond_conv), seed=3)


def test_the_warp_is_the_deformable_conv_of_the_texture_feature():
    """``dcn(x_main, feat)``: the texture feature is what is sampled; the offset feature gives the first 72
    channels of conv_offset as offsets (dy, dx interleaved) and the sigmoid of the last 36 as the mask (§2)."""
    twm = _twm()
    x, cond, previous = _rand(1, 64, 6, 6, seed=1), _rand(1, 32, 12, 12, seed=2), _rand(1, 64, 3, 3, seed=4)
    with torch.no_grad():
        warped, feat = twm(x, cond, previous)
        out = twm.dcn.conv_offset(feat)
        expected = _deform_conv(x, out[:, :72], torch.sigmoid(out[:, 72:]), twm.dcn.weight, twm.dcn.bias)
    assert out[:, :72].abs().max() > 0.5  # offsets of a pixel or so: the sampling positions really move
    torch.testing.assert_close(warped, expected, **EXACT)


def test_the_condition_comes_first_in_the_offset_features_input():
    """``offset_conv1`` takes ``cat([cond, x_main])``: with the weights that read the condition's 32 channels set
    to zero, the condition no longer changes anything."""
    twm = _twm()
    x, previous = _rand(1, 64, 6, 6, seed=1), _rand(1, 64, 3, 3, seed=4)
    cond_a, cond_b = _rand(1, 32, 12, 12, seed=2), _rand(1, 32, 12, 12, seed=5)
    with torch.no_grad():
        assert not torch.allclose(twm(x, cond_a, previous)[0], twm(x, cond_b, previous)[0])
        twm.offset_conv1[0].weight[:, :32] = 0
        for a, b in zip(twm(x, cond_a, previous), twm(x, cond_b, previous), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_v2_resizes_the_condition_bilinearly_without_a_conv():
    """v2: a plain bilinear (h // rate) resize, so /4 is the mean of the 2x2 pixels around 4i+1.5; v1 adds a conv."""
    cond = _rand(1, 32, 16, 12)
    torch.testing.assert_close(_twm(rate=4).resize_cond(cond), _bilinear_down(cond, 4), **EXACT)
    v1 = _twm(cond_conv=True, rate=4)
    expected = F.conv2d(_bilinear_down(cond, 4), v1.downsample.conv.weight, v1.downsample.conv.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(v1.resize_cond(cond), expected, **EXACT)


# --- top-level models (§3-5) ---------------------------------------------------------------------------------------


def _x(b=2, size=64, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_v2_main_dec_is_the_shared_conv_out_of_texture_plus_fidelity_times_residual(v2):
    """main_dec = decoder.conv_out(dec_feat[Level_1] + f * main_branch(...)): the texture decoder's conv_out reused
    (GN, SiLU, 3x3), the residual scaled by f alone (§4)."""
    x = _x()
    with torch.no_grad():
        _, feats = v2.decoder(v2.select_codes(v2.encoder(x))[0])
        residual = v2.main_branch(feats, v2.inpfeat_extraction(x))
        gn, conv = v2.decoder.conv_out[0], v2.decoder.conv_out[2]
        for f in (0.5, 1.0):
            h = F.silu(F.group_norm(feats["Level_1"] + f * residual, 32, gn.weight, gn.bias, eps=1e-6))
            expected = F.conv2d(h, conv.weight, conv.bias, padding=1)
            torch.testing.assert_close(v2(x, fidelity=f), expected, atol=1e-5, rtol=0)


def test_v1_last_conv_reads_the_degraded_input_as_its_last_three_channels(v1):
    """``conv_out`` is one 3x3 conv on ``cat([GN-SiLU(x), x_lq])``: the output moves with x_lq by that conv's last
    three input channels alone (§3)."""
    x, x2 = _x(seed=0), _x(seed=1)
    with torch.no_grad():
        cond = v1.inpfeat_extraction.conv(x)
        _, feats = v1.decoder(v1.quantizer(v1.encoder(x))["Level_32"].z_q)
        change = v1.main_decoder(feats, cond, x2) - v1.main_decoder(feats, cond, x)
        expected = F.conv2d(x2 - x, v1.main_decoder.conv_out[0].weight[:, -3:], padding=1)
    torch.testing.assert_close(change, expected, atol=1e-5, rtol=0)


def test_v2_code_lookup_is_row_major_on_a_grid_that_is_not_square():
    q = L2VectorQuantizer(8, 4)
    idx = torch.tensor([[5, 1, 7, 0, 2, 6]])
    feat = q.get_feature(idx, 2, 3)
    assert feat.shape == (1, 4, 2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(feat[0, :, i, j], q.embedding.weight[idx[0, 3 * i + j]])


@pytest.mark.parametrize("kind", ["kmeans", "plain"])
def test_training_quantization_passes_the_gradient_straight_through(kind):
    """z_q = z + sg(e - z): d z_q / d z is the identity and the codebook gets no gradient through z_q (only through
    the loss). The encoder test in test_model.py also passes without it, through the commitment loss."""
    q = (L2VectorQuantizerKmeans(8, 4, 4) if kind == "kmeans" else L2VectorQuantizer(8, 4)).double().train()
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = _rand(2, 4, 2, 3).requires_grad_()
    out = q(z)
    upstream = _rand(*out.z_quant_before_conv.shape, seed=1)
    (out.z_quant_before_conv * upstream).sum().backward()
    if kind == "kmeans":  # through quant_conv: the gradient of z_conv * upstream itself
        expected = torch.autograd.grad((q.quant_conv(z) * upstream).sum(), z)[0]
        torch.testing.assert_close(z.grad, expected, **EXACT)
    else:
        assert torch.equal(z.grad, upstream)
    assert q.embedding.weight.grad is None


def test_eval_quantization_keeps_the_official_z_plus_e_minus_z_form():
    """In fp32, z + (e - z) differs from e by an ulp here and there; the official code returns the former, and
    the golden z_quant_before_conv records it (§5). The golden tolerance of 1e-4 cannot see the difference."""
    q = L2VectorQuantizer(16, 8).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
        z = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(0)) * 3
        out = q(z)
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 8)
    e = q.embedding.weight[out.indices.reshape(-1)]
    expected = (tokens + (e - tokens)).reshape(2, 3, 4, 8).permute(0, 3, 1, 2)
    assert not torch.equal(expected, e.reshape(2, 3, 4, 8).permute(0, 3, 1, 2))  # the forms differ on this data
    assert torch.equal(out.z_q, expected)


def test_v2_texture_decoder_gets_no_gradient_in_training():
    """The official code runs the texture decoder under no_grad (it is frozen in stage 2): no graph is kept for it
    and none of its weights gets a gradient, except the conv_out the main branch reuses."""
    model = seeded_model(TINY_V2, seed=2).train()
    out = model(_x(), fidelity=1.0, return_all=True)
    assert not out["texture_dec"].requires_grad
    out["main_dec"].mean().backward()
    grads = {n: p.grad for n, p in model.decoder.named_parameters()}
    assert all(g is None for n, g in grads.items() if not n.startswith("conv_out")), \
        [n for n, g in grads.items() if g is not None and not n.startswith("conv_out")]
    assert model.main_branch.decoder_dict["Level_1"].conv1.weight.grad is not None


def test_v2_fidelity_zero_skips_the_main_branch_in_eval(v2):
    """At f=0 the warping branch is thrown away (§4), so eval skips it: the deployment's speed-up at the demo
    default. A [B] tensor of zeros skips it too; any non-zero value runs it."""
    calls = []
    handle = v2.main_branch.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            for f in (0.0, 0, torch.zeros(2), torch.tensor(0.0)):
                v2(_x(), fidelity=f)
            assert calls == []
            v2(_x(), fidelity=torch.tensor([0.0, 0.5]))
            v2(_x(), fidelity=0.1)
    finally:
        handle.remove()
    assert calls == [1, 1]


@pytest.mark.parametrize("options", [TINY_V1, TINY_V2])
def test_fresh_models_have_the_official_initialisation(options):
    """trunc-normal(std 0.02) conv and linear weights with zero biases, unit norms (the official _init_weights);
    it matters when training from scratch."""
    model = vqfr.build_model(copy.deepcopy(options))
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = torch.cat([m.weight.detach().flatten() for m in layers])
    assert 0.018 < weights.std().item() < 0.022
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in layers if m.bias is not None)
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_v2_with_cond_channels_other_than_inpfeat_dim_is_refused_when_built():
    """Nothing checks this in the official code, which then fails inside the first forward (§4)."""
    bad = {**copy.deepcopy(TINY_V2), "align_opt": {"cond_channels": 64, "deformable_groups": 4}}
    with pytest.raises(vqfr.ConfigError, match="cond_channels"):
        vqfr.build_model(bad)


@pytest.mark.parametrize(("alias", "arch"), [
    ("v1", "VQFRv1"), ("1", "VQFRv1"), ("1.0", "VQFRv1"), ("VQFRv1", "VQFRv1"),
    ("v2", "VQFRv2"), ("2", "VQFRv2"), ("2.0", "VQFRv2"), ("VQFRv2", "VQFRv2"),
    ("vqgan_v1", "VQGANv1"), ("VQGANv1", "VQGANv1"), ("vqgan_v2", "VQGANv2"), ("VQGANv2", "VQGANv2"),
])
def test_each_version_alias_names_its_official_architecture(alias, arch):
    """The official demo's ``-v 1.0`` / ``-v 2.0`` must select v1 / v2 (§7)."""
    options = vqfr.models.official_options(alias)
    assert options["type"] == arch
    released = {"VQFRv1": (128, [1, 1, 2, 2, 2, 4]), "VQFRv2": (64, [1, 2, 2, 4, 4, 8])}
    if arch in released:
        assert (options["base_channels"], options["channel_multipliers"]) == released[arch]


def test_vqgan_v2_fix_keys_freeze_the_codebook():
    """fix_keys match a part of the parameter name, as in v1: ``[embedding]`` freezes ``quantizer.embedding``."""
    options = {k: v for k, v in copy.deepcopy(TINY_V2).items()
               if k not in ("inpfeat_dim", "align_opt", "code_selection_mode")}
    model = vqfr.build_model({**options, "type": "VQGANv2", "fix_keys": ["embedding"]})
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["quantizer.embedding.weight"]


# --- training config refusals and the training CLI -----------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    # YAML's true is not a count: float(True) is 1.0, so it trained for one iteration
    ({"train": {"total_iter": True}}, "train.total_iter is True"),
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2"}}, "val": {"save_img": -1}}, "val.save_img is -1"),
    ({"train": {"scheduler": {"type": "MultiStepLR", "milestones": [-5]}}}, "train.scheduler.milestones is [-5]"),
    ({"train": {"fidelity_ratio": "high"}}, "train.fidelity_ratio is 'high'"),
    ({"train": {"perceptual_opt": {"random_vgg": "false"}}}, "train.perceptual_opt.random_vgg is 'false'"),
    # trained at 16x16 while load_model, the runtime and export run the network at spatial_size x patch = 32
    ({"network_sr": {"quantizer_opt": {"spatial_size": [8, 8]}},
      "network_g": {"quantizer_opt": {"spatial_size": [8, 8]}}},
     "network_sr (VQFRv2, Predict mode) restores 32x32 faces"),
    # a v1 discriminator block in a v2 config would be ignored
    ({"network_d_global": {"type": "StyleGAN2Discriminator", "out_size": 16, "narrow": 1 / 16}},
     "network_d_global is not a network block of VQFRv2Model"),
])
def test_more_values_that_cannot_train_are_refused_when_the_config_is_read(tmp_path, change, message):
    from tests.test_training_loop import tiny_vqfr_v2, write_config
    from training.config import load_config, merge

    with pytest.raises(vqfr.ConfigError, match="values.yml") as err:
        load_config(write_config(merge(tiny_vqfr_v2(), change), tmp_path / "values.yml"))
    assert message in str(err.value) and err.value.fix


def test_save_img_zero_saves_no_image_and_is_accepted(tmp_path):
    from tests.test_training_loop import tiny_vqfr_v2, write_config
    from training.config import load_config, merge

    cfg = merge(tiny_vqfr_v2(), {"datasets": {"val": {"dataroot_gt": "synthetic:2"}}, "val": {"save_img": 0}})
    assert load_config(write_config(cfg, tmp_path / "zero.yml"))["val"]["save_img"] == 0


def test_the_perceptual_size_rule_holds_for_the_style_loss_alone(tmp_path):
    """VGG16 runs for the style (Gram) loss too: perceptual_weight 0 does not make 8x8 images possible."""
    from tests.test_training_loop import tiny_vqgan_v2, write_config
    from training.config import load_config, merge

    cfg = merge(tiny_vqgan_v2(), {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8},
                                  "train": {"perceptual_opt": {"perceptual_weight": 0, "style_weight": 1.0}}})
    with pytest.raises(vqfr.ConfigError, match="VGG16 needs images of at least 16x16"):
        load_config(write_config(cfg, tmp_path / "style.yml"))


def test_resume_goes_on_in_the_folder_of_the_run_it_names(tmp_path):
    """``--resume <run>/training_states/<iter>.state`` (a file) or ``--resume <run>`` continue in ``<run>``."""
    from training.train import resumed_run_folder

    run = tmp_path / "run"
    (run / "training_states").mkdir(parents=True)
    state = run / "training_states" / "100.state"
    state.write_bytes(b"")
    assert resumed_run_folder(state) == run
    assert resumed_run_folder(run) == run
    assert resumed_run_folder(tmp_path / "100.state") is None


# --- autotune configs and the compile check (kernels/) -------------------------------------------------------------

needs_triton = pytest.mark.skipif(not kernels.dispatch.triton_installed(), reason="triton not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_code_search_tunes_fp32_on_its_own_small_tiles_only(dtype, monkeypatch):
    """fp32 runs on CUDA cores, where the fp16 tiles spill or overflow shared memory; fp16 never gets fp32 tiles."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nearest = kernels.dispatch.triton_module("nearest_code_triton")
    launch = dict(aot_check.vqfr_launches(dtype))["nearest_code"]
    tuner = launch.kernel
    kept = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, launch.args, strict=False)),
                                    **launch.constexprs)
    expected = nearest.FP32_CONFIGS if dtype == torch.float32 else nearest.HALF_CONFIGS
    assert kept and all(c in expected for c in kept)


@needs_triton
def test_aot_check_fails_a_config_whose_shared_memory_does_not_fit(monkeypatch):
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(aot_check.SM_LIMITS, 90, (1024, 65536))  # 1 KiB of shared memory per SM
    results = aot_check.check(90, [torch.float16], only="nearest_code", max_configs=1)
    assert results and all(r["shared_bytes"] > 1024 and r["ok"] is False for r in results)


def test_aot_check_exits_1_when_any_config_fails(monkeypatch, capsys):
    from kernels import aot_check

    row = dict(kernel="k", dtype="fp16", config="{}", num_warps=4, num_stages=2, registers=32, spill_bytes=0,
               shared_bytes=0, blocks_per_sm=8)
    monkeypatch.setattr(aot_check, "check", lambda *a, **k: [{**row, "ok": True}, {**row, "ok": False}])
    assert aot_check.main([]) == 1
    monkeypatch.setattr(aot_check, "check", lambda *a, **k: [{**row, "ok": True}])
    assert aot_check.main([]) == 0
    assert "| k | fp16 |" in capsys.readouterr().out
