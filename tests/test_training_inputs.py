"""Mistakes a new user makes with the trainer and its tools: a misspelt option, loss type or gan_type, ``--out``
naming a file, and the metrics CLI on the face files that ``python -m vqfr --aligned`` writes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training_loop import tiny_vqfr_v1, tiny_vqfr_v2, tiny_vqgan_v2, write_config
from training.config import load_config, merge
from training.train import main as train_main
from training.trainer import Trainer, latest_state
from vqfr.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize(("cfg", "change", "message"), [
    # Each of these used to train on silently (or, for gan_type, failed only when the GAN started, 5000
    # iterations into a real run).
    (tiny_vqfr_v2, {"train": {"gan_opt": {"gan_type": "wgan_softpls"}}}, "train.gan_opt.gan_type"),
    (tiny_vqfr_v2, {"train": {"patch_gan_opt": {"gan_type": "hing"}}}, "train.patch_gan_opt.gan_type"),
    (tiny_vqfr_v2, {"train": {"pixel_opt": {"type": "MSELoss"}}}, "pixel_opt takes type L1Loss"),
    (tiny_vqfr_v2, {"train": {"quant_index_opt": {"type": "CrossEntropy"}}}, "CrossEntropyLoss"),
    (tiny_vqfr_v1, {"train": {"latent_opt": {"Level_4": {"type": "L1Loss"}}}}, "train.latent_opt.Level_4.type"),
    (tiny_vqfr_v2, {"train": {"gan_strat_iter": 3}}, "did you mean 'gan_start_iter'"),
    (tiny_vqfr_v2, {"train": {"percetual_opt": {"perceptual_weight": 1.0}}}, "did you mean 'perceptual_opt'"),
    (tiny_vqfr_v2, {"network_d_locl": {"type": "NLayerDiscriminator", "ndf": 8, "n_layers": 2}},
     "did you mean 'network_d_local'"),
    (tiny_vqfr_v2, {"val": {"test_which": "texture"}}, "val.test_which"),
])
def test_misspelt_names_are_refused_when_the_config_is_read(tmp_path, cfg, change, message):
    path = write_config(merge(cfg(), change), tmp_path / "typo.yml")
    with pytest.raises(ConfigError, match="typo.yml") as err:
        load_config(path)
    assert message in str(err.value)


def test_the_official_option_names_are_accepted(tmp_path):
    # Every loss block with its official type, as the official ymls write them.
    cfg = tiny_vqfr_v1()
    for key, kind in [("pixel_opt", "L1Loss"), ("pixel_main_opt", "L1Loss"), ("perceptual_opt", "LPIPS"),
                      ("global_gan_opt", "GANLoss"), ("patch_gan_opt", "GANLoss")]:
        cfg["train"][key]["type"] = kind
    cfg["train"]["latent_opt"] = {"type": "MultiQuantMatchLoss", "Level_4": {"type": "MSELoss", "loss_weight": 1.0}}
    cfg["val"] = {"test_which": "texture_branch"}
    load_config(write_config(cfg, tmp_path / "v1.yml"))


def test_an_unknown_gan_type_is_refused_before_the_first_step(tmp_path):
    # The trainer may also be given a config that load_config did not check.
    cfg = tiny_vqfr_v2()
    cfg["train"]["patch_gan_opt"] = {"gan_type": "hing"}
    with pytest.raises(ConfigError, match="hing"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_out_naming_a_file_is_explained(tmp_path, capsys):
    out = tmp_path / "runs"
    out.write_text("not a folder")
    config = write_config(tiny_vqfr_v2(), tmp_path / "c.yml")
    assert train_main(["--config", str(config), "--out", str(out), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--out" in err
    assert out.read_text() == "not a folder"
    below = out / "run"  # a parent that is a file
    assert train_main(["--config", str(config), "--out", str(below), "--max-iters", "1"]) == 2
    assert str(below) in capsys.readouterr().err


def test_psnr_ssim_cli_pairs_the_faces_that_vqfr_restored(tmp_path, capsys):
    import cv2

    from training.metrics import main as metrics_main
    from training.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "restored_faces").mkdir()
    refs, outs = {}, {}
    for name in ("a", "b_00"):  # a reference whose own name ends in _00, as the sample faces' lfw_..._00
        refs[name] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        outs[name] = np.clip(refs[name].astype(int) + rng.integers(-9, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "gt" / f"{name}.png"), refs[name])
        # python -m vqfr --aligned writes restored_faces/<name>_00.png for the face of <name>.png
        cv2.imwrite(str(tmp_path / "restored_faces" / f"{name}_00.png"), outs[name])
    cv2.imwrite(str(tmp_path / "restored_faces" / "stray.png"), outs["a"])
    args = ["psnr-ssim", "--restored", str(tmp_path / "restored_faces"), "--gt", str(tmp_path / "gt")]
    code = metrics_main(["--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert sorted(r["name"] for r in result["images"]) == ["a_00", "b_00_00"]
    expected = np.mean([psnr(outs[n], refs[n]) for n in refs])
    assert result["mean"]["psnr"] == pytest.approx(expected)
    assert result["mean"]["ssim"] == pytest.approx(np.mean([ssim(outs[n], refs[n]) for n in refs]))
    assert "stray.png" in captured.err  # left out, and said so
    assert metrics_main([*args, "--json"]) == 0  # the flag also works after the command, where users put it
    assert json.loads(capsys.readouterr().out) == result


def _official_correction(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The official evaluation script's arithmetic, written out: float32 images on [0, 1], each channel's mean
    shifted and its deviation scaled to the reference's, twice; returned on the [0, 255] scale."""
    out, gt = img.astype(np.float32) / 255, ref.astype(np.float32) / 255
    for c in range(out.shape[2]):
        for _ in range(2):
            out[..., c] = out[..., c] - np.mean(out[..., c]) + np.mean(gt[..., c])
            out[..., c] = out[..., c] / np.std(out[..., c]) * np.std(gt[..., c])
    return out.astype(np.float64) * 255


def _metrics_json(capsys, argv: list[str]) -> dict:
    from training.metrics import main as metrics_main

    code = metrics_main(["--json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_psnr_ssim_cli_corrects_mean_and_variance_as_the_official_script(tmp_path, capsys):
    """--correct-mean-var: the official calculate_psnr_ssim.py always matches each channel's mean and deviation to
    the reference's first; numbers compared with the paper's need it. A restored image that differs from its
    reference only by a gain and an offset per channel then scores as (all but) identical."""
    import cv2

    from training.metrics import correct_mean_var, psnr, ssim

    rng = np.random.default_rng(1)
    for sub in ("gt", "out"):
        (tmp_path / sub).mkdir()
    ref = rng.integers(40, 200, (48, 48, 3), dtype=np.uint8)
    gained = np.clip(ref * np.array([0.5, 0.8, 1.2]) + np.array([60, -20, 5]), 0, 255).round().astype(np.uint8)
    noisy = np.clip(ref.astype(int) + rng.integers(-30, 31, ref.shape) + 12, 0, 255).astype(np.uint8)
    for name, img in (("gain", gained), ("noise", noisy)):
        cv2.imwrite(str(tmp_path / "gt" / f"{name}.png"), ref)
        cv2.imwrite(str(tmp_path / "out" / f"{name}.png"), img)
    args = ["psnr-ssim", "--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt")]
    plain = {r["name"]: r for r in _metrics_json(capsys, args)["images"]}
    corrected = {r["name"]: r for r in _metrics_json(capsys, [*args, "--correct-mean-var"])["images"]}
    assert plain["gain"]["psnr"] < 20 and corrected["gain"]["psnr"] > 40  # only rounding to 8 bits is left
    assert corrected["gain"]["ssim"] > 0.999
    official = _official_correction(noisy, ref)
    assert np.abs(correct_mean_var(noisy, ref) - official).max() < 1e-3
    assert corrected["noise"]["psnr"] == pytest.approx(psnr(official, ref), abs=1e-4)
    assert corrected["noise"]["ssim"] == pytest.approx(ssim(official, ref), abs=1e-6)
    assert corrected["noise"]["psnr"] > plain["noise"]["psnr"]  # the +12 offset no longer counts
    flat = np.full_like(ref, 90)  # no deviation to scale: shifted to the reference's mean, nothing divided by 0
    assert np.allclose(correct_mean_var(flat, ref), ref.reshape(-1, 3).mean(0))


def test_psnr_ssim_cli_on_the_y_channel_and_identical_images_in_strict_json(tmp_path, capsys):
    """--test-y-channel scores BT.601 luma, as the official script's option; an image identical to its reference
    has an infinite PSNR, written as null (strict JSON: Python wrote Infinity) and left out of the mean."""
    import cv2

    from training.metrics import bgr_to_y, psnr

    rng = np.random.default_rng(2)
    for sub in ("gt", "out"):
        (tmp_path / sub).mkdir()
    ref = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = np.clip(ref.astype(int) + rng.integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)
    for name, img in (("a", out), ("same", ref)):
        cv2.imwrite(str(tmp_path / "gt" / f"{name}.png"), ref)
        cv2.imwrite(str(tmp_path / "out" / f"{name}.png"), img)
    args = ["psnr-ssim", "--restored", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--test-y-channel"]
    result = _metrics_json(capsys, args)  # json.loads refuses nothing; check strictness on the text below
    rows = {r["name"]: r for r in result["images"]}
    y_err = bgr_to_y(out) - bgr_to_y(ref)
    assert rows["a"]["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean(y_err**2)), abs=1e-9)
    assert rows["a"]["psnr"] != pytest.approx(psnr(out, ref), abs=0.01)
    assert rows["same"]["psnr"] is None and rows["same"]["ssim"] == pytest.approx(1.0)
    assert result["mean"]["psnr"] == pytest.approx(rows["a"]["psnr"])
    from training.metrics import main as metrics_main

    metrics_main(["--json", *args])
    assert "Infinity" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_refuses_threads_below_one(tmp_path, capsys, value):
    # -1 used to end in a RuntimeError traceback from torch.set_num_threads, 0 was ignored.
    config = write_config(tiny_vqfr_v2(), tmp_path / "c.yml")
    with pytest.raises(SystemExit):
        train_main(["--config", str(config), "--out", str(tmp_path / "o"), "--max-iters", "1", "--threads", value])
    assert "--threads" in capsys.readouterr().err


def interrupt_training_at(monkeypatch, at: int) -> None:
    """Make every Trainer raise KeyboardInterrupt (Ctrl-C) when it reaches iteration ``at``."""
    step = Trainer.step

    def interrupted(self, batch, it):
        if it == at:
            raise KeyboardInterrupt
        return step(self, batch, it)

    monkeypatch.setattr(Trainer, "step", interrupted)


def test_ctrl_c_says_how_to_go_on_and_the_resume_continues(tmp_path, capsys, monkeypatch):
    cfg = tiny_vqfr_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"]["save_checkpoint_freq"] = 2
    config = write_config(cfg, tmp_path / "c.yml")
    out = tmp_path / "run"
    interrupt_training_at(monkeypatch, 3)
    try:
        code = train_main(["--config", str(config), "--out", str(out)])
    except KeyboardInterrupt:  # caught here, or it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped from python -m training.train as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "iteration 2" in err and f"--resume {out}" in err and "Traceback" not in err
    monkeypatch.undo()  # the real step again
    assert train_main(["--config", str(config), "--resume", str(out)]) == 0
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_wrong_resume_path_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without --out a run goes to experiments/<name> here
    config = write_config(tiny_vqfr_v2(), tmp_path / "c.yml")
    assert train_main(["--config", str(config), "--resume", str(tmp_path / "rnu")]) == 2  # a typo of "run"
    assert "rnu" in capsys.readouterr().err
    checkpoint = tmp_path / "net_sr_5.pth"  # a checkpoint where a training state belongs
    torch.save({"params": {}}, checkpoint)
    assert train_main(["--config", str(config), "--resume", str(checkpoint), "--out", str(tmp_path / "new")]) == 2
    assert "not a training state" in capsys.readouterr().err
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "new").exists()


def test_resuming_into_a_folder_that_holds_another_run_is_refused(tmp_path, capsys):
    """``--resume A --out B`` wrote A's continuation over the checkpoints and states of the run in B."""
    cfg = tiny_vqfr_v2()
    cfg["train"]["total_iter"] = 2
    cfg["logger"]["save_checkpoint_freq"] = 2
    config = write_config(cfg, tmp_path / "c.yml")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for out in (run_a, run_b):
        assert train_main(["--config", str(config), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in sorted((run_b / "training_states").iterdir())}
    assert train_main(["--config", str(config), "--resume", str(run_a), "--out", str(run_b), "--max-iters", "4"]) == 2
    err = capsys.readouterr().err
    assert "already holds another training run" in err and str(run_b) in err
    assert {p.name: p.read_bytes() for p in sorted((run_b / "training_states").iterdir())} == before
    # its own folder, or a new one, still take the resume
    assert train_main(["--config", str(config), "--resume", str(run_a), "--out", str(tmp_path / "c"),
                       "--max-iters", "3"]) == 0
    assert train_main(["--config", str(config), "--resume", str(run_b), "--max-iters", "3"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    # These used to end in a KeyError or ValueError traceback when the data loaded.
    ({"datasets": {"train": {"degradation": "v3"}}}, "datasets.train.degradation is 'v3'"),
    ({"datasets": {"train": {"blur_sigma": [15, 1]}}}, "datasets.train: blur_sigma"),
    ({"datasets": {"train": {"kernel_list": ["iso", "generalized"]}}}, "kernel_list"),
    ({"datasets": {"train": {"noise_range": 20}}}, "datasets.train: noise_range must be [low, high]"),
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2", "degradation": "V2"}}}, "datasets.val.degradation"),
    # a ValueError traceback from numpy (probabilities) or OpenCV (kernel) when the first batch loaded
    ({"datasets": {"train": {"kernel_prob": [1.5, -0.5]}}}, "datasets.train: kernel_prob [1.5, -0.5]"),
    ({"datasets": {"train": {"blur_kernel_size": -1}}}, "datasets.train: blur_kernel_size"),
    # trained on silently: OpenCV clamps a JPEG quality to [0, 100]; a negative noise sigma is meaningless
    ({"datasets": {"train": {"jpeg_range": [30, 900]}}}, "datasets.train: jpeg_range must lie in [0, 100]"),
    ({"datasets": {"train": {"noise_range": [-20, -10]}}}, "datasets.train: noise_range must be >= 0"),
])
def test_bad_degradation_options_are_refused_when_the_config_is_read(tmp_path, capsys, change, message):
    config = write_config(merge(tiny_vqfr_v2(), change), tmp_path / "deg.yml")
    assert train_main(["--config", str(config), "--out", str(tmp_path / "o"), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "deg.yml" in err and message in err


@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"net_d_reg_every": 0}}, "train.net_d_reg_every"),  # was a ZeroDivisionError when the GAN started
    ({"train": {"gan_start_iter": "soon"}}, "train.gan_start_iter"),  # was a ValueError traceback
])
def test_bad_gan_schedule_options_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(merge(tiny_vqfr_v2(), change), tmp_path / "gan.yml"))


@pytest.mark.parametrize(("change", "message"), [
    # torch's ValueError traceback once the networks were built
    ({"train": {"optim_sr_enc": {"lr": -1e-4}}}, "train.optim_sr_enc: Invalid learning rate"),
    ({"train": {"optim_d": {"type": "Adam", "lr": 1e-4, "betas": [0.9, 1.5]}}}, "train.optim_d: Invalid beta"),
    ({"train": {"optim_sr_maindec": {"type": "Adam", "lr": 1e-4, "momentum": 0.9}}}, "train.optim_sr_maindec"),
    # numpy's ValueError traceback when the first batch loaded
    ({"manual_seed": -1}, "manual_seed is -1"),
    # trained on silently: 1 kept the initial weights as params_ema (which load_model prefers), 1.5 diverged
    ({"train": {"ema_decay": 1}}, "train.ema_decay is 1"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay is 1.5"),
    # validated on all images but the last one
    ({"datasets": {"val": {"dataroot_gt": "synthetic:3", "max_images": -1}}}, "datasets.val.max_images is -1"),
    # "StyleGAN2Discriminator was built for 32x32 inputs" when the GAN started (official: 5000 iterations in)
    ({"network_d": {"out_size": 32}}, "network_d.out_size is 32 but the training images are 16x16"),
    ({"network_d": {"out_size": 24}, "datasets": {"train": {"out_size": 24}}},
     "datasets.train.out_size is 24, but network_d (StyleGAN2Discriminator) takes square images whose side is a power"),
    # an unnamed ValueError at the first validation (val_freq iterations in), or TypeError/ValueError at the start
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2"}}, "val": {"fidelity_ratio": "high"}},
     "val.fidelity_ratio is 'high'"),
    ({"train": {"pixel_opt": {"loss_weight": "one"}}}, "train.pixel_opt.loss_weight is 'one'"),
    ({"train": {"scheduler": {"type": "MultiStepLR", "milestones": 400000}}}, "train.scheduler.milestones is 400000"),
    ({"train": {"scheduler": {"type": "MultiStepLR", "milestones": [10], "gamma": "half"}}},
     "train.scheduler.gamma is 'half'"),
    # a quoted "false" is a non-empty string: bool() took it for true (flips on, TensorBoard on ...)
    ({"datasets": {"train": {"use_hflip": "false"}}}, "datasets.train.use_hflip is 'false', not true or false"),
    ({"logger": {"use_tb_logger": "no"}}, "logger.use_tb_logger is 'no'"),
    ({"path": {"strict_load_g": 0}}, "path.strict_load_g is 0"),
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2"}}, "val": {"save_img": "false"}}, "val.save_img is 'false'"),
])
def test_values_that_cannot_train_are_refused_when_the_config_is_read(tmp_path, change, message):
    path = write_config(merge(tiny_vqfr_v2(), change), tmp_path / "values.yml")
    with pytest.raises(ConfigError, match="values.yml") as err:
        load_config(path)
    assert message in str(err.value) and err.value.fix


@pytest.mark.parametrize(("cfg", "change", "message"), [
    # "Kernel size can't be greater than actual input size" when the GAN started (gan_start_iter in)
    (tiny_vqfr_v2, {"network_d_local": {"n_layers": 3}},
     "network_d_local (NLayerDiscriminator, n_layers 3) needs images of at least 24x24"),
    # trained at 32 without complaint; load_model, the runtime and export then ran the network at 16
    (tiny_vqfr_v2, {"datasets": {"train": {"out_size": 32}}, "network_d": {"out_size": 32}},
     "network_sr (VQFRv2, Predict mode) restores 16x16 faces"),
    # the network failed at the first iteration (GroupNorm over a 1x1 map)
    (tiny_vqgan_v2, {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8},
                     "network_g": {"channel_multipliers": [1, 1, 1, 1, 2]}}, "network_g (VQGANv2) downsamples by 16"),
    # the validation images failed the same way at the first validation
    (tiny_vqgan_v2, {"datasets": {"val": {"dataroot_gt": "synthetic:2", "out_size": 18}}},
     "datasets.val.out_size is 18, but network_g (VQGANv2) downsamples by 4"),
    # "Output size is too small" in VGG16's fourth max-pool at the first iteration
    (tiny_vqgan_v2, {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8}},
     "the perceptual loss's VGG16 needs images of at least 16x16"),
])
def test_image_sizes_a_network_cannot_take_are_refused_when_the_config_is_read(tmp_path, cfg, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(write_config(merge(cfg(), change), tmp_path / "sizes.yml"))
    assert "out_size is" in str(err.value) and err.value.fix


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_the_patchgan_size_rule_matches_the_discriminator(n_layers):
    from training.config import _patchgan_side
    from training.discriminators import NLayerDiscriminator

    d = NLayerDiscriminator(3, 4, n_layers).eval()
    least = 3 * 2**n_layers
    for size in (least - 1, least, least + 5):
        if _patchgan_side(size, n_layers) < 1:
            with pytest.raises(RuntimeError):
                d(torch.zeros(1, 3, size, size))
        else:
            assert d(torch.zeros(1, 3, size, size)).shape[-1] == _patchgan_side(size, n_layers)
    assert _patchgan_side(least - 1, n_layers) < 1 <= _patchgan_side(least, n_layers)


def test_values_at_the_edge_of_their_range_are_accepted(tmp_path):
    cfg = merge(tiny_vqfr_v2(), {"manual_seed": 0, "train": {"ema_decay": 0, "optim_d": {"lr": 0.0},
                                                         "scheduler": {"milestones": ["5e5", 6.5e5], "gamma": "0.5"}},
                                 "datasets": {"val": {"dataroot_gt": "synthetic:3", "max_images": "2", "seed": 0},
                                              "train": {"jpeg_range": [0, 100], "noise_range": [0, 0],
                                                        "kernel_prob": [1.0, 0.0]}}})
    loaded = load_config(write_config(cfg, tmp_path / "edge.yml"))
    assert loaded["datasets"]["val"]["max_images"] == 2  # was a TypeError (slice indices) as a string


def test_gan_start_iterations_may_be_written_in_exponent_notation(tmp_path):
    cfg = merge(tiny_vqfr_v1(), {"train": {"gan_start_iter": -1, "main_gan_start_iter": "5e3"}})
    loaded = load_config(write_config(cfg, tmp_path / "exp.yml"))
    assert (loaded["train"]["gan_start_iter"], loaded["train"]["main_gan_start_iter"]) == (-1, 5000)
    trainer = Trainer(loaded, tmp_path / "run")  # used to fail: int("5e3")
    assert trainer.recipe.branches["main"].start_iter == 5000
    trainer.close()


@pytest.mark.parametrize(("option", "value"), [("color_jitter_prob", 0.3), ("gray_prob", 0.01), ("recon_prob", 0.1),
                                               ("crop_components", True), ("dataset_enlarge_ratio", 10)])
def test_official_data_options_that_are_not_implemented_are_refused(tmp_path, option, value):
    # FFHQDegradationDataset and basicsr's sampler options: they used to be ignored, changing the data silently.
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {option: value}}})
    with pytest.raises(ConfigError, match=f"datasets.train.{option}"):
        load_config(write_config(cfg, tmp_path / "data.yml"))
    off = merge(tiny_vqfr_v2(), {"datasets": {"train": {option: {"crop_components": False,
                                                                  "dataset_enlarge_ratio": 1}.get(option)}}})
    load_config(write_config(off, tmp_path / "off.yml"))  # the official files' values are accepted


def test_plot_refuses_a_window_below_one(tmp_path, capsys):
    from training.plot import main as plot_main

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iter": 1, "loss_total": 1.0}\n')
    with pytest.raises(SystemExit):  # was a ZeroDivisionError traceback
        plot_main([str(metrics), "-o", str(tmp_path / "c.png"), "--window", "0"])
    assert "--window" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    # A misspelt loss_weight used to leave the default weight 1 (pixel_main_opt: {loss_wieght: 0} turned the loss on);
    # a misspelt perceptual option ended in a TypeError traceback.
    ({"train": {"pixel_opt": {"loss_wieght": 0.0}}}, "train.pixel_opt.loss_wieght is not an option (did you mean "
                                                     "'loss_weight'?)"),
    ({"train": {"perceptual_opt": {"style_wieght": 2000.0}}}, "did you mean 'style_weight'"),
    ({"train": {"global_gan_opt": {"gan_typ": "hinge"}}}, "did you mean 'gan_type'"),
    ({"train": {"latent_opt": {"Level_4": {"loss_weigt": 1.0}}}}, "train.latent_opt.Level_4.loss_weigt"),
])
def test_misspelt_loss_options_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match="loss.yml") as err:
        load_config(write_config(merge(tiny_vqfr_v1(), change), tmp_path / "loss.yml"))
    assert message in str(err.value)


@pytest.mark.parametrize(("change", "message"), [
    # Each of these used to be ignored: the run trained with the default (or without the section) and said nothing.
    ({"datasets": {"train": {"use_hfilp": False}}}, "datasets.train.use_hfilp is not an option (did you mean "
                                                    "'use_hflip'?)"),
    ({"datasets": {"train": {"batch_size": 8}}}, "did you mean 'batch_size_per_gpu'"),
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2", "max_image": 1}}}, "did you mean 'max_images'"),
    ({"datasets": {"vall": {"dataroot_gt": "synthetic:2"}}}, "datasets.vall is not an option (did you mean 'val'?)"),
    ({"logger": {"print_frq": 10}}, "logger.print_frq is not an option (did you mean 'print_freq'?)"),
    ({"logger": {"save_checkpoint_frequency": 10}}, "did you mean 'save_checkpoint_freq'"),
    ({"path": {"pretrain_network_s": "sr.pth"}}, "path.pretrain_network_s is not an option (did you mean "
                                                 "'pretrain_network_sr'?)"),
    ({"path": {"param_key": "params"}}, "path.param_key is not an option"),
    ({"val": {"val_frequency": 2}}, "val.val_frequency is not an option (did you mean 'val_freq'?)"),
    ({"val": {"fidelity": 0.5}}, "did you mean 'fidelity_ratio'"),
    ({"loger": {"print_freq": 10}}, "loger is not an option (did you mean 'logger'?)"),
    ({"logger": 100}, "logger is not a mapping"),
    ({"dist_params": {"backnd": "gloo"}}, "dist_params.backnd is not an option (did you mean 'backend'?)"),
    ({"dist_params": "gloo"}, "dist_params is not a mapping"),
    # official options that are not implemented, refused unless off
    ({"path": {"resume_state": "run/training_states/5000.state"}}, "--resume"),
    ({"path": {"pretrain_network_d": "d.pth"}}, "path.pretrain_network_d"),
    ({"logger": {"wandb": {"project": "vqfr"}}}, "logger.wandb"),
    ({"datasets": {"train": {"io_backend": {"type": "lmdb"}}}}, "datasets.train.io_backend"),
    ({"datasets": {"train": {"mean": [0.485, 0.456, 0.406]}}}, "datasets.train.mean"),
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2", "scale": 4}}}, "datasets.val.scale"),
    ({"scale": True}, "scale is True"),  # YAML true is not the off value 1, though Python says True == 1
])
def test_misspelt_section_options_are_refused_when_the_config_is_read(tmp_path, change, message):
    path = write_config(merge(tiny_vqfr_v2(), change), tmp_path / "keys.yml")
    with pytest.raises(ConfigError, match="keys.yml") as err:
        load_config(path)
    assert message in str(err.value)


def test_every_official_option_the_trainer_implements_or_leaves_off_is_accepted(tmp_path):
    # The options of the official train_vqfr_v{1,2} / train_vqgan_v{1,2} ymls outside the network and train blocks,
    # with the values the official files give them, and the options of ours.
    official = {
        "num_gpu": "auto", "scale": 1, "syncbn": True, "find_unused_parameters": True,
        "dist_params": {"backend": "nccl", "port": 29500},
        "datasets": {
            "train": {"name": "FFHQ", "type": "FFHQDegradationDataset", "io_backend": {"type": "disk"},
                      "use_hflip": True, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "out_size": 16,
                      "blur_kernel_size": 41, "kernel_list": ["iso", "aniso"], "kernel_prob": [0.5, 0.5],
                      "blur_sigma": [1, 15], "downsample_range": [1, 30], "noise_range": [0, 20],
                      "jpeg_range": [30, 90], "use_shuffle": True, "num_worker_per_gpu": 0, "batch_size_per_gpu": 2,
                      "dataset_enlarge_ratio": 1, "prefetch_mode": None},
            "val": {"name": "validation", "type": "PairedImageDataset", "dataroot_gt": "synthetic:2",
                    "io_backend": {"type": "disk"}, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": 1,
                    "out_size": 16, "max_images": 1, "seed": 7, "degradation": "v1", "jpeg_range": [60, 100]}},
        "path": {"pretrain_network_g": None, "param_key_g": "params", "strict_load_g": None,
                 "pretrain_network_d": None, "param_key_d": "params", "strict_load_d": None,
                 "pretrain_network_sr": None, "param_key_sr": "params", "strict_load_sr": False,
                 "pretrain_network_d_local": None, "resume_state": None, "ignore_resume_networks": ["network_g"]},
        "val": {"val_freq": 5000.0, "save_img": True, "test_which": "main_branch", "fidelity_ratio": 1.0,
                "metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 0, "test_y_channel": False}}},
        "logger": {"print_freq": 100, "save_checkpoint_freq": 5000.0, "use_tb_logger": False,
                   "wandb": {"project": None, "resume_id": None}},
    }
    load_config(write_config(merge(tiny_vqfr_v2(), official), tmp_path / "official.yml"))
    for path in sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.yml")):
        load_config(path)  # every shipped config


@pytest.mark.parametrize("setup_error", ["missing data folder", "bad VGG weights"])
def test_an_error_during_setup_is_written_to_train_log_once(tmp_path, capsys, caplog, setup_error):
    cfg = tiny_vqfr_v2()
    if setup_error == "missing data folder":
        cfg["datasets"]["train"]["dataroot_gt"] = str(tmp_path / "ffhq_512")
        culprit = "ffhq_512"
    else:
        (tmp_path / "vgg16.pth").write_bytes(b"not a checkpoint")
        cfg["train"]["perceptual_opt"] = {"perceptual_weight": 1.0, "vgg_weights": str(tmp_path / "vgg16.pth")}
        culprit = "vgg16.pth"
    out = tmp_path / "run"
    assert train_main(["--config", str(write_config(cfg, tmp_path / "c.yml")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count(culprit) >= 1 and err.count("error: ") == 1, err
    log = (out / "train.log").read_text()
    stopped = [line for line in log.splitlines() if "ERROR" in line]
    assert len(stopped) == 1 and culprit in stopped[0], log  # once, with the reason
    # only into the file: the console has the stderr line already, not a second copy through the root logger
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("key", ["datasets.train.dataroot_gt", "datasets.val.dataroot_gt",
                                 "datasets.val.dataroot_lq"])
def test_a_missing_data_folder_is_named_by_its_option_before_the_networks_are_built(tmp_path, monkeypatch, key):
    import training.recipes

    cfg = tiny_vqfr_v2()
    cfg["datasets"]["val"] = {"name": "val", "dataroot_gt": "synthetic:2", "out_size": 32}
    section, option = key.split(".")[1:]
    cfg["datasets"][section][option] = str(tmp_path / "nowhere")
    built = []
    recipe = training.recipes.RECIPES[cfg["model_type"]]
    assert "build_generator" in vars(recipe)  # patch the method the trainer calls, not an overridden one
    monkeypatch.setattr(recipe, "build_generator", lambda self: built.append(self) or 1 / 0)
    with pytest.raises(ConfigError, match=key) as exc:
        Trainer(load_config(write_config(cfg, tmp_path / "c.yml")), tmp_path / "run", device="cpu").close()
    assert "nowhere" in str(exc.value) and built == []


def _write_faces(folder: Path, count: int, broken: int = 0) -> None:
    import cv2

    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((16, 16, 3), 20 * i, np.uint8))
    png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    for i in range(broken):  # cut off, as by an interrupted copy
        (folder / f"broken{i}.png").write_bytes(png[:40])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_training_image_is_skipped_with_a_warning(tmp_path, workers):
    # It used to stop the run (exit 2) when the sampler first drew it, possibly days into a run.
    faces = tmp_path / "faces"
    _write_faces(faces, 4, broken=1)
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {"dataroot_gt": str(faces), "batch_size_per_gpu": 2,
                                                        "num_worker_per_gpu": workers}}})
    out = tmp_path / "o"
    assert train_main(["--config", str(write_config(cfg, tmp_path / "c.yml")), "--out", str(out),
                       "--max-iters", "5"]) == 0  # 2 epochs of 2 batches and more: broken0.png drawn twice
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    warnings = [line for line in (out / "train.log").read_text().splitlines() if "broken0.png" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings  # named once, not once per epoch
    assert "another image" in warnings[0]


def test_unreadable_images_stay_counted_across_a_resume(tmp_path):
    """A run resumed again and again (a preemptible cluster) must not start its count of unreadable files at zero
    each time, or the 1% limit could never be reached."""
    faces = tmp_path / "faces"
    _write_faces(faces, 4, broken=1)
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {"dataroot_gt": str(faces), "batch_size_per_gpu": 2}},
                                 "logger": {"save_checkpoint_freq": 5}})
    config, out = write_config(cfg, tmp_path / "c.yml"), tmp_path / "o"
    assert train_main(["--config", str(config), "--out", str(out), "--max-iters", "5"]) == 0
    state = torch.load(out / "training_states" / "5.state", weights_only=True)
    assert list(state["unreadable"]["files"]) == [str(faces / "broken0.png")] and state["unreadable"]["drawn"] >= 10
    trainer = Trainer(load_config(config, {"train": {"total_iter": 6}}), out, device="cpu", resume=out)
    try:
        assert trainer._unreadable == state["unreadable"]["files"] and trainer._drawn == state["unreadable"]["drawn"]
    finally:
        trainer.close()
    assert "met 1 unreadable training images so far" in (out / "train.log").read_text()


def test_a_corrupt_image_is_replaced_by_a_readable_one_the_same_way_every_time(tmp_path):
    from training.data import FaceDataset

    _write_faces(tmp_path / "faces", 4, broken=1)
    ds = FaceDataset(str(tmp_path / "faces"), 16, use_hflip=False)
    bad = [p.name for p in ds.source.files].index("broken0.png")
    item = ds[bad]
    assert item["gt"].shape == (3, 16, 16) and "broken0.png" in item["skipped"]
    assert torch.equal(ds[bad]["gt"], item["gt"])  # deterministic: an exact resume draws the same image
    assert json.loads(ds[0]["skipped"]) == []  # a readable image: nothing skipped


@pytest.mark.parametrize(("good", "broken", "workers"), [(0, 3, 1), (2, 12, 0)])
def test_a_training_folder_of_mostly_corrupt_images_stops_with_a_clear_error(tmp_path, capsys, good, broken, workers):
    faces = tmp_path / "faces"
    _write_faces(faces, good, broken=broken)
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {"dataroot_gt": str(faces), "batch_size_per_gpu": 2,
                                                        "num_worker_per_gpu": workers}}})
    out = tmp_path / "o"
    assert train_main(["--config", str(write_config(cfg, tmp_path / "c.yml")), "--out", str(out),
                       "--max-iters", "20"]) == 2
    err = capsys.readouterr().err
    # named, without the traceback that torch puts into the message of an error in a DataLoader worker
    assert err.startswith("error: ") and "could not be read" in err and "broken" in err and "Traceback" not in err
    assert "could not be read" in (out / "train.log").read_text()


def test_a_corrupt_validation_image_is_named_at_the_start_and_left_out_of_every_validation(tmp_path):
    # It used to stop the run at its first validation, hours in, after that iteration's checkpoint.
    val = tmp_path / "val"
    _write_faces(val, 3, broken=1)
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"val": {"dataroot_gt": str(val)}}, "train": {"total_iter": 2},
                                  "val": {"val_freq": 1}})
    out = tmp_path / "o"
    trainer = Trainer(cfg, out, device="cpu")
    named = [line for line in (out / "train.log").read_text().splitlines() if "broken0.png" in line]
    assert len(named) == 1 and "WARNING" in named[0] and "left out" in named[0], named  # before any iteration
    trainer.train()
    scored = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["images"]) for r in scored] == [(1, 3), (2, 3)]
    assert all(np.isfinite(r["psnr"]) for r in scored)
    assert sum("broken0.png" in line for line in (out / "train.log").read_text().splitlines()) == 1


@pytest.mark.parametrize("bad", ["corrupt", "not square"])
def test_a_validation_set_of_mostly_bad_images_is_refused_before_training(tmp_path, capsys, bad):
    import cv2

    val = tmp_path / "val"
    _write_faces(val, 1, broken=2 if bad == "corrupt" else 0)
    if bad == "not square":
        for name in ("wide0.png", "wide1.png"):
            cv2.imwrite(str(val / name), np.zeros((16, 24, 3), np.uint8))
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"val": {"dataroot_gt": str(val)}}})
    out = tmp_path / "o"
    assert train_main(["--config", str(write_config(cfg, tmp_path / "c.yml")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 of the 3 validation images could not be read" in err, err
    assert ("broken0.png" if bad == "corrupt" else "wide0.png") in err
    assert not (out / "metrics.jsonl").exists() and not list((out / "training_states").glob("*.state"))


def test_resuming_an_older_state_sets_the_newer_states_and_checkpoints_aside(tmp_path):
    cfg = tiny_vqfr_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"]["save_checkpoint_freq"] = 2
    config = write_config(cfg, tmp_path / "c.yml")
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(run)]) == 0
    abandoned = {p.relative_to(run): p.read_bytes() for p in (run / "training_states" / "4.state",
                                                              run / "models" / "net_sr_4.pth")}
    # go back to iteration 2 and train another future up to 3
    assert train_main(["--config", str(config), "--resume", str(run / "training_states" / "2.state"),
                       "--max-iters", "3"]) == 0
    assert [p.name for p in sorted((run / "training_states").iterdir())] == ["2.state", "3.state"]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["net_sr_2.pth", "net_sr_3.pth"]
    (aside,) = (run / "superseded").iterdir()  # nothing deleted: the abandoned future is kept out of the way
    assert {p: (aside / p).read_bytes() for p in abandoned} == abandoned
    assert [json.loads(line)["iter"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [3, 4]
    assert f"moved the training states and checkpoints after iteration 2 to {aside}" in (run / "train.log").read_text()
    # the folder's latest state is the new future's
    assert latest_state(run).name == "3.state"


def test_unreadable_images_are_a_share_of_the_folder_on_every_rank_of_a_multi_gpu_run():
    # Under torchrun each rank draws another slice of the folder every epoch, so over the epochs it meets every
    # unreadable file. 0.5% of the files unreadable (under the 1% that is skipped) used to stop an 8-GPU run after a
    # few epochs: the share was taken of one epoch's slice (1/8 of the folder) rather than of the folder.
    from training.data import EpochSampler
    from vqfr.errors import InputError

    files, world, batch = 8000, 8, 4

    def run(bad: set[int], epochs: int) -> Trainer:
        trainer = Trainer.__new__(Trainer)  # only what _count_unreadable reads
        trainer.train_set = type("Folder", (), {"root": "faces", "__len__": lambda self: files})()
        trainer.world, trainer._unreadable, trainer._drawn = world, {}, 0
        sampler, it = EpochSampler(files, batch, world, rank=3), 0
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for indices in sampler:
                it += 1
                skipped = [json.dumps([[f"{i}.png", "truncated"]] if i in bad else []) for i in indices]
                trainer._count_unreadable({"gt": torch.zeros(len(indices), 1), "skipped": skipped}, it)
        return trainer

    trainer = run(set(range(0, files, 200)), epochs=12)  # 40 files, 0.5%
    assert len(trainer._unreadable) > 20  # this rank met most of them, and went on
    with pytest.raises(InputError, match="could not be read"):
        run(set(range(0, files, 50)), epochs=12)  # 160 files, 2%: stopped


def test_a_resume_that_fails_to_start_leaves_the_later_states_in_place(tmp_path, capsys, monkeypatch):
    # Resuming from an older state sets the later states aside, but only once the run can start: a setup error
    # (here TensorBoard missing, checked last) used to come after the move, so a run that never trained had
    # already abandoned the later states, and `--resume <run>` then took the older one.
    import sys

    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"].update({"save_checkpoint_freq": 2, "use_tb_logger": True})
    config = write_config(cfg, tmp_path / "c.yml")
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(run)]) == 0
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert train_main(["--config", str(config), "--resume", str(run / "training_states" / "2.state")]) == 2
    assert "pip install" in capsys.readouterr().err
    assert latest_state(run).name == "4.state" and not (run / "superseded").exists()
    assert [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 4
