"""What mutation testing (round 5) of training/config.py found unchecked, pinned here (each expected value computed
independently, on tiny configs, on the CPU; no network is built except one PatchGAN):

- a loss weight that is NaN or infinite is refused like one that is not a number;
- ``train.scheduler.milestones``: 0 is a valid iteration, 2.5 is not;
- ``val.metrics``: the largest ``crop_border`` that the refusal suggests is accepted (and one more is refused), and
  the crop is measured against the validation images' own ``out_size``, not the training images';
- a discriminator takes sides up to 1024 (the top of the range its refusal names), not above;
- the PatchGAN refusal's fix names the size that ``n_layers - 1`` really takes;
- without ``datasets.train.out_size`` the images are 512x512 (the trainer's default) for the discriminator and
  the v2 Predict-mode rules;
- ``load_config``'s overrides (``--max-iters``) are merged key by key and checked like the file (pinned before
  only through whole command-line runs);
- basicsr's GANLoss label options are accepted, and ``perceptual_opt.style_weight`` must be a number;
- two defects this round found, fixed: ``datasets.val.out_size`` is a whole number >= 1, and validation images
  smaller than SSIM's 11x11 window are refused when the config is read, not at the first validation.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.test_training_loop import tiny_vqfr_v2, tiny_vqgan_v1, tiny_vqgan_v2, write_config
from training.config import load_config, merge
from vqfr.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny configs; two threads only spin on a busy 2-core machine


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_a_loss_weight_that_is_not_finite_is_refused(tmp_path, weight):
    """docs/TRAINING.md: a loss weight that is not a number is refused when the config is read; YAML's ``.nan`` and
    ``.inf`` are floats, but no finite loss comes out of them."""
    cfg = merge(tiny_vqfr_v2(), {"train": {"pixel_opt": {"loss_weight": weight}}})
    with pytest.raises(ConfigError, match="weights.yml") as err:
        load_config(write_config(cfg, tmp_path / "weights.yml"))
    assert f"train.pixel_opt.loss_weight is {weight!r}" in str(err.value) and err.value.fix == "use a number"


def test_milestones_take_iteration_0_and_refuse_a_fraction(tmp_path):
    """``scheduler.milestones`` are whole numbers >= 0 (``_check_numbers``): 0 loads as given, 2.5 is refused with
    the fix showing a list of iterations."""
    scheduler = {"type": "MultiStepLR", "milestones": [0, 3], "gamma": 0.5}
    cfg = merge(tiny_vqgan_v2(), {"train": {"scheduler": scheduler}})
    assert load_config(write_config(cfg, tmp_path / "ok.yml"))["train"]["scheduler"]["milestones"] == [0, 3]
    cfg["train"]["scheduler"]["milestones"] = [2.5]
    with pytest.raises(ConfigError, match=re.escape("train.scheduler.milestones is [2.5]")) as err:
        load_config(write_config(cfg, tmp_path / "bad.yml"))
    assert "milestones: [" in err.value.fix


@pytest.mark.parametrize(("metric", "least"), [("calculate_psnr", 1), ("calculate_ssim", 11)])
def test_the_largest_crop_border_the_refusal_suggests_is_accepted(tmp_path, metric, least):
    """On 16x16 validation images a crop must leave one pixel (PSNR) or one 11x11 window (SSIM): the fix names the
    largest crop that does, which loads, and one pixel more is refused."""
    largest = max(c for c in range(9) if 16 - 2 * c >= least)  # PSNR 7, SSIM 2
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1"}
    cfg["val"] = {"metrics": {"m": {"type": metric, "crop_border": largest + 1}}}
    with pytest.raises(ConfigError, match="val.metrics.m.crop_border") as err:
        load_config(write_config(cfg, tmp_path / "crop.yml"))
    assert err.value.fix == f"use a crop_border of at most {largest}"
    cfg["val"]["metrics"]["m"]["crop_border"] = largest
    assert load_config(write_config(cfg, tmp_path / "crop.yml"))["val"]["metrics"]["m"]["crop_border"] == largest


def test_the_crop_border_is_measured_against_the_validation_images(tmp_path):
    """Validation images of 32x32 (training 16x16): an SSIM crop of 8 leaves 16x16 of them and loads; 11 leaves
    10x10 and is refused, naming the 32x32 images."""
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1", "out_size": 32}
    cfg["val"] = {"metrics": {"ssim": {"type": "calculate_ssim", "crop_border": 8}}}
    load_config(write_config(cfg, tmp_path / "val.yml"))
    cfg["val"]["metrics"]["ssim"]["crop_border"] = 11
    with pytest.raises(ConfigError, match="of the 32x32 validation images"):
        load_config(write_config(cfg, tmp_path / "val.yml"))


@pytest.mark.parametrize("size", [0, -16, 2.5])
def test_a_validation_size_that_is_not_a_whole_number_above_0_is_refused(tmp_path, size):
    """``datasets.val.out_size`` is checked like ``datasets.train.out_size``. It was not: 0 failed later in OpenCV,
    2.5 became 2 and failed in the model, -16 was accepted (a defect found by mutation testing, round 5)."""
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"val": {"dataroot_gt": "synthetic:2", "out_size": size}}})
    with pytest.raises(ConfigError, match=re.escape(f"datasets.val.out_size is {size!r}")):
        load_config(write_config(cfg, tmp_path / "v.yml"))
    cfg["datasets"]["val"]["out_size"] = "3.2e1"  # YAML's string for 3.2e1, accepted as for the other whole numbers
    assert load_config(write_config(cfg, tmp_path / "v.yml"))["datasets"]["val"]["out_size"] == 32


def test_validation_images_too_small_for_ssim_are_refused_when_the_config_is_read(tmp_path):
    """8x8 validation images with the default metrics (PSNR and SSIM, no crop): SSIM's 11x11 window does not fit.
    The config loaded, and the run stopped at its first validation; now it is refused at once, naming the metric,
    and loads with PSNR alone."""
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2", "out_size": 8}
    with pytest.raises(ConfigError, match=r"val\.metrics\.ssim needs validation images of at least 11x11 pixels; "
                                          r"they are 8x8") as err:
        load_config(write_config(cfg, tmp_path / "small.yml"))
    assert "datasets.val.out_size to 11 or more" in err.value.fix
    cfg["val"] = {"metrics": {"psnr": {"type": "calculate_psnr"}}}
    assert load_config(write_config(cfg, tmp_path / "small.yml"))["datasets"]["val"]["out_size"] == 8


@pytest.mark.parametrize(("side", "accepted"), [(512, True), (1024, True), (2048, False)])
def test_a_discriminator_takes_sides_up_to_1024(tmp_path, side, accepted):
    """The refusal says a discriminator takes a power of two in [8, 1024]: 1024 (the top) loads, 2048 does not."""
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"train": {"out_size": side}}, "network_d": {"out_size": side}})
    path = write_config(cfg, tmp_path / "d.yml")
    if accepted:
        assert load_config(path)["datasets"]["train"]["out_size"] == side
    else:
        with pytest.raises(ConfigError, match=re.escape("power of two in [8, 1024]")):
            load_config(path)


def test_the_wavelet_discriminator_needs_16_pixel_images_when_the_config_is_read(tmp_path):
    """SWADiscriminator's head gets 2x2 features from 8x8 images (it failed at its first forward, when the GAN
    started): 8 is refused when the config is read, with StyleGAN2Discriminator named; 16 loads, and StyleGAN2 at 8
    loads too."""
    from training.discriminators import SWADiscriminator

    cfg = merge(tiny_vqgan_v1(), {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8}})
    cfg["train"]["perceptual_opt"] = None
    assert cfg["network_d"]["type"] == "SWADiscriminator"
    with pytest.raises(ConfigError, match=re.escape("power of two in [16, 1024]")) as err:
        load_config(write_config(cfg, tmp_path / "swa8.yml"))
    assert "StyleGAN2Discriminator also takes 8" in err.value.fix
    with pytest.raises(ConfigError, match="at least 16"):  # the class refuses it too, for callers without a config
        SWADiscriminator(8, narrow=1 / 16)
    sixteen = merge(tiny_vqgan_v1(), {"datasets": {"train": {"out_size": 16}}, "network_d": {"out_size": 16}})
    assert load_config(write_config(sixteen, tmp_path / "swa16.yml"))["network_d"]["out_size"] == 16
    stylegan = merge(tiny_vqgan_v2(), {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8}})
    stylegan["train"]["perceptual_opt"] = None  # VGG16 needs 16x16 too; the discriminator is what is checked here
    stylegan["val"] = {"metrics": {"psnr": {"type": "calculate_psnr"}}}  # and so does SSIM's window
    assert stylegan["network_d"]["type"] == "StyleGAN2Discriminator"
    assert load_config(write_config(stylegan, tmp_path / "sg8.yml"))["network_d"]["out_size"] == 8


def test_the_patchgan_fix_names_the_size_that_one_layer_fewer_takes(tmp_path):
    """A 3-layer PatchGAN on 16x16 images is refused; the fix's "n_layers 2 takes NxN" is the smallest side that a
    real 2-layer NLayerDiscriminator runs on."""
    from training.discriminators import NLayerDiscriminator

    d = NLayerDiscriminator(3, 4, 2).eval()

    def runs(side: int) -> bool:
        try:
            d(torch.zeros(1, 3, side, side))
        except RuntimeError:
            return False
        return True

    least = next(side for side in range(1, 64) if runs(side))
    cfg = merge(tiny_vqfr_v2(), {"network_d_local": {"n_layers": 3}})
    with pytest.raises(ConfigError, match="n_layers 3") as err:
        load_config(write_config(cfg, tmp_path / "patch.yml"))
    assert f"n_layers 2 takes {least}x{least}" in err.value.fix


def test_without_out_size_the_training_images_are_512(tmp_path):
    """The trainer reads ``datasets.train.out_size`` as 512 when it is left out (the official size): a v2 config
    whose discriminator and Predict-mode grid (128 x patch 4) fit 512x512 loads; a discriminator of 256 is refused,
    naming 512x512."""
    grid = {"quantizer_opt": {"spatial_size": [128, 128]}}
    cfg = merge(tiny_vqfr_v2(), {"network_sr": grid, "network_g": grid, "network_d": {"out_size": 512}})  # a copy
    del cfg["datasets"]["train"]["out_size"]
    assert "out_size" not in load_config(write_config(cfg, tmp_path / "default.yml"))["datasets"]["train"]
    cfg["network_d"]["out_size"] = 256
    with pytest.raises(ConfigError, match="network_d.out_size is 256 but the training images are 512x512"):
        load_config(write_config(cfg, tmp_path / "default.yml"))


def test_overrides_are_merged_key_by_key_and_checked(tmp_path):
    """``load_config(path, overrides)`` (``--max-iters``): the override wins, the rest of its block stays, and a bad
    override is refused like a bad file."""
    path = write_config(tiny_vqgan_v2(), tmp_path / "c.yml")
    cfg = load_config(path, {"train": {"total_iter": "3"}})
    assert cfg["train"]["total_iter"] == 3 and cfg["train"]["ema_decay"] == 0.5
    with pytest.raises(ConfigError, match="train.total_iter is 0"):
        load_config(path, {"train": {"total_iter": 0}})


def test_gan_label_values_are_accepted_and_style_weight_must_be_a_number(tmp_path):
    """basicsr's GANLoss options ``real_label_val`` / ``fake_label_val`` (as the official ymls write them) load; a
    ``perceptual_opt.style_weight`` that is not a number is refused, naming it."""
    gan = {"type": "GANLoss", "gan_type": "wgan_softplus", "loss_weight": 0.1, "real_label_val": 1.0,
           "fake_label_val": 0.0}
    cfg = merge(tiny_vqfr_v2(), {"train": {"gan_opt": gan}})
    assert load_config(write_config(cfg, tmp_path / "gan.yml"))["train"]["gan_opt"] == gan
    cfg = merge(tiny_vqfr_v2(), {"train": {"perceptual_opt": {"style_weight": "high"}}})
    with pytest.raises(ConfigError, match="train.perceptual_opt.style_weight is 'high'"):
        load_config(write_config(cfg, tmp_path / "style.yml"))
