"""Mistakes a new user makes with the trainer and its tools: a misspelt option, loss type or gan_type, ``--out``
naming a file, and the metrics CLI on the face files that ``python -m vqfr --aligned`` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_training_loop import tiny_vqfr_v1, tiny_vqfr_v2, write_config
from training.config import load_config, merge
from training.train import main as train_main
from training.trainer import Trainer
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


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_refuses_threads_below_one(tmp_path, capsys, value):
    # -1 used to end in a RuntimeError traceback from torch.set_num_threads, 0 was ignored.
    config = write_config(tiny_vqfr_v2(), tmp_path / "c.yml")
    with pytest.raises(SystemExit):
        train_main(["--config", str(config), "--out", str(tmp_path / "o"), "--max-iters", "1", "--threads", value])
    assert "--threads" in capsys.readouterr().err


def test_ctrl_c_says_how_to_go_on_and_the_resume_continues(tmp_path, capsys, monkeypatch):
    cfg = tiny_vqfr_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"]["save_checkpoint_freq"] = 2
    config = write_config(cfg, tmp_path / "c.yml")
    out = tmp_path / "run"
    step = Trainer.step

    def interrupted_at_3(self, batch, it):
        if it == 3:
            raise KeyboardInterrupt
        return step(self, batch, it)

    monkeypatch.setattr(Trainer, "step", interrupted_at_3)
    try:
        code = train_main(["--config", str(config), "--out", str(out)])
    except KeyboardInterrupt:  # caught here, or it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped from python -m training.train as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "iteration 2" in err and f"--resume {out}" in err and "Traceback" not in err
    monkeypatch.setattr(Trainer, "step", step)
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


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_training_image_is_named_without_a_worker_traceback(tmp_path, capsys, workers):
    import cv2

    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(2):
        cv2.imwrite(str(faces / f"{i}.png"), np.full((16, 16, 3), 60 * i, np.uint8))
    (faces / "broken.png").write_bytes((faces / "0.png").read_bytes()[:40])  # cut off, as by an interrupted copy
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {"dataroot_gt": str(faces), "batch_size_per_gpu": 3,
                                                        "num_worker_per_gpu": workers}}})
    config = write_config(cfg, tmp_path / "c.yml")
    assert train_main(["--config", str(config), "--out", str(tmp_path / "o"), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    # With workers, torch used to put the worker's whole traceback into the message.
    assert err.startswith("error: ") and "broken.png" in err and "Traceback" not in err, err


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
