"""The numbers the benchmark tooling reports, pinned against hand calculations (mutation-tested).

What these pin, beyond tests/test_bench_tools.py and tests/test_kernels_bench.py:

- ``deploy.roofline``: the FLOPs of each compute op kind (conv, deformable conv, code search, batched matrix
  products) and the bytes an fp16 op moves, counted on small meta tensors and compared with ``2*N*Cout*Cin*k*k*H*W``
  and friends written out by hand; weights counted once in the ideal bytes; the card's rates and the time floors;
  the printed table's columns and the ``--tflops``/``--tbps`` flags;
- ``deploy.report``: each table column shows its own row key (p10 under "p10 ms", images/s under "img/s"), and an
  exact zero is printed as a number, not as a missing value;
- ``deploy.bench_kernels``: the default shapes, dtypes and counts of a GPU run (the four warping levels, 256 and
  64x256 tokens, a 1024x256 codebook, fp16 and fp32, 50 calls after 10), the median and 20th/80th percentiles, the
  warm-up and input rotation, the rotation's memory budget, a dense conv of the same output shape, and the table's
  fp16/fp32 rows;
- ``deploy.gpu_check``: a target met exactly at its bound, memory in GB of 10^9 bytes, the reference baseline and
  fidelity of a row, baselines never counted as candidates, the targets as docs/BENCHMARKS.md states them, each
  target read from a run of its own batch and fidelity, and a step's time cut at what is left of the budget;
- ``deploy.soak``: the RSS growth judged from the RSS at the end of the warm-up against the tolerance, the RSS slope
  per image, the number of bad inputs, the summary's growth in percent and the RSS series over the good inputs;
- ``deploy.cpu_latency``: warm-up runs left out of the median, process time reported as such, fidelity 0 run as 0;
- ``deploy.bench_folder``: the whole-run and model-alone rates read from the CLI's summary line, the fastest repeat
  kept, and the run's seconds from the whole-run rate.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from deploy import bench_kernels, gpu_check, report, roofline, soak
from tests.test_bench import SMALL_V2
from tests.test_bench_tools import row

ROOT = Path(__file__).resolve().parents[1]
META, HALF = "meta", torch.float16


def _count_ops(fn, weights=()) -> roofline.Cost:
    """What roofline's counter records for ``fn()`` on meta tensors, ``weights`` being the model's parameters."""
    cost = roofline.Cost()
    with torch.no_grad(), roofline._Counter(cost, {id(w) for w in weights}):
        fn()
    return cost


def _empty(*shape, dtype=HALF):
    return torch.empty(*shape, device=META, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ roofline
def test_roofline_counts_an_fp16_conv_by_hand():
    """2*N*Cout*Cin*k*k*H*W FLOPs; ideal bytes are the activation read and the output written, 2 bytes each in fp16
    (weights are counted once for the whole model, elsewhere); eager bytes add the weight and the bias."""
    x, w, b = _empty(2, 8, 16, 12), _empty(4, 8, 3, 3), _empty(4)
    cost = _count_ops(lambda: F.conv2d(x, w, b, padding=1), weights=[w, b])
    assert cost.flops == {"conv": 2 * 2 * 4 * 8 * 3 * 3 * 16 * 12}
    assert cost.flops_by_size == {"16x12": 2 * 2 * 4 * 8 * 3 * 3 * 16 * 12}
    x_bytes, out_bytes = 2 * 8 * 16 * 12 * 2, 2 * 4 * 16 * 12 * 2
    assert cost.ideal_bytes == x_bytes + out_bytes
    assert cost.eager_bytes == x_bytes + out_bytes + 4 * 8 * 9 * 2 + 4 * 2


def test_roofline_counts_a_deformable_conv_by_hand():
    """``2*N*C_out*C_in*9*H*W`` (OFFICIAL_VQFR.md section 10), filed under its feature-map size; its ideal bytes are x,
    the offsets (2*G*9 channels), the mask (G*9) and the output, in fp16."""
    g = 4
    x, off, mask, w = _empty(2, 8, 16, 12), _empty(2, 2 * g * 9, 16, 12), _empty(2, g * 9, 16, 12), _empty(8, 8, 3, 3)
    cost = _count_ops(lambda: kernels.modulated_deform_conv2d(x, off, mask, w, None, 1, 1, 1), weights=[w])
    flops = 2 * 2 * 8 * 8 * 9 * 16 * 12
    assert cost.flops == {"deform_conv": flops} and cost.flops_by_size == {"16x12": flops}
    assert cost.ideal_bytes == 2 * (8 + 2 * g * 9 + g * 9 + 8) * 16 * 12 * 2


def test_roofline_counts_the_code_search_and_batched_products_by_hand():
    """The code search is 2*N*K*D (a distance per token and code); a batched product counts every batch."""
    z, codebook = _empty(10, 16), _empty(32, 16)
    cost = _count_ops(lambda: kernels.nearest_code(z, codebook), weights=[codebook])
    assert cost.flops == {"nearest_code": 2 * 10 * 32 * 16}
    a, b = _empty(3, 5, 7), _empty(3, 7, 2)
    assert _count_ops(lambda: torch.bmm(a, b)).flops == {"matmul": 2 * 3 * 5 * 2 * 7}
    q, k, v = _empty(2, 3, 5, 8), _empty(2, 3, 7, 8), _empty(2, 3, 7, 4)
    flops = 2 * (2 * 3 * 5) * 7 * (8 + 4)  # q k^T, then the weights times v
    # On meta tensors the CPU's attention decomposes into products; a GPU dispatches the fused op, counted alike.
    assert sum(_count_ops(lambda: F.scaled_dot_product_attention(q, k, v)).flops.values()) == flops
    fused = torch.ops.aten._scaled_dot_product_flash_attention.default
    assert roofline._kind(fused) == "attention" and roofline._flops("attention", (q, k, v), None) == flops


def test_roofline_counts_fp16_weights_once_in_the_ideal_bytes():
    """fp16 is the default; the weights are 2 bytes each and the ideal bytes hold them once, whatever the batch:
    ideal(b) = weights + b * activations, so 2 * ideal(1) - ideal(2) is the weights."""
    import vqfr

    params = sum(p.numel() for p in vqfr.build_model(copy.deepcopy(SMALL_V2)).parameters())
    one, two = (roofline.count(copy.deepcopy(SMALL_V2), batch=b, size=32) for b in (1, 2))
    assert one.weight_bytes == 2 * params
    assert 2 * one.ideal_bytes - two.ideal_bytes == one.weight_bytes
    assert two.total_flops == 2 * one.total_flops


def test_roofline_floors_use_the_h100_rates_the_docs_quote():
    """docs/BENCHMARKS.md: 790 TFLOP/s dense fp16 and 3.0 TB/s. 790 GFLOP is 1 ms, 3 GB is 1 ms."""
    assert roofline.H100 == (790e12, 3.0e12)
    cost = roofline.Cost(flops={"conv": 790e9}, ideal_bytes=3e9, eager_bytes=6e9)
    assert roofline.floors(cost) == pytest.approx({"compute_ms": 1.0, "ideal_bytes_ms": 1.0, "eager_bytes_ms": 2.0})


def _fake_cost() -> roofline.Cost:
    return roofline.Cost(flops={"conv": 1000e9, "deform_conv": 200e9, "attention": 3e9, "matmul": 4e9,
                                "nearest_code": 5e9},
                         flops_by_size={"512x512": 1100e9, "tokens": 112e9},
                         ideal_bytes=6e9, eager_bytes=7e9, weight_bytes=0.1e9, peak_live_bytes=0.2e9, peak_at="dec")


def test_roofline_table_puts_each_figure_in_its_column(monkeypatch, capsys):
    """One row per batch: GFLOP, conv, deform conv, attention + matmul (+ code search), ideal and eager GB, the three
    floors at the rates given on the command line, and weights + peak activations."""
    monkeypatch.setattr(roofline, "count", lambda *a, **k: _fake_cost())
    assert roofline.main(["--version", "v2", "--batch", "1", "--tflops", "1000", "--tbps", "2"]) == 0
    out = capsys.readouterr().out
    assert "(1000 TFLOP/s, 2.0 TB/s)" in out
    header = next(line for line in out.splitlines() if line.startswith("| batch |"))
    line = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in line.split("|")[1:-1]],
                     strict=True))
    assert cells == {"batch": "1", "GFLOP": "1212.0", "conv": "1000.0", "deform conv": "200.0",
                     "attention + matmul": "12.00", "ideal GB": "6.00", "eager GB": "7.00",
                     "compute floor ms": "1.21", "ideal-bytes floor ms": "3.00", "eager-bytes floor ms": "3.50",
                     "weights + peak live activations GB": "0.30"}


# -------------------------------------------------------------------------------------------------------- report
def test_report_columns_show_their_own_values():
    """A user reads p10 under "p10 ms", images/s under "img/s" and the speed-up under "x ref fp32"; an exact zero
    error is printed as a number (a "-" means not measured)."""
    r = {"backend": "torch", "precision": "fp16", "batch": 4, "fidelity": 1.0, "what": "forward", "median_ms": 2.0,
         "p10_ms": 1.5, "p90_ms": 3.5, "img_per_s": 2000.0, "max_abs_err": 0.0, "psnr_db": 60.0, "speedup": 7.25,
         "status": "ok"}
    header, _, line = report.markdown_table([r]).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in line.split("|")[1:-1]],
                     strict=True))
    assert cells["median ms"] == "2" and cells["p10 ms"] == "1.5" and cells["p90 ms"] == "3.5"
    assert cells["img/s"] == "2000" and cells["x ref fp32"] == "7.25" and cells["batch"] == "4"
    assert cells["max abs err"] == "0.00e+00" and cells["PSNR dB"] == "60.0"


# ------------------------------------------------------------------------------------------------- bench_kernels
def test_kernel_bench_defaults_on_a_gpu_are_the_documented_cases(monkeypatch, capsys):
    """docs/KERNELS.md: the four warping levels (128x512², 128x256², 256x128², 512x16²), batch 1 and 8, fp16 and
    fp32, 50 timed calls after 10; the code search for 256 and 64x256 tokens with a 1024x256 codebook."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_kernels, "bench_deform", lambda *a: seen.setdefault("deform", a) and [])
    monkeypatch.setattr(bench_kernels, "bench_nearest", lambda *a: seen.setdefault("nearest", a) and [])
    monkeypatch.setattr(bench_kernels, "environment", lambda device: {"date": "d", "torch": "t", "triton": None})
    bench_kernels.main([])
    levels, batches, dtypes, device, iters, warmup, rotate, reference, channels_last, graphs = seen["deform"]
    assert [tuple(lvl) for lvl in levels] == [(128, 512, 512), (128, 256, 256), (256, 128, 128), (512, 16, 16)]
    assert (batches, dtypes, device.type, iters, warmup, rotate) == ([1, 8], ["fp16", "fp32"], "cuda", 50, 10, 4)
    assert reference is False and graphs == 0
    tokens, codebook, dtypes, *_ = seen["nearest"]
    assert list(tokens) == [256, 64 * 256] and tuple(codebook) == (1024, 256) and dtypes == ["fp16", "fp32"]


def test_kernel_bench_reports_the_median_and_the_20th_and_80th_percentiles(monkeypatch):
    """Five calls of 1..5 ms and one 100 ms outlier: median 3.5 (not the mean, 19.2), p20 the 2nd of 6 (2 ms), p80
    the 5th (5 ms), by rank q*(n-1)."""
    monkeypatch.setattr(bench_kernels, "time_calls", lambda *a: [5.0, 100.0, 1.0, 3.0, 2.0, 4.0])
    t = bench_kernels._run("op", "case", "fp32", "impl", lambda *a: None, "", [[]], torch.device("cpu"), 6, 0)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.iters) == (3.5, 2.0, 5.0, 6)


def test_kernel_bench_warms_up_untimed_and_cycles_through_the_input_copies():
    calls = []
    times = bench_kernels.time_calls(calls.append, torch.device("cpu"), iters=3, warmup=2)
    assert len(times) == 3 and calls == [0, 1, 0, 1, 2]  # 2 untimed calls first, then 3 timed ones
    copies = [[torch.zeros(1)], [torch.ones(1)], [torch.full((1,), 2.0)]]
    used = []
    t = bench_kernels._run("op", "case", "fp32", "impl", lambda x: used.append(int(x)), "", copies,
                           torch.device("cpu"), iters=6, warmup=0)
    assert used == [0, 1, 2, 0, 1, 2] and t.iters == 6


def test_kernel_bench_rotation_keeps_up_to_4_copies_within_4_gib():
    """Up to --rotate copies, as many as fit in 4 GiB: batch 1 of the 128x512² level in fp16 (x, offsets, mask:
    236 channels, 124 MB) gets 4; batch 8 in fp32 (1.98 GB) gets 2."""
    assert bench_kernels.ROTATION_BUDGET == 4 * 2**30
    small = bench_kernels._copies(lambda: bench_kernels.deform_inputs(1, 128, 512, 512, HALF, torch.device(META)), 4)
    big = bench_kernels._copies(
        lambda: bench_kernels.deform_inputs(8, 128, 512, 512, torch.float32, torch.device(META)), 4)
    assert len(small) == 4 and len(big) == 2


def test_kernel_bench_dense_conv_has_the_deformable_convs_output_shape(monkeypatch):
    """The dense conv2d row is "the floor a deformable conv can hope for": the same work, so the same output."""
    timed = {}

    def record(op, case, dname, name, fn, note, copies, *rest):
        timed[name] = (fn, copies)
        return bench_kernels.Timing(op, case, dname, name, None, None, None, 0, note)

    monkeypatch.setattr(bench_kernels, "_run", record)
    bench_kernels.bench_deform([(8, 6, 7)], [2], ["fp32"], torch.device("cpu"), 1, 0, 1, True, False)
    dense, copies = timed["dense conv2d"]
    reference, _ = timed["vqfr reference"]
    assert dense(*copies[0]).shape == reference(*copies[0]).shape == (2, 8, 6, 7)


def test_kernel_bench_table_puts_each_dtype_on_its_own_row():
    rows = [bench_kernels.Timing("deform_conv", "1x8x6x7", d, "dense conv2d", ms, ms - 0.5, ms + 0.5, 3)
            for d, ms in (("fp16", 1.0), ("fp32", 4.0))]
    text = bench_kernels.markdown(rows, {"date": "d", "torch": "t", "triton": None, "cpu": "c"})
    assert "| 1x8x6x7 | fp16 | 1 [0.5-1.5] |" in text and "| 1x8x6x7 | fp32 | 4 [3.5-4.5] |" in text


# ----------------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_meets_a_target_exactly_at_its_bound():
    """The goals read "<= 4 ms" and ">= 500 img/s": 4.00 ms and 500 img/s (8 images in 16 ms) meet them."""
    v2_b1, v2_b8 = gpu_check.TARGETS[0], gpu_check.TARGETS[1]
    assert gpu_check.evaluate(v2_b1, [row("torch-max", 1, 4.0)])["met"] is True
    assert gpu_check.evaluate(v2_b8, [row("torch-max", 8, 16.0, mem=2000)])["met"] is True


def test_gpu_check_memory_target_is_in_gb_of_a_billion_bytes():
    """peak_mem_mb is MiB: 2900 MiB is 3.04 GB, over the 3 GB target (it is under 3 GiB), and printed as 3.04."""
    rows = [row("torch-max", 8, 10.0, mem=2900)]
    assert gpu_check.evaluate(gpu_check.TARGETS[1], rows)["met"] is False
    text = gpu_check.summary({"v2": ({}, rows)})
    assert re.search(r"\| v2, batch 8 \| >= 500 img/s, <= 3 GB \| [^|]+\| 3\.04 \| \*\*no\*\* \|", text), text


def test_gpu_check_compares_with_the_reference_eager_baseline_and_never_counts_a_baseline_as_best():
    rows = [row("torchvision", 1, 25.0, baseline=True), row("reference", 1, 2.0, baseline=True),
            row("torch-max", 1, 5.0), row("torch-max", 1, 1.0, fidelity=0.0)]  # a fidelity-0 row is another target
    e = gpu_check.evaluate(gpu_check.TARGETS[0], rows)
    assert e["baseline"]["backend"] == "reference" and e["best"]["median_ms"] == 5.0 and e["met"] is False
    text = gpu_check.summary({"v2": ({}, rows)})
    assert "| 2.0 ms, 500 img/s |" in text  # the baseline column shows the baseline's own numbers


def test_gpu_check_targets_are_the_ones_the_docs_state():
    """docs/BENCHMARKS.md "H100: targets, official anchors and floors" is the issue's table; the check must judge the
    same goals."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text().split("## H100: targets, official anchors and floors")[1]
    documented = dict(re.findall(r"^\| (v[12], [^|]+?) \| ([^|]+?) \|", text, re.M)[:5])
    assert {t.label: gpu_check._goal(t) for t in gpu_check.TARGETS} == documented


def test_gpu_check_reads_each_target_from_a_run_of_its_batch_and_fidelity(tmp_path):
    args = gpu_check.argparse.Namespace(train_iters=1)
    for t in gpu_check.TARGETS:
        command = gpu_check.STEPS[t.run].command(tmp_path, tmp_path, args)
        value = dict(zip(command, command[1:], strict=False))
        assert value["--version"] == t.label.split(",")[0], t
        assert str(t.batch) in value["--batch"].split(","), t
        if t.fidelity is not None:
            assert float(value["--fidelity"]) == t.fidelity, t


def test_gpu_check_cuts_a_step_at_what_is_left_of_the_budget(tmp_path, monkeypatch):
    """A step's cap is an upper bound: with 40 s of budget, a step capped at 500 s is killed after about 40 s."""
    waited = []

    def wait(proc, until):
        waited.append(until - time.monotonic())
        return proc.wait()

    monkeypatch.setattr(gpu_check, "_wait", wait)
    monkeypatch.setitem(gpu_check.STEPS, "v2", gpu_check.Step(lambda w, o, a: ["true"], 500))
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "v2", "--budget", "40"]) == 0
    assert len(waited) == 1 and 30 < waited[0] <= 40


# ---------------------------------------------------------------------------------------------------------- soak
def test_soak_slope_is_kib_per_image():
    """RSS of 1000 KiB + 3 KiB per image done: the slope is 3 (not the 1000 KiB intercept)."""
    samples = [(0.1 * i, done, 1000 + 3 * done) for i, done in enumerate((10, 20, 30, 40))]
    base, peak, growth, slope = soak._rss_stats(samples, 10)
    assert (base, peak) == (1030, 1120) and slope == pytest.approx(3.0) and growth == pytest.approx(1120 / 1030 - 1)


def test_soak_breaks_the_rounded_fraction_of_its_inputs(tmp_path):
    """round(count * bad_fraction): 10 images at 0.19 have 2 bad (1.9), not 1."""
    good, bad = soak.make_folder(tmp_path, 10, 0.19)
    assert (len(good), len(bad)) == (8, 2)


def test_soak_summary_prints_growth_in_percent_and_rss_over_the_good_inputs():
    samples = [(0.1 * i, done, 1024 * (100 + done)) for i, done in enumerate(range(0, 11))]
    result = soak.SoakResult(20, 10, 10, 3, 10, 10, [], samples, 1.0, 1, 101 * 1024, 110 * 1024, 110 * 1024, 0.05,
                             1024.0, ["python"])
    text = result.summary()
    assert "growth +5.0%" in text and "slope +1024.00 KiB/image" in text
    assert [done for done, _ in result.rss_series()] == list(range(1, 11))  # a point per tenth of the 10 good ones


# --------------------------------------------------------------------------------------------------- cpu_latency
def test_cpu_latency_leaves_warm_up_out_and_reports_process_time(monkeypatch):
    """Two warm-up calls sleep 0.3 s each; the timed one sleeps 50 ms and spins 20 ms of CPU. The median wall leaves
    the warm-up out, and the process time is the CPU's alone (a sleep uses none), not the wall time again."""
    from deploy import cpu_latency

    calls = []

    def model(x):
        calls.append(1)
        time.sleep(0.3 if len(calls) <= 2 else 0.05)
        if len(calls) > 2:
            end = time.process_time() + 0.02
            while time.process_time() < end:
                pass

    wall, cpu = cpu_latency.time_model(model, torch.zeros(1), {}, iters=1, warmup=2)
    assert len(calls) == 3 and 0.07 <= wall < 0.25 and 0.02 <= cpu < 0.05


def test_cpu_latency_runs_v2_at_fidelity_1_and_0(monkeypatch, capsys):
    import vqfr
    from deploy import cpu_latency

    seen = []

    class Fake(torch.nn.Module):
        def forward(self, x, fidelity=None):
            seen.append(fidelity)
            return x

    monkeypatch.setattr(vqfr, "build_model", lambda *a, **k: Fake())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cpu_latency.main(["--version", "v2", "--size", "8", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert seen == [1.0, 0.0] and "| VQFRv2 | 1.0 |" in out and "| VQFRv2 | 0.0 |" in out


# -------------------------------------------------------------------------------------------------- bench_folder
def test_folder_bench_reads_both_rates_from_the_cli_summary(tmp_path, monkeypatch):
    import vqfr.cli
    from deploy import bench_folder

    def cli(argv):
        print("vqfr: 12 images, 12 faces restored, 0 failed in 2.0 s (6.00 faces/s; the model alone 40.00) on x")
        return 0

    monkeypatch.setattr(vqfr.cli, "main", cli)
    got = bench_folder.time_run(tmp_path, tmp_path / "out", [])
    assert got == {"exit": 0, "faces": 12, "faces_per_s": 6.0, "model_faces_per_s": 40.0}


def test_folder_bench_keeps_the_fastest_repeat_and_its_wall_time(tmp_path, monkeypatch, capsys):
    """--repeat 2: the table shows the faster of the two whole runs, and its seconds = faces / whole-run faces/s."""
    from deploy import bench_folder

    runs = iter([{"exit": 0, "faces": 8, "faces_per_s": 2.0, "model_faces_per_s": 50.0},
                 {"exit": 0, "faces": 8, "faces_per_s": 4.0, "model_faces_per_s": 40.0}])
    monkeypatch.setattr(bench_folder, "make_faces", lambda folder, count: [])
    monkeypatch.setattr(bench_folder, "time_run", lambda *a: next(runs))
    assert bench_folder.main(["--count", "8", "--io-threads", "1", "--repeat", "2", "--work", str(tmp_path)]) == 0
    assert "| 1 | 4.0 | 40.0 | 2.00 |" in capsys.readouterr().out


def test_soak_judges_rss_growth_after_the_warm_up_against_the_tolerance(tmp_path, monkeypatch):
    """18 good inputs, warm-up 0.1: the first 2 images are warm-up (round(1.8)). Scripted samples: 50 MiB before
    them, then 100 MiB growing to 115 MiB: a 15% growth from the RSS at warm-up, over the 10% tolerance."""
    done = iter(range(100))
    step = {"n": 0}

    class FakeCLI:  # stands in for the CLI process: the soak only polls it and reads its files
        pid, returncode = 0, None

        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            step["n"] = next(done)
            if step["n"] > 12:
                self.returncode = 3
            return self.returncode

    def rss(pid):
        n = step["n"]
        return 50_000 if n < 2 else 100_000 + 15_000 * (n - 2) // 10

    monkeypatch.setattr(soak.subprocess, "Popen", FakeCLI)
    monkeypatch.setattr(soak, "_rss_kib", rss)
    monkeypatch.setattr(soak, "_count_files", lambda folder: step["n"])
    result = soak.run_soak(20, 0.1, tmp_path, interval=0.0)
    assert (result.good, result.warmup_images, result.rss_at_warmup_kib, result.rss_peak_after_kib) == (
        18, 2, 100_000, 115_000)
    assert any(p.startswith("RSS grew 15.0% after warm-up (tolerance 10%)") for p in result.problems), result.problems
