"""What mutation testing of the architectures (``vqfr.models``) and of checkpoint loading (``vqfr.checkpoint``) found
unchecked, all of it away from the golden configurations: a v1 resampler scale of 0 refused when built; the nearest
code of every token on a grid that is not square and in a batch of two (indices per image, row-major), with the
lowest index winning a tie; the k-means quantizer's warm-up bypass exactly while ``iters < warmup_iters``, in
training only, with ``iters`` reaching it from VQGANv1 and VQFRv1; a loss of 0 in eval mode, the codebook loss's
gradients (1 for the tokens, 0.25 for the codes) and the codebook loss ``mean((sg(e) - z)^2) + 0.25 mean((e -
sg(z))^2)`` summed over every quantized level of VQGANv1; the trainer's k-means options kept on the quantizer;
``build_quantizer`` leaving its option block alone; the codebook's uniform(+-1/num_code) and the deformable conv's
uniform(+-1/sqrt(cin*9)) initialisation; the offset/mask split of a deformable conv with 2 groups and its padding
option; the v2 condition and the offset feature resized on grids that are not square; v1 deformable groups read per
level, ``fix_keys`` with two keys (v1 and VQGANv2), and v1 and v2 models whose patch is 16 (five levels:
``proj_patch_size`` and ``align_from_patch`` 16, 48x48 inputs); v2 fidelities below 0 and above 1 not clamped nor
skipped, a float64 fidelity tensor used in the model's dtype, an unknown ``code_selection_mode`` refused, and the
"Nearest" mode's indices the argmin of the distances; the network block of a yml read from ``network_sr`` before
``network_g``; ``model.options`` a copy of the caller's dict; and checkpoints whose suffix is upper case, whose keys
are nested ``module.module.`` and whose ``params_ema`` is not a mapping; the model moved to the device asked for,
with its full ``weights_path``; an empty file reported as empty; and options passed in not reported as the stored
ones, nor a same-version file told to load with its alias. Expected values come from OFFICIAL_VQFR.md's formulas
re-done here with plain torch, hand-built state dicts and hand arithmetic, on tiny CPU models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import vqfr
from tests.conftest import TINY_V1, TINY_V2, seeded_model
from tests.test_model_config_behaviours import _deform_conv, _perturbed, _rand
from vqfr.models.blocks import UpDownSample
from vqfr.models.quantizer import L2VectorQuantizer, L2VectorQuantizerKmeans, build_quantizer
from vqfr.models.warping import DCNv2Pack, TextureWarpingModule, upsample_offset_feature


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


def _x(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def _bilinear_x2_last(y):
    prev = torch.cat([y[..., :1], y[..., :-1]], -1)
    nxt = torch.cat([y[..., 1:], y[..., -1:]], -1)
    return torch.stack([0.75 * y + 0.25 * prev, 0.75 * y + 0.25 * nxt], -1).flatten(-2)


# --- blocks ---------------------------------------------------------------------------------------------------------


def test_a_resampler_scale_of_zero_is_refused_when_built():
    with pytest.raises(ValueError, match="positive integer"):
        UpDownSample(32, 32, 0, "down")


# --- quantizers (OFFICIAL_VQFR.md §5) ------------------------------------------------------------------------------


def test_nearest_codes_per_image_on_a_grid_that_is_not_square_and_ties_go_to_the_lowest_index():
    q = L2VectorQuantizer(6, 3).double().eval()
    with torch.no_grad():
        q.embedding.weight.copy_(_rand(6, 3, seed=5))
        q.embedding.weight[4] = q.embedding.weight[1]  # a tie: code 1 must win
    z = _rand(2, 3, 2, 3, seed=6)
    z[1, :, 1, 2] = q.embedding.weight[1]  # exactly on the tied code
    out = q(z)
    assert out.indices.shape == (2, 6)
    book = q.embedding.weight.detach()
    for b in range(2):
        for i in range(2):
            for j in range(3):
                d = ((z[b, :, i, j] - book) ** 2).sum(1).tolist()
                best = d.index(min(d))  # the first minimum
                assert out.indices[b, 3 * i + j].item() == best
                torch.testing.assert_close(out.z_q[b, :, i, j], book[best], atol=1e-12, rtol=0)
    assert out.indices[1, 5].item() == 1


def _kmeans(warmup: int) -> L2VectorQuantizerKmeans:
    torch.manual_seed(0)
    q = L2VectorQuantizerKmeans(8, 4, 4, warmup_iters=warmup).double()
    with torch.no_grad():
        q.embedding.weight.normal_()
    return q


def test_kmeans_warm_up_bypasses_quantization_while_iters_is_below_it_in_training_only():
    """§5: while ``iters < warmup_iters`` quantization is the identity with loss 0; from ``warmup_iters`` on, and
    always in eval mode, the tokens are quantized."""
    q = _kmeans(warmup=5).train()
    z = _rand(1, 4, 2, 2, seed=1)
    before = q(z, iters=4)
    torch.testing.assert_close(before.z_quant_before_conv, q.quant_conv(z), atol=0, rtol=0)
    assert before.loss.item() == 0
    assert before.indices.tolist() == [[0, 0, 0, 0]]
    at = q(z, iters=5)
    book = q.embedding.weight.detach()
    rows = book[at.indices.reshape(-1)].reshape(1, 2, 2, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(at.z_quant_before_conv, rows, atol=1e-12, rtol=0)
    assert at.loss.item() > 0
    evaluated = q.eval()(z, iters=0)
    torch.testing.assert_close(evaluated.z_quant_before_conv, rows, atol=1e-12, rtol=0)


def test_the_codebook_loss_gradient_is_one_for_the_encoder_and_a_quarter_for_the_codebook():
    """§5: ``mean((sg(e) - z)^2) + 0.25 mean((e - sg(z))^2)``: the tokens get 2 (z - e) / n, the codes they picked
    0.25 * 2 (e - z) / n summed over their tokens (n = tokens x channels)."""
    q = L2VectorQuantizer(6, 3).double().train()
    with torch.no_grad():
        q.embedding.weight.copy_(_rand(6, 3, seed=5))
    z = _rand(2, 3, 2, 3, seed=6).requires_grad_()
    out = q(z)
    out.loss.backward()
    n = 2 * 3 * 2 * 3
    e = q.embedding.weight.detach()[out.indices.reshape(-1)]  # [12, 3]
    tokens = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 3), 2 * (tokens - e) / n, atol=1e-12, rtol=0)
    expected = torch.zeros(6, 3, dtype=torch.float64)
    expected.index_add_(0, out.indices.reshape(-1), 0.25 * 2 * (e - tokens) / n)
    torch.testing.assert_close(q.embedding.weight.grad, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.loss, 1.25 * ((e - tokens) ** 2).mean(), atol=1e-12, rtol=0)


def test_the_loss_is_zero_in_eval_mode():
    q = _kmeans(warmup=-1).eval()
    assert q(_rand(1, 4, 2, 2, seed=1)).loss.item() == 0
    assert L2VectorQuantizer(8, 4).eval()(_rand(1, 4, 2, 2).float()).loss.item() == 0


def test_the_kmeans_options_are_kept_for_the_trainer_and_the_option_block_is_left_alone():
    opts = {"type": "L2VectorQuantizerKmeans", "num_code": 8, "in_dim": 32, "code_dim": 4, "reservoir_size": 64,
            "reestimate_iters": 7, "reestimate_maxiters": 9, "warmup_iters": 3}
    saved = copy.deepcopy(opts)
    q = build_quantizer(opts)
    assert opts == saved
    assert (q.reservoir_size, q.reestimate_iters, q.reestimate_maxiters, q.warmup_iters) == (64, 7, 9, 3)
    build_quantizer(opts)  # the same block builds twice


def test_codebooks_start_uniform_within_one_over_num_code():
    for q in (L2VectorQuantizerKmeans(64, 32, 8), L2VectorQuantizer(64, 8)):
        w = q.embedding.weight.detach().abs()
        assert w.max() <= 1 / 64 and w.max() > 0.9 / 64


def _vqgan_v1(warmup: int, two_levels: bool = False) -> dict:
    opts = {k: copy.deepcopy(TINY_V1[k]) for k in ("base_channels", "proj_patch_size", "resolution_scale_rates",
                                                     "channel_multipliers", "encoder_num_blocks",
                                                     "decoder_num_blocks", "quant_level", "quantizer_opt")}
    opts["type"] = "VQGANv1"
    opts["quantizer_opt"]["Level_32"]["warmup_iters"] = warmup
    if two_levels:
        opts["quant_level"] = ["Level_16", "Level_32"]
        opts["quantizer_opt"]["Level_16"] = dict(opts["quantizer_opt"]["Level_32"], in_dim=32)
    return opts


def test_vqgan_v1_passes_iters_to_the_warm_up_and_sums_the_codebook_loss_of_every_level():
    model = seeded_model(_vqgan_v1(warmup=10, two_levels=True)).train()
    x = _x(b=1)
    out = model(x, iters=0, return_all=True)
    assert out["code_indices"]["Level_32"].abs().sum().item() == 0  # bypassed: Level_32 warms up for 10 iterations
    # Level_16 (warm-up 10 too) is also bypassed: no loss at all.
    assert out["quant_loss"] == 0
    out = model(x, iters=10, return_all=True)
    expected = sum(1.25 * torch.mean((f["z_quant_before_conv"] - f["z_conv"]) ** 2)
                   for f in out["feat_dict"].values())
    assert len(out["feat_dict"]) == 2 and out["quant_loss"].item() > 0  # quantized from iters=10 on
    torch.testing.assert_close(out["quant_loss"], expected, rtol=1e-5, atol=0)


def test_vqfr_v1_passes_iters_to_the_warm_up():
    opts = copy.deepcopy(TINY_V1)
    opts["quantizer_opt"]["Level_32"]["warmup_iters"] = 10
    model = seeded_model(opts).train()
    x = _x(b=1)
    f = model(x, iters=9, return_all=True)["feat_dict"]["Level_32"]
    assert torch.equal(f["z_quant_before_conv"], f["z_conv"])  # bypassed
    out = model(x, iters=10, return_all=True)
    book = model.quantizer.quantize_dict["Level_32"].embedding.weight.detach()
    rows = book[out["code_indices"]["Level_32"].reshape(-1)].reshape(1, 2, 2, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(out["feat_dict"]["Level_32"]["z_quant_before_conv"], rows, atol=1e-6, rtol=0)


# --- warping (§1-2) -------------------------------------------------------------------------------------------------


def test_a_deformable_conv_with_two_groups_splits_36_offsets_and_18_mask_channels():
    dcn = _perturbed(DCNv2Pack(8, 8, deformable_groups=2), seed=4)
    x, feat = _rand(1, 8, 5, 6, seed=1), _rand(1, 8, 5, 6, seed=2)
    raw = F.conv2d(feat, dcn.conv_offset.weight, dcn.conv_offset.bias, padding=1)
    assert raw.shape[1] == 54
    expected = _deform_conv(x, raw[:, :36], torch.sigmoid(raw[:, 36:]), dcn.weight, dcn.bias)
    torch.testing.assert_close(dcn(x, feat), expected, atol=1e-10, rtol=0)


def test_a_deformable_conv_without_padding_shrinks_the_map():
    dcn = DCNv2Pack(4, 4, deformable_groups=1, padding=0)
    assert dcn(torch.randn(1, 4, 6, 7), torch.randn(1, 4, 6, 7)).shape == (1, 4, 4, 5)


def test_the_deformable_conv_weights_start_uniform_within_one_over_sqrt_fan_in():
    w = DCNv2Pack(64, 64, deformable_groups=4).weight.detach().abs()
    bound = 1 / math.sqrt(64 * 9)
    assert w.max() <= bound and w.max() > 0.9 * bound


def test_v2_condition_and_offset_feature_are_resized_on_grids_that_are_not_square():
    cond = _rand(1, 32, 8, 12, seed=1)
    twm = TextureWarpingModule(32, 32, 4, 1)
    rows = (cond[..., 1::4, :] + cond[..., 2::4, :]) / 2  # bilinear /4: the mean of the 2x2 around 4i + 1.5
    torch.testing.assert_close(twm.resize_cond(cond), (rows[..., 1::4] + rows[..., 2::4]) / 2, atol=1e-12, rtol=0)
    feat = _rand(1, 4, 2, 3, seed=2)
    x2 = _bilinear_x2_last(_bilinear_x2_last(feat).transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(upsample_offset_feature(feat), 2 * x2, atol=1e-12, rtol=0)


# --- v1 options -----------------------------------------------------------------------------------------------------


def test_v1_reads_the_deformable_groups_of_each_level():
    opts = copy.deepcopy(TINY_V1)
    opts["align_opt"]["Level_8"]["deformable_groups"] = 2
    model = vqfr.build_model(opts)
    shapes = {name: tuple(twm.dcn.conv_offset.weight.shape[:1]) for name, twm in
              model.main_decoder.align_func_dict.items()}
    assert shapes["Level_8"] == (54,) and shapes["Level_16"] == (108,)


def test_v1_fix_keys_freeze_every_parameter_matching_any_key():
    opts = dict(copy.deepcopy(TINY_V1), fix_keys=["embedding", "quant_conv"])
    frozen = {n for n, p in vqfr.build_model(opts).named_parameters() if not p.requires_grad}
    q = "quantizer.quantize_dict.Level_32."
    assert frozen == {q + "embedding.weight", q + "quant_conv.weight", q + "quant_conv.bias",
                      q + "post_quant_conv.weight", q + "post_quant_conv.bias"}


def _v1_patch16() -> dict:
    opts = copy.deepcopy(TINY_V1)
    opts.update(proj_patch_size=16, align_from_patch=16, quant_level=["Level_16"],
                resolution_scale_rates=[1, 2, 2, 2, 2], channel_multipliers=[1, 1, 1, 1, 2])
    opts["align_opt"].pop("Level_32")
    opts["quantizer_opt"] = {"Level_16": opts["quantizer_opt"]["Level_32"]}
    return opts


def test_v1_with_a_patch_of_16_builds_and_restores_48_pixel_faces():
    model = seeded_model(_v1_patch16())
    assert model.patch == 16
    assert "Level_32" not in model.main_decoder.align_func_dict
    # Level_16 is the coarsest warp: it has no previous offset feature (conv 64 -> 64 only).
    assert model.main_decoder.align_func_dict["Level_16"].offset_conv2[0].weight.shape[1] == 64
    with torch.no_grad():
        out = model(_x(b=1, h=48, w=80), return_all=True)
    assert out["main_dec"].shape == (1, 3, 48, 80)
    assert out["code_indices"]["Level_16"].shape == (1, 15)


# --- v2 options -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2():
    return seeded_model(TINY_V2)


def test_v2_fidelity_outside_0_1_extrapolates_the_residual(v2):
    """main_dec = conv_out(texture + f * residual): the pre-conv_out value is affine in f, so the outputs at -0.5
    and 1.5 are the official extrapolations; a clamp, or a skip below 0, would return the 0 or 1 outputs."""
    x = _x(b=1)
    captured = []
    hook = v2.decoder.conv_out.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for f in (0.0, 1.0, -0.5, 1.5):
            v2(x, fidelity=f)
    hook.remove()
    # conv_out runs on the texture feature in every call, then (f != 0) on texture + f * residual.
    texture, pre = captured[0], captured[2::2]  # pre: f = 1, -0.5, 1.5
    assert len(captured) == 7
    residual = pre[0] - texture
    torch.testing.assert_close(pre[1], texture - 0.5 * residual, atol=1e-5, rtol=0)
    torch.testing.assert_close(pre[2], texture + 1.5 * residual, atol=1e-5, rtol=0)
    assert residual.abs().max() > 1e-3


def test_v2_a_float64_fidelity_tensor_runs_in_the_model_dtype(v2):
    x = _x(b=2)
    with torch.no_grad():
        out = v2(x, fidelity=torch.tensor([0.5, 0.5], dtype=torch.float64))
        ref = v2(x, fidelity=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_v2_an_unknown_code_selection_mode_is_refused():
    with pytest.raises(vqfr.ConfigError, match="code_selection_mode"):
        vqfr.build_model(dict(copy.deepcopy(TINY_V2), code_selection_mode=""))


def test_v2_nearest_mode_picks_the_code_at_the_smallest_distance():
    model = seeded_model(dict(copy.deepcopy(TINY_V2), code_selection_mode="Nearest"))
    assert model.feat2index is None
    with torch.no_grad():
        out = model(_x(b=2), return_all=True)
    z = out["enc_feat"].double().permute(0, 2, 3, 1).reshape(-1, 16)
    book = model.quantizer.embedding.weight.double()
    assert torch.equal(out["code_indices"].reshape(-1), torch.cdist(z, book).argmin(1))


def test_v2_with_five_levels_has_a_patch_of_16():
    opts = copy.deepcopy(TINY_V2)
    opts["channel_multipliers"] = [1, 1, 1, 1, 2]
    model = seeded_model(opts)
    assert model.patch == 16
    with torch.no_grad():
        assert model(_x(b=1, h=48, w=48), fidelity=1.0).shape == (1, 3, 48, 48)


def test_vqgan_v2_fix_keys_freeze_every_parameter_matching_any_key():
    opts = {k: copy.deepcopy(TINY_V2[k]) for k in ("base_channels", "channel_multipliers", "use_enc_attention",
                                                    "use_dec_attention", "code_dim", "quantizer_opt")}
    opts.update(type="VQGANv2", num_enc_blocks=1, num_dec_blocks=1, fix_keys=["embedding", "encoder.conv_in"])
    frozen = {n for n, p in vqfr.build_model(opts).named_parameters() if not p.requires_grad}
    assert frozen == {"quantizer.embedding.weight", "encoder.conv_in.weight", "encoder.conv_in.bias"}


# --- options ---------------------------------------------------------------------------------------------------------


def test_a_yml_with_both_blocks_is_read_from_network_sr(tmp_path):
    train = dict(copy.deepcopy(TINY_V2), code_selection_mode="Nearest")
    path = tmp_path / "both.yml"
    path.write_text(yaml.safe_dump({"network_g": train, "network_sr": copy.deepcopy(TINY_V2)}))
    assert vqfr.build_model(path).options["code_selection_mode"] == "Predict"


def test_model_options_do_not_follow_later_changes_to_the_callers_dict():
    opts = copy.deepcopy(TINY_V2)
    model = vqfr.build_model(opts)
    opts["align_opt"]["deformable_groups"] = 8
    opts["quantizer_opt"]["num_code"] = 999
    assert model.options["align_opt"]["deformable_groups"] == 4
    assert model.options["quantizer_opt"]["num_code"] == 32


# --- checkpoints ----------------------------------------------------------------------------------------------------


def test_an_upper_case_safetensors_suffix_is_read_as_safetensors(tmp_path):
    model = seeded_model(TINY_V2)
    path = vqfr.save_safetensors(model, tmp_path / "w.safetensors")
    upper = path.rename(tmp_path / "W.SAFETENSORS")
    loaded = vqfr.load_model(upper)  # options from the metadata
    assert loaded.options == model.options
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_nested_module_prefixes_are_all_stripped_and_a_non_mapping_params_ema_is_not_taken(tmp_path):
    from vqfr.checkpoint import filter_state_dict

    w = torch.ones(2)
    assert filter_state_dict({"module.module.module.a": w}) == {"a": w}
    assert filter_state_dict({"params_ema": [w], "params": {"a": w}}) == {"a": w}  # a list is no state dict


def test_the_model_is_moved_to_the_device_asked_for(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"params": seeded_model(TINY_V2).state_dict()}, path)
    model = vqfr.load_model(path, TINY_V2, device="meta")  # a device every machine has
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.weights_path == str(path)  # the full path, as given


def test_options_passed_in_are_not_reported_as_the_files_stored_options(tmp_path):
    path = vqfr.save_safetensors(seeded_model(TINY_V2), tmp_path / "w.safetensors")
    other = copy.deepcopy(TINY_V2)
    other["quantizer_opt"]["num_code"] = 16
    other["quantizer_opt"]["code_dim"] = 16
    with pytest.raises(vqfr.CheckpointError) as info:
        vqfr.load_model(path, other)
    assert "does not match VQFRv2 (" in str(info.value) and "metadata" not in str(info.value)
    assert "options='v2'" not in str(info.value)  # the file is a VQFRv2: only its training options can help


def test_an_empty_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(vqfr.CheckpointError, match=r"is empty \(0 bytes\)"):  # the folder name holds "empty" too
        vqfr.load_model(path)
