"""What mutation testing (round 21) of the trainer's iteration loop and its command line found unchecked: the iterations
that log, save and validate (every ``print_freq`` / ``save_checkpoint_freq`` / ``val_freq`` and always the last one,
with the documented defaults 100 / 5000 / 5000), the epoch each record names, ``seconds_per_iter`` as the mean over
the iterations since the previous record, the learning rate of every optimiser (discriminators included) dropping on
the iteration after each milestone, a scheduler other than MultiStepLR refused and a warm-up of 0 accepted, new
shuffles and new flips every epoch (both on by default), the data position of a resume in the middle of an epoch, the
images drawn counting the unreadable ones replaced, the warnings for a resume with nothing to train or another global
batch, a state without EMA refused by a config with EMA, states ordered by iteration number, the later validation
images set aside by a resume, a folder of its own for each resume within one second, validation on the LQ image in
eval mode and handing the generator back in training mode, ``save_img: true``, means that leave out an infinite PSNR,
v2's validation fidelity and texture branch, ``manual_seed`` fixing the initial weights, ``WORLD_SIZE=1`` staying
without a process group, generator gradients that do not pile up, train.log receiving the progress lines (every loss
term) without any logging set up and detached when the run ends, ``--profile-iters`` reaching the trainer and the
profile table's top 25, TensorBoard off by default and given the validation scores; and one defect fixed: milestones
without ``gamma`` decay tenfold, as basicsr and torch (they kept the rate). Expected values are worked out in each
test; most replace the training step with a recorder, so the loop itself runs in milliseconds on the CPU."""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import pytest
import torch
import torch.distributed as dist

from tests.test_training_loop import records, tiny_vqfr_v2, tiny_vqgan_v2, write_config
from training.recipes import unwrap
from training.train import main as train_main
from training.trainer import Trainer, init_distributed, latest_state, saved_states
from vqfr.errors import ConfigError, InputError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


def _cfg(total_iter: int, **logger) -> dict:
    """Tiny VQGANv2 without LPIPS or GAN (cheap real steps): 4 synthetic faces, batches of 2, so 2 per epoch."""
    cfg = tiny_vqgan_v2()
    cfg["train"].update({"total_iter": total_iter, "perceptual_opt": None, "gan_start_iter": 10_000})
    cfg["logger"].update(logger)
    return cfg


def _record_steps(trainer: Trainer) -> list[tuple[int, list[int], torch.Tensor]]:
    """Replace ``trainer.step`` by a recorder of (iteration, image indices, gt batch); the step's loss reads the
    iteration number."""
    seen: list[tuple[int, list[int], torch.Tensor]] = []

    def step(batch: dict, it: int) -> dict:
        seen.append((it, batch["index"].tolist(), batch["gt"].clone()))
        return {"loss_total": torch.tensor(float(it))}

    trainer.step = step
    return seen


def _record_saves_and_validations(trainer: Trainer) -> tuple[list[int], list[int]]:
    saved: list[int] = []
    validated: list[int] = []
    trainer.save = saved.append
    trainer.validate = validated.append
    return saved, validated


# --- which iterations log, save and validate ------------------------------------------------------------------------
def test_every_frequency_fires_on_its_multiples_and_on_the_last_iteration(tmp_path):
    """total_iter 5 with every frequency 2: iterations 2 and 4, and 5 as the last one (a run of 5 must not end
    unsaved, unlogged and unvalidated). 2 batches per epoch: iterations 1-2 are epoch 0, 3-4 epoch 1, 5 epoch 2."""
    cfg = _cfg(5, print_freq=2, save_checkpoint_freq=2)
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    cfg["val"] = {"val_freq": 2}
    trainer = Trainer(cfg, tmp_path / "run")
    steps = _record_steps(trainer)
    saved, validated = _record_saves_and_validations(trainer)
    last = trainer.train()
    assert [it for it, _, _ in steps] == [1, 2, 3, 4, 5]
    assert saved == [2, 4, 5] and validated == [2, 4, 5]
    recs = records(tmp_path / "run")
    assert [(r["iter"], r["epoch"], r["loss_total"]) for r in recs] == [(2, 0, 2.0), (4, 1, 4.0), (5, 2, 5.0)]
    assert last == recs[-1]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "[iter 2/5] loss_total 2" in log and "[iter 5/5] loss_total 5" in log


def test_the_documented_frequencies_apply_when_the_logger_and_val_leave_them_out(tmp_path):
    """Defaults (docs/TRAINING.md, as basicsr): print_freq 100, save_checkpoint_freq 5000, val_freq 5000. A run of
    501 iterations logs at 100, 200, ..., 500 and 501, and saves and validates only at its end."""
    cfg = _cfg(501)
    for key in ("print_freq", "save_checkpoint_freq"):
        del cfg["logger"][key]
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    trainer = Trainer(cfg, tmp_path / "run")
    _record_steps(trainer)
    saved, validated = _record_saves_and_validations(trainer)
    trainer.train()
    assert [r["iter"] for r in records(tmp_path / "run")] == [100, 200, 300, 400, 500, 501]
    assert saved == [501] and validated == [501]


def test_seconds_per_iter_is_the_mean_over_the_iterations_since_the_previous_record(tmp_path, monkeypatch):
    """A clock that only the steps advance, step i taking i seconds: with print_freq 2 the records read
    (1 + 2) / 2 = 1.5 and (3 + 4) / 2 = 3.5, not a mean since the start ((1+2+3+4) / 4 = 2.5)."""
    import training.trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    trainer = Trainer(_cfg(4, print_freq=2), tmp_path / "run")

    def step(batch: dict, it: int) -> dict:
        clock[0] += it
        return {"loss_total": torch.tensor(0.0)}

    trainer.step = step
    trainer.train()
    assert [r["seconds_per_iter"] for r in records(tmp_path / "run")] == [1.5, 3.5]


# --- learning rate --------------------------------------------------------------------------------------------------
def test_every_optimisers_learning_rate_drops_on_the_iteration_after_each_milestone_of_a_real_run(tmp_path):
    """Milestone 2, gamma 0.5, lr 1e-3 for the generator and the discriminator: iterations 1 and 2 train at 1e-3,
    3 and 4 at 5e-4 (the rate each step used is the one its record names), the discriminator's optimiser too."""
    cfg = _cfg(4)
    cfg["train"]["scheduler"] = {"type": "MultiStepLR", "milestones": [2], "gamma": 0.5}
    trainer = Trainer(cfg, tmp_path / "run")
    used: dict[str, list[float]] = {}
    step = trainer.step

    def spying_step(batch: dict, it: int) -> dict:
        terms = step(batch, it)
        for name, opt in trainer._all_optimizers().items():
            used.setdefault(name, []).append(opt.param_groups[0]["lr"])
        return terms

    trainer.step = spying_step
    trainer.train()
    d_names = [n for n in used if n.startswith("optim_d_")]
    assert d_names and "optim_g" in used
    expected = [1e-3, 1e-3, 5e-4, 5e-4]
    for name in used:
        assert used[name] == pytest.approx(expected), name
        assert [r[f"lr_{name}"] for r in records(tmp_path / "run")] == pytest.approx(expected), name


def test_a_warm_up_of_0_iterations_is_no_warm_up_and_is_accepted(tmp_path):
    """Only a warm-up of at least one iteration is refused (not implemented); 0, like the official -1, is none."""
    cfg = _cfg(1)
    cfg["train"]["warmup_iter"] = 0
    Trainer(cfg, tmp_path / "run").close()


def test_a_scheduler_other_than_multisteplr_is_refused_by_name(tmp_path):
    """Only MultiStepLR is implemented: basicsr's CosineAnnealingRestartLR must not silently train at a constant
    rate."""
    cfg = _cfg(1)
    cfg["train"]["scheduler"] = {"type": "CosineAnnealingRestartLR"}
    with pytest.raises(ConfigError, match="CosineAnnealingRestartLR"):
        Trainer(cfg, tmp_path / "run")


# --- data order -----------------------------------------------------------------------------------------------------
def test_each_epoch_draws_a_new_shuffle_and_new_flips(tmp_path):
    """Over 6 epochs of 4 shuffled, randomly flipped faces, the batch order is not the same every epoch, and some
    face is seen both flipped and unflipped (one seed per epoch; a fixed epoch would repeat epoch 0 six times).
    use_shuffle and use_hflip are left out: both default to true, as in every official config."""
    cfg = _cfg(12)
    del cfg["datasets"]["train"]["use_hflip"]
    assert "use_shuffle" not in cfg["datasets"]["train"]
    trainer = Trainer(cfg, tmp_path / "run")
    steps = _record_steps(trainer)
    trainer.train()
    orders = [tuple(i for _, idx, _ in steps[e * 2:e * 2 + 2] for i in idx) for e in range(6)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)  # each epoch sees every face once
    assert len(set(orders)) > 1, orders
    versions: dict[int, list[torch.Tensor]] = {}
    for _, idx, gt in steps:
        for i, image in zip(idx, gt, strict=True):
            versions.setdefault(i, []).append(image)
    assert any(not torch.equal(v[0], w) for v in versions.values() for w in v[1:])


def test_a_resume_in_the_middle_of_an_epoch_goes_on_with_the_next_batch_of_that_epoch(tmp_path):
    """Saved at iteration 3 (the first batch of epoch 1), the resumed run's iterations 4-6 see exactly the images
    (indices and flipped pixels) of the uninterrupted run's iterations 4-6."""
    cfg = _cfg(6, save_checkpoint_freq=3)
    straight = Trainer(copy.deepcopy(cfg), tmp_path / "a")
    seen_a = _record_steps(straight)
    straight.train()
    resumed = Trainer(copy.deepcopy(cfg), tmp_path / "b", resume=tmp_path / "a" / "training_states" / "3.state")
    seen_b = _record_steps(resumed)
    resumed.train()
    assert [(it, idx) for it, idx, _ in seen_b] == [(it, idx) for it, idx, _ in seen_a[3:]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(seen_a[3:], seen_b, strict=True))


# --- resume and states ----------------------------------------------------------------------------------------------
def test_resuming_a_finished_run_with_the_same_total_warns_that_there_is_nothing_to_train(tmp_path, caplog):
    cfg = _cfg(2, save_checkpoint_freq=2)
    Trainer(copy.deepcopy(cfg), tmp_path / "run").train()
    caplog.clear()
    trainer = Trainer(copy.deepcopy(cfg), tmp_path / "run", resume=tmp_path / "run")
    steps = _record_steps(trainer)
    trainer.train()
    assert steps == []
    assert "nothing to train: the run is at iteration 2 and train.total_iter is 2" in caplog.text


def test_states_are_ordered_by_iteration_number_not_by_name(tmp_path):
    """Iteration 10 is newer than 9 and 2, though "10.state" sorts before "2.state" as text."""
    states = tmp_path / "training_states"
    states.mkdir()
    for it in (2, 10, 9):
        (states / f"{it}.state").write_bytes(b"")
    assert [p.stem for p in saved_states(tmp_path)] == ["2", "9", "10"]
    assert latest_state(tmp_path) == states / "10.state"


def test_a_resume_sets_aside_the_validation_images_of_later_iterations_only(tmp_path):
    """Resumed at iteration 2, visualization/3 and /4 belong to the abandoned future (moved under superseded/);
    visualization/1 and /2 are the resumed run's own history and stay."""
    cfg = _cfg(4, save_checkpoint_freq=2)
    run = tmp_path / "run"
    trainer = Trainer(copy.deepcopy(cfg), run)
    _record_steps(trainer)
    trainer.train()
    for it in (1, 2, 3, 4):
        (run / "visualization" / str(it)).mkdir(parents=True)
        (run / "visualization" / str(it) / "face.png").write_bytes(b"png")
    Trainer(cfg, run, resume=run / "training_states" / "2.state").close()
    assert sorted(p.name for p in (run / "visualization").iterdir()) == ["1", "2"]
    [aside] = (run / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "visualization").iterdir()) == ["3", "4"]
    assert (aside / "visualization" / "4" / "face.png").read_bytes() == b"png"


def test_the_images_drawn_count_the_unreadable_ones_a_sample_replaced(tmp_path):
    """A batch of 2 samples, each of which first met an unreadable file: 4 images drawn, 2 unreadable, not most of
    them, so the run goes on (counting only the 2 samples, 2 of 2 would stop it); 3 unreadable of 5 drawn stop it."""
    cfg = _cfg(1)
    cfg["datasets"]["train"]["dataroot_gt"] = "synthetic:200"
    trainer = Trainer(cfg, tmp_path / "run")
    gt = torch.zeros(2, 3, 16, 16)
    trainer._count_unreadable({"gt": gt, "skipped": [json.dumps([["a.png", "bad"]]), json.dumps([["b.png", "bad"]])]},
                              1)
    assert trainer._drawn == 4 and list(trainer._unreadable) == ["a.png", "b.png"]
    trainer._unreadable, trainer._drawn = {}, 0
    with pytest.raises(InputError, match="3 of the 5 training images drawn so far could not be read"):
        trainer._count_unreadable({"gt": gt, "skipped": [json.dumps([["a.png", "bad"], ["b.png", "bad"]]),
                                                         json.dumps([["c.png", "bad"]])]}, 1)
    trainer.close()


def test_resuming_a_state_without_ema_into_a_config_with_ema_is_refused_by_name(tmp_path):
    """A state saved with ema_decay 0 holds no EMA; a config that sets ema_decay cannot resume it (the EMA would
    have nothing to start from)."""
    cfg = _cfg(1, save_checkpoint_freq=1)
    cfg["train"]["ema_decay"] = 0
    Trainer(copy.deepcopy(cfg), tmp_path / "run").train()
    cfg["train"]["ema_decay"] = 0.5
    with pytest.raises(ConfigError, match="has no EMA weights but this config sets train.ema_decay"):
        Trainer(cfg, tmp_path / "run", resume=tmp_path / "run")


def test_resumes_within_one_second_each_set_aside_into_a_folder_of_their_own(tmp_path, monkeypatch):
    """Two earlier resumes to iteration 2 within the same second took after_2_<time> and after_2_<time>_2; a third
    takes _3 (moving its files into _2 would mix two abandoned futures, and overwrite one with the other)."""
    import training.trainer as trainer_module

    cfg = _cfg(4, save_checkpoint_freq=2)
    run = tmp_path / "run"
    trainer = Trainer(copy.deepcopy(cfg), run)
    _record_steps(trainer)
    trainer.train()
    monkeypatch.setattr(trainer_module.time, "strftime", lambda fmt: "20260101-000000")
    for taken in ("after_2_20260101-000000", "after_2_20260101-000000_2"):
        (run / "superseded" / taken).mkdir(parents=True)
    Trainer(cfg, run, resume=run / "training_states" / "2.state").close()
    third = run / "superseded" / "after_2_20260101-000000_3"
    assert (third / "training_states" / "4.state").is_file() and (third / "models" / "net_g_4.pth").is_file()
    assert not any((run / "superseded" / "after_2_20260101-000000_2").iterdir())


# --- validation -----------------------------------------------------------------------------------------------------
def test_validation_without_ema_hands_the_generator_back_in_training_mode(tmp_path):
    """Without train.ema_decay the trained network itself is validated (in eval mode); training then goes on in
    training mode."""
    cfg = _cfg(1)
    cfg["train"]["ema_decay"] = 0
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.net.train()
    assert trainer.ema is None
    modes: list[bool] = []
    restore = trainer.restore
    trainer.restore = lambda model, lq, gt: (modes.append(model.training), restore(model, lq, gt))[1]
    result = trainer.validate(7)
    trainer.close()
    assert modes == [False, False]
    assert unwrap(trainer.net).training
    assert result is not None and result["iter"] == 7 and result["images"] == 2


def test_save_img_true_saves_every_validation_image(tmp_path):
    cfg = _cfg(1)
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:3"}
    cfg["val"] = {"save_img": True}
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.validate(1)
    trainer.close()
    assert len(list((tmp_path / "run" / "visualization" / "1").glob("*.png"))) == 3
    line = json.loads((tmp_path / "run" / "val_metrics.jsonl").read_text())
    assert line["iter"] == 1 and line["images"] == 3


def test_validation_means_leave_out_the_infinite_psnr_of_a_perfect_restoration(tmp_path):
    """An image restored exactly scores PSNR inf; the mean over [inf, 30] is 30 (not inf), and val_metrics.jsonl
    stays strict JSON."""
    cfg = _cfg(1)
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    trainer = Trainer(cfg, tmp_path / "run")
    scores = iter([math.inf, 30.0])
    trainer.val_metrics = {"psnr": (lambda img, ref, crop: next(scores), 0)}
    result = trainer.validate(1)
    trainer.close()
    assert result == {"iter": 1, "psnr": 30.0, "images": 2}
    line = (tmp_path / "run" / "val_metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) == result


# --- one process ----------------------------------------------------------------------------------------------------
def test_world_size_1_runs_without_a_process_group(monkeypatch):
    """torchrun --nproc_per_node=1 sets WORLD_SIZE=1 (and no MASTER_ADDR here): one process, no group to join."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert init_distributed() == (0, 1, 0, False)
    assert not (dist.is_available() and dist.is_initialized())


# --- gradients ------------------------------------------------------------------------------------------------------
def test_each_step_starts_the_generator_from_zero_gradients(tmp_path):
    """The same weights and batch twice: the second step's gradients equal the first's, not twice them."""
    trainer = Trainer(_cfg(2), tmp_path / "run")
    batch = next(iter(trainer.loader))
    net = unwrap(trainer.net)
    start = copy.deepcopy(net.state_dict())
    trainer.step(batch, 1)
    first = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.load_state_dict(start)
    trainer.step(batch, 1)
    trainer.close()
    second = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert first and first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], msg=name)



# --- the log and the command line -----------------------------------------------------------------------------------
def test_train_log_gets_the_progress_lines_when_the_trainer_is_used_from_python(tmp_path, monkeypatch):
    """Without any logging set up (no ``main``, the "training" logger at NOTSET under a WARNING root), train.log still
    receives the INFO lines: the data, each record (loss_total, then every l_* term), each save."""
    monkeypatch.setattr(logging.getLogger("training"), "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    Trainer(_cfg(1, save_checkpoint_freq=1), tmp_path / "run").train()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training data:" in log and "saved" in log
    assert re.search(r"\[iter 1/1\] loss_total \S+ l_codebook \S+ l_rec \S+ \(\d+\.\d{3} s/iter\)", log), log


def test_a_finished_run_detaches_its_train_log(tmp_path):
    """Later messages of the process (another run, other code) must not land in a finished run's train.log."""
    training_log = logging.getLogger("training")
    before = list(training_log.handlers)
    Trainer(_cfg(1), tmp_path / "run").train()
    assert training_log.handlers == before
    training_log.warning("a message after the run")
    assert "a message after the run" not in (tmp_path / "run" / "train.log").read_text()


def test_profile_iters_on_the_command_line_reach_the_trainer(tmp_path):
    cfg = _cfg(2)
    config = write_config(cfg, tmp_path / "c.yml")
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(run), "--profile-iters", "2"]) == 0
    assert (run / "profile_iter_2.md").read_text().startswith("# Training step 2\n")
    assert not (run / "profile_iter_1.md").exists()


# --- seeds and the validation output --------------------------------------------------------------------------------
def test_manual_seed_fixes_the_initial_weights_whatever_the_random_state_before(tmp_path):
    """Two runs of one config start from the same networks (generator and discriminator), however much of torch's
    random stream was used before; another manual_seed starts elsewhere."""
    def initial(out: str, seed: int, before: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(before)
        torch.rand(before)
        cfg = _cfg(1)
        cfg["manual_seed"] = seed
        trainer = Trainer(cfg, tmp_path / out)
        trainer.close()
        nets = {f"g.{k}": v for k, v in unwrap(trainer.net).state_dict().items()}
        for name, d in trainer._discriminators().items():
            nets.update({f"{name}.{k}": v for k, v in d.state_dict().items()})
        return nets

    a, b, c = initial("a", 0, 3), initial("b", 0, 17), initial("c", 1, 3)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_v2_validation_restores_at_fidelity_1_unless_fidelity_ratio_says_otherwise(tmp_path):
    """val.fidelity_ratio defaults to 1.0; val.test_which: texture_branch validates the texture decoder's output."""
    cfg = tiny_vqfr_v2()
    cfg["train"]["total_iter"] = 1
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.close()
    model = trainer.eval_model().eval()
    lq = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        at_1, at_0 = model(lq, fidelity=1.0), model(lq, fidelity=0.0)
    assert not torch.equal(at_1, at_0)  # else the test could not tell them apart
    assert torch.equal(trainer.restore(model, lq, lq), at_1)
    trainer.cfg["val"] = {"fidelity_ratio": 0.0}
    assert torch.equal(trainer.restore(model, lq, lq), at_0)
    trainer.cfg["val"] = {"test_which": "texture_branch"}
    with torch.no_grad():
        texture = model(lq, return_all=True, fidelity=1.0)["texture_dec"]
    assert not torch.equal(texture, at_1)
    assert torch.equal(trainer.restore(model, lq, lq), texture)


def test_validation_restores_each_lq_image_and_scores_it_against_its_gt(tmp_path):
    """Stage 2 validates the network on the degraded LQ image (restoring the HQ one would flatter every score)."""
    cfg = tiny_vqfr_v2()
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    trainer = Trainer(cfg, tmp_path / "run")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    restore = trainer.restore
    trainer.restore = lambda model, lq, gt: (seen.append((lq, gt)), restore(model, lq, gt))[1]
    trainer.validate(1)
    trainer.close()
    assert len(seen) == 2
    for i, (lq, gt) in enumerate(seen):
        item = trainer.val_set[i]
        assert torch.equal(lq[0], item["lq"]) and torch.equal(gt[0], item["gt"])
        assert not torch.equal(lq, gt)


# --- what the run reports -------------------------------------------------------------------------------------------
def test_the_profile_table_lists_the_top_25_operators():
    """30 host operators of 1..30 ms: the table keeps the 25 slowest (30 down to 6 ms)."""
    from types import SimpleNamespace

    from training.trainer import step_profile_table

    events = [SimpleNamespace(key=f"aten::op{i}", self_cpu_time_total=1000.0 * i, count=1, self_device_time_total=0,
                              device_type=torch.autograd.DeviceType.CPU) for i in range(1, 31)]
    text = step_profile_table(events, 3, 1.0, cuda=False)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 25
    assert rows[0].startswith("| `aten::op30` | 30.00 |") and rows[-1].startswith("| `aten::op6` | 6.00 |")


def test_tensorboard_is_off_unless_asked_and_gets_the_validation_scores_when_on(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(2, print_freq=1)
    del cfg["logger"]["use_tb_logger"]
    Trainer(copy.deepcopy(cfg), tmp_path / "off").train()
    assert not (tmp_path / "off" / "tb").exists()
    cfg["logger"]["use_tb_logger"] = True
    cfg["datasets"]["val"] = {"dataroot_gt": "synthetic:2"}
    cfg["val"] = {"val_freq": 1}
    Trainer(cfg, tmp_path / "on").train()
    events = EventAccumulator(str(tmp_path / "on" / "tb"))
    events.Reload()
    vals = [json.loads(line) for line in (tmp_path / "on" / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["iter"] for v in vals] == [1, 2]
    for name in ("psnr", "ssim"):
        scalars = events.Scalars(f"val/{name}")
        assert [e.step for e in scalars] == [1, 2]
        assert [e.value for e in scalars] == pytest.approx([v[name] for v in vals])


def test_resuming_with_another_global_batch_warns_that_the_data_order_differs(tmp_path, caplog):
    cfg = _cfg(1, save_checkpoint_freq=1)
    Trainer(copy.deepcopy(cfg), tmp_path / "run").train()
    cfg["datasets"]["train"]["batch_size_per_gpu"] = 4
    caplog.clear()
    Trainer(cfg, tmp_path / "run", resume=tmp_path / "run").close()
    assert "resuming with a global batch of 4 instead of 2" in caplog.text


# --- a defect this round fixed --------------------------------------------------------------------------------------
def test_milestones_without_gamma_decay_the_rate_tenfold_as_basicsr_and_torch(tmp_path):
    """basicsr's MultiStepRestartLR and torch's MultiStepLR take gamma 0.1 when it is left out; a config with
    milestones but no gamma (one written for basicsr) used to train at its first rate to the end. Milestones 1 and 2
    from lr 1e-3: iteration 1 at 1e-3, 2 at 1e-4, 3 at 1e-5."""
    cfg = _cfg(3)
    cfg["train"]["scheduler"] = {"type": "MultiStepLR", "milestones": [1, 2]}
    trainer = Trainer(cfg, tmp_path / "run")
    lrs = []
    for it in (1, 2, 3):
        trainer._set_lr(it)
        lrs.append(trainer.g_optimizers["optim_g"].param_groups[0]["lr"])
    trainer.close()
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-5])
