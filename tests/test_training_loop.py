"""The training loop on tiny configurations (16x16 faces): both stages, both versions, checkpoints, resume, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vqfr
from training.config import load_config, merge
from training.recipes import unwrap
from training.train import main as train_main
from training.trainer import Trainer, latest_state
from vqfr.errors import CheckpointError, ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]

_V2_NET = {"base_channels": 32, "channel_multipliers": [1, 1, 2], "num_enc_blocks": 1, "use_enc_attention": True,
           "num_dec_blocks": 1, "use_dec_attention": True, "code_dim": 16,
           "quantizer_opt": {"type": "L2VectorQuantizer", "num_code": 32, "code_dim": 16, "spatial_size": [4, 4]}}
_V1_CORE = {"base_channels": 32, "proj_patch_size": 4, "resolution_scale_rates": [1, 2, 2],
            "channel_multipliers": [1, 1, 2], "encoder_num_blocks": 1, "decoder_num_blocks": 1,
            "quant_level": ["Level_4"]}


def _v1_quantizer(**kw) -> dict:
    opts = {"type": "L2VectorQuantizerKmeans", "in_dim": 64, "num_code": 16, "code_dim": 8, "reservoir_size": 64,
            "reestimate_iters": 2000, "reestimate_maxiters": -1, "warmup_iters": -1}
    return {"Level_4": {**opts, **kw}}


def _common(model_type: str, lr: float = 1e-3) -> dict:
    adam = {"type": "Adam", "lr": lr, "betas": [0.9, 0.96]}
    return {
        "name": "tiny", "model_type": model_type, "manual_seed": 0, "amp": "none",
        "datasets": {"train": {"dataroot_gt": "synthetic:4", "out_size": 16, "use_hflip": True, "degradation": "v2",
                               "batch_size_per_gpu": 2, "num_worker_per_gpu": 0}},
        "train": {"total_iter": 30, "ema_decay": 0.5, "optim_d": adam,
                  "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0},
                  "perceptual_opt": {"type": "LPIPS", "perceptual_weight": 1.0, "random_vgg": True},
                  "r1_reg_weight": 10, "net_d_reg_every": 4},
        "logger": {"print_freq": 1, "save_checkpoint_freq": 1000, "use_tb_logger": False},
    }


def tiny_vqfr_v2(lr: float = 1e-3) -> dict:
    cfg = _common("VQFRv2Model", lr)
    cfg["network_sr"] = {"type": "VQFRv2", **_V2_NET, "inpfeat_dim": 32, "code_selection_mode": "Predict",
                         "align_opt": {"cond_channels": 32, "deformable_groups": 4}}
    cfg["network_g"] = {"type": "VQGANv2", **_V2_NET}
    cfg["network_d"] = {"type": "StyleGAN2Discriminator", "out_size": 16, "narrow": 1 / 16}
    cfg["network_d_local"] = {"type": "NLayerDiscriminator", "input_nc": 3, "ndf": 8, "n_layers": 2}
    adam = {"type": "Adam", "lr": lr, "betas": [0.9, 0.96]}
    cfg["train"].update({"optim_sr_enc": adam, "optim_sr_maindec": adam, "gan_opt": {"gan_type": "wgan_softplus"},
                         "patch_gan_opt": {"gan_type": "hinge"}, "generator_d_local_weight": 0.5,
                         "quant_feature_opt": {"loss_weight": 1.0}, "quant_index_opt": {"loss_weight": 1.0},
                         "gan_start_iter": 10})
    return cfg


def tiny_vqgan_v1(lr: float = 1e-3) -> dict:
    cfg = _common("VQGANModel", lr)
    cfg["network_g"] = {"type": "VQGANv1", **_V1_CORE,
                        "quantizer_opt": _v1_quantizer(reestimate_iters=5, reestimate_maxiters=16, warmup_iters=6)}
    cfg["network_d"] = {"type": "SWADiscriminator", "out_size": 16, "narrow": 1 / 16}
    cfg["train"].update({"optim_g": {"type": "Adam", "lr": lr, "betas": [0.9, 0.96]}, "codebook_loss_weight": 1.0,
                         "gan_opt": {"gan_type": "wgan_softplus"}, "gan_start_iter": 24, "kmeans_iters": 50})
    return cfg


def tiny_vqgan_v2() -> dict:
    cfg = _common("VQGANModel")
    cfg["network_g"] = {"type": "VQGANv2", **_V2_NET}
    cfg["network_d"] = {"type": "StyleGAN2Discriminator", "out_size": 16, "narrow": 1 / 16}
    cfg["train"].update({"optim_g": {"type": "Adam", "lr": 1e-3}, "gan_opt": {"gan_type": "wgan_softplus"},
                         "gan_start_iter": 0})
    return cfg


def tiny_vqfr_v1() -> dict:
    cfg = _common("VQFRv1Model")
    align = {f"Level_{r}": {"cond_channels": 32, "cond_downscale_rate": r, "deformable_groups": 4} for r in (4, 2, 1)}
    cfg["network_sr"] = {"type": "VQFRv1", **_V1_CORE, "fix_keys": ["embedding"], "align_from_patch": 4,
                         "inpfeat_extraction_opt": {"in_dim": 3, "out_dim": 32}, "align_opt": align,
                         "quantizer_opt": _v1_quantizer()}
    cfg["network_g"] = {"type": "VQGANv1", **_V1_CORE, "quantizer_opt": _v1_quantizer()}
    for key in ("network_d_global", "network_d_main_global"):
        cfg[key] = {"type": "SWADiscriminator", "out_size": 16, "narrow": 1 / 16}
    for key in ("network_d_local", "network_d_main_local"):
        cfg[key] = {"type": "NLayerDiscriminator", "input_nc": 3, "ndf": 8, "n_layers": 2}
    cfg["train"].update({"optim_sr": {"type": "Adam", "lr": 1e-3, "betas": [0.5, 0.9]},
                         "pixel_main_opt": {"loss_weight": 0.0}, "latent_opt": {"Level_4": {"loss_weight": 1.0}},
                         "perceptual_opt": {"perceptual_weight": 1.0, "style_weight": 2000.0, "random_vgg": True},
                         "global_gan_opt": {"gan_type": "wgan_softplus"}, "patch_gan_opt": {"gan_type": "hinge"},
                         "generator_d_global_weight": 0.5, "generator_d_local_weight": 0.5,
                         "gan_start_iter": -1, "main_gan_start_iter": 1, "net_d_reg_every": 2, "total_iter": 3})
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_error(cfg: dict, config: Path, capsys) -> str:
    """Run ``python -m training.train`` on ``cfg`` written to ``config``: it must exit 2 with an error naming the
    file. Returns the error output."""
    code = train_main(["--config", str(write_config(cfg, config)), "--out", str(config.parent / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert config.name in err, err
    return err


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _falls(values: list[float], ratio: float) -> bool:
    """The mean of the last 10 values is below ``ratio`` times the mean of the first 10."""
    return sum(values[-10:]) / 10 < ratio * sum(values[:10]) / 10


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops run fastest on one thread, and a loaded 2-core machine does not make two threads spin.
    torch.set_num_threads(1)


def _assert_finite(recs: list[dict]) -> None:
    for r in recs:
        assert all(v == v and abs(v) != float("inf") for v in r.values() if isinstance(v, float)), r


def test_stage2_v2_thirty_steps_and_checkpoint_round_trip(tmp_path):
    cfg = tiny_vqfr_v2()
    cfg["datasets"]["train"]["batch_size_per_gpu"] = 4  # the whole (4-face) set every step: smoother curves
    cfg_path = write_config(cfg, tmp_path / "tiny_v2.yml")
    cfg = load_config(cfg_path)
    trainer = Trainer(cfg, tmp_path / "run")
    stage1 = copy.deepcopy(trainer.recipe.stage1.state_dict())
    start = {k: v.clone() for k, v in unwrap(trainer.net).state_dict().items()}
    trainer.train()
    recs = records(tmp_path / "run")
    assert [r["iter"] for r in recs] == list(range(1, 31))
    _assert_finite(recs)
    for key, ratio in (("l_rec", 0.95), ("l_quant_feature", 0.7), ("l_quant_index", 0.97), ("l_g_percep", 0.95)):
        assert _falls([r[key] for r in recs], ratio), (key, [round(r[key], 4) for r in recs])
    assert all("l_g_gan_global" not in r for r in recs[:10])
    for key in ("l_g_gan_global", "l_g_gan_local", "d_weight_local", "l_d_global", "l_d_local"):
        assert all(key in r for r in recs[10:]), key
    assert all("l_d_r1" in r for r in recs if r["iter"] > 10 and r["iter"] % 4 == 0)
    assert all(r["loss_total"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("l_g") or
                                                    k in ("l_rec", "l_quant_feature", "l_quant_index")), rel=1e-5)
               for r in recs)

    # v2 trains only encoder+feat2index and main_branch+inpfeat_extraction; the rest keeps the stage-1 weights
    trained = unwrap(trainer.net).state_dict()
    for name, value in trained.items():
        moved = not torch.equal(value, start[name])
        should = any(k in name for k in ("encoder", "feat2index", "main_branch", "inpfeat_extraction"))
        assert moved == should, name
        if name in stage1 and not should:
            assert torch.equal(value, stage1[name]), name

    # the released-layout checkpoint loads through the public API with the training config
    ckpt = tmp_path / "run" / "models" / "net_sr_30.pth"
    saved = torch.load(ckpt, weights_only=True)
    assert set(saved) == {"params", "params_ema"}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for options in (cfg_path, tmp_path / "run" / "config.yml"):
        model = vqfr.load_model(ckpt, options)
        with torch.no_grad():
            assert torch.equal(model(x), trainer.ema.model.eval()(x))
    for name, value in unwrap(trainer.net).state_dict().items():
        assert torch.equal(saved["params"][name], value)
    val = json.loads((tmp_path / "run" / "val_metrics.jsonl").read_text().splitlines()[-1]) if (
        tmp_path / "run" / "val_metrics.jsonl").exists() else None
    assert val is None  # no val block configured


def test_stage1_vqgan_v1_thirty_steps_with_kmeans(tmp_path):
    cfg = tiny_vqgan_v1()
    cfg["datasets"]["train"]["batch_size_per_gpu"] = 4
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:4", "max_images": 2}
    cfg["val"] = {"val_freq": 30, "save_img": 1}
    trainer = Trainer(cfg, tmp_path / "run")
    codebook0 = trainer.recipe.generator.quantizer.quantize_dict["Level_4"].embedding.weight.detach().clone()
    trainer.train()
    recs = records(tmp_path / "run")
    assert len(recs) == 30
    _assert_finite(recs)
    for key in ("l_rec", "l_g_percep"):
        assert _falls([r[key] for r in recs], 0.9), (key, [round(r[key], 4) for r in recs])
    assert all(r["l_codebook"] == 0 for r in recs[:5])  # quantization bypassed during the warm-up
    assert all(r["l_codebook"] > 0 for r in recs[6:])
    assert all("l_g_gan_global" in r for r in recs[24:]) and all("l_g_gan_global" not in r for r in recs[:24])
    log = (tmp_path / "run" / "train.log").read_text()
    assert re.findall(r"iter (\d+): k-means re-estimated", log) == ["5", "10", "15"]
    codebook = trainer.recipe.generator.quantizer.quantize_dict["Level_4"].embedding.weight
    assert not torch.allclose(codebook, codebook0)
    val = json.loads((tmp_path / "run" / "val_metrics.jsonl").read_text())
    assert val["iter"] == 30 and val["images"] == 2 and val["psnr"] > 5
    assert len(list((tmp_path / "run" / "visualization" / "30").glob("*.png"))) == 1


def test_stage1_vqgan_v2_with_bf16_autocast_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_vqgan_v2()
    cfg["amp"] = "bf16"
    cfg["train"]["total_iter"] = 3
    cfg["logger"]["use_tb_logger"] = True
    Trainer(cfg, tmp_path / "run").train()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    recs = records(tmp_path / "run")
    _assert_finite(recs)
    assert {"l_rec", "l_g_percep", "l_codebook", "l_g_gan_global", "l_d_global", "real_score_global",
            "fake_score_global"} <= set(recs[-1])
    assert vqfr.load_model(tmp_path / "run" / "models" / "net_g_3.pth", tmp_path / "run" / "config.yml")


def test_tensorboard_shows_one_run_after_resuming_an_older_state(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"].update(save_checkpoint_freq=2, use_tb_logger=True)
    run = tmp_path / "run"
    Trainer(cfg, run).train()
    resumed = Trainer(load_config(write_config(cfg, tmp_path / "c.yml"), {"train": {"total_iter": 3}}), run,
                      resume=run / "training_states" / "2.state")
    resumed.train()
    events = EventAccumulator(str(run / "tb"))  # reads both sessions' files, as TensorBoard does
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("train/loss_total")]
    # The abandoned iterations 3 and 4 are hidden; they used to show beside the new iteration 3.
    assert [step for step, _ in steps] == [1, 2, 3]
    assert steps[2][1] == pytest.approx(records(run)[-1]["loss_total"])


def test_stage2_v1_both_branches(tmp_path):
    cfg = tiny_vqfr_v1()
    trainer = Trainer(cfg, tmp_path / "run")
    embedding0 = trainer.recipe.generator.quantizer.quantize_dict["Level_4"].embedding.weight.detach().clone()
    trainer.train()
    recs = records(tmp_path / "run")
    _assert_finite(recs)
    last = recs[-1]
    for key in ("l_rec", "l_latent", "l_g_percep", "l_g_style", "l_g_percep_main", "l_g_style_main",
                "l_g_gan_global", "l_g_gan_local", "l_g_gan_global_main", "l_g_gan_local_main", "l_d_global",
                "l_d_local", "l_d_global_main", "l_d_local_main"):
        assert key in last, key
    assert "l_d_r1" in recs[1] and "l_d_r1_main" in recs[1]  # lazy R1 on even iterations
    assert "l_main_rec" not in last  # weight 0, as the official v1
    assert "l_g_gan_global_main" not in recs[0]  # the main-branch GAN starts after iteration 1
    # fix_keys: the codebook stays frozen
    assert torch.equal(trainer.recipe.generator.quantizer.quantize_dict["Level_4"].embedding.weight, embedding0)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    cfg = tiny_vqfr_v2()
    cfg["train"].update({"total_iter": 4, "gan_start_iter": 0, "net_d_reg_every": 2})
    cfg["logger"]["save_checkpoint_freq"] = 2
    straight = Trainer(cfg, tmp_path / "a")
    straight.train()
    resumed = Trainer(cfg, tmp_path / "b", resume=tmp_path / "a" / "training_states" / "2.state")
    assert resumed.start_iter == 2
    resumed.train()
    a = torch.load(tmp_path / "a" / "training_states" / "4.state", weights_only=True)
    b = torch.load(tmp_path / "b" / "training_states" / "4.state", weights_only=True)
    for part in ("nets", "ema"):
        flat_a = a[part] if part == "ema" else {f"{n}.{k}": v for n, sd in a[part].items() for k, v in sd.items()}
        flat_b = b[part] if part == "ema" else {f"{n}.{k}": v for n, sd in b[part].items() for k, v in sd.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), k
    assert records(tmp_path / "a")[-1]["loss_total"] == records(tmp_path / "b")[-1]["loss_total"]


def _one_step_run(out: Path) -> dict:
    """A 1-iteration VQGANv2 run saved at iteration 1 into ``out``; returns its config."""
    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 1
    cfg["logger"]["save_checkpoint_freq"] = 1
    Trainer(cfg, out).train()
    return cfg


def test_latest_state_ignores_interrupted_saves(tmp_path):
    # A save killed mid-write (SIGKILL, power loss) leaves its hidden temporary file beside the finished states.
    states = tmp_path / "training_states"
    states.mkdir()
    for name in ("2.state", "10.state", ".11.state.3f2a9c1e.partial.state", "backup.state"):
        (states / name).write_bytes(b"")
    assert latest_state(tmp_path) == states / "10.state"


def test_resume_explains_a_file_that_does_not_fit_and_keeps_the_run_config(tmp_path):
    cfg = _one_step_run(tmp_path / "run")
    saved_config = (tmp_path / "run" / "config.yml").read_text()
    wider = tiny_vqgan_v2()
    wider["network_g"]["base_channels"] = 64
    for other, resume, error, message in [
        (cfg, tmp_path / "run" / "models" / "net_g_1.pth", CheckpointError, "not a training state"),  # released
        (cfg, tmp_path / "run" / "config.yml", CheckpointError, "cannot be read as a training state"),
        (tiny_vqfr_v2(), tmp_path / "run", ConfigError, "does not match this config"),  # another stage
        (wider, tmp_path / "run", ConfigError, "does not match this config"),  # another architecture
    ]:
        with pytest.raises(error, match=message) as err:
            Trainer(other, tmp_path / "run", resume=resume)
        assert err.value.path is not None and err.value.fix
    # the failed resumes left the run's config.yml, which rebuilds its checkpoints, as it was
    assert (tmp_path / "run" / "config.yml").read_text() == saved_config
    assert vqfr.load_model(tmp_path / "run" / "models" / "net_g_1.pth", tmp_path / "run" / "config.yml")


def test_a_new_run_does_not_overwrite_an_earlier_run(tmp_path):
    cfg = _one_step_run(tmp_path / "run")
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "train.log"}
    other = copy.deepcopy(cfg)
    other["manual_seed"] = 1
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(other, tmp_path / "run")
    assert {p: p.read_bytes() for p in files} == files
    Trainer(cfg, tmp_path / "run", resume=tmp_path / "run").close()  # continuing it is what --resume is for


def test_a_failing_validation_does_not_cost_the_checkpoint_of_its_iteration(tmp_path):
    import cv2
    import numpy as np

    val = tmp_path / "val"
    val.mkdir()
    cv2.imwrite(str(val / "face.png"), np.zeros((16, 16, 3), np.uint8))
    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 1
    cfg["datasets"]["val"] = {"dataroot_gt": str(val)}
    cfg["logger"]["save_checkpoint_freq"] = 1
    trainer = Trainer(cfg, tmp_path / "run")
    (val / "face.png").unlink()  # gone after the start-up check: validation fails
    with pytest.raises(InputError, match="face.png"):
        trainer.train()
    assert latest_state(tmp_path / "run").name == "1.state"  # saved first, as basicsr does


def test_kmeans_reservoir_smaller_than_the_codebook_is_refused(tmp_path):
    cfg = tiny_vqgan_v1()
    cfg["network_g"]["quantizer_opt"]["Level_4"]["reservoir_size"] = 8  # 16 codes: k-means could never run
    with pytest.raises(ConfigError, match="reservoir_size"):
        Trainer(cfg, tmp_path / "run")


def test_cli_explains_missing_tensorboard(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = tiny_vqgan_v2()
    cfg["logger"]["use_tb_logger"] = True
    code = train_main(["--config", str(write_config(cfg, tmp_path / "tb.yml")), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "pip install" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    ({"logger": {"print_freq": 0}}, "logger.print_freq"),
    ({"train": {"total_iter": "many"}}, "train.total_iter"),
    ({"datasets": {"train": {"batch_size_per_gpu": "two"}}}, "batch_size_per_gpu"),
    ({"datasets": {"val": {"dataroot_lq": "val/lq"}}}, "datasets.val"),
    ({"datasets": ["train"]}, "datasets.train"),
])
def test_cli_explains_config_values_of_the_wrong_type(tmp_path, capsys, change, message):
    assert message in cli_error(merge(tiny_vqgan_v2(), change), tmp_path / "bad.yml", capsys)


def test_integer_options_may_be_written_in_exponent_notation(tmp_path):
    # YAML reads 8e5 (no dot) as a string; the official files write !!float 5e3 for the same reason.
    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = "8e5"
    cfg["logger"]["print_freq"] = "1e2"
    loaded = load_config(write_config(cfg, tmp_path / "exp.yml"))
    assert loaded["train"]["total_iter"] == 800000 and loaded["logger"]["print_freq"] == 100


def test_cli_explains_device_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg_path = write_config(tiny_vqgan_v2(), tmp_path / "c.yml")
    assert train_main(["--config", str(cfg_path), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_refuses_max_iters_below_one(tmp_path, capsys, value):
    cfg_path = write_config(tiny_vqgan_v2(), tmp_path / "c.yml")
    with pytest.raises(SystemExit):
        train_main(["--config", str(cfg_path), "--out", str(tmp_path / "o"), "--max-iters", value])
    assert "--max-iters" in capsys.readouterr().err


def test_discriminator_gradients_are_zeroed_every_step(tmp_path):
    cfg = tiny_vqfr_v2()
    cfg["train"]["optim_d"] = {"type": "Adam", "lr": 0.0}  # parameters stay put: the same step twice
    trainer = Trainer(cfg, tmp_path / "run")
    branch = trainer.recipe.branches["main"]
    branch.d_global.eval()  # no spectral-norm power iteration: both steps compute the same gradient
    fake, real = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    branch.discriminator_step(fake, real, 1, trainer.scaler_d, trainer.autocast())
    first = [p.grad.clone() for p in branch.d_global.parameters()]
    branch.discriminator_step(fake, real, 1, trainer.scaler_d, trainer.autocast())
    second = [p.grad for p in branch.d_global.parameters()]
    for a, b in zip(first, second, strict=True):  # the official v2 would accumulate: b == 2 * a
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    trainer.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "VQFRModel"}, "use model_type: VQFRv1Model"),
    ({"network_g": {"type": "VQGAN"}}, "use type: VQGANv1"),
    ({"network_g": {"quantizer_opt": {"Level_4": {"type": "L2VectorQuantizer"}}}}, "L2VectorQuantizerKmeans"),
])
def test_cli_explains_the_stale_official_v1_names(tmp_path, capsys, change, message):
    assert message in cli_error(merge(tiny_vqfr_v1(), change), tmp_path / "stale.yml", capsys)


def test_cli_runs_the_smoke_config_and_missing_vgg_weights_are_explained(tmp_path, capsys):
    cfg = load_config(ROOT / "training" / "configs" / "smoke_vqfr_v2.yml")
    assert cfg["train"]["perceptual_opt"]["random_vgg"] is True  # the smoke config needs no VGG file
    broken = tiny_vqfr_v2()
    broken["train"]["perceptual_opt"] = {"perceptual_weight": 1.0, "vgg_weights": str(tmp_path / "vgg16.pth")}
    code = train_main(["--config", str(write_config(broken, tmp_path / "b.yml")), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "vgg16.pth" in capsys.readouterr().err


def test_inference_code_never_imports_training():
    pattern = re.compile(r"^\s*(from|import)\s+training\b", re.M)
    for package in ("vqfr", "kernels", "export", "deploy"):
        for path in (ROOT / package).rglob("*.py") if (ROOT / package).is_dir() else []:
            assert not pattern.search(path.read_text()), path


def test_learning_rate_drops_on_the_iteration_after_each_milestone(tmp_path):
    # basicsr (and torch's MultiStepLR) step the scheduler once per finished iteration: iteration m still runs at
    # the old rate and iteration m + 1 at the decayed one (official milestones [500k, 650k]: 1e-4 until 500000).
    cfg = tiny_vqgan_v2()
    cfg["train"]["scheduler"] = {"type": "MultiStepLR", "milestones": [2, 3], "gamma": 0.5}
    trainer = Trainer(cfg, tmp_path / "run")
    lrs = []
    for it in range(1, 5):
        trainer._set_lr(it)
        lrs.append(trainer.g_optimizers["optim_g"].param_groups[0]["lr"])
    trainer.close()
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])


@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"warmup_iter": 100}}, "warmup_iter"),
    ({"train": {"pixel_opt": {"reduction": "sum"}}}, "reduction"),
])
def test_official_options_that_are_not_implemented_are_refused(tmp_path, change, message):
    base = tiny_vqgan_v2()
    base["train"]["warmup_iter"] = -1  # the official value (no warm-up) is accepted
    base["train"]["pixel_opt"]["reduction"] = "mean"
    Trainer(base, tmp_path / "ok").close()
    with pytest.raises(ConfigError, match=message):
        Trainer(merge(base, change), tmp_path / "bad")


def test_param_keys_pick_the_stage1_weights(tmp_path):
    from training.recipes import VQFRv2Recipe

    cfg = tiny_vqfr_v2()
    cfg["train"]["perceptual_opt"] = None
    stage1 = vqfr.build_model(cfg["network_g"])
    params = stage1.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in params.items()}
    torch.save({"params": params, "params_ema": ema}, tmp_path / "net_g.pth")
    cfg["path"] = {"pretrain_network_g": str(tmp_path / "net_g.pth"), "param_key_g": "params",
                   "pretrain_network_sr": str(tmp_path / "net_g.pth"), "param_key_sr": "params_ema"}
    recipe = VQFRv2Recipe(cfg)
    recipe.build_generator()
    key = "quantizer.embedding.weight"
    assert torch.equal(recipe.stage1.state_dict()[key], params[key])  # official param_key_g: params
    assert torch.equal(recipe.generator.state_dict()[key], ema[key])


def test_a_failed_init_detaches_and_closes_its_log_file(tmp_path, monkeypatch):
    import logging

    created = []

    class Recorded(logging.FileHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(logging, "FileHandler", Recorded)
    training_log = logging.getLogger("training")
    before = list(training_log.handlers)
    cfg = tiny_vqgan_v2()
    cfg["train"]["warmup_iter"] = 100  # refused after train.log is attached
    with pytest.raises(ConfigError, match="warmup_iter"):
        Trainer(cfg, tmp_path / "run")
    assert len(created) == 1 and created[0].baseFilename == str(tmp_path / "run" / "train.log")
    assert training_log.handlers == before
    assert created[0].stream is None  # closed: no file handle leaks into later runs


def test_resume_drops_the_records_of_iterations_after_the_state(tmp_path):
    from training.plot import read_metrics

    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 4
    cfg["logger"]["save_checkpoint_freq"] = 2
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    cfg["val"] = {"val_freq": 1}
    run = tmp_path / "run"
    Trainer(cfg, run).train()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "loss_to')  # a write cut off by a kill, without its newline
    resumed = Trainer(cfg, run, resume=run / "training_states" / "2.state")
    assert [r["iter"] for r in records(run)] == [1, 2]
    assert [json.loads(line)["iter"] for line in (run / "val_metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed.train()
    assert [r["iter"] for r in records(run)] == [1, 2, 3, 4]  # one consistent run, every line a record
    assert [json.loads(line)["iter"] for line in (run / "val_metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [r["iter"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_validation_crops_the_border_given_in_val_metrics(tmp_path):
    # basicsr's layout, as the official ymls (VQGAN: crop_border 4). Prediction: 10 inside a 2-pixel ring of 255,
    # reference 0. Cropping 2 pixels leaves a uniform error of 10: PSNR 20 log10(255 / 10); SSIM of two constant
    # images c1 / (10^2 + c1), c1 = (0.01 * 255)^2.
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1"}
    cfg["val"] = {"metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 2, "test_y_channel": False},
                              "ssim": {"type": "calculate_ssim", "crop_border": 2}}}
    trainer = Trainer(cfg, tmp_path / "run")
    gt = torch.full((3, 16, 16), -1.0)
    pred = torch.ones(1, 3, 16, 16)
    pred[..., 2:-2, 2:-2] = -1 + 2 * 10 / 255
    trainer.val_set = [{"lq": gt, "gt": gt, "name": "face"}]
    trainer.restore = lambda model, lq, ref: pred
    result = trainer.validate(1)
    trainer.close()
    c1 = (0.01 * 255) ** 2
    assert result["psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert result["ssim"] == pytest.approx(c1 / (100 + c1), abs=1e-6)


def test_validation_on_the_y_channel_when_val_metrics_asks(tmp_path):
    # basicsr's test_y_channel: true. Prediction 10 levels above a reference of 0 in every channel: in BT.601 luma
    # (16 + (24.966 B + 128.553 G + 65.481 R) / 255) the error is 10 * 219 / 255, the reference 16.
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1"}
    cfg["val"] = {"metrics": {"psnr": {"type": "calculate_psnr", "test_y_channel": True},
                              "ssim": {"type": "calculate_ssim", "test_y_channel": True},
                              "psnr_rgb": {"type": "calculate_psnr", "test_y_channel": False}}}
    trainer = Trainer(cfg, tmp_path / "run")
    gt = torch.full((3, 16, 16), -1.0)
    trainer.val_set = [{"lq": gt, "gt": gt, "name": "face"}]
    trainer.restore = lambda model, lq, ref: torch.full((1, 3, 16, 16), -1 + 2 * 10 / 255)
    result = trainer.validate(1)
    trainer.close()
    err, y_ref = 10 * 219 / 255, 16.0
    c1 = (0.01 * 255) ** 2
    assert result["psnr"] == pytest.approx(20 * math.log10(255 / err), abs=1e-9)
    assert result["ssim"] == pytest.approx((2 * y_ref * (y_ref + err) + c1) / (y_ref**2 + (y_ref + err) ** 2 + c1),
                                           abs=1e-9)
    assert result["psnr_rgb"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


@pytest.mark.parametrize(("metrics", "message"), [
    ({"psnr": {"type": "calculate_psnr", "crop_border": -1}}, "val.metrics.psnr.crop_border"),
    ({"psnr": {"type": "calculate_psnr", "crop_border": "four"}}, "val.metrics.psnr.crop_border"),
    ({"psnr": {"type": "calculate_psnr", "test_y_channel": "yes"}}, "val.metrics.psnr.test_y_channel"),
    ({"niqe": {"type": "calculate_niqe"}}, "val.metrics.niqe.type"),
    ({"psnr": {"type": "calculate_psnr", "crop_border": 8}}, "leaves less than 1x1 pixels"),  # of 16x16 images
    ({"ssim": {"type": "calculate_ssim", "crop_border": 3}}, "leaves less than 11x11 pixels"),
])
def test_validation_metrics_that_cannot_be_computed_are_refused(tmp_path, capsys, metrics, message):
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:1"}
    cfg["val"] = {"metrics": metrics}
    err = cli_error(cfg, tmp_path / "val.yml", capsys)
    assert message in err and "Fix:" in err


def test_saves_reach_the_disk_before_and_after_their_renames(tmp_path, monkeypatch):
    cfg = tiny_vqgan_v2()
    trainer = Trainer(cfg, tmp_path / "run")
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    trainer.save(1)
    trainer.close()
    run = tmp_path / "run"
    for path in (run / "models" / "net_g_1.pth", run / "training_states" / "1.state",  # before the renames
                 run / "models", run / "training_states"):  # the renames themselves
        assert path.stat().st_ino in synced, path


def test_frozen_generator_parameters_hold_no_gradient(tmp_path):
    # v2 freezes the texture decoder, but its last conv (shared with the main branch) keeps requires_grad for the
    # local discriminator's adaptive weight: its gradient must not pile up from one iteration to the next.
    cfg = tiny_vqfr_v2()
    cfg["train"]["gan_start_iter"] = 0
    trainer = Trainer(cfg, tmp_path / "run")
    trained = {id(p) for opt in trainer.g_optimizers.values() for g in opt.param_groups for p in g["params"]}
    batch = next(iter(trainer.loader))
    for it in range(1, 4):
        terms = trainer.step(batch, it)
    trainer.close()
    generator = unwrap(trainer.net)
    assert generator.get_parameter("decoder.conv_out.2.weight").requires_grad
    assert float(terms["d_weight_local"]) > 0  # the adaptive weight still sees the frozen layer
    frozen = [n for n, p in generator.named_parameters() if id(p) not in trained]
    assert "decoder.conv_out.2.weight" in frozen
    assert [n for n in frozen if generator.get_parameter(n).grad is not None] == []


@pytest.mark.parametrize("given", ["folder", "state"])
def test_resume_without_out_goes_on_in_the_resumed_run(tmp_path, monkeypatch, caplog, given):
    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = 2
    cfg["logger"]["save_checkpoint_freq"] = 2
    config = write_config(cfg, tmp_path / "c.yml")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # where the default experiments/<name> would go
    assert train_main(["--config", str(config), "--out", str(run)]) == 0
    resume = run if given == "folder" else run / "training_states" / "2.state"
    assert train_main(["--config", str(config), "--max-iters", "4", "--resume", str(resume)]) == 0
    assert [r["iter"] for r in records(run)] == [1, 2, 3, 4]
    assert (run / "training_states" / "4.state").is_file() and not (tmp_path / "experiments").exists()

    caplog.clear()
    assert train_main(["--config", str(config), "--max-iters", "3", "--resume", str(run)]) == 0
    assert "nothing to train: the run is at iteration 4 and train.total_iter is 3" in caplog.text


def _diverging_trainer(run: Path, total_iter: int, save_every: int, nan_weights_at: int,
                       inf_loss_at: int | None = None) -> Trainer:
    """A tiny VQGANv2 trainer whose weights turn NaN after step ``nan_weights_at``, and whose loss reads inf at step
    ``inf_loss_at`` with the weights left finite (a step fp16 AMP's GradScaler skipped)."""
    cfg = tiny_vqgan_v2()
    cfg["train"]["total_iter"] = total_iter
    cfg["logger"]["save_checkpoint_freq"] = save_every
    trainer = Trainer(cfg, run)
    step = trainer.step

    def diverging_step(batch, it):
        terms = step(batch, it)
        if it == inf_loss_at:
            terms = {**terms, "loss_total": torch.tensor(math.inf)}
        if it == nan_weights_at:
            with torch.no_grad():
                next(unwrap(trainer.net).parameters()).fill_(math.nan)
        return terms

    trainer.step = diverging_step
    return trainer


def test_weights_that_are_no_longer_finite_stop_the_run_before_they_are_saved(tmp_path, capsys):
    """A diverged run used to go on for days, saving NaN checkpoints and states, the newest of which ``--resume
    <run>`` then took."""
    from training.trainer import DivergedError

    run = tmp_path / "run"
    trainer = _diverging_trainer(run, total_iter=4, save_every=2, nan_weights_at=3)
    with pytest.raises(DivergedError, match="at iteration 4 the generator's weights are not finite") as err:
        trainer.train()
    assert "2.state" in err.value.fix and "lower learning rate" in err.value.fix
    assert [p.name for p in sorted((run / "training_states").iterdir())] == ["2.state"]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["net_g_2.pth"]
    assert "weights are not finite" in (run / "train.log").read_text()


def test_a_non_finite_loss_stops_the_run_at_once_when_the_weights_diverged(tmp_path, caplog):
    """A NaN loss used to be a warning only: the run trained on until its next save (5000 iterations in the
    official configs). A non-finite loss whose weights are still finite (a step fp16 AMP's GradScaler skipped)
    stays a warning."""
    from training.trainer import DivergedError

    run = tmp_path / "run"
    trainer = _diverging_trainer(run, total_iter=8, save_every=1000, nan_weights_at=3, inf_loss_at=2)
    with pytest.raises(DivergedError, match="at iteration 4 the generator's weights are not finite"):
        trainer.train()
    assert [r["iter"] for r in records(run)] == [1, 2, 3, 4]  # the record that shows the divergence is kept
    assert "iter 2: non-finite values" in caplog.text
    assert not (run / "training_states").exists() or not any((run / "training_states").iterdir())


def test_profile_iters_write_a_table_of_the_chosen_steps_only(tmp_path, capsys):
    """``--profile-iters``: the chosen iterations run under torch.profiler and leave profile_iter_N.md with the host
    operators by self time (on the CPU); the others leave nothing; bad lists are refused by the command line."""
    from training.train import build_parser

    cfg = tiny_vqfr_v2()
    cfg["train"].update({"total_iter": 2, "gan_start_iter": 0, "net_d_reg_every": 2})
    Trainer(cfg, tmp_path / "run", profile_iters=[2]).train()
    assert not (tmp_path / "run" / "profile_iter_1.md").exists()
    text = (tmp_path / "run" / "profile_iter_2.md").read_text()
    assert text.startswith("# Training step 2\n\nWall time of the profiled step: ")
    assert "## Host operators by self CPU time: " in text and "GPU kernels" not in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    assert 1 <= len(rows) <= 25
    names = [r[0].strip("| `") for r in rows]
    # iteration 2 holds the R1 penalty: a double backward through the discriminator's convolutions
    assert any(n.startswith("aten::convolution_backward") for n in names), names
    shares = [float(r[3].rstrip(" |%")) for r in rows]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    parser = build_parser()
    assert parser.parse_args(["--config", "c.yml", "--profile-iters", "160,161"]).profile_iters == (160, 161)
    assert parser.parse_args(["--config", "c.yml"]).profile_iters == ()
    for bad in ("0", "a,2", "3,,4"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--config", "c.yml", "--profile-iters", bad])
    assert "iteration" in capsys.readouterr().err


def test_step_profile_table_on_cuda_lists_device_kernels_apart_from_host_operators():
    """The CUDA branch of the profiled step's table, from scripted profiler events (microseconds): kernels by self
    device time (host-side events and ones without device time left out), then the host operators."""
    from types import SimpleNamespace

    from training.trainer import step_profile_table

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(key="conv_kernel", self_device_time_total=3000.0, count=4, device_type=cuda,
                              self_cpu_time_total=0.0),
              SimpleNamespace(key="blur_kernel", self_device_time_total=1000.0, count=2, device_type=cuda,
                              self_cpu_time_total=0.0),
              SimpleNamespace(key="idle_kernel", self_device_time_total=0.0, count=1, device_type=cuda,
                              self_cpu_time_total=0.0),
              SimpleNamespace(key="aten::convolution", self_device_time_total=500.0, count=4, device_type=cpu,
                              self_cpu_time_total=2000.0)]
    text = step_profile_table(events, 160, 4.25, cuda=True)
    kernels, host = text.split("## GPU kernels by self time: ")[1].split("## Host operators by self CPU time: ")
    assert kernels.startswith("4.00 ms in all")
    assert "| `conv_kernel` | 3.00 | 4 | 75.0% |" in kernels and "| `blur_kernel` | 1.00 | 2 | 25.0% |" in kernels
    assert "idle_kernel" not in text and "aten::convolution" not in kernels
    assert host.startswith("2.00 ms in all") and "| `aten::convolution` | 2.00 | 4 | 100.0% |" in host
    assert "Wall time of the profiled step: 4.250 s" in text
