"""What mutation testing of the benchmark's core (``deploy.measure``, ``deploy.bench``, ``deploy.baselines``) found
unchecked: the timed calls' milliseconds and process CPU time read from the clocks around each call (a scripted clock
here), the warm-up's calls left out of the timings, the input index running on from the warm-up, the cap on slow rows
taken from the last warm call, and, on a GPU (a scripted asynchronous device standing in), the forward calls timed by
CUDA events read after a synchronisation and the restore calls by the host clock after one, with their CPU time; the
largest error over all input sets (not the last set's), in both directions, the PSNR of the images the outputs become
(clamped to [-1, 1]) and the 8-bit images' error summed over every set; a row's median (not mean), 10th and 90th
percentiles, images per second from the row's batch, median CPU time and count of timed calls; ``x ref fp32`` against
the fp32 reference only; the defaults on a GPU and on the CPU; ``--row-seconds``, ``--tf32`` and the fidelity default
reaching the run; every field of a row in results.json; the baselines' precisions and order on a GPU; ``auto``'s
backends; restore rows without a first call, warmed up once on a GPU and not again on the CPU, and the timing line of
the results; seeded weights that follow their seed; and (defects, fixed) a ``--row-seconds`` of 0 or less, inf or nan
refused before the run, and the counts and the row cap of a ``BenchConfig`` built in code refused like the flags.
Expected values are written out in each test (hand arithmetic, PSNR = 10 log10(peak^2 / mse) with the peak the code
documents, scripted clocks, stand-in backends), on tiny inputs, on the CPU."""

from __future__ import annotations

import copy
import json
import math
import types

import numpy as np
import pytest
import torch

import vqfr
from deploy import bench, measure
from deploy.baselines import seeded_weights_
from deploy.measure import Timing, compare_images, compare_outputs, time_calls
from tests.test_bench import SMALL_V2, tiny_yml


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# ----------------------------------------------------------------------------------------------- time_calls
class Device:
    """A scripted clock, and a scripted asynchronous GPU: ``call(i)`` takes ``cpu[i]`` s of host work at once and
    queues ``gpu[i]`` s of device work, which the wall clock sees only once ``synchronize`` waits for it. CUDA events
    take the device timeline's position when recorded, and can be read only after a synchronisation passed them."""

    def __init__(self, gpu, cpu=None):
        self.gpu, self.cpu = gpu, cpu or [0.0] * len(gpu)
        self.wall, self.process, self.pending = 100.0, 7.0, 0.0
        self.calls: list = []
        self.events = 0

    def call(self, i):
        self.calls.append(i)
        self.wall += self.cpu[i]
        self.process += self.cpu[i]
        self.pending += self.gpu[i]

    def synchronize(self, device=None):
        self.wall += self.pending
        self.pending = 0.0

    def host(self):
        """Without a GPU the work is done when the call returns."""
        return types.SimpleNamespace(perf_counter=lambda: self.wall, process_time=lambda: self.process)

    def event_class(self):
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                dev.events += 1
                self.t = None

            def record(self):
                self.t = dev.wall + dev.pending

            def elapsed_time(self, end):
                if end.t > dev.wall:
                    raise RuntimeError("CUDA error: device not ready (read before a synchronisation)")
                return (end.t - self.t) * 1e3

        return Event


def test_timed_calls_read_the_clocks_around_each_call_and_leave_the_warm_up_out(monkeypatch):
    """Warm-up 3, 4 timed calls: the first call (0.5 s, a compile) is ``first_s``; calls 1 and 2 are neither timed
    nor counted; the timed calls get inputs 3 to 6 (rotation runs on from the warm-up), their wall milliseconds and
    their process CPU milliseconds (not the wall time again)."""
    dev = Device(gpu=[0.0] * 7, cpu=[0.5, 0.1, 0.1, 0.010, 0.030, 0.020, 0.040])
    monkeypatch.setattr(measure, "time", dev.host())

    def call(i):
        dev.call(i)
        dev.process -= dev.cpu[i] / 2  # half of each call's wall time was spent waiting, not computing

    timing = time_calls(call, warmup=3, iters=4, device=torch.device("cpu"))
    assert dev.calls == [0, 1, 2, 3, 4, 5, 6]
    assert timing.first_s == pytest.approx(0.5)
    assert timing.ms == pytest.approx([10.0, 30.0, 20.0, 40.0])
    assert timing.cpu_ms == pytest.approx([5.0, 15.0, 10.0, 20.0])


def test_slow_rows_are_capped_by_the_last_warm_call_to_at_least_three(monkeypatch):
    """A 5 s first call (compilation) says nothing about the warm speed: the cap divides ``row_seconds`` by the last
    warm call (0.25 s): 1 s allows 4 of 50 calls; 0.3 s would allow 1, raised to the floor of 3."""
    for row_seconds, expected in ((1.0, 4), (0.3, 3)):
        dev = Device(gpu=[0.0] * 60, cpu=[5.0] + [0.25] * 59)
        monkeypatch.setattr(measure, "time", dev.host())
        timing = time_calls(dev.call, warmup=2, iters=50, device=torch.device("cpu"), row_seconds=row_seconds)
        assert len(timing.ms) == expected and dev.calls == list(range(2 + expected))


def gpu(monkeypatch, durations):
    dev = Device(gpu=durations)
    monkeypatch.setattr(measure, "time", dev.host())
    monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
    monkeypatch.setattr(torch.cuda, "Event", dev.event_class())
    return dev


def test_on_a_gpu_forward_calls_are_timed_by_events_read_after_a_synchronisation(monkeypatch):
    """Asynchronous calls: 0.3 s of device work for the first call, then 2, 6 and 4 ms timed. Events give the device
    time of each call (and no CPU time: the host only queued work)."""
    dev = gpu(monkeypatch, [0.3, 0.001, 0.002, 0.006, 0.004])
    timing = time_calls(dev.call, warmup=2, iters=3, device=torch.device("cuda"))
    assert timing.first_s == pytest.approx(0.3)  # the warm-up waits for the device around each call
    assert timing.ms == pytest.approx([2.0, 6.0, 4.0]) and timing.cpu_ms == []
    assert dev.events == 6 and dev.calls == [0, 1, 2, 3, 4]


def test_on_a_gpu_host_timed_calls_wait_for_the_device_and_keep_their_cpu_time(monkeypatch):
    """``events=False`` (the restore rows): the host clock, read after a synchronisation, so each call's device work
    is inside its own time (not 0 ms, and not the next call's), with the process CPU time beside it; no events."""
    dev = gpu(monkeypatch, [0.3, 0.002, 0.006, 0.004])
    timing = time_calls(dev.call, warmup=1, iters=3, device=torch.device("cuda"), events=False)
    assert timing.ms == pytest.approx([2.0, 6.0, 4.0]) and timing.cpu_ms == pytest.approx([0.0, 0.0, 0.0])
    assert dev.events == 0


# ----------------------------------------------------------------------------------------------- errors
def test_the_largest_error_of_any_input_set_counts_not_the_last_sets():
    """Set 0 is off by 0.75 (in [-1, 1]), set 1 (twice as large) by 0.25: max abs error 0.75. In [0, 1]: squared
    errors 0.375^2 + 0.125^2 over 12 + 24 values."""
    ref0, ref1 = torch.zeros(1, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    out0, out1 = ref0.clone(), ref1.clone()
    out0[0, 0, 0, 0] = -0.75
    out1[1, 2, 1, 1] = 0.25
    err, db = compare_outputs([out0, out1], [ref0, ref1])
    assert err == 0.75
    assert db == pytest.approx(10 * math.log10(1.0 / ((0.375 ** 2 + 0.125 ** 2) / 36)))


def test_psnr_is_that_of_the_images_the_outputs_become():
    """An output of 3.0 where the reference is 0.5 is a white pixel (1.0 after the clamp): 0.25 off in [0, 1] for
    the PSNR, while the max abs error keeps the raw 2.5."""
    ref = torch.zeros(1, 3, 2, 2)
    ref[0, 0, 0, 0] = 0.5
    out = ref.clone()
    out[0, 0, 0, 0] = 3.0
    err, db = compare_outputs([out], [ref])
    assert err == 2.5 and db == pytest.approx(10 * math.log10(1.0 / (0.25 ** 2 / 12)))


def test_image_errors_are_absolute_and_summed_over_every_set():
    """Set 0 (one pixel 6 levels below the reference) and set 1 (one pixel 2 above, in twice the pixels): max 6
    levels, PSNR with peak 255 over the 12 + 24 values."""
    ref0, ref1 = np.full((1, 2, 2, 3), 100, np.uint8), np.full((2, 2, 2, 3), 100, np.uint8)
    out0, out1 = ref0.copy(), ref1.copy()
    out0[0, 0, 0, 0] = 94
    out1[1, 1, 1, 2] = 102
    err, db = compare_images([out0, out1], [ref0, ref1])
    assert err == 6 and db == pytest.approx(10 * math.log10(255 ** 2 / ((36 + 4) / 36)))


# ----------------------------------------------------------------------------------------------- rows
def test_a_row_reports_median_percentiles_rate_and_cpu_time_of_its_timed_calls():
    """Batch 4, five calls of 40, 10, 30, 20, 100 ms. Sorted 10..100: median 30; p10 at rank 0.4 = 14; p90 at rank
    3.6 = 40 + 0.6 * 60 = 76; 4 images / 30 ms = 133.3 img/s; CPU time the median of 5, 1, 3, 2, 50 ms."""
    row = bench.Row("x", "fp32", 4, "cpu")
    bench._fill_timing(row, Timing(ms=[40.0, 10.0, 30.0, 20.0, 100.0], cpu_ms=[5.0, 1.0, 3.0, 2.0, 50.0], first_s=1.5))
    assert row.median_ms == 30.0 and row.iters == 5 and row.first_call_s == 1.5
    assert row.p10_ms == pytest.approx(14.0) and row.p90_ms == pytest.approx(76.0)
    assert row.img_per_s == pytest.approx(4 / 0.030) and row.cpu_ms == 3.0
    gpu_row = bench.Row("x", "fp16", 8, "cuda")  # CUDA events: no CPU time, still three timed calls
    bench._fill_timing(gpu_row, Timing(ms=[2.0, 4.0, 3.0], cpu_ms=[], first_s=None))
    assert gpu_row.iters == 3 and gpu_row.cpu_ms is None and gpu_row.img_per_s == pytest.approx(8 / 0.003)
    instant = bench.Row("x", "fp32", 1, "cpu")  # a clock too coarse to see the call: no rate, not 0 img/s
    bench._fill_timing(instant, Timing(ms=[0.0, 0.0, 0.0], cpu_ms=[0.0, 0.0, 0.0], first_s=None))
    assert instant.median_ms == 0.0 and instant.img_per_s is None


def test_speedup_is_against_the_fp32_reference_not_another_baseline():
    rows = [bench.Row("reference", "fp32", 1, "cpu", baseline=True, median_ms=10.0),
            bench.Row("mine", "bf16", 1, "cpu", median_ms=2.0),
            bench.Row("reference", "bf16", 1, "cpu", baseline=True, median_ms=5.0)]
    bench._speedups(rows)
    assert [r.speedup for r in rows] == [1.0, 5.0, 2.0]


# ----------------------------------------------------------------------------------------------- configuration
def test_defaults_on_a_gpu_and_on_the_cpu():
    gpu_cfg = bench.BenchConfig().resolved(torch.device("cuda"))
    assert (gpu_cfg.precisions, gpu_cfg.batches, gpu_cfg.iters, gpu_cfg.warmup, gpu_cfg.restore_iters,
            gpu_cfg.inputs, gpu_cfg.row_seconds) == (["fp16"], [1, 8], 30, 5, 10, 4, 20.0)
    cpu_cfg = bench.BenchConfig().resolved(torch.device("cpu"))
    assert (cpu_cfg.precisions, cpu_cfg.batches, cpu_cfg.iters, cpu_cfg.warmup, cpu_cfg.restore_iters,
            cpu_cfg.inputs, cpu_cfg.row_seconds) == (["fp32"], [1], 2, 1, 1, 2, None)
    asked = bench.BenchConfig(iters=7, warmup=2, restore_iters=0, inputs=3, row_seconds=1.5)
    asked = asked.resolved(torch.device("cuda"))
    assert (asked.iters, asked.warmup, asked.restore_iters, asked.inputs, asked.row_seconds) == (7, 2, 0, 3, 1.5)


ROW_FIELDS = {"backend", "precision", "batch", "device", "what", "fidelity", "baseline", "median_ms", "p10_ms",
              "p90_ms", "img_per_s", "cpu_ms", "peak_mem_mb", "build_s", "first_call_s", "max_abs_err", "psnr_db",
              "error_unit", "speedup", "iters", "status", "note", "paths"}


def test_cli_flags_reach_the_run_and_results_json_keeps_every_field(tmp_path, monkeypatch):
    seen = []

    def fake_run(cfg, on_subject=None, **kw):
        seen.append(cfg)
        return {"model": "m"}, [bench.Row("mine", "fp32", 1, "cpu", median_ms=2.0, cpu_ms=1.5, iters=3)]

    monkeypatch.setattr(bench, "run", fake_run)
    out = tmp_path / "out"
    base = ["--version", "v2", "--device", "cpu", "--no-chart", "--out", str(out)]
    assert bench.main([*base, "--row-seconds", "2.5", "--tf32"]) == 0
    assert seen[-1].row_seconds == 2.5 and seen[-1].tf32 is True and list(seen[-1].fidelities) == [1.0]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert set(row) == ROW_FIELDS and row["cpu_ms"] == 1.5 and row["iters"] == 3
    assert bench.main(base) == 0
    assert seen[-1].row_seconds is None and seen[-1].tf32 is False


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_row_time_cap_that_is_not_a_positive_number_is_refused_before_the_run(value, tmp_path, monkeypatch, capsys):
    """(A defect, fixed.) ``--row-seconds 0`` (or below) silently cut every row to 3 timed calls, while the results'
    timing line left the cap out; ``inf`` ended the run in an OverflowError traceback and ``nan`` failed every row."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--version", "v2", "--device", "cpu", "--no-chart", "--out", str(tmp_path / "out"),
                    "--row-seconds", value])
    assert exc.value.code == 2
    assert f"--row-seconds must be a positive number of seconds, got {float(value):g}" in capsys.readouterr().err



@pytest.mark.parametrize(("field", "value", "message"), [
    ("row_seconds", math.inf, "--row-seconds must be a positive number of seconds, got inf"),
    ("row_seconds", math.nan, "--row-seconds must be a positive number of seconds, got nan"),
    ("row_seconds", 0.0, "--row-seconds must be a positive number of seconds, got 0"),
    ("iters", 0, "--iters must be at least 1, got 0"),
    ("restore_iters", -1, "--restore-iters must be at least 0, got -1"),
    ("warmup", 0, "--warmup must be at least 1, got 0"),
    ("inputs", 0, "--inputs must be at least 1, got 0"),
    ("threads", 0, "--threads must be at least 1, got 0"),
    ("batches", [1, 0], "--batch sizes must be at least 1, got 1,0"),
])
def test_a_config_built_in_code_is_refused_like_the_cli_flags(field, value, message):
    """(A defect, fixed.) Only the CLI checked these: ``BenchConfig(row_seconds=math.inf)`` built in code failed
    inside the timing loop (OverflowError), and ``warmup=0`` or ``inputs=0`` became the defaults without a word."""
    with pytest.raises(ValueError) as exc:
        bench.BenchConfig(**{field: value})
    assert str(exc.value) == message
    bench.BenchConfig(**{field: [1, 8] if field == "batches" else 1})  # the least allowed passes

def test_baselines_on_a_gpu_and_the_order_of_subjects():
    """fp32 reference first (its outputs are every row's reference), then the candidates, then the other baselines:
    on a GPU fp16 always, and bf16 when asked for."""
    cfg = bench.BenchConfig(backends=["torch"], precisions=["bf16"], batches=[1])
    subjects = bench.make_subjects(cfg, None, torch.device("cuda"), None)
    assert [(s.backend, s.precision, s.baseline) for s in subjects] == [
        ("reference", "fp32", True), ("torch", "bf16", False), ("reference", "fp16", True),
        ("reference", "bf16", True), ("torchvision", "fp32", True), ("torchvision", "fp16", True),
        ("torchvision", "bf16", True)]


def test_auto_times_what_is_worth_timing_on_each_device():
    assert bench.expand_backends(["auto"], torch.device("cpu")) == ["torch", "onnxruntime"]
    assert bench.expand_backends(["auto", "aoti"], torch.device("cuda")) == ["torch", "torch-max", "onnxruntime",
                                                                             "tensorrt", "aoti"]


# ----------------------------------------------------------------------------------------------- a run
class Identity:
    """A stand-in backend: returns its input (in [-1, 1]), plus ``offset``; counts its calls."""

    max_batch = None
    device = "cpu"

    def __init__(self, offset=0.0):
        self.offset, self.calls = offset, 0

    def infer(self, x, fidelity):
        self.calls += 1
        return x.float() + self.offset

    def close(self):
        pass


def test_restore_rows_on_the_cpu_have_no_first_call_and_no_extra_warm_up(tmp_path, monkeypatch):
    """Warm-up 3, 2 timed forward calls, 2 restore calls, 2 input sets: the forward row calls the backend 5 times;
    the restore row (already warm) exactly 2, and has no first call of its own. The timing line says it."""
    made = {}

    def subjects(cfg, model, device, engines):
        made["ref"], made["mine"] = Identity(), Identity(offset=0.5)
        return [bench.Subject("reference", "fp32", True, lambda: made["ref"]),
                bench.Subject("mine", "fp32", False, lambda: made["mine"])]

    monkeypatch.setattr(bench, "make_subjects", subjects)
    cfg = bench.BenchConfig(config=copy.deepcopy(SMALL_V2), device="cpu", backends=[], batches=[1], iters=2, warmup=3,
                            inputs=2, restore_iters=2, out=tmp_path, chart=False)
    meta, rows = bench.run(cfg, log=lambda line: None)
    assert meta["timing"] == ("first call timed alone, then 2 warm-up, then up to 2 timed calls (restore: 2) rotating "
                              "over 2 input sets; host clock (perf_counter) and process CPU time")
    assert made["mine"].calls == 5 + 2
    forward, restore = (next(r for r in rows if r.backend == "mine" and r.what == w) for w in ("forward", "restore"))
    assert forward.first_call_s is not None and restore.first_call_s is None and restore.iters == 2
    assert forward.max_abs_err == pytest.approx(0.5)
    assert restore.max_abs_err > 0 and restore.psnr_db < 40


def test_restore_rows_on_a_gpu_warm_up_once_and_report_no_first_call(monkeypatch):
    """On a GPU the restore row warms up with one untimed call (not reported as a first call: the forward row already
    built and warmed the backend), then times ``restore_iters`` calls by the host clock."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**31))
    cuda = torch.device("cuda")
    cfg = bench.BenchConfig(batches=[1], iters=1, warmup=1, restore_iters=2, inputs=2).resolved(cuda)
    faces, _ = bench.make_faces(2, 16, None)
    ctx = bench._Context(cfg, cuda, vqfr.build_model(copy.deepcopy(SMALL_V2)).eval(), 16, {1: [faces[:1], faces[1:]]},
                         {}, [1.0], {}, lambda line: None)
    runner, row = Identity(), bench.Row("mine", "fp32", 1, "cuda", what="restore", fidelity=1.0)
    bench._restore_row(ctx, bench.Subject("mine", "fp32", False, lambda: runner), runner, 1, 1.0, row, None)
    assert runner.calls == 1 + 2 and row.iters == 2
    assert row.first_call_s is None and row.median_ms is not None and row.cpu_ms is not None


# ----------------------------------------------------------------------------------------------- baselines
def test_seeded_weights_follow_their_seed(tmp_path):
    model = vqfr.build_model(str(tiny_yml(tmp_path, SMALL_V2)))
    a = seeded_weights_(copy.deepcopy(model), 1).state_dict()
    b = seeded_weights_(copy.deepcopy(model), 1).state_dict()
    zero = seeded_weights_(copy.deepcopy(model)).state_dict()
    gen = torch.Generator().manual_seed(1)
    name, first = next(iter(model.named_parameters()))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], zero[k]) for k in a if k.endswith("weight"))
    # the first parameter (encoder.conv_in, a conv weight): N(0, 1 / fan_in) from the seeded generator
    expected = torch.randn(first.shape, generator=gen) * (1.0 / first[0].numel()) ** 0.5
    torch.testing.assert_close(a[name], expected)
