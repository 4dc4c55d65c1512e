"""What mutation testing of the training command lines and recipes found unchecked: the default output folder and
the line naming it (in a real process), the go-on command after Ctrl-C (latest state, ``--max-iters`` kept, and that
it works), ``--threads``, an unreadable or invalid config named, the panels, x values, repeated iterations, moving
average, ``--keys`` and ``--title`` of ``training.plot``, refusals of ``val_freq`` / ``save_checkpoint_freq`` 0, the
size rules' defaults (PatchGAN ``n_layers`` 3, perceptual weight 1) and fixes that are accepted when applied, and the
documented defaults of ``d_local_loss_weight`` (v1 0.5, v2 1), ``fidelity_ratio`` (1) and ``codebook_loss_weight`` (1).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training_inputs import interrupt_training_at
from tests.test_training_loop import records, tiny_vqfr_v1, tiny_vqfr_v2, tiny_vqgan_v2, write_config
from training.config import load_config, merge
from training.train import main as train_main
from vqfr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(_two_threads):
    """Each test starts at one torch thread (``--threads`` changes it); conftest's ``_two_threads`` puts the count
    back after it."""
    torch.set_num_threads(1)


# --- python -m training.train ---------------------------------------------------------------------------------------

def test_a_run_without_out_goes_to_experiments_slash_its_name(tmp_path, monkeypatch, caplog):
    """docs/TRAINING.md: without ``--out`` a run goes to ``experiments/<name>`` (the config's ``name``, not the
    file's), and the first line logged names the folder."""
    cfg = tiny_vqgan_v2()
    cfg["name"] = "my_run"
    config = write_config(cfg, tmp_path / "other_file_name.yml")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="training")
    assert train_main(["--config", str(config), "--max-iters", "1"]) == 0
    run = Path("experiments") / "my_run"
    assert [r["iter"] for r in records(tmp_path / run)] == [1]
    assert not (tmp_path / "experiments" / "other_file_name").exists()
    first = [r.getMessage() for r in caplog.records if r.name == "training"][0]
    assert first == f"output folder: {run}"


def test_the_real_command_names_its_output_folder_on_stdout_and_exits_2_on_an_error(tmp_path):
    """In a real process (logging set up by the command, not by pytest): rank 0 logs the output folder first on
    stdout, and a config error (a missing data folder) exits 2 with the error, naming the option, on stderr."""
    cfg = tiny_vqgan_v2()
    cfg["datasets"]["train"]["dataroot_gt"] = str(tmp_path / "no_faces")
    config = write_config(cfg, tmp_path / "c.yml")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config), "--out",
                           str(tmp_path / "o"), "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"output folder: {tmp_path / 'o'}" in done.stdout.splitlines()[0]
    assert "no_faces" in done.stderr and "error:" in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_names_the_latest_state_and_its_command_goes_on_with_the_same_max_iters(tmp_path, capsys,
                                                                                        monkeypatch):
    """The Ctrl-C message names the newest of several states and repeats ``--max-iters``; the command it prints,
    run as printed, finishes the run at that iteration (not the config's 30)."""
    cfg = tiny_vqgan_v2()
    cfg["logger"]["save_checkpoint_freq"] = 1
    config = write_config(cfg, tmp_path / "c.yml")
    out = tmp_path / "run"
    interrupt_training_at(monkeypatch, 3)
    assert train_main(["--config", str(config), "--out", str(out), "--max-iters", "4"]) == 130
    err = capsys.readouterr().err
    assert "the latest state is iteration 2;" in err  # states 1 and 2 were saved
    command = err.split("go on with: ", 1)[1].strip()
    assert command.startswith("python -m training.train ") and command.endswith("--max-iters 4")
    monkeypatch.undo()  # the real step again
    assert train_main(command.split()[3:]) == 0
    assert [r["iter"] for r in records(out)] == [1, 2, 3, 4]


def test_threads_sets_the_number_of_torch_threads(tmp_path, capsys):
    """``--threads N`` is torch.set_num_threads(N) (docs: ``--threads 1`` avoids OpenMP spinning), set even before
    the config is read."""
    assert torch.get_num_threads() == 1
    assert train_main(["--config", str(tmp_path / "missing.yml"), "--threads", "3"]) == 2
    assert torch.get_num_threads() == 3


def test_an_unreadable_or_invalid_config_is_named_with_exit_status_2(tmp_path, capsys):
    """A mistyped ``--config`` path and a file that is not YAML are errors naming the file, not a traceback."""
    missing = tmp_path / "trian.yml"
    assert train_main(["--config", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "cannot read the config" in err
    broken = tmp_path / "broken.yml"
    broken.write_text("train: {total_iter: 5\n")
    assert train_main(["--config", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "is not valid YAML" in err
    assert not (tmp_path / "o").exists()


# --- python -m training.plot ----------------------------------------------------------------------------------------

@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures that ``training.plot`` saves, kept for inspection."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _write_metrics(path: Path) -> None:
    """Iterations 1-3, then a resume from iteration 1 that logged 2-5 again with other values."""
    lines = [{"iter": i, "epoch": 0, "loss_total": 10.0 + i, "l_rec": 1.0 + i, "lr_optim_g": 1e-3,
              "d_weight_local": 0.1} for i in (1, 2, 3)]
    lines += [{"iter": i, "epoch": 0, "loss_total": 2.0 * i, "l_rec": 0.5 * i, "l_g_percep": 0.25 * i,
               "lr_optim_g": 1e-3, "d_weight_local": 0.1} for i in (2, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def _panels(fig) -> dict[str, tuple[list, list, list]]:
    """{panel title: (iterations, raw values, moving average)} of the visible panels."""
    out = {}
    for ax in fig.axes:
        if ax.get_title():
            raw, mean = ax.get_lines()
            out[ax.get_title()] = (list(raw.get_xdata()), list(raw.get_ydata()), list(mean.get_ydata()))
    return out


def test_plot_draws_loss_total_and_every_loss_term_by_iteration_keeping_the_resumed_values(tmp_path, saved_figures):
    """Default panels: ``loss_total`` first, then the ``l_*`` terms (not ``lr_*``, ``epoch`` or diagnostics); the x
    axis is the iteration; a repeated iteration (a resume) shows its last record."""
    from training.plot import main as plot_main

    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    assert plot_main([str(metrics), "-o", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 0
    panels = _panels(saved_figures[-1])
    assert list(panels) == ["loss_total", "l_g_percep", "l_rec"]
    assert panels["loss_total"][:2] == ([1, 2, 3, 4, 5], [11.0, 4.0, 6.0, 8.0, 10.0])
    assert panels["l_g_percep"][:2] == ([2, 3, 4, 5], [0.5, 0.75, 1.0, 1.25])


def test_plot_window_keys_and_title_options_are_used(tmp_path, saved_figures):
    """``--window 2`` is a trailing mean over 2 iterations (fewer at the start), ``--keys`` picks the panels and
    ``--title`` is the figure's title."""
    from training.plot import main as plot_main

    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    assert plot_main([str(metrics), "-o", str(tmp_path / "c.png"), "--window", "2", "--keys", "l_rec,loss_total",
                      "--title", "run A"]) == 0
    fig = saved_figures[-1]
    panels = _panels(fig)
    assert list(panels) == ["l_rec", "loss_total"]
    raw = np.array(panels["loss_total"][1])
    expected = [raw[max(0, i - 1):i + 1].mean() for i in range(len(raw))]
    np.testing.assert_allclose(panels["loss_total"][2], expected)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "run A"


# --- refusals and fixes when the config is read ---------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    # a ZeroDivisionError (iteration % 0) at the first iteration, or never a checkpoint
    ({"datasets": {"val": {"dataroot_gt": "synthetic:2"}}, "val": {"val_freq": 0}}, "val.val_freq is 0"),
    ({"logger": {"save_checkpoint_freq": 0}}, "logger.save_checkpoint_freq is 0"),
    # NLayerDiscriminator's own default n_layers is 3 (needs 24x24): it failed only when the GAN started
    ({"network_d_local": {"n_layers": None}}, "network_d_local (NLayerDiscriminator, n_layers 3) needs images of "
                                              "at least 24x24"),
])
def test_intervals_of_0_and_the_default_patchgan_depth_are_refused(tmp_path, change, message):
    cfg = merge(tiny_vqfr_v2(), change)
    if cfg["network_d_local"]["n_layers"] is None:
        del cfg["network_d_local"]["n_layers"]
        from training.discriminators import build_discriminator

        with pytest.raises(RuntimeError):  # what the refusal spares the user, gan_start_iter iterations in
            build_discriminator(cfg["network_d_local"]).eval()(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="refuse.yml") as err:
        load_config(write_config(cfg, tmp_path / "refuse.yml"))
    assert message in str(err.value) and err.value.fix


def test_the_perceptual_size_rule_applies_with_the_default_perceptual_weight(tmp_path):
    """``perceptual_opt`` without ``perceptual_weight`` has the weight 1 (PerceptualLoss's default): VGG16 runs."""
    from training.losses import PerceptualLoss

    assert PerceptualLoss(random_vgg=True).perceptual_weight == 1.0
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"train": {"out_size": 8}}, "network_d": {"out_size": 8}})
    cfg["train"]["perceptual_opt"] = {"type": "LPIPS", "random_vgg": True}
    with pytest.raises(ConfigError, match="VGG16 needs images of at least 16x16"):
        load_config(write_config(cfg, tmp_path / "percep.yml"))


@pytest.mark.parametrize("val_size", [18, 2])
def test_the_suggested_validation_size_is_accepted(tmp_path, val_size):
    """The fix for a validation size the generator cannot take names a size it can: applied, the config loads."""
    cfg = merge(tiny_vqgan_v2(), {"datasets": {"val": {"dataroot_gt": "synthetic:2", "out_size": val_size}}})
    with pytest.raises(ConfigError, match="downsamples by 4") as err:
        load_config(write_config(cfg, tmp_path / "val.yml"))
    suggested = int(re.search(r"such as (\d+)", err.value.fix).group(1))
    assert suggested > 0
    cfg["datasets"]["val"]["out_size"] = suggested
    assert load_config(write_config(cfg, tmp_path / "val.yml"))["datasets"]["val"]["out_size"] == suggested


def test_the_suggested_spatial_size_for_a_v2_predict_network_is_accepted(tmp_path):
    """Training a v2 (Predict mode) network at 32x32 whose grid restores 16x16 faces: both fixes offered, the
    training size and the grid, give a config that loads."""
    cfg = merge(tiny_vqfr_v2(), {"datasets": {"train": {"out_size": 32}}, "network_d": {"out_size": 32}})
    with pytest.raises(ConfigError, match="restores 16x16 faces") as err:
        load_config(write_config(cfg, tmp_path / "v2.yml"))
    grid = [int(v) for v in re.search(r"spatial_size: \[(\d+), (\d+)\]", err.value.fix).groups()]
    assert "datasets.train.out_size: 16" in err.value.fix
    for name in ("network_sr", "network_g"):
        cfg[name]["quantizer_opt"]["spatial_size"] = grid
    load_config(write_config(cfg, tmp_path / "v2.yml"))


# --- documented defaults of the recipes -----------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "factor"), [(tiny_vqfr_v1, 0.5), (tiny_vqfr_v2, 1.0)])
def test_the_local_discriminators_own_loss_factor_defaults_to_0_5_in_v1_and_1_in_v2(make, factor):
    """docs/TRAINING.md: ``train.d_local_loss_weight`` is 0.5 in the official v1 code and 1 in v2."""
    from training.recipes import RECIPES

    cfg = make()
    cfg["train"].pop("d_local_loss_weight", None)
    cfg["train"]["perceptual_opt"] = None
    recipe = RECIPES[cfg["model_type"]](cfg)
    recipe.build_branches(lambda module: module)
    assert recipe.branches and {b.d_local_loss_weight for b in recipe.branches.values()} == {factor}


class _Stop(Exception):
    pass


def test_v2_trains_at_fidelity_1_unless_fidelity_ratio_says_otherwise():
    """docs/TRAINING.md: ``train.fidelity_ratio`` (v2) defaults to 1.0; the network is called with it."""
    from training.recipes import VQFRv2Recipe

    seen = []

    def network(lq, fidelity, return_all):
        seen.append(fidelity)
        raise _Stop

    for ratio in (None, 0.25):
        cfg = tiny_vqfr_v2()
        cfg["train"]["perceptual_opt"] = None
        if ratio is not None:
            cfg["train"]["fidelity_ratio"] = ratio
        batch = {"lq": torch.zeros(1, 3, 16, 16), "gt": torch.zeros(1, 3, 16, 16)}
        with pytest.raises(_Stop):
            VQFRv2Recipe(cfg).generator_step(network, batch, 1, 1.0)
    assert seen == [1.0, 0.25]


def test_the_codebook_loss_weight_defaults_to_1():
    """docs/TRAINING.md, stage 1: ``l_codebook`` is the quantizer's loss x ``codebook_loss_weight`` (1.0)."""
    from types import SimpleNamespace

    from training.recipes import VQGANRecipe

    quant_loss = torch.tensor(0.375)
    gt = torch.zeros(1, 3, 16, 16)
    for weight, expected in ((None, 0.375), (0.5, 0.1875)):
        cfg = tiny_vqgan_v2()
        cfg["train"]["perceptual_opt"] = None
        cfg["train"].pop("codebook_loss_weight", None)
        if weight is not None:
            cfg["train"]["codebook_loss_weight"] = weight
        recipe = VQGANRecipe(cfg)
        recipe.generator = SimpleNamespace(arch="VQGANv2")
        terms, *_ = recipe.generator_step(lambda x, return_all: {"dec": x, "quant_loss": quant_loss}, {"gt": gt}, 1,
                                          1.0)
        assert terms["l_codebook"].item() == pytest.approx(expected)
