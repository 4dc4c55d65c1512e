"""Discriminators, k-means re-estimation and the image-quality metrics of training/."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import FACES, needs_faces
from training.discriminators import (
    NLayerDiscriminator,
    StyleGAN2Discriminator,
    SWADiscriminator,
    build_discriminator,
    haar_dwt,
    haar_iwt,
    minibatch_stddev,
)
from training.kmeans import CodebookReestimator, Reservoir, kmeans
from training.metrics import imresize_half, niqe, psnr, ssim
from vqfr.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


@pytest.mark.parametrize("cls", [SWADiscriminator, StyleGAN2Discriminator])
def test_global_discriminators_shapes_and_gradients(cls):
    torch.manual_seed(0)
    d = cls(32, narrow=1 / 16)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = d(x)
    assert out.shape == (4, 1)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())
    with pytest.raises(ValueError, match="out_size"):
        d(torch.randn(2, 3, 64, 64))


def test_spectral_norm_bounds_every_layer():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 8, 3).train()
    for _ in range(30):  # power iterations run on training forwards
        d(torch.randn(2, 3, 32, 32))
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_haar_transform_is_orthonormal_and_invertible():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    y = haar_dwt(x)
    assert y.shape == (2, 12, 4, 6)
    torch.testing.assert_close(haar_iwt(y), x)
    torch.testing.assert_close(y.pow(2).sum(), x.pow(2).sum())
    const = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(haar_dwt(const).flatten(), torch.tensor([2.0, 0.0, 0.0, 0.0]))


def test_minibatch_stddev_by_hand():
    x = torch.zeros(2, 2, 1, 1)
    x[0] = 1.0
    x[1, 0] = 3.0
    out = minibatch_stddev(x)  # group of 2: std per element is |a - b| / 2 -> (1, 0.5), mean 0.75
    torch.testing.assert_close(out[:, 2].flatten(), torch.full((2,), (1.0 + 0.5) / 2), atol=1e-4, rtol=0)
    assert minibatch_stddev(torch.randn(6, 4, 2, 2)).shape == (6, 5, 2, 2)  # 6 is not a multiple of 4: group 3
    with pytest.raises(ConfigError, match="unknown discriminator"):
        build_discriminator({"type": "UNetDiscriminator"})


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centers[:, None] + 0.3 * torch.randn(4, 200, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 4, seed=1)
    order = sorted(range(4), key=lambda i: (round(found[i, 0].item()), round(found[i, 1].item())))
    expected = centers[[0, 2, 1, 3]]  # the same lexicographic order
    torch.testing.assert_close(found[order], expected, atol=0.1, rtol=0)
    assert torch.equal(found, kmeans(x, 4, seed=1))
    with pytest.raises(ValueError, match="at least"):
        kmeans(x[:3], 4)


def test_reservoir_is_uniform_and_resumable():
    r = Reservoir(200, seed=3)
    rows = torch.arange(20000, dtype=torch.float32)[:, None]
    for chunk in rows.split(256):
        r.add(chunk)
    kept = r.contents().flatten()
    assert r.filled == 200 and r.seen == 20000 and kept.unique().numel() == 200
    assert abs(kept.mean().item() - 10000) < 4 * 20000 / math.sqrt(12 * 200)  # uniform over everything offered
    a, b = Reservoir(50, seed=1), Reservoir(50, seed=1)
    a.add(rows[:300])
    b.load_state_dict(a.state_dict())
    a.add(rows[300:900])
    b.add(rows[300:900])
    assert torch.equal(a.contents(), b.contents())


def test_codebook_reestimation_without_torch_distributed():
    codebook = torch.nn.Parameter(torch.zeros(8, 3))
    re = CodebookReestimator(codebook, reservoir_size=64, reestimate_iters=2, reestimate_maxiters=5, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(20, 3, generator=g) for _ in range(6)]
    assert not re.step(1, tokens[0]) and torch.all(codebook == 0)
    assert re.step(2, tokens[1])  # 40 tokens >= 8 codes: k-means overwrites the codebook
    assert not torch.all(codebook == 0)
    torch.testing.assert_close(codebook.data, kmeans(torch.cat(tokens[:2]), 8, seed=0))
    before = codebook.detach().clone()
    assert not re.step(3, tokens[2])
    assert re.step(4, tokens[3]) and not torch.equal(before, codebook)
    assert not re.step(6, tokens[5])  # past reestimate_maxiters


def test_psnr_and_ssim_by_hand():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.ones((8, 8, 3), np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255.0**2))
    assert psnr(a, a) == math.inf
    c1 = (0.01 * 255) ** 2
    x, y = np.full((16, 16), 100, np.uint8), np.full((16, 16), 120, np.uint8)
    assert ssim(x, y) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))  # constant images
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    assert psnr(img, img, crop_border=4) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        psnr(img, img[:8])
    with pytest.raises(ValueError, match="at least 11x11"):  # no SSIM window fits: was a silent NaN
        ssim(img[:10], img[:10])


def test_metrics_cli_names_the_image_it_cannot_measure(tmp_path, capsys):
    import cv2

    from training.metrics import main as metrics_main

    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((64, 64, 3), np.uint8))
    assert metrics_main(["niqe", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "small.png" in err and "96x96" in err
    assert metrics_main(["niqe", str(tmp_path / "missing")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_plot_skips_a_cut_off_record_and_explains_an_empty_or_missing_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from training.plot import main as plot_main
    from training.plot import read_metrics

    metrics = tmp_path / "metrics.jsonl"  # the run was killed while writing its third record
    metrics.write_text('{"iter": 1, "loss_total": 1.0}\n{"iter": 2, "loss_total": 0.5}\n{"iter": 3, "loss_to')
    assert [r["iter"] for r in read_metrics(metrics)] == [1, 2]
    assert plot_main([str(metrics), "-o", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("empty.jsonl", "missing.jsonl"):
        capsys.readouterr()
        assert plot_main([str(tmp_path / name), "-o", str(tmp_path / "x.png")]) == 1
        assert name in capsys.readouterr().err


def _niqe_test_image() -> np.ndarray:
    rng = np.random.default_rng(2024)
    yy, xx = np.mgrid[0:384, 0:384]
    base = 120 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img = np.stack([base, base * 0.8 + 20, 255 - base], -1) + rng.integers(-25, 26, (384, 384, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_niqe_matches_basicsr():
    # Reference values computed with basicsr 1.4.2's calculate_niqe (float32) on the same image.
    img = _niqe_test_image()
    assert niqe(img) == pytest.approx(27.255023153177923, abs=1e-3)
    assert niqe(img, crop_border=4) == pytest.approx(30.85897254222242, abs=1e-3)
    with pytest.raises(ValueError, match="at least 96x96"):
        niqe(img[:64, :64])


@needs_faces
def test_niqe_on_sample_faces_matches_basicsr():
    from vqfr.imaging import load_image

    # basicsr 1.4.2 (float32) values; ours is float64, as MATLAB, and agrees to ~1e-3 relative.
    expected = {"00000052_lq.png": 13.293985542332335, "00066_02_lq.png": 13.940822639219784,
                "Eliane_Karp_0001_00_lq.png": 10.552703880584291}
    for name, value in expected.items():
        assert niqe(load_image(FACES / "aligned" / name)) == pytest.approx(value, abs=0.02)


def test_matlab_half_resize_properties():
    const = np.full((10, 14), 7.0)
    np.testing.assert_allclose(imresize_half(const), np.full((5, 7), 7.0))
    ramp = np.tile(np.arange(16, dtype=np.float64), (8, 1))
    out = imresize_half(ramp)
    assert out.shape == (4, 8)
    np.testing.assert_allclose(out[:, 3], 6.5, atol=1e-9)  # linear in the interior: centres at 2i + 0.5
