"""Tests found missing by mutation testing of training/: each pins a behaviour that a plausible bug would change
without any other test noticing (degradation steps, dataset alignment, loss weights from the config, the
discriminator step, EMA, exact resume, k-means, SSIM). Expected values are computed independently (by hand, or
with a plain formula), on tiny inputs, on the CPU."""

from __future__ import annotations

import contextlib
import copy
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_training_loop import tiny_vqfr_v1, tiny_vqfr_v2, tiny_vqgan_v1, tiny_vqgan_v2
from training.config import build_optimizer
from training.data import FaceDataset, synthetic_face, to_model_tensor
from training.degradations import DegradationParams, degrade, sample_blur_kernel, sample_rng
from training.kmeans import CodebookReestimator
from training.metrics import ssim
from training.recipes import AdversarialBranch, VQFRv1Recipe, VQFRv2Recipe, VQGANRecipe, unwrap
from training.trainer import EMA, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# A degradation that does nothing but the steps a test switches on: a 1x1 kernel, no rescaling, no noise, no JPEG.
_IDENTITY = dict(blur_kernel_size=1, kernel_list=("iso",), kernel_prob=(1.0,), blur_sigma=(1.0, 1.0),
                 downsample_range=(1.0, 1.0), noise_range=None, jpeg_range=None)


def _face(size: int = 48, index: int = 2) -> np.ndarray:
    return synthetic_face(index, size).astype(np.float32) / 255.0


def _to_8bit(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.float32) / 255.0


# --- degradations ---------------------------------------------------------------------------------------------------
def test_identity_degradation_returns_the_image():
    img = _face()
    out, _ = degrade(img, sample_rng(0, 0, 0), DegradationParams(**_IDENTITY))
    np.testing.assert_array_equal(out, img)  # already 8-bit values


def test_jpeg_is_applied_at_the_drawn_quality():
    img = _face()
    for q in (15, 40, 85):
        out, info = degrade(img, sample_rng(1, 0, q), DegradationParams(**{**_IDENTITY, "jpeg_range": (q, q)}))
        assert info["jpeg_quality"] == q
        ok, buf = cv2.imencode(".jpg", np.rint(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
        expected = cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) / 255.0
        np.testing.assert_array_equal(out, expected)


def test_blur_is_the_drawn_gaussian_applied_with_reflect101_borders():
    img = _face()
    sigma = 2.0
    out, info = degrade(img, sample_rng(2, 0, 0), DegradationParams(**{**_IDENTITY, "blur_kernel_size": 41,
                                                                        "blur_sigma": (sigma, sigma)}))
    assert info["kind"] == "iso" and info["sigma_x"] == sigma
    g = np.exp(-0.5 * (np.arange(41) - 20.0) ** 2 / sigma**2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()  # separable: the isotropic Gaussian
    expected = _to_8bit(cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101))
    np.testing.assert_allclose(out, expected, atol=1.01 / 255)  # one 8-bit level for float rounding at .5
    assert np.mean(out != expected) < 0.01
    assert np.abs(out - img).max() > 0.1  # and it does blur


def test_downscale_is_bilinear_to_the_floor_size_and_back():
    img = _face(50)
    out, info = degrade(img, sample_rng(3, 0, 0), DegradationParams(**{**_IDENTITY, "downsample_range": (3.0, 3.0)}))
    assert info["low_size"] == (16, 16)  # int(50 // 3)
    low = cv2.resize(img, (16, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, _to_8bit(cv2.resize(low, (50, 50), interpolation=cv2.INTER_LINEAR)))


def test_noise_is_per_channel_with_sigma_in_8bit_levels():
    img = np.full((64, 64, 3), 0.5, np.float32)  # mid grey: no clipping
    out, info = degrade(img, sample_rng(4, 0, 0), DegradationParams(**{**_IDENTITY, "noise_range": (10.0, 10.0)}))
    assert info["noise_sigma"] == 10.0
    diff = (out - img) * 255.0  # noise of 10 levels, then rounded to 8 bits
    assert abs(diff.std() - 10.0) < 0.5
    assert abs(diff.mean()) < 0.5
    flat = diff.reshape(-1, 3).T
    corr = np.corrcoef(flat)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.1  # independent channels, not grey noise


def test_anisotropic_kernels_draw_two_independent_sigmas_and_match_their_covariance():
    params = DegradationParams(blur_kernel_size=41, kernel_list=("aniso",), kernel_prob=(1.0,), blur_sigma=(0.8, 3.0))
    r = np.arange(41) - 20.0
    xx, yy = np.meshgrid(r, r)
    sx, sy = [], []
    for i in range(200):
        kernel, info = sample_blur_kernel(sample_rng(5, 0, i), params)
        sx.append(info["sigma_x"])
        sy.append(info["sigma_y"])
        if i < 20:  # the kernel is the one described: covariance R diag(sx^2, sy^2) R^T, x along columns
            c, s = math.cos(info["theta"]), math.sin(info["theta"])
            rot = np.array([[c, -s], [s, c]])
            cov = rot @ np.diag([info["sigma_x"] ** 2, info["sigma_y"] ** 2]) @ rot.T
            moments = np.array([[np.sum(kernel * xx * xx), np.sum(kernel * xx * yy)],
                                [np.sum(kernel * xx * yy), np.sum(kernel * yy * yy)]])
            np.testing.assert_allclose(moments, cov, atol=1e-4)  # sampled on integer pixels
    assert np.mean(np.isclose(sx, sy)) < 0.05
    assert abs(np.corrcoef(sx, sy)[0, 1]) < 0.25


def test_kernel_prob_and_kernel_size_options_are_used():
    only_iso = DegradationParams(kernel_prob=(1.0, 0.0), blur_kernel_size=7)
    kinds = [sample_blur_kernel(sample_rng(6, 0, i), only_iso)[1]["kind"] for i in range(50)]
    assert kinds == ["iso"] * 50
    assert sample_blur_kernel(sample_rng(6, 0, 0), only_iso)[0].shape == (7, 7)
    mostly_aniso = DegradationParams(kernel_prob=(0.2, 0.8))
    kinds = [sample_blur_kernel(sample_rng(6, 1, i), mostly_aniso)[1]["kind"] for i in range(400)]
    assert abs(kinds.count("iso") / 400 - 0.2) < 0.07


# --- data -----------------------------------------------------------------------------------------------------------
def test_lq_is_made_from_the_flipped_gt():
    ds = FaceDataset("synthetic:6", 32, use_hflip=True, degradation=DegradationParams(**_IDENTITY), seed=3)
    flipped = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert torch.equal(item["lq"], item["gt"]), (epoch, i)  # an identity degradation of the same image
            flipped += not torch.equal(item["gt"], FaceDataset("synthetic:6", 32, use_hflip=False)[i]["gt"])
    assert 0 < flipped < 18


def test_faces_are_flipped_half_of_the_time():
    ds = FaceDataset("synthetic:150", 16, use_hflip=True, seed=4)
    plain = FaceDataset("synthetic:150", 16, use_hflip=False, seed=4)
    flipped = [torch.equal(ds[i]["gt"], plain[i]["gt"].flip(-1)) for i in range(len(ds))]
    assert abs(sum(flipped) / len(flipped) - 0.5) < 0.15  # 150 draws at p = 0.5: 3.7 standard errors


def test_model_tensors_are_rgb_in_minus_one_to_one():
    bgr = np.zeros((2, 2, 3), np.float32)
    bgr[0, 0] = (0.0, 0.0, 1.0)  # red in BGR
    bgr[1, 1] = (1.0, 0.5, 0.0)  # blue + half green
    t = to_model_tensor(bgr)
    assert t.shape == (3, 2, 2) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(t[:, 1, 1], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(t[:, 0, 1], torch.tensor([-1.0, -1.0, -1.0]))


# --- SSIM against a plain implementation ----------------------------------------------------------------------------
def _plain_ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    g = np.exp(-0.5 * (np.arange(11) - 5.0) ** 2 / 1.5**2)
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(x):  # valid-region correlation with the 11x11 window
        return np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(x, (11, 11)), w)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = filt(a), filt(b)
    va, vb, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    return float(np.mean((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))))


def test_ssim_matches_the_plain_formula_on_textured_images():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (24, 30, 3)).astype(np.uint8)
    img = np.clip(ref.astype(np.int32) + rng.integers(-40, 41, ref.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_plain_ssim_channel(img[..., c].astype(np.float64), ref[..., c].astype(np.float64))
                        for c in range(3)])
    assert 0.2 < expected < 0.95
    assert ssim(img, ref) == pytest.approx(expected, abs=1e-7)
    inner = np.mean([_plain_ssim_channel(img[3:-3, 3:-3, c].astype(np.float64), ref[3:-3, 3:-3, c].astype(np.float64))
                     for c in range(3)])
    assert ssim(img, ref, crop_border=3) == pytest.approx(inner, abs=1e-7)


def test_psnr_of_a_known_mean_squared_error():
    from training.metrics import psnr

    ref = np.full((8, 8, 3), 100, np.uint8)
    img = ref.copy()
    img[:4] += 4  # half the pixels off by 4: MSE 8
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / 8), abs=1e-9)
    img[:2, :2] = 255  # the border ring is cropped away
    assert psnr(img, ref, crop_border=2) == pytest.approx(10 * math.log10(255**2 / 8), abs=1e-9)


# --- the discriminator step -----------------------------------------------------------------------------------------
class _LinearD(nn.Module):
    """D(x) = w . x + b per image: every gradient has a closed form."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64) * 0.3)
        self.b = nn.Parameter(torch.tensor([0.1], dtype=torch.float64))

    def forward(self, x):
        return (x.double().flatten(1) @ self.w + self.b)[:, None]


def _branch(r1_weight=10.0, r1_every=4, d_local_loss_weight=0.5, global_weight=0.5, local_weight=0.25,
            global_lw=2.0, local_lw=3.0):
    n = 3 * 2 * 2
    branch = AdversarialBranch("", _LinearD(n, 0), _LinearD(n, 1), 0, {"gan_type": "wgan_softplus",
                                                                      "loss_weight": global_lw},
                               {"gan_type": "hinge", "loss_weight": local_lw}, global_weight, local_weight,
                               d_local_loss_weight, r1_weight, r1_every)
    for kind, d in branch.discriminators().items():
        branch.optimizers[kind] = torch.optim.SGD(d.parameters(), lr=0.0)  # keep the weights: grads are read
    return branch


def _images(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("iteration", [3, 4])
def test_discriminator_step_gradients_by_hand(iteration):
    branch = _branch()
    fake, real = _images(1), _images(2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = branch.discriminator_step(fake, real, iteration, scaler, contextlib.nullcontext())
    f, r = fake.flatten(1), real.flatten(1)

    dg = branch.d_global
    with torch.no_grad():
        w, b = dg.w, dg.b
        # softplus(-D(real)) + softplus(D(fake)), each a batch mean
        s_real, s_fake = torch.sigmoid(-(r @ w + b)), torch.sigmoid(f @ w + b)
        grad_w = (-(s_real[:, None] * r).mean(0) + (s_fake[:, None] * f).mean(0))
        grad_b = -s_real.mean() + s_fake.mean()
        if iteration % 4 == 0:  # lazy R1: dD/dx = w for every image, so R1 = |w|^2; 10 / 2 * R1 * 4
            grad_w = grad_w + 10 / 2 * 4 * 2 * w
            assert out["l_d_r1"].item() == pytest.approx(10 / 2 * 4 * float(w @ w), rel=1e-6)
        else:
            assert "l_d_r1" not in out
    torch.testing.assert_close(dg.w.grad, grad_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dg.b.grad.reshape(()), grad_b.reshape(()), rtol=1e-5, atol=1e-7)

    dl = branch.d_local
    with torch.no_grad():
        w, b = dl.w, dl.b
        # 0.5 * (relu(1 - D(real)) + relu(1 + D(fake)))
        on_real, on_fake = ((1 - (r @ w + b)) > 0).double(), ((1 + (f @ w + b)) > 0).double()
        grad_w = 0.5 * (-(on_real[:, None] * r).mean(0) + (on_fake[:, None] * f).mean(0))
        expected_loss = 0.5 * (F.relu(1 - (r @ w + b)).mean() + F.relu(1 + (f @ w + b)).mean())
    torch.testing.assert_close(dl.w.grad, grad_w, rtol=1e-5, atol=1e-7)
    assert out["l_d_local"].item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_generator_adversarial_terms_use_every_weight():
    branch = _branch()
    last = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)  # the "last layer" is the image itself
    target = torch.zeros(3, 3, 2, 2, dtype=torch.float64)
    fake = last * 1.0
    nll = (fake - target).abs().mean()
    terms, extra = branch.generator_terms(fake, nll, last, 1.0)
    with torch.no_grad():
        dg, dl = branch.d_global, branch.d_local
        x = fake.flatten(1)
        g_global = F.softplus(-(x @ dg.w + dg.b)).mean()
        g_local = -(x @ dl.w + dl.b).mean()
        # d nll / d last = sign(last) / numel; d g_local / d last = -local_lw * w / B per image
        grad_nll = torch.sign(last) / last.numel()
        grad_gan = (-3.0 * dl.w / 3).expand(3, -1)
        weight = grad_nll.norm() / (grad_gan.norm() + 1e-4)
    # (the losses are float32: gan_loss and adaptive_weight compute in float32)
    assert terms["l_g_gan_global"].item() == pytest.approx(0.5 * 2.0 * g_global.item(), rel=1e-6)
    assert extra["d_weight_local"].item() == pytest.approx(weight.item(), rel=1e-6)
    assert terms["l_g_gan_local"].item() == pytest.approx(0.25 * weight.item() * 3.0 * g_local.item(), rel=1e-6)


# --- loss weights from the config -----------------------------------------------------------------------------------
def test_vqgan_loss_weights_from_the_config_are_applied():
    cfg = tiny_vqgan_v2()
    cfg["train"]["pixel_opt"]["loss_weight"] = 0.25
    cfg["train"]["codebook_loss_weight"] = 0.5
    cfg["train"]["perceptual_opt"] = None
    recipe = VQGANRecipe(cfg)
    net = recipe.build_generator()
    gt = torch.rand(2, 3, 16, 16) * 2 - 1
    terms, _, _, _ = recipe.generator_step(net, {"gt": gt}, 1, 1.0)
    with torch.no_grad():
        out = net(gt, return_all=True)
    assert terms["l_rec"].item() == pytest.approx(0.25 * (out["dec"] - gt).abs().mean().item(), rel=1e-5)
    assert terms["l_codebook"].item() == pytest.approx(0.5 * out["quant_loss"].item(), rel=1e-5)


def test_vqfr_v2_loss_weights_from_the_config_are_applied():
    cfg = tiny_vqfr_v2()
    cfg["train"]["pixel_opt"]["loss_weight"] = 0.5
    cfg["train"]["quant_feature_opt"]["loss_weight"] = 0.3
    cfg["train"]["quant_index_opt"]["loss_weight"] = 0.7
    cfg["train"]["perceptual_opt"] = None
    recipe = VQFRv2Recipe(cfg)
    net = recipe.build_generator()
    gt, lq = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    terms, _, _, _ = recipe.generator_step(net, {"gt": gt, "lq": lq}, 1, 1.0)
    with torch.no_grad():
        out = net(lq, fidelity=1.0, return_all=True)
        hq = recipe.stage1(gt, return_all=True)
    assert terms["l_rec"].item() == pytest.approx(0.5 * (out["main_dec"] - gt).abs().mean().item(), rel=1e-5)
    mse = ((out["enc_feat"] - hq["quant_feat"]) ** 2).mean().item()
    assert terms["l_quant_feature"].item() == pytest.approx(0.3 * mse, rel=1e-5)
    logits = out["quant_logit"].reshape(-1, out["quant_logit"].shape[-1])
    ce = -torch.log_softmax(logits, -1).gather(1, hq["code_indices"].reshape(-1, 1)).mean().item()
    assert terms["l_quant_index"].item() == pytest.approx(0.7 * ce, rel=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_local_adaptive_weight_is_taken_against_the_reconstruction_losses(monkeypatch, version):
    # v1: each branch's L1 + LPIPS + style (OFFICIAL_VQFR.md section 8); v2: the perceptual loss alone.
    import training.recipes as recipes

    seen = []
    real = recipes.adaptive_weight
    monkeypatch.setattr(recipes, "adaptive_weight", lambda nll, gan, last, scale=1.0: (
        seen.append((float(nll) / scale, last)), real(nll, gan, last, scale))[1])
    if version == "v1":
        cfg = tiny_vqfr_v1()
        cfg["train"]["main_gan_start_iter"] = -1
        recipe = VQFRv1Recipe(cfg)
    else:
        cfg = tiny_vqfr_v2()
        cfg["train"]["gan_start_iter"] = -1
        recipe = VQFRv2Recipe(cfg)
    net = recipe.build_generator()
    recipe.build_branches(lambda d: d.train())
    g = torch.Generator().manual_seed(0)
    gt, lq = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    terms, _, _, _ = recipe.generator_step(net, {"gt": gt, "lq": lq}, 1, 1.0)
    t = {k: float(v) for k, v in terms.items()}
    if version == "v1":
        assert len(seen) == 2
        assert seen[0][0] == pytest.approx(t["l_rec"] + t["l_g_percep"] + t["l_g_style"], rel=1e-5)
        assert seen[1][0] == pytest.approx(t["l_g_percep_main"] + t["l_g_style_main"], rel=1e-5)  # L1 weight 0
        assert seen[0][1] is net.get_parameter("decoder.conv_out.2.weight")
        assert seen[1][1] is net.get_parameter("main_decoder.conv_out.0.weight")
    else:
        assert len(seen) == 1 and seen[0][0] == pytest.approx(t["l_g_percep"], rel=1e-6)
        assert seen[0][1] is net.get_parameter("decoder.conv_out.2.weight")


def test_optimiser_betas_from_the_config_are_applied():
    p = nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], {"type": "Adam", "lr": "1e-4", "betas": [0.5, 0.9]})
    assert opt.param_groups[0]["betas"] == (0.5, 0.9) and opt.param_groups[0]["lr"] == 1e-4


# --- EMA ------------------------------------------------------------------------------------------------------------
def test_ema_moves_a_tenth_of_the_way_at_decay_0_9_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    for e, s in zip(ema.model.parameters(), start, strict=True):
        torch.testing.assert_close(e, s + 0.1)  # 0.9 * old + 0.1 * new = old + 0.1
    torch.testing.assert_close(ema.model[1].running_mean, torch.full((2,), 3.0))


# --- exact resume in the middle of an epoch -------------------------------------------------------------------------
def test_resume_in_the_middle_of_an_epoch_reproduces_an_uninterrupted_run(tmp_path):
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["train"]["dataroot_gt"] = "synthetic:6"  # 3 batches of 2 per epoch
    cfg["train"].update({"total_iter": 5, "gan_start_iter": 100})
    cfg["train"]["perceptual_opt"] = None
    cfg["logger"]["save_checkpoint_freq"] = 4  # iteration 4: the second batch of epoch 1
    Trainer(copy.deepcopy(cfg), tmp_path / "a").train()
    resumed = Trainer(copy.deepcopy(cfg), tmp_path / "b", resume=tmp_path / "a" / "training_states" / "4.state")
    assert resumed.start_iter == 4
    resumed.train()
    a = torch.load(tmp_path / "a" / "training_states" / "5.state", weights_only=True)
    b = torch.load(tmp_path / "b" / "training_states" / "5.state", weights_only=True)
    for k, v in a["nets"]["net_g"].items():
        assert torch.equal(v, b["nets"]["net_g"][k]), k


# --- k-means --------------------------------------------------------------------------------------------------------
def test_kmeans_gives_unused_codes_a_data_point():
    from training.kmeans import kmeans

    points = torch.tensor([[10.0, 10.0], [20.0, 10.0], [10.0, 20.0]]).repeat_interleave(10, 0)
    centres = kmeans(points, 5, seed=0)
    # Fewer distinct points than codes: the extra codes repeat data points (an empty cluster takes the farthest
    # point), never the zero vector of an empty mean.
    for c in centres:
        assert (points - c).abs().sum(1).min() < 1e-6, centres


def test_reservoir_is_uniform_when_the_rows_come_in_one_large_chunk():
    from training.kmeans import Reservoir

    rows = torch.arange(20000, dtype=torch.float32)[:, None]
    means = []
    for seed in range(3):
        r = Reservoir(200, seed=seed)
        r.add(rows[:150])
        r.add(rows[150:])  # one chunk of 19850 rows: each must land in a random slot, not in "its" slot
        kept = r.contents().flatten()
        assert r.filled == 200 and kept.unique().numel() == 200
        assert bool(torch.isin(kept, rows.flatten()).all())
        means.append(kept.mean().item())
    # uniform over the 20000 rows offered: mean 10000, standard error ~5774 / sqrt(600)
    assert abs(sum(means) / 3 - 10000) < 4 * 20000 / math.sqrt(12 * 600)
    assert all(abs(m - 10000) < 4 * 20000 / math.sqrt(12 * 200) for m in means)


def test_codebook_reestimation_uses_only_the_tokens_since_the_last_one_and_stops_at_maxiters():
    codebook = nn.Parameter(torch.zeros(4, 2))
    re = CodebookReestimator(codebook, reservoir_size=64, reestimate_iters=2, reestimate_maxiters=4, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(20, 2, generator=g) + 5 * i for i in range(4)]  # every step's tokens elsewhere
    assert not re.step(1, tokens[0]) and re.step(2, tokens[1])
    assert not re.step(3, tokens[2])
    before = codebook.detach().clone()
    assert not re.step(4, tokens[3])  # iteration == reestimate_maxiters: no longer re-estimated (official: iters < max)
    assert torch.equal(before, codebook)
    re2 = CodebookReestimator(nn.Parameter(torch.zeros(4, 2)), 64, 2, 100, seed=0)
    for i, t in enumerate(tokens):
        re2.step(i + 1, t)
    data = torch.cat(tokens[2:4])  # the reservoir restarted after iteration 2
    centres = re2.codebook.detach()
    assign = torch.cdist(data, centres).argmin(1)
    for k in range(4):  # a Lloyd fixed point of these tokens only
        members = data[assign == k]
        assert len(members) > 0
        torch.testing.assert_close(centres[k], members.mean(0), atol=0.05, rtol=0)


def test_kmeans_codebook_is_copied_into_the_ema(tmp_path):
    cfg = tiny_vqgan_v1()
    cfg["network_g"]["quantizer_opt"]["Level_4"].update(reestimate_iters=1, reestimate_maxiters=3, warmup_iters=-1)
    cfg["train"]["perceptual_opt"] = None
    trainer = Trainer(cfg, tmp_path / "run")
    batch = next(iter(trainer.loader))
    trainer.step(batch, 1)
    trainer.close()
    net_codes = unwrap(trainer.net).quantizer.quantize_dict["Level_4"].embedding.weight
    ema_codes = trainer.ema.model.quantizer.quantize_dict["Level_4"].embedding.weight
    torch.testing.assert_close(ema_codes, net_codes)


# --- validation and checkpoints evaluate the EMA --------------------------------------------------------------------
def test_validation_scores_the_ema_network(tmp_path):
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1"}
    cfg["train"]["perceptual_opt"] = None
    trainer = Trainer(cfg, tmp_path / "run")
    seen = []
    trainer.restore = lambda model, lq, gt: (seen.append(model), gt)[1]
    trainer.validate(1)
    trainer.close()
    assert seen and all(m is trainer.ema.model for m in seen)
