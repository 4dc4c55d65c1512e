"""The autotuners' cache keys and the dot precision they tune for, without a GPU.

The compiled (not interpreted) Triton modules carry the real config lists and pruners. Their autotuners are driven
here with the launches of ``kernels.aot_check`` (meta tensors) and with the benchmark and the launch stubbed out, so
what is checked is the autotuner's own bookkeeping: which config it picks for which call.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed")

LAUNCHES = ["deform_conv forward", "deform_conv backward (x, offset, mask)", "deform_conv backward (weight)",
            "nearest_code"]


class _NoLaunch:
    """Stands in for the JIT function behind an autotuner: records nothing, launches nothing."""

    def run(self, *args, **kwargs):
        return None


@pytest.mark.parametrize("name", LAUNCHES)
def test_a_config_tuned_under_one_dot_precision_is_not_reused_under_the_other(name, monkeypatch):
    """fp32 kernels take DOT_PRECISION "tf32" or "ieee" from torch's matmul setting. The constexpr itself always
    reached the compiler (triton specialises on constexpr values), but the autotune key lacked it: the config tuned
    under TF32 was then reused for exact fp32, where the pruner drops the configs that spill (the DCN forward's
    128x128 tiles), and the other way round. Each precision must get the best of its own pruned configs."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = dict(aot_check.vqfr_launches(torch.float32))[name]
    tuner = launch.kernel
    assert len(tuner.configs) > 1  # the compiled module: a real choice to make
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "fn", _NoLaunch())
    order = {id(c): i for i, c in enumerate(tuner.configs)}

    def bench(*args, config, **kwargs):
        # TF32 favours the first configs of the list (the large tiles), exact fp32 the last ones.
        rank = order[id(config)]
        return [float(rank if kwargs["DOT_PRECISION"] == "tf32" else -rank)]

    monkeypatch.setattr(tuner, "_bench", bench)
    named = dict(zip(tuner.arg_names, launch.args, strict=False))
    for precision, pick in (("tf32", 0), ("ieee", -1), ("tf32", 0)):
        constexprs = {**launch.constexprs, "DOT_PRECISION": precision}
        expected = tuner.early_config_prune(tuner.configs, named, **constexprs)[pick]
        tuner[launch.grid](*launch.args, **constexprs)
        assert tuner.best_config is expected, f"{precision}: ran {tuner.best_config}, expected {expected}"


def test_the_input_gradient_kernel_tunes_each_set_of_gradients_asked_for(monkeypatch):
    """Without grad_x the kernel does no atomics, without grad_offset/grad_mask no corner reads: a config tuned for
    the full backward must not be reused, from the cache, for a partial one (or the other way round)."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = dict(aot_check.vqfr_launches(torch.float16))["deform_conv backward (x, offset, mask)"]
    tuner = launch.kernel
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "fn", _NoLaunch())
    order = {id(c): i for i, c in enumerate(tuner.configs)}
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: [float(order[id(config)] if k["NEED_X"]
                                                                         else -order[id(config)])])
    named = dict(zip(tuner.arg_names, launch.args, strict=False))
    for need_x, pick in ((True, 0), (False, -1), (True, 0)):
        constexprs = {**launch.constexprs, "NEED_X": need_x, "NEED_OFFSET": True, "NEED_MASK": True}
        expected = tuner.early_config_prune(tuner.configs, named, **constexprs)[pick]
        tuner[launch.grid](*launch.args, **constexprs)
        assert tuner.best_config is expected, f"NEED_X={need_x}: ran {tuner.best_config}, expected {expected}"


@pytest.mark.parametrize("name", LAUNCHES[:3])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_a_problem_narrower_than_every_tile_gets_the_narrowest_tile_that_does_not_spill(name, precision, monkeypatch):
    """With a few channels every tile is too wide and the pruner keeps one config: it kept the first of the list,
    the widest (128x128 for the forward), which spills in exact fp32."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = dict(aot_check.vqfr_launches(torch.float32))[name]
    tuner = launch.kernel
    named = {**dict(zip(tuner.arg_names, launch.args, strict=False)), "C_OUT": 4, "CG": 2}
    kept = tuner.early_config_prune(tuner.configs, named, **{**launch.constexprs, "DOT_PRECISION": precision})
    area = [c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_C"] for c in tuner.configs]
    assert len(kept) == 1 and kept[0].kwargs["BLOCK_N"] * kept[0].kwargs["BLOCK_C"] == min(area), str(kept)
    if precision == "ieee":  # and it is one the pruner keeps for exact fp32 when every tile fits the problem
        wide = tuner.early_config_prune(tuner.configs, {**named, "C_OUT": 4096, "CG": 4096},
                                        **{**launch.constexprs, "DOT_PRECISION": "ieee"})
        assert kept[0] in wide, str(kept)


def test_dcn_forward_exact_fp32_never_runs_a_tile_pruned_for_spilling(monkeypatch):
    """The case that matters: tuned under TF32 first, the exact-fp32 forward ran the 128x128 tile (64 fp32
    accumulators per thread), which ``python -m kernels.aot_check`` shows spilling on sm_90."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = dict(aot_check.vqfr_launches(torch.float32))["deform_conv forward"]
    tuner = launch.kernel
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "fn", _NoLaunch())
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: [-float(config.kwargs["BLOCK_M"] *
                                                                        config.kwargs["BLOCK_N"])])
    tuner[launch.grid](*launch.args, **{**launch.constexprs, "DOT_PRECISION": "tf32"})
    assert tuner.best_config.kwargs["BLOCK_M"] * tuner.best_config.kwargs["BLOCK_N"] > 32 * 32 * 8
    tuner[launch.grid](*launch.args, **{**launch.constexprs, "DOT_PRECISION": "ieee"})
    best = tuner.best_config
    assert best.kwargs["BLOCK_M"] * best.kwargs["BLOCK_N"] <= 32 * 32 * best.num_warps, str(best)


@pytest.mark.parametrize("setting,expected", [
    ("pass", "ieee"),  # torch's default: exact fp32
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
])
def test_dot_precision_follows_torchs_matmul_setting_through_either_api(setting, expected):
    """Every fp32 launch takes its dot precision from torch's matmul setting, set through the legacy API or the new
    one (``fp32_precision``, torch >= 2.9, which torch's own warnings recommend). The launchers read
    ``torch.get_float32_matmul_precision()``, which raises RuntimeError once the new API has been used, so every
    fp32 kernel launch failed. In a subprocess: the setting is global, and torch refuses to mix the APIs after."""
    from tests.conftest import ROOT

    code = (
        "import torch\n"
        f"{setting}\n"
        "from kernels import aot_check\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    print(sorted({str(l.constexprs['DOT_PRECISION']) for _, l in aot_check.vqfr_launches(dtype)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == [f"['{expected}']", "['None']"], res.stdout
