"""What mutation testing of the recipes, losses, k-means and the trainer's loss/EMA/AMP/checkpoint code found
unchecked: the discriminator step zeroing and stepping both discriminators and logging its scores, the loss-weight
defaults (an absent block adds no term, a block without ``loss_weight`` weighs 1, the documented R1 and GAN
defaults), the adaptive weight's independence of the AMP loss scale, fp16 loss scaling (overflowing steps skipped,
scales lowered, the scale passed to the recipe, the scales resumed), v1's main-branch losses on ``main_dec``, v2's
two optimisers, the ``L2`` style measure, a perceptual weight of 0, LPIPS's input normalisation, the reservoir's
probabilities (also after a reset), k-means' empty clusters and its exactly-k case, k-means switched off, the EMA
after a trainer step and off by default, and an exact resume of stage 1 with k-means and EMA. Expected values are
computed independently in each test, on tiny inputs, on the CPU."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_training_behaviours import _branch, _images
from tests.test_training_loop import tiny_vqfr_v1, tiny_vqfr_v2, tiny_vqgan_v1, tiny_vqgan_v2
from training.kmeans import CodebookReestimator, Reservoir, kmeans
from training.losses import PerceptualLoss, gram_matrix
from training.recipes import RECIPES, AdversarialBranch, VQFRv1Recipe, VQFRv2Recipe, unwrap
from training.trainer import Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


_NO_AMP = torch.amp.GradScaler("cpu", enabled=False)


# --- the discriminator step -----------------------------------------------------------------------------------------
def test_the_local_discriminators_gradients_are_zeroed_every_step_too():
    """Each discriminator step starts from zero gradients for the local PatchGAN as well as the global D (the
    official v2 bug, accumulating gradients, must not come back for either)."""
    branch = _branch()  # SGD at lr 0: the weights stay, the same step twice gives the same gradients
    fake, real = _images(1), _images(2)
    branch.discriminator_step(fake, real, 3, _NO_AMP, contextlib.nullcontext())
    first = {k: [p.grad.clone() for p in d.parameters()] for k, d in branch.discriminators().items()}
    branch.discriminator_step(fake, real, 3, _NO_AMP, contextlib.nullcontext())
    for kind, d in branch.discriminators().items():
        assert sum(float(a.abs().sum()) for a in first[kind]) > 0
        for a, p in zip(first[kind], d.parameters(), strict=True):
            torch.testing.assert_close(p.grad, a)  # not 2 * a


def test_a_discriminator_step_moves_both_discriminators_by_their_gradients():
    """Both discriminators take an optimiser step (SGD: w - lr * grad), not only the global one."""
    branch = _branch()
    for kind, d in branch.discriminators().items():
        branch.optimizers[kind] = torch.optim.SGD(d.parameters(), lr=0.1)
    before = {k: [p.detach().clone() for p in d.parameters()] for k, d in branch.discriminators().items()}
    branch.discriminator_step(_images(1), _images(2), 3, _NO_AMP, contextlib.nullcontext())
    for kind, d in branch.discriminators().items():
        assert sum(float(p.grad.abs().sum()) for p in d.parameters()) > 0
        for old, p in zip(before[kind], d.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), old - 0.1 * p.grad)


def test_the_discriminator_step_logs_its_losses_and_the_scores_of_real_and_fake():
    """``l_d_*`` is the discriminator's loss, ``real_score_*`` / ``fake_score_*`` the mean outputs on the real and
    the fake images (what a user reads to tell whether the discriminator wins)."""
    branch = _branch()
    fake, real = _images(1), _images(2)
    out = branch.discriminator_step(fake, real, 3, _NO_AMP, contextlib.nullcontext())
    f, r = fake.flatten(1), real.flatten(1)
    with torch.no_grad():
        dg, dl = branch.d_global, branch.d_local
        g_real, g_fake = r @ dg.w + dg.b, f @ dg.w + dg.b
        l_real, l_fake = r @ dl.w + dl.b, f @ dl.w + dl.b
    assert out["l_d_global"].item() == pytest.approx((F.softplus(-g_real).mean() + F.softplus(g_fake).mean()).item(),
                                                     rel=1e-6)
    assert out["real_score_global"].item() == pytest.approx(g_real.mean().item(), rel=1e-6)
    assert out["fake_score_global"].item() == pytest.approx(g_fake.mean().item(), rel=1e-6)
    assert out["real_score_local"].item() == pytest.approx(l_real.mean().item(), rel=1e-6)
    assert out["fake_score_local"].item() == pytest.approx(l_fake.mean().item(), rel=1e-6)


def test_the_generator_step_sends_no_gradient_into_the_discriminators():
    """The discriminators are frozen while the generator's adversarial terms are computed: backward reaches the
    generator (here the image) but no discriminator parameter, and they train again afterwards."""
    branch = _branch()
    last = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    fake = last * 1.0
    terms, _ = branch.generator_terms(fake, fake.abs().mean(), last, 1.0)
    sum(terms.values()).backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    for d in branch.discriminators().values():
        assert all(p.grad is None and p.requires_grad for p in d.parameters())


# --- defaults of the adversarial branches and the loss blocks -------------------------------------------------------
def test_gan_blocks_without_a_loss_weight_weigh_1():
    """A ``gan_opt`` / ``patch_gan_opt`` without ``loss_weight`` (as in the official files) weighs 1, and a missing
    ``patch_gan_opt`` means the hinge loss at weight 1: the generator terms are then the plain losses."""
    ref = _branch()
    for local_gan in ({"gan_type": "hinge"}, None):
        branch = AdversarialBranch("", ref.d_global, ref.d_local, 0, {"gan_type": "wgan_softplus"}, local_gan,
                                   1.0, 1.0, 1.0, 10.0, 16)
        last = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        fake = last * 1.0
        nll = fake.abs().mean()
        terms, extra = branch.generator_terms(fake, nll, last, 1.0)
        with torch.no_grad():
            x = fake.flatten(1)
            g_global = F.softplus(-(x @ ref.d_global.w + ref.d_global.b)).mean()
            g_local = -(x @ ref.d_local.w + ref.d_local.b).mean()
        assert terms["l_g_gan_global"].item() == pytest.approx(g_global.item(), rel=1e-6)
        assert terms["l_g_gan_local"].item() == pytest.approx(extra["d_weight_local"].item() * g_local.item(),
                                                              rel=1e-6)


@pytest.mark.parametrize("make", [tiny_vqfr_v1, tiny_vqfr_v2])
def test_the_documented_gan_defaults_apply_when_the_options_are_left_out(make):
    """Left out, the options take their defaults: lazy R1 of weight 10 every 16 iterations (docs/TRAINING.md, as the
    official configs), generator GAN weights 1, and GANs that judge from iteration 1."""
    cfg = make()
    for key in ("r1_reg_weight", "net_d_reg_every", "generator_d_global_weight", "generator_d_local_weight",
                "gan_start_iter", "main_gan_start_iter"):
        cfg["train"].pop(key, None)
    cfg["train"]["perceptual_opt"] = None
    recipe = RECIPES[cfg["model_type"]](cfg)
    recipe.build_branches(lambda module: module)
    assert recipe.branches
    for branch in recipe.branches.values():
        assert (branch.r1_weight, branch.r1_every) == (10.0, 16)
        assert (branch.global_weight, branch.local_weight) == (1.0, 1.0)
        assert branch.active(1)


def test_a_loss_block_that_is_left_out_adds_no_term():
    """v2 without ``pixel_opt``: no L1 term (an absent block weighs 0, not 1)."""
    cfg = tiny_vqfr_v2()
    cfg["train"].pop("pixel_opt")
    cfg["train"]["perceptual_opt"] = None
    recipe = VQFRv2Recipe(cfg)
    net = recipe.build_generator()
    g = torch.Generator().manual_seed(0)
    batch = {"gt": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, "lq": torch.rand(1, 3, 16, 16, generator=g) * 2 - 1}
    terms, *_ = recipe.generator_step(net, batch, 1, 1.0)
    assert set(terms) == {"l_quant_feature", "l_quant_index"}


def test_the_adaptive_weight_does_not_depend_on_the_amp_loss_scale():
    """Under fp16 the recipe passes the GradScaler's scale: the local GAN's adaptive weight (and its term) must be
    the unscaled one, here where the GAN gradient is small enough for the 1e-4 of the formula to matter."""
    branch = _branch()
    with torch.no_grad():
        branch.d_local.w.mul_(1e-4)
    last = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    fake = last * 1.0
    nll = fake.abs().mean()
    with torch.no_grad():  # the formula: |d nll / d last| / (|d g_local / d last| + 1e-4), g_local = 3 * -mean D
        grad_nll = torch.sign(last) / last.numel()
        grad_gan = (-3.0 * branch.d_local.w / 3).expand(3, -1)
        expected = (grad_nll.norm() / (grad_gan.norm() + 1e-4)).item()
    assert grad_gan.norm().item() < 1e-3  # the regime where a scaled gradient would change the weight
    for scale in (1.0, 1024.0):
        _, extra = branch.generator_terms(fake, nll, last, scale)
        assert extra["d_weight_local"].item() == pytest.approx(expected, rel=1e-5), scale


# --- fp16 loss scaling ----------------------------------------------------------------------------------------------
def test_fp16_steps_that_overflow_are_skipped_lower_the_scales_and_are_resumed(tmp_path):
    """amp: fp16: the generator and discriminator losses are scaled by their own GradScaler; a step whose gradients
    overflow changes no weight and halves that scale; the recipe receives the generator's scale (for the adaptive
    weight); a resumed run goes on with the saved scales, not the initial ones."""
    cfg = tiny_vqgan_v2()
    cfg["amp"] = "fp16"
    cfg["train"].update(total_iter=1, gan_start_iter=0, perceptual_opt=None)
    trainer = Trainer(copy.deepcopy(cfg), tmp_path / "run")
    trainer.scaler_g = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # certain to overflow in fp16
    trainer.scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    seen = []
    step = trainer.recipe.generator_step
    trainer.recipe.generator_step = lambda net, batch, it, grad_scale: (seen.append(grad_scale),
                                                                        step(net, batch, it, grad_scale))[1]
    nets = {"g": unwrap(trainer.net), **trainer._discriminators()}
    before = {k: copy.deepcopy(n.state_dict()) for k, n in nets.items()}
    trainer.step(next(iter(trainer.loader)), 1)
    assert seen == [2.0**60]
    assert (trainer.scaler_g.get_scale(), trainer.scaler_d.get_scale()) == (2.0**59, 2.0**39)
    for k, n in nets.items():
        for name, value in n.state_dict().items():
            if not name.endswith(("._u", "._v")):  # spectral norm's power-iteration vectors move on each forward
                assert torch.equal(value, before[k][name]), (k, name)
    trainer.save(1)
    trainer.close()
    resumed = Trainer(copy.deepcopy(cfg), tmp_path / "run", resume=tmp_path / "run")
    resumed.close()
    assert (resumed.scaler_g.get_scale(), resumed.scaler_d.get_scale()) == (2.0**59, 2.0**39)


# --- what each recipe optimises -------------------------------------------------------------------------------------
def test_v1_main_branch_losses_and_gans_judge_main_dec():
    """VQFR v1: ``l_main_rec``, ``l_g_percep_main`` / ``l_g_style_main`` and the main GANs are taken on the main
    decoder's output ``main_dec``, the texture ones on ``dec``, and the latent loss against the HQ
    ``z_quant_before_conv``: codebook rows, also when the frozen stage-1 block keeps stage 1's quantization warm-up
    (it runs in eval mode, where the warm-up does not apply)."""
    cfg = tiny_vqfr_v1()
    cfg["train"].update(main_gan_start_iter=-1, pixel_main_opt={"loss_weight": 0.5})
    cfg["network_g"]["quantizer_opt"]["Level_4"]["warmup_iters"] = 10**6  # as copied from a stage-1 config
    recipe = VQFRv1Recipe(cfg)
    net = recipe.build_generator()
    recipe.build_branches(lambda d: d.eval())  # eval: no spectral-norm power iteration between two forwards
    g = torch.Generator().manual_seed(0)
    gt, lq = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    terms, _, fakes, _ = recipe.generator_step(net, {"gt": gt, "lq": lq}, 2, 1.0)
    with torch.no_grad():
        out = net(lq, return_all=True)
        hq = recipe.stage1(gt, return_all=True)
        percep_main, style_main = recipe.perceptual(out["main_dec"], gt)
        d_main = recipe.branches["main"].d_global
        gan_main = F.softplus(-d_main(out["main_dec"])).mean()
    assert torch.equal(fakes["main"], out["main_dec"]) and torch.equal(fakes["texture"], out["dec"])
    assert terms["l_main_rec"].item() == pytest.approx(0.5 * (out["main_dec"] - gt).abs().mean().item(), rel=1e-5)
    assert terms["l_g_percep_main"].item() == pytest.approx(percep_main.item(), rel=1e-5)
    assert terms["l_g_style_main"].item() == pytest.approx(style_main.item(), rel=1e-5)
    assert terms["l_g_gan_global_main"].item() == pytest.approx(0.5 * gan_main.item(), rel=1e-5)
    target = hq["feat_dict"]["Level_4"]["z_quant_before_conv"]
    codebook = recipe.stage1.quantizer.quantize_dict["Level_4"].embedding.weight
    tokens = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    nearest = (tokens[:, None] - codebook[None]).abs().amax(-1).min(1).values
    assert nearest.max().item() < 1e-6  # quantized: every token is a code (codes are ~0.1 apart)
    latent = ((out["feat_dict"]["Level_4"]["z_conv"] - target) ** 2).mean()
    assert terms["l_latent"].item() == pytest.approx(latent.item(), rel=1e-5)


def test_v2_optimisers_take_their_own_options_and_parameters():
    """VQFR v2: ``optim_sr_enc`` trains encoder + feat2index and ``optim_sr_maindec`` main_branch +
    inpfeat_extraction, each with its own learning rate (official: 1e-4 and 2e-5)."""
    cfg = tiny_vqfr_v2()
    cfg["train"]["optim_sr_enc"] = {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.96]}
    cfg["train"]["optim_sr_maindec"] = {"type": "Adam", "lr": 2e-5, "betas": [0.5, 0.9]}
    cfg["train"]["perceptual_opt"] = None
    recipe = VQFRv2Recipe(cfg)
    net = recipe.build_generator()
    groups = recipe.param_groups()
    names = {id(p): n for n, p in net.named_parameters()}
    assert groups["optim_sr_enc"][1]["lr"] == 1e-4 and groups["optim_sr_maindec"][1]["lr"] == 2e-5
    assert groups["optim_sr_maindec"][1]["betas"] == [0.5, 0.9]
    enc = [names[id(p)] for p in groups["optim_sr_enc"][0]]
    main = [names[id(p)] for p in groups["optim_sr_maindec"][0]]
    assert enc and all(n.startswith(("encoder", "feat2index")) for n in enc)
    assert main and all(n.startswith(("main_branch", "inpfeat_extraction")) for n in main)


# --- the perceptual loss --------------------------------------------------------------------------------------------
def test_style_measure_l2_and_a_perceptual_weight_of_0():
    """``style_measure: L2`` is the mean squared difference of the Gram matrices; a perceptual weight of 0 switches
    the LPIPS term off (None: no ``l_g_percep`` logged)."""
    loss = PerceptualLoss(perceptual_weight=0.0, style_weight=3.0, random_vgg=True, style_measure="L2")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    percep, style = loss(x, y)
    assert percep is None
    with torch.no_grad():
        expected = sum(((gram_matrix(a) - gram_matrix(b)) ** 2).mean() for a, b in
                       zip(loss.features(x), loss.features(y), strict=True))
    assert style.item() == pytest.approx(3.0 * expected.item(), rel=1e-5)


def test_lpips_normalises_its_inputs_with_the_lpips_constants():
    """LPIPS's ScalingLayer: (x - shift) / scale with shift (-0.030, -0.088, -0.188) and scale (0.458, 0.448,
    0.450), then the features are unit-normalised over channels."""
    loss = PerceptualLoss(random_vgg=True)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = loss.vgg((x - shift) / scale, (3, 8, 15, 22, 29))
        got = loss.features(x)
    for f, h in zip(raw, got, strict=True):
        torch.testing.assert_close(h, f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))


# --- k-means --------------------------------------------------------------------------------------------------------
def test_the_reservoir_keeps_each_row_with_probability_size_over_seen_also_after_a_reset():
    """Algorithm R: a reservoir of 1 offered two rows keeps the second with probability 1/2, whether the rows come
    one by one or together, and after a reset (which restarts the count, ``seen``) as well."""
    kept = {"apart": 0, "together": 0, "after reset": 0}
    trials = 400
    for seed in range(trials):
        r = Reservoir(1, seed=seed)
        r.add(torch.tensor([[0.0]]))
        r.add(torch.tensor([[1.0]]))
        kept["apart"] += int(r.contents().item())
        r = Reservoir(1, seed=seed)
        r.add(torch.tensor([[0.0], [1.0]]))
        kept["together"] += int(r.contents().item())
        r.reset()
        assert r.seen == 0
        r.add(torch.tensor([[0.0]]))
        r.add(torch.tensor([[1.0]]))
        kept["after reset"] += int(r.contents().item())
    for how, n in kept.items():  # binomial(400, 1/2): standard deviation 10
        assert abs(n - trials / 2) < 50, (how, n)


def test_an_empty_cluster_takes_the_point_farthest_from_its_centre(monkeypatch):
    """kmeans: a centre that wins no point moves to the point farthest from its centre (it then captures the
    outlier), not to a point that already has one."""
    import training.kmeans as km

    x = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0], [1.0], [100.0]])
    monkeypatch.setattr(km, "_kmeans_pp", lambda data, k, generator: torch.tensor([[0.0], [0.0]]))
    centres = kmeans(x, 2, max_iter=1)  # one Lloyd round: centre 1 is empty (ties go to centre 0)
    torch.testing.assert_close(centres, torch.tensor([[102.0 / 7], [100.0]]))


def test_kmeans_re_estimates_from_exactly_k_tokens_and_is_off_without_maxiters():
    """A reservoir holding exactly as many tokens as codes is enough (each token becomes a code); with
    ``reestimate_maxiters`` <= 0 re-estimation is off whatever ``reestimate_iters`` says."""
    codebook = nn.Parameter(torch.zeros(4, 2))
    tokens = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    re = CodebookReestimator(codebook, reservoir_size=8, reestimate_iters=1, reestimate_maxiters=10)
    assert re.step(1, tokens)
    assert sorted(map(tuple, codebook.detach().tolist())) == sorted(map(tuple, tokens.tolist()))
    off = CodebookReestimator(nn.Parameter(torch.zeros(4, 2)), 8, 1, -1)
    assert not off.active and not off.step(1, tokens) and off.reservoir.filled == 0


# --- EMA and exact resume -------------------------------------------------------------------------------------------
def test_the_ema_follows_each_trainer_step_and_is_off_by_default(tmp_path):
    """After one step at ``ema_decay`` 0.75 the EMA moved a quarter of the way to the trained weights; without
    ``ema_decay`` there is no EMA (as the official run) and the checkpoint holds ``params`` only."""
    cfg = tiny_vqgan_v2()
    cfg["train"].update(total_iter=1, gan_start_iter=100, perceptual_opt=None, ema_decay=0.75)
    trainer = Trainer(copy.deepcopy(cfg), tmp_path / "a")
    start = [p.detach().clone() for p in unwrap(trainer.net).parameters()]
    trainer.step(next(iter(trainer.loader)), 1)
    trainer.close()
    moved = 0
    for s, p, e in zip(start, unwrap(trainer.net).parameters(), trainer.ema.model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.75 * s + 0.25 * p.detach())
        moved += int(not torch.equal(s, p))
    assert moved > 0
    cfg["train"].pop("ema_decay")
    trainer = Trainer(cfg, tmp_path / "b")
    trainer.train()
    assert trainer.ema is None
    assert set(torch.load(tmp_path / "b" / "models" / "net_g_1.pth", weights_only=True)) == {"params"}


def test_resume_reproduces_stage1_with_kmeans_and_ema(tmp_path):
    """A VQGANv1 run resumed between two k-means re-estimations ends with the codebook, weights and EMA (in the
    training state and in ``params_ema``) of the uninterrupted run: the reservoir, its generator, the count of
    re-estimations and the EMA are all resumed."""
    cfg = tiny_vqgan_v1()
    cfg["network_g"]["quantizer_opt"]["Level_4"].update(reestimate_iters=2, reestimate_maxiters=10, warmup_iters=-1)
    cfg.pop("network_d")
    cfg["train"].update(total_iter=4, perceptual_opt=None, kmeans_iters=20)
    cfg["logger"]["save_checkpoint_freq"] = 3
    Trainer(copy.deepcopy(cfg), tmp_path / "a").train()
    Trainer(copy.deepcopy(cfg), tmp_path / "b", resume=tmp_path / "a" / "training_states" / "3.state").train()
    a = torch.load(tmp_path / "a" / "training_states" / "4.state", weights_only=True)
    b = torch.load(tmp_path / "b" / "training_states" / "4.state", weights_only=True)
    for part in ("net_g", "ema"):
        sa, sb = (a["nets"]["net_g"], b["nets"]["net_g"]) if part == "net_g" else (a["ema"], b["ema"])
        for k, v in sa.items():
            assert torch.equal(v, sb[k]), (part, k)
    ca = torch.load(tmp_path / "a" / "models" / "net_g_4.pth", weights_only=True)
    cb = torch.load(tmp_path / "b" / "models" / "net_g_4.pth", weights_only=True)
    for k, v in ca["params_ema"].items():
        assert torch.equal(v, cb["params_ema"][k]), k
    assert b["kmeans"]["Level_4"]["count"] == 2  # re-estimated at iterations 2 and 4


@pytest.mark.parametrize("make,key,disc", [(tiny_vqgan_v2, "gan_opt", "network_d"),
                                           (tiny_vqfr_v1, "global_gan_opt", "network_d_global"),
                                           (tiny_vqfr_v2, "gan_opt", "network_d")])
def test_a_global_discriminator_without_its_loss_block_is_refused_by_name(make, key, disc):
    """A global discriminator block with no ``gan_opt`` (v1 ``global_gan_opt``) is refused, naming both: the
    official trainer trains no GAN then, and here the discriminators trained while the generator's GAN term weighed
    0, silently. Without the discriminator blocks as well, the run trains without a GAN."""
    from vqfr.errors import ConfigError

    cfg = make()
    cfg["train"].pop(key)
    with pytest.raises(ConfigError, match=f"{disc} is given but train.{key} is not") as err:
        RECIPES[cfg["model_type"]](cfg).build_branches(lambda module: module)
    assert f"add train.{key}" in err.value.fix and f"remove {disc}" in err.value.fix
    for name in [k for k in cfg if k.startswith("network_d")]:
        del cfg[name]
    recipe = RECIPES[cfg["model_type"]](cfg)
    recipe.build_branches(lambda module: module)
    assert recipe.branches == {}


@pytest.mark.parametrize("make,keys", [(tiny_vqgan_v2, ["train.gan_opt"]),
                                       (tiny_vqfr_v1, ["train.global_gan_opt", "train.patch_gan_opt"]),
                                       (tiny_vqfr_v2, ["train.gan_opt", "train.patch_gan_opt"])])
def test_gan_loss_blocks_without_any_discriminator_are_reported_as_ignored(make, keys, caplog):
    """Removing the discriminator blocks trains without a GAN; the GAN loss blocks left in ``train`` are then
    ignored, and the log says so once, naming them (the run used to go on without a word)."""
    cfg = make()
    for name in [k for k in cfg if k.startswith("network_d")]:
        del cfg[name]
    with caplog.at_level("WARNING", logger="training"):
        RECIPES[cfg["model_type"]](cfg).build_branches(lambda module: module)
    warnings = [r.getMessage() for r in caplog.records if "GAN" in r.getMessage()]
    assert len(warnings) == 1 and "trains without a GAN" in warnings[0]
    assert warnings[0].split("ignores ")[1].split(";")[0] == ", ".join(keys)
    caplog.clear()
    with caplog.at_level("WARNING", logger="training"):  # with its discriminators: nothing to report
        RECIPES[make()["model_type"]](make()).build_branches(lambda module: module)
    assert not [r for r in caplog.records if "without a GAN" in r.getMessage()]
