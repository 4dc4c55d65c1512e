"""Every training loss against a value computed by hand, and the VGG16 / LPIPS weight loading."""

import math

import numpy as np
import pytest
import torch

from training.losses import (
    LPIPS_CHANNELS,
    PerceptualLoss,
    adaptive_weight,
    code_index_loss,
    gan_loss,
    gram_matrix,
    l1_loss,
    mse_loss,
    r1_penalty,
)
from training.recipes import build_perceptual
from training.vgg import LPIPS_TAPS, VGG16Features, load_vgg16
from vqfr.errors import CheckpointError, ConfigError
from vqfr.models.quantizer import codebook_loss


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


def test_pixel_and_code_losses_by_hand():
    a = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    b = torch.tensor([[0.0, 0.0], [0.5, 2.0]])
    assert l1_loss(a, b).item() == pytest.approx((1 + 2 + 0 + 2) / 4)
    assert l1_loss(a, b, 0.5).item() == pytest.approx(0.625)
    assert mse_loss(a, b).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])  # [B=1, hw=2, K=3]
    target = torch.tensor([[0, 1]])
    expected = (-(2 - math.log(math.exp(2) + 2)) - (1 - math.log(1 + math.e + math.exp(3)))) / 2
    assert code_index_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_codebook_and_commitment_weights():
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    e = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = codebook_loss(e, z)
    assert loss.item() == pytest.approx(2.5 + 0.25 * 2.5)  # mean((sg(e)-z)^2) + 0.25 mean((e-sg(z))^2)
    loss.backward()
    torch.testing.assert_close(z.grad, torch.tensor([[1.0, 2.0]]))  # weight 1 on the encoder side
    torch.testing.assert_close(e.grad, torch.tensor([[-0.25, -0.5]]))  # weight 0.25 on the codebook side


def test_gan_losses_by_hand():
    x = torch.tensor([0.0, math.log(3.0)])
    assert gan_loss(x, True, False, "wgan_softplus").item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert gan_loss(x, True, True, "wgan_softplus").item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert gan_loss(x, False, True, "wgan_softplus").item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    h = torch.tensor([2.0, -1.0])
    assert gan_loss(h, True, True, "hinge").item() == pytest.approx(1.0)  # relu(1 - x): 0, 2
    assert gan_loss(h, False, True, "hinge").item() == pytest.approx(1.5)  # relu(1 + x): 3, 0
    assert gan_loss(h, True, False, "hinge").item() == pytest.approx(-0.5)  # generator: -mean(x)
    with pytest.raises(ConfigError, match="gan_type"):
        gan_loss(h, True, True, "lsgan")


def test_r1_penalty_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    pred = (x**2).sum(1)  # d pred_b / d x_b = 2 x_b
    r1 = r1_penalty(pred, x)
    assert r1.item() == pytest.approx((4 * 5 + 4 * 10) / 2)
    r1.backward()  # create_graph: the penalty is differentiable (d/dx of 4 x^2 / B = 4 x)
    torch.testing.assert_close(x.grad, 4 * x.detach())


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    c1, c2 = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    nll, gan = (w * c1).sum(), (w * c2).sum()
    assert adaptive_weight(nll, gan, w).item() == pytest.approx(5.0 / (1.0 + 1e-4))
    # pre-scaled losses (AMP loss scale 8) give the same weight
    assert adaptive_weight(8 * nll, 8 * gan, w, grad_scale=8.0).item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert adaptive_weight(nll, 0 * (w * c2).sum(), w).item() == pytest.approx(1e4)  # clamped: 5 / 1e-4 > 1e4
    assert adaptive_weight(torch.zeros(()), gan, w).item() == 0.0  # a switched-off loss has no gradient
    assert w.grad is None  # nothing accumulated into .grad


def test_gram_matrix_by_hand():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, C=2, 1, 2]
    torch.testing.assert_close(gram_matrix(x), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


def test_perceptual_and_style_losses_match_their_formula():
    torch.manual_seed(0)
    loss = PerceptualLoss(perceptual_weight=0.7, style_weight=30.0, random_vgg=True)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    percep, style = loss(x, y)
    with torch.no_grad():
        fx, fy = loss.features(x), loss.features(y)
    expected_p, expected_s = 0.0, 0.0
    for a, b, w in zip(fx, fy, loss.lin, strict=True):
        a, b, w = a.double().numpy(), b.double().numpy(), w.double().numpy()
        np.testing.assert_allclose((a**2).sum(1), 1.0, atol=1e-5)  # unit-normalised over channels
        expected_p += ((a - b) ** 2 * w).sum(1).mean(axis=(1, 2)).mean()
        ga = np.einsum("bchw,bdhw->bcd", a, a) / a[0].size
        gb = np.einsum("bchw,bdhw->bcd", b, b) / b[0].size
        expected_s += np.abs(ga - gb).mean()
    assert percep.item() == pytest.approx(0.7 * expected_p, rel=1e-5)
    assert style.item() == pytest.approx(30.0 * expected_s, rel=1e-4)
    zero_p, zero_s = loss(x, x)
    assert zero_p.item() == 0.0 and zero_s.item() == 0.0
    assert all(not p.requires_grad for p in loss.parameters())
    xg = x.clone().requires_grad_(True)
    loss(xg, y)[0].backward()
    assert xg.grad.abs().sum() > 0  # gradients reach the image


def test_packaged_lpips_weights_are_the_v01_linear_layers():
    loss = PerceptualLoss(random_vgg=True)
    assert [tuple(w.shape) for w in loss.lin] == [(1, c, 1, 1) for c in LPIPS_CHANNELS]
    assert all(bool((w >= 0).all()) for w in loss.lin)
    assert loss.lin[0].max().item() == pytest.approx(1.2828161716461182)  # lpips 0.1.4, lin0 max
    uniform = PerceptualLoss(lpips_weights="none", random_vgg=True)
    assert all(bool((w == 1).all()) for w in uniform.lin)


def test_vgg16_loads_torchvision_format_and_explains_a_missing_file(tmp_path):
    ref = VGG16Features()
    keys = list(ref.state_dict())
    convs = sorted({int(k.split(".")[1]) for k in keys})
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16().features indices
    assert LPIPS_TAPS == (3, 8, 15, 22, 29)
    sd = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files also hold the classifier
    torch.save(sd, tmp_path / "vgg16-397923af.pth")
    vgg = load_vgg16(tmp_path / "vgg16-397923af.pth")
    torch.testing.assert_close(vgg.features[28].weight, sd["features.28.weight"])
    x = torch.randn(1, 3, 16, 16)
    assert [f.shape[1] for f in vgg(x)] == list(LPIPS_CHANNELS)

    with pytest.raises(ConfigError) as err:
        load_vgg16(tmp_path / "missing.pth")
    assert "missing.pth" in str(err.value) and "vgg16-397923af.pth" in str(err.value)
    assert "perceptual_weight and style_weight to 0" in str(err.value)
    with pytest.raises(ConfigError, match="vgg_weights is not set"):
        PerceptualLoss(perceptual_weight=1.0)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="lacks"):
        load_vgg16(tmp_path / "partial.pth")
    # no file is needed when the perceptual and style weights are 0
    assert build_perceptual({"perceptual_opt": {"type": "LPIPS", "perceptual_weight": 0, "style_weight": 0,
                                                "vgg_weights": str(tmp_path / "missing.pth")}}) is None
