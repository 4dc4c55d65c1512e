"""The benchmark's helpers: FLOP and byte counting (roofline), the profiler summary and the GPU check's verdicts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vqfr
from deploy import gpu_check, profile_model, report, roofline
from tests.conftest import seeded_model
from tests.test_bench import SMALL_V1, SMALL_V2


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_roofline_counts_what_torchs_flop_counter_counts_plus_the_deformable_convs(options):
    model = seeded_model(copy.deepcopy(options))
    cost = roofline.count(model, batch=2, size=32, dtype=torch.float32)
    kwargs = {"fidelity": 1.0} if options["type"] == "VQFRv2" else {}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(2, 3, 32, 32), **kwargs)
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert cost.flops["conv"] == by_op["aten.convolution"]
    dcn = sum(2 * 2 * m.weight.shape[0] * m.weight.shape[1] * 9 * s * s for m, s in _dcn_sizes(model, 32))
    assert cost.flops["deform_conv"] == dcn
    # Attention by hand (torch's counter misses the CPU flash kernel): q k^T and a v, 2 * B * L * L * C each.
    blocks = [m for m in model.modules() if type(m).__name__ == "AttnBlock"]
    tokens = (32 // model.patch) ** 2
    attention = sum(2 * 2 * 2 * tokens * tokens * m.q.out_channels for m in blocks)
    linear = by_op.get("aten.addmm", 0)
    assert cost.flops["matmul"] + cost.flops["attention"] == attention + linear
    assert cost.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert cost.weight_bytes < cost.ideal_bytes < cost.eager_bytes



def test_roofline_least_bytes_by_kind_read_a_norm_twice_and_a_conv_with_its_weights():
    """A conv moves its input, weight, bias and output once; a GroupNorm or LayerNorm reads its input twice
    (statistics, then normalise) and writes its output once, and adds no FLOPs; elementwise ops are fused away."""
    import torch.nn.functional as F

    def empty(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)

    x, w, b, gamma, beta = empty(2, 8, 16, 12), empty(4, 8, 3, 3), empty(4), empty(4), empty(4)
    cost = roofline.Cost()
    with torch.no_grad(), roofline._Counter(cost, {id(t) for t in (w, b, gamma, beta)}):
        y = F.conv2d(x, w, b, padding=1)
        F.silu(F.group_norm(y, 2, gamma, beta))
        F.layer_norm(y, (12,))
    x_bytes, y_bytes = 2 * 8 * 16 * 12 * 2, 2 * 4 * 16 * 12 * 2
    assert cost.bytes_by_kind == {"conv": x_bytes + 4 * 8 * 9 * 2 + 4 * 2 + y_bytes, "norm": 2 * 3 * y_bytes}
    assert cost.ops["norm"] == 2 and set(cost.flops) == {"conv"}


def test_roofline_floor_by_kind_is_the_larger_of_compute_and_bytes_and_the_table_sums_them(monkeypatch):
    """At the H100 rates, 790 GFLOP and 3 GB are 1 ms each: a conv of 790 GFLOP over 1.5 GB is compute-bound (1 ms),
    a norm of 6 GB is bandwidth-bound (2 ms); kinds come largest bytes first, and the table's last row adds them."""
    flops = {"conv": 790e9, "deform_conv": 0.0, "attention": 0.0, "matmul": 0.0, "nearest_code": 0.0}
    cost = roofline.Cost(flops=flops, flops_by_size={"512x512": 790e9}, bytes_by_kind={"conv": 1.5e9, "norm": 6e9},
                         ops={"conv": 3, "norm": 5})
    floors = roofline.floors_by_kind(cost)
    assert list(floors) == ["norm", "conv"]
    assert floors["norm"] == pytest.approx((0.0, 6.0, 2.0)) and floors["conv"] == pytest.approx((790.0, 1.5, 1.0))
    assert roofline.floors_by_kind(cost, (395e12, 1.5e12))["conv"][2] == pytest.approx(2.0)  # its rates, not the H100's
    monkeypatch.setattr(roofline, "count", lambda *a, **k: cost)
    assert "by kind of op" not in roofline._table("v2", [8], 1.0, roofline.H100)
    table = roofline._table("v2", [8], 1.0, roofline.H100, by_kind=True)
    assert "### VQFRv2 at 512x512, fp16, batch 8, fidelity 1: by kind of op" in table
    assert "| norm | 5 | 0.0 | 6.000 | 0.000 | 2.000 | 2.000 |" in table
    assert "| conv | 3 | 790.0 | 1.500 | 1.000 | 0.500 | 1.000 |" in table
    assert table.endswith("| sum of floors | | | | | | 3.000 |")

def _dcn_sizes(model, size):
    """(DCNv2Pack, its feature-map side) for every deformable conv of the model at this input size."""
    out = []
    for name, m in model.named_modules():
        if type(m).__name__ == "DCNv2Pack":
            level = int(name.split("Level_")[1].split(".")[0])
            out.append((m, size // level))
    return out


def test_roofline_of_the_official_v2_matches_the_published_count():
    """OFFICIAL_VQFR.md section 10: 1013.6 GFLOP counted + 50.8 deformable = 1064.4 GFLOP at 512x512."""
    cost = roofline.count(vqfr.models.official_options("v2"), batch=1, size=512)
    assert cost.total_flops / 1e9 == pytest.approx(1064.4, abs=0.15)
    assert cost.flops["deform_conv"] / 1e9 == pytest.approx(50.8, abs=0.15)
    floors = roofline.floors(cost)
    assert floors["compute_ms"] == pytest.approx(1.35, abs=0.01)  # the anchor's arithmetic floor
    # The eager peak sits in the finest warping level, where 192 channels at 512x512 meet.
    assert cost.peak_at.startswith("main_branch.align_func_dict.Level_1")
    assert 0.3e9 < cost.peak_live_bytes < 1e9


@pytest.mark.parametrize("version,before,bound", [("v2", 0.412e9, 0.34e9), ("v1", 0.718e9, 0.48e9)])
def test_inference_frees_the_finest_levels_activations_early(version, before, bound):
    """Activations alive at once in an eager fp16 forward without autograd, 1x3x512x512 (meta tensors, counted by
    roofline). Concatenations released after their first conv, the finest offset feature dropped, SiLU in place:
    v2 0.412 -> 0.328 GB, v1 0.718 -> 0.466 GB. The bound fails if any of those comes back."""
    cost = roofline.count(vqfr.models.official_options(version), batch=1, size=512)
    assert cost.peak_live_bytes < bound < before


def test_roofline_does_not_count_an_in_place_op_as_new_memory():
    x = torch.empty(1, 4, 8, 8, device="meta")
    cost = roofline.Cost()
    counter = roofline._Counter(cost, weights=set())
    with torch.no_grad(), counter:
        y = x + 1  # 1 KiB of new memory
        torch.nn.functional.silu(y, inplace=True)  # none
        y.mul_(2)  # none
    assert cost.peak_live_bytes == 4 * 8 * 8 * 4


def test_profile_groups_operators_by_what_they_do():
    model = seeded_model(copy.deepcopy(SMALL_V2))
    result = profile_model.profile(model, "cpu", "fp32", batch=1, size=16, mode="eager", iters=1, warmup=1)
    assert result.total_ms > 0 and result.per_category["convolution"] > 0
    assert result.per_category["deformable conv"] > 0 and result.per_category["normalisation"] > 0
    text = profile_model.report(result, "tiny")
    assert "| convolution |" in text and "aten::" in text
    assert profile_model.category("triton_red_fused_native_group_norm_silu_0") == "normalisation"
    assert profile_model.category("sm90_xmma_fprop_implicit_gemm_f16f16") == "convolution"
    assert profile_model.category("_fwd_kernel") == "deformable conv"
    for kernel in ("_group_norm_stats_kernel", "_group_norm_apply_kernel", "vqfr::group_norm_silu"):
        assert profile_model.category(kernel) == "normalisation"


def test_profile_of_the_max_mode_with_the_fused_group_norm():
    """``--fused-group-norm``: the max mode's GroupNorms run as the vqfr op, counted as normalisation."""
    model = seeded_model(copy.deepcopy(SMALL_V2))
    result = profile_model.profile(model, "cpu", "fp32", batch=1, size=16, mode="max", iters=1, warmup=1,
                                   fused_group_norm=True)
    assert result.vqfr_ops.get("vqfr::group_norm_silu", 0) > 0 and result.per_category["normalisation"] > 0


def row(backend, batch, ms, fidelity=1.0, baseline=False, mem=None, precision="fp16"):
    return {"backend": backend, "precision": precision, "batch": batch, "fidelity": fidelity, "what": "forward",
            "status": "ok", "baseline": baseline, "median_ms": ms, "img_per_s": batch * 1e3 / ms,
            "peak_mem_mb": mem, "max_abs_err": 1e-3, "psnr_db": 55.0}


def test_gpu_check_judges_targets_on_the_best_fp16_candidate():
    rows = [row("reference", 1, 30.0, baseline=True), row("torch", 1, 9.0), row("torch-max", 1, 3.5),
            row("torch-max", 1, 1.0, precision="fp32"),  # another precision never counts
            row("reference", 8, 120.0, baseline=True), row("torch-max", 8, 17.0, mem=2000)]
    v2_b1, v2_b8 = gpu_check.TARGETS[0], gpu_check.TARGETS[1]
    e1 = gpu_check.evaluate(v2_b1, rows)
    assert e1["best"]["backend"] == "torch-max" and e1["met"] is True and e1["baseline"]["median_ms"] == 30.0
    e8 = gpu_check.evaluate(v2_b8, rows)
    assert e8["met"] is False  # 470 img/s < 500 although the memory fits
    e8 = gpu_check.evaluate(v2_b8, rows[:-1] + [row("torch-max", 8, 15.0, mem=3500)])
    assert e8["met"] is False  # fast enough, but 3.67 GB > 3 GB
    assert gpu_check.evaluate(gpu_check.TARGETS[3], rows)["best"] is None  # no v1 rows: not measured
    text = gpu_check.summary({"v2": ({"device_name": "H100"}, rows)})
    assert "| v2, batch 1 | <= 4 ms | 3.50 ms" in text and "| **no** |" in text and "not measured" in text


def test_gpu_check_dry_run_lists_the_steps(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in [*gpu_check.CHECKS, *(s for s in gpu_check.STEPS if s not in ("checks", *gpu_check.ON_REQUEST))]:
        assert f"[gpu_check] {name}:" in printed
    assert "[gpu_check] v2_autotune:" not in printed  # minutes of autotuning: only when named
    assert "[gpu_check] groupnorm:" not in printed  # the opt-in A/B: only when named
    assert "--precision fp16 --batch 1,8" in printed
    assert "tests/test_kernels_triton.py tests/test_golden.py" in printed and "--max-iters 200" in printed
    assert "[gpu_check] train_check:" in printed and printed.count("training.train") == 1  # once, in the checks
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--steps", "v2_autotune"]) == 0
    assert "--compile-mode max-autotune-no-cudagraphs" in capsys.readouterr().out
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--steps", "groupnorm"]) == 0
    printed = capsys.readouterr().out
    assert "deploy.bench_kernels --ops group_norm --dtypes fp16" in printed and "group_norm.json" in printed
    assert "--backends torch-max-gn,torch-max --precision fp16 --batch 8" in printed
    assert gpu_check.STEPS["groupnorm"].cap <= 300 and "groupnorm" in gpu_check.RUNS
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--steps", "kernels", "train", "--train-iters",
                           "300"]) == 0
    printed = capsys.readouterr().out
    assert "timeout 210 " in printed and "--max-iters 300" in printed and "train_loss.png" in printed


def stand_in_python(folder, monkeypatch, script: str) -> None:
    """Make ``gpu_check`` build its commands around a shell script playing the Python interpreter."""
    fake = folder / "python"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check.sys, "executable", str(fake))


def test_gpu_check_profiles_step_profiles_each_other_target_into_its_own_file(tmp_path, monkeypatch):
    """The ``profiles`` step (on request) runs profile_model in max mode for v2 b1, v2 f0 b1, v1 b1 and v1 b8, one
    file each, in that order, and one failing profile does not stop the next; its digest shows each category table.
    A stand-in interpreter writes what it was asked into the --out file."""
    stand_in_python(tmp_path, monkeypatch, 'for last; do :; done\necho "## $*" > "$last"\n'
                    'echo "| category |\n| kernel | x |" >> "$last"\n'
                    'case "$*" in *"--version v2 --batch 1 --mode"*) exit 1;; esac\n')
    out = tmp_path / "out dir"  # a space: the paths are quoted for the shell
    out.mkdir()
    assert "profiles" in gpu_check.ON_REQUEST
    command = gpu_check.STEPS["profiles"].command(tmp_path, out, gpu_check.argparse.Namespace())
    assert subprocess.run(command, check=False).returncode == 0
    expected = {"profile_v2_b1": "--version v2 --batch 1 --mode max",
                "profile_v2_f0_b1": "--version v2 --batch 1 --fidelity 0 --mode max",
                "profile_v1_b1": "--version v1 --batch 1 --mode max",
                "profile_v1_b8": "--version v1 --batch 8 --mode max"}
    for stem, args in expected.items():
        assert (out / f"{stem}.md").read_text().startswith(f"## -m deploy.profile_model {args} --out {out}/{stem}.md")
    digest = gpu_check._digest("profiles", out, tmp_path)
    assert digest.count("| category |") == 4 and "| kernel |" not in digest
    assert digest.index("--version v2 --batch 1 --mode") < digest.index("--fidelity 0") < digest.index("v1 --batch 1")


def test_gpu_check_train_step_profiles_an_r1_iteration_and_copies_the_tables_out(tmp_path, monkeypatch):
    """The training check asks for iterations 160 (lazy R1) and 161 to be profiled when it runs that far, copies
    their tables into the output folder, and still reports the plot's exit status. A stand-in interpreter plays the
    trainer (writing the profile files into its --out folder) and a failing plot."""
    stand_in_python(tmp_path, monkeypatch, 'case "$*" in\n*training.train*) while [ "$1" != "--out" ]; do shift; '
                    'done; mkdir -p "$2"; echo one > "$2/profile_iter_160.md"; echo two > "$2/profile_iter_161.md";;'
                    '\n*training.plot*) exit 3;;\nesac\n')
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    command = gpu_check._train(work, out, 300, 210)
    assert "--profile-iters 160,161" in command[-1]
    assert subprocess.run(command, check=False).returncode == 3
    assert (out / "train_profile_iter_160.md").read_text() == "one\n"
    assert (out / "train_profile_iter_161.md").read_text() == "two\n"
    assert "--profile-iters 160;" in gpu_check._train(work, out, 160, 210)[-1]
    assert "--profile-iters" not in gpu_check._train(work, out, 100, 210)[-1]  # a short run profiles nothing


def test_gpu_check_kills_a_job_past_its_cap_with_its_children_and_reports_it(tmp_path, monkeypatch):
    marker = tmp_path / "child_survived"
    slow = gpu_check.Step(lambda w, o, a: ["sh", "-c", f"(sleep 3; touch {marker}) & wait"], 1)
    quick = gpu_check.Step(lambda w, o, a: ["sh", "-c", "echo fine; echo env=$CHECK_ME"], 5, {"CHECK_ME": "yes"})
    monkeypatch.setattr(gpu_check, "CHECKS", {"slow": slow, "quick": quick})
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--steps", "checks", "--budget", "60"]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "`slow`: exit timeout" in text and "`quick`: exit 0" in text and "env=yes" in text
    __import__("time").sleep(3.5)
    assert not marker.exists()  # the shell's child was killed too
    assert (tmp_path / "out" / "logs.tgz").is_file()


def test_gpu_check_saves_and_prints_each_steps_results_before_the_next_step(tmp_path, monkeypatch, capsys):
    """The remote runner's limit can kill the whole call: what the finished steps measured must be in OUT already."""
    out, work = tmp_path / "out", tmp_path / "work"
    measured = report.write_json(tmp_path / "measured.json", {"device_name": "H100"},
                                 [row("reference", 1, 30.0, baseline=True), row("torch-max", 1, 3.5)])
    monkeypatch.setitem(gpu_check.STEPS, "v2", gpu_check.Step(
        lambda w, o, a: ["sh", "-c", f"mkdir -p {w}/v2 && cp {measured} {w}/v2/results.json"], 10))
    monkeypatch.setitem(gpu_check.STEPS, "v1", gpu_check.Step(  # what a kill at this point leaves in OUT
        lambda w, o, a: ["sh", "-c", f"grep -h '| v2, batch 1 |' {o}/summary.md; grep -c torch-max {o}/results.json; "
                                     f"tar -tzf {o}/logs.tgz"], 10))
    assert gpu_check.main(["--out", str(out), "--work", str(work), "--steps", "v2", "v1", "--budget", "60"]) == 0
    seen_by_v1 = (work / "v1.log").read_text()
    assert "| v2, batch 1 | <= 4 ms | 3.50 ms" in seen_by_v1  # summary.md
    assert "\n1\n" in seen_by_v1 and "v2/results.json" in seen_by_v1  # results.json, logs.tgz
    printed = capsys.readouterr().out
    assert "[gpu_check] v2 measured:" in printed and "| torch-max | fp16 | 1 | 1 | 3.5 |" in printed


def test_gpu_check_keeps_its_jobs_in_the_calls_session(tmp_path, monkeypatch):
    """A job in a session of its own would outlive a kill of the call (the remote runner ends the call's session)."""
    monkeypatch.setattr(gpu_check, "CHECKS", {"sid": gpu_check.Step(
        lambda w, o, a: [sys.executable, "-c", "import os; print('sid', os.getsid(0), 'pgid', os.getpgid(0))"], 10)})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "checks", "--budget", "60"]) == 0
    _, sid, _, pgid = (tmp_path / "runs" / "sid.log").read_text().split()
    assert int(sid) == os.getsid(0) and int(pgid) != os.getpgid(0)  # its own group: a kill reaches its children


def test_folder_benchmark_times_real_cli_runs_and_leaves_the_model_as_it_was(tmp_path, capsys):
    from deploy import bench_folder
    from tests.conftest import TINY_V2
    from vqfr.runtime import Runtime

    weights = vqfr.save_safetensors(seeded_model(TINY_V2, seed=1), tmp_path / "tiny.safetensors")
    real = Runtime._restore_crops
    assert bench_folder.main(["--count", "5", "--identity", "--io-threads", "1,2", "--repeat", "1", "--batch", "2",
                              "--work", str(tmp_path / "work"), "--weights", str(weights), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows), table
    assert len(list((tmp_path / "work" / "results" / "restored_faces").glob("*.png"))) == 5
    assert Runtime._restore_crops is real
    with pytest.raises(RuntimeError, match="the CLI run failed"):  # a failing run is an error, not a fast row
        bench_folder.time_run(tmp_path / "work" / "inputs", tmp_path / "out", ["--weights", str(tmp_path / "none")])


@pytest.mark.parametrize("args,message", [
    (["--iters", "0"], "--iters must be at least 1"),  # used to print an empty table of 0 ms
    (["--device", "cuda"], "torch sees no CUDA GPU"),  # used to end in "Torch not compiled with CUDA enabled"
    (["--precision", "fp8"], "invalid choice: 'fp8'"),  # used to end in a ConfigError traceback, the model built
], ids=["iters 0", "cuda without a GPU", "unknown precision"])
def test_profile_refuses_what_it_cannot_profile(args, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profile_model, "profile", lambda *a, **k: pytest.fail("profiled"))
    with pytest.raises(SystemExit) as exc:
        profile_model.main(["--config", "v2", "--device", "cpu", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--iters", "0"], "--iters must be at least 1"),
                                          (["--threads", "0"], "--threads must be at least 1")])
def test_cpu_latency_refuses_counts_below_one(args, message, capsys, monkeypatch):
    from deploy import cpu_latency

    monkeypatch.setattr(vqfr, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as exc:
        cpu_latency.main(args)  # --iters 0 used to end in statistics.StatisticsError after building the model
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--bad-fraction", "-0.1"], "--bad-fraction must be between 0 and 1"),
                                          (["--bad-fraction", "1.5"], "--bad-fraction must be between 0 and 1"),
                                          (["--count", "0"], "--count must be at least 1")])
def test_soak_refuses_a_folder_it_cannot_make(args, message, tmp_path, capsys, monkeypatch):
    """A negative --bad-fraction ended in numpy's ValueError; 1.5 made every input bad without a word."""
    from deploy import soak

    monkeypatch.setattr(soak, "run_soak", lambda *a, **k: pytest.fail("the soak ran"))
    with pytest.raises(SystemExit) as exc:
        soak.main(["--count", "10", "--out", str(tmp_path), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_times_without_matplotlib(monkeypatch):
    """deploy.bench now refuses to start without matplotlib unless --no-chart: the GPU check must not lose its
    timings on a machine without it."""
    import importlib.util

    from deploy import gpu_check

    real = importlib.util.find_spec
    assert "--no-chart" not in gpu_check._bench("v2", "1", "torch", Path("out"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert gpu_check._bench("v2", "1", "torch", Path("out"))[-1] == "--no-chart"


def test_gpu_check_does_not_call_a_target_met_when_its_memory_was_not_measured():
    """An onnxruntime/TensorRT row may have no peak memory (None): fast enough is not enough for "v2, batch 8" (500
    img/s and 3 GB), so the verdict is undecided ("-"), and a miss on throughput is still a miss."""
    v2_b8 = gpu_check.TARGETS[1]
    assert gpu_check.evaluate(v2_b8, [row("tensorrt", 8, 10.0, mem=None)])["met"] is None
    assert gpu_check.evaluate(v2_b8, [row("tensorrt", 8, 20.0, mem=None)])["met"] is False
    assert gpu_check.evaluate(v2_b8, [row("tensorrt", 8, 10.0, mem=2000)])["met"] is True
    assert gpu_check.evaluate(gpu_check.TARGETS[0], [row("tensorrt", 1, 3.0, mem=None)])["met"] is True
    text = gpu_check.summary({"v2": ({}, [row("tensorrt", 8, 10.0, mem=None)])})
    assert "800 img/s (tensorrt; max abs err 1.0e-03, PSNR 55.0 dB) | - | - |" in text


def test_gpu_check_summary_names_the_card_from_the_kernel_benchmark_when_no_model_run_did(tmp_path):
    """A call of ``--steps kernels train profile`` runs no model benchmark: its summary said "unknown device"."""
    environment = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "torch": "2.11.0"}
    (tmp_path / "kernels.json").write_text(json.dumps({"environment": environment, "timings": []}))
    (tmp_path / "gpu_check.log").write_text("[gpu_check] kernels: exit 0\n")
    args = gpu_check.argparse.Namespace(steps=["kernels"])
    text = gpu_check._save(args, tmp_path, tmp_path / "runs", {"kernels": 0})
    assert "Device: NVIDIA H100 80GB HBM3 (sm_90)." in text
    (tmp_path / "kernels.json").write_text("{")  # cut off: no name, no crash
    assert "Device: unknown device." in gpu_check._save(args, tmp_path, tmp_path / "runs", {"kernels": 0})
    # a model run's own device name wins
    assert "Device: H200." in gpu_check.summary({"v2": ({"device_name": "H200"}, [])}, device="H100 (sm_90)")
