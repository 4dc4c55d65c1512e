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
        "    print(sorted({str(l.constexprs['DOT_PRECISION']) for name, l in aot_check.vqfr_launches(dtype)\n"
        "                  if not name.startswith('group_norm')}))\n"  # the GroupNorm kernels have no tl.dot
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == [f"['{expected}']", "['None']"], res.stdout


def test_traced_backward_launches_run_one_config_so_no_trial_adds_into_the_gradients(monkeypatch):
    """The backward kernels add into zero-filled gradient buffers with atomics; their autotuners zero the buffers
    between benchmark trials (reset_to_zero). Traced through ``torch.library.wrap_triton`` (torch.compile of a model
    on a GPU, where the ops are triton_ops), torch runs the pruner at trace time and records a new autotuner with the
    kept configs and no reset_to_zero, so Inductor benchmarked several configs into the real buffers and the first
    compiled call of each shape returned a multiple of the gradient. Traced launches now carry one config: nothing to
    benchmark. (The trace is made here on the CPU with fake tensors; the GPU run itself is not tested.)"""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "TRACEABLE_LAUNCHES", True)  # the launches as the GPU flavour of the ops makes them
    deform = dispatch.triton_module("deform_conv_triton")
    conv = ((1, 1), (1, 1), (1, 1))
    args = (torch.randn(1, 128, 8, 8), torch.randn(1, 128, 8, 8), torch.randn(1, 72, 8, 8), torch.rand(1, 36, 8, 8),
            torch.randn(128, 128, 3, 3))
    _, launches = deform.backward_launches(*args, *conv)
    for launch in launches:  # eagerly, a real choice, and the buffer reset between trials
        tuner = launch.kernel
        kept = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, launch.args, strict=False)),
                                        **launch.constexprs)
        assert len(kept) > 1 and tuner.reset_to_zero
    graph = make_fx(lambda *a: deform.backward(*a, *conv), tracing_mode="fake")(*args).graph
    nodes = [n for n in graph.nodes if n.target is triton_kernel_wrapper_mutation]
    traced = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]) for n in nodes]
    assert [k.fn.__name__ for k in traced] == ["_bwd_input_kernel", "_bwd_weight_kernel"]
    for node, kernel, launch in zip(nodes, traced, launches, strict=True):
        assert len(kernel.configs) == 1, kernel.configs
        expected = deform.untuned(launch).constexprs  # the first config the pruner keeps
        assert (kernel.configs[0].num_warps, kernel.configs[0].num_stages) == (expected["num_warps"],
                                                                               expected["num_stages"])
        assert all(node.kwargs["kwargs"][k] == expected[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_forward_tries_l1_gathers_and_keeps_the_configs_the_h100_chose_before(dtype, monkeypatch):
    """The pipelined corner gathers bypass L1 (cp.async.cg; docs/KERNELS.md). The forward's list adds configs that
    gather through L1 (GATHER_L1, num_stages 1), untimed on a GPU, and keeps the pipelined config the H100 chose on
    2026-11-27 as it was (GATHER_L1 0), so that the autotuner, which keeps the fastest, cannot do worse than before.
    Both kinds must survive the pruner at VQFR's largest level, in fp16 and in exact fp32."""
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launch = dict(aot_check.vqfr_launches(dtype))["deform_conv forward"]
    tuner = launch.kernel
    named = dict(zip(tuner.arg_names, launch.args, strict=False))
    kept = tuner.early_config_prune(tuner.configs, named, **launch.constexprs)

    def shape(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages,
                c.kwargs["GATHER_L1"])

    shapes = {shape(c) for c in kept}
    assert (64, 128, 32, 8, 3, 0) in shapes  # the previous choice, exactly as it was compiled then
    assert any(s[4] == 1 for s in shapes)  # plain ld.global.ca gathers on every triton version
    assert any(s[4] > 1 and s[5] == 1 for s in shapes)  # cp.async.ca where triton honours it (3.9)
    assert all(isinstance(c.kwargs["GATHER_L1"], int) for c in kept)  # Inductor re-emits the configs: no strings
