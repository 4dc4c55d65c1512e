"""``python -m deploy.bench`` end to end on tiny models (CPU), and the parts that measure."""

from __future__ import annotations

import copy
import importlib.machinery
import json
import math
import os
import sys
import types

import cv2
import numpy as np
import pytest
import torch
import yaml

import kernels
import vqfr
from deploy import bench, report
from deploy.baselines import EagerBaseline, seeded_weights_, torchvision_problem
from deploy.measure import compare_images, compare_outputs, time_calls
from tests.conftest import TINY_V1, TINY_V2
from vqfr.backends import BACKENDS
from vqfr.backends.torch import TorchBackend
from vqfr.errors import VQFRError

REQUIRED = {"backend", "precision", "batch", "device", "median_ms", "p90_ms", "img_per_s", "peak_mem_mb",
            "max_abs_err"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Smaller still than TINY_V2: three levels, 16x16 faces (every code path, a fraction of the time).
SMALL_V2 = {**copy.deepcopy(TINY_V2), "channel_multipliers": [1, 1, 2],
            "quantizer_opt": {**TINY_V2["quantizer_opt"], "spatial_size": [4, 4]}}
SMALL_V1 = {**copy.deepcopy(TINY_V1), "proj_patch_size": 4, "resolution_scale_rates": [1, 2, 2],
            "channel_multipliers": [1, 1, 2], "quant_level": ["Level_4"], "align_from_patch": 4,
            "align_opt": {f"Level_{r}": TINY_V1["align_opt"][f"Level_{r}"] for r in (4, 2, 1)},
            "quantizer_opt": {"Level_4": TINY_V1["quantizer_opt"]["Level_32"]}}


def tiny_yml(tmp_path, options):
    path = tmp_path / f"{options['type']}.yml"
    path.write_text(yaml.safe_dump({"network_sr": copy.deepcopy(options)}))
    return path


def rows_of(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_cli_runs_end_to_end_and_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "out"
    rc = bench.main(["--config", str(tiny_yml(tmp_path, SMALL_V2)), "--device", "cpu", "--backends", "torch-max",
                     "--precision", "fp32,bf16", "--batch", "1,2", "--fidelity", "1", "--iters", "1", "--warmup", "1",
                     "--inputs", "2", "--restore-iters", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    rows, meta = data["rows"], data["meta"]
    assert all(REQUIRED <= row.keys() for row in rows)
    assert meta["weights"].startswith("RANDOM") and meta["device"] == "cpu" and "VQFRv2 at 16x16" in meta["model"]
    # Baselines in every run: the reference in fp32 and in the requested reduced precision; torchvision when present.
    for backend, precision in [("reference", "fp32"), ("reference", "bf16"), ("torch-max", "fp32"),
                               ("torch-max", "bf16")]:
        for batch in (1, 2):
            for what in ("forward", "restore"):
                (row,) = rows_of(rows, backend=backend, precision=precision, batch=batch, what=what)
                assert row["status"] == "ok" and row["device"] == "cpu" and row["fidelity"] == 1.0
                assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
                assert row["img_per_s"] == pytest.approx(batch * 1e3 / row["median_ms"])
                assert row["baseline"] == (backend == "reference")
    tv = rows_of(rows, backend="torchvision")
    # (torchvision 0.29 has no bf16 deformable conv on the CPU: those rows say so instead of failing.)
    assert tv and all(r["status"] == ("skipped" if torchvision_problem(torch.device("cpu"), r["precision"]) else "ok")
                      for r in tv)
    # Errors against the fp32 reference: zero for itself, tiny for fp32, clearly non-zero (but sane) for bf16.
    for row in rows_of(rows, backend="reference", precision="fp32"):
        assert row["max_abs_err"] == 0 and row["psnr_db"] == "inf" and row["speedup"] == pytest.approx(1)
    for row in rows_of(rows, backend="torch-max", precision="fp32", what="forward"):
        assert row["max_abs_err"] < 1e-4 and row["psnr_db"] > 80
        assert row["paths"].get("modulated_deform_conv2d:grid_sample", 0) > 0  # the fast CPU path ran
    for row in rows_of(rows, precision="bf16", what="forward", status="ok"):  # reduced precision really ran
        assert 1e-3 < row["max_abs_err"] < 10 and row["psnr_db"] < 80
    for row in rows_of(rows, backend="reference", what="forward"):
        assert set(row["paths"]) == {"modulated_deform_conv2d:reference"}  # the baseline never takes a fast path
    for row in rows_of(rows, what="restore", precision="fp32"):
        assert row["max_abs_err"] <= 1  # 8-bit levels
    markdown = (out / "results.md").read_text()
    assert "## Model forward" in markdown and "## Runtime.restore of aligned faces" in markdown
    assert markdown.count("| torch-max |") == 8
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert "| backend | precision | batch |" in capsys.readouterr().out  # the table is printed


def test_torch_max_gn_is_torch_max_with_the_fused_group_norm(tmp_path):
    """``--backends torch-max,torch-max-gn`` A/Bs the fused GroupNorm in one run: same outputs, the GroupNorm op in
    the second backend's paths only (the reference path on the CPU)."""
    out = tmp_path / "out"
    rc = bench.main(["--config", str(tiny_yml(tmp_path, SMALL_V2)), "--device", "cpu", "--backends",
                     "torch-max,torch-max-gn", "--precision", "fp32", "--batch", "1", "--iters", "1", "--warmup", "1",
                     "--inputs", "1", "--restore-iters", "0", "--no-chart", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    (plain,) = rows_of(rows, backend="torch-max", what="forward")
    (fused,) = rows_of(rows, backend="torch-max-gn", what="forward")
    assert plain["status"] == fused["status"] == "ok" and fused["max_abs_err"] < 1e-4
    assert "group_norm_silu:reference" not in plain["paths"] and fused["paths"]["group_norm_silu:reference"] > 0
    assert "fused GroupNorm+SiLU" in fused["note"] and "fused" not in plain["note"]


class Perturbed(TorchBackend):
    """A torch backend whose model has one weight scaled by 1.5: a wrong backend the benchmark must expose."""

    def load(self) -> None:
        self.engine = copy.deepcopy(self.engine)
        with torch.no_grad():
            self.engine.encoder.conv_in.weight.mul_(1.5)
        super().load()


def test_errors_are_measured_against_the_fp32_reference_and_catch_a_wrong_backend(tmp_path):
    entry = next(e for e in BACKENDS if e.label == "torch[cpu]")

    def extra(model, device):
        return [bench.Subject("perturbed", "fp32", False, lambda: bench._loaded(Perturbed(entry, model)))]

    cfg = bench.BenchConfig(config=copy.deepcopy(SMALL_V1), size=32, device="cpu", backends=["torch"],
                            batches=[2], iters=1, warmup=1, inputs=2, restore_iters=0, out=tmp_path)
    meta, rows = bench.run(cfg, log=lambda line: None, extra=extra)
    by_backend = {r.backend: r for r in rows if r.status == "ok"}
    baselines = {"reference"} | (set() if torchvision_problem(torch.device("cpu")) else {"torchvision"})
    assert set(by_backend) == baselines | {"torch", "perturbed"} and meta["model"] == "VQFRv1 at 32x32"
    assert by_backend["torch"].max_abs_err < 1e-4
    assert by_backend["perturbed"].max_abs_err > 0.05 and by_backend["perturbed"].psnr_db < 40


@pytest.mark.parametrize("flag,value", [("--iters", "0"), ("--restore-iters", "-1")])
def test_iteration_counts_that_time_nothing_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--size", "32", "--device", "cpu", "--backends",
                    "torch", "--iters", "1", flag, value, "--no-chart", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and f"{flag} must be at least" in capsys.readouterr().err


class StoppedAtBatch2:
    """Runs the model at batch 1; at batch 2 the run is killed, as gpu_check's time cap does during a compile."""

    max_batch = None

    def __init__(self, model):
        self.model = model

    def infer(self, x, fidelity):
        if x.shape[0] == 2:
            raise KeyboardInterrupt
        with torch.no_grad():
            return self.model(x)

    def close(self):
        pass


def test_a_run_killed_inside_a_backend_has_saved_the_rows_that_backend_finished(tmp_path):
    saved = []
    cfg = bench.BenchConfig(config=copy.deepcopy(SMALL_V1), size=32, device="cpu", backends=[], batches=[1, 2],
                            iters=1, warmup=1, inputs=1, restore_iters=0, out=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        bench.run(cfg, log=lambda line: None,
                  extra=lambda model, device: [bench.Subject("stopped", "fp32", False, lambda: StoppedAtBatch2(model))],
                  on_subject=lambda meta, rows: saved.append([(r.backend, r.batch, r.status) for r in rows]))
    assert ("stopped", 1, "ok") in saved[-1]


def test_time_calls_times_the_first_call_alone_and_caps_slow_rows():
    calls = []

    def call(i):
        calls.append(i)
        if i == 0:
            torch.ones(1000, 1000).sum()  # a "compile"

    timing = time_calls(call, warmup=3, iters=5, device=torch.device("cpu"),
                        on_warm=lambda: calls.append("warm"))  # e.g. reset the peak-memory counter
    assert calls == [0, 1, 2, "warm", 3, 4, 5, 6, 7] and len(timing.ms) == len(timing.cpu_ms) == 5
    assert timing.first_s > 0
    calls.clear()
    slow = time_calls(lambda i: (calls.append(i), __import__("time").sleep(0.02)), warmup=1, iters=50,
                      device=torch.device("cpu"), row_seconds=0.1)
    assert 3 <= len(slow.ms) <= 6 and min(slow.ms) >= 20
    every = time_calls(lambda i: None, warmup=0, iters=4, device=torch.device("cpu"))
    assert every.first_s is None and len(every.ms) == 4


def test_compare_outputs_and_images():
    ref = torch.zeros(2, 3, 4, 4)
    out = ref.clone()
    out[1, 0, 0, 0] = 0.5  # one pixel off by 0.5 in [-1, 1] = 0.25 in [0, 1]
    err, psnr = compare_outputs([out[:1], out[1:]], [ref[:1], ref[1:]])
    assert err == 0.5 and psnr == pytest.approx(10 * math.log10(96 / 0.25 ** 2))
    assert compare_outputs([ref], [ref]) == (0.0, math.inf)
    big = ref.clone()
    big[0, 0, 0, 0] = 7.0  # unclamped in the max abs error, clamped in the PSNR
    assert compare_outputs([big], [ref])[0] == 7.0
    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 3
    err8, psnr8 = compare_images([b], [a])
    assert err8 == 3 and psnr8 == pytest.approx(10 * math.log10(255 ** 2 / (9 / 48)))


def stand_in_torchvision(monkeypatch, deform_conv2d):
    """Make ``import torchvision.ops`` give a module whose ``deform_conv2d`` is the given function."""
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = deform_conv2d
    tv.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)


def test_torchvision_rows_swap_in_torchvisions_calling_convention(monkeypatch):
    """With a stand-in torchvision (the reference behind torchvision's argument order), the swap must give the
    reference's output and route every deformable conv through it."""
    calls = []

    def deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
        calls.append(x.shape)
        with kernels.use("reference"):
            return kernels.deform_conv2d_reference(x, offset, mask, weight, bias, stride, padding, dilation)

    stand_in_torchvision(monkeypatch, deform_conv2d)
    assert torchvision_problem() is None
    model = seeded_weights_(vqfr.build_model(copy.deepcopy(TINY_V2)), 0).eval()
    x, f = torch.rand(1, 3, 64, 64) * 2 - 1, torch.ones(1)
    ref = EagerBaseline(model, torch.device("cpu"), "fp32").infer(x, f)
    out = EagerBaseline(model, torch.device("cpu"), "fp32", "torchvision").infer(x, f)
    dcns = sum(type(m).__name__ == "DCNv2Pack" for m in model.modules())
    assert len(calls) == dcns > 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert kernels.modulated_deform_conv2d is kernels.deform_conv.modulated_deform_conv2d  # restored afterwards


def test_a_precision_torchvision_cannot_run_is_skipped_with_the_reason(monkeypatch):
    """torchvision 0.29 has no bf16 deformable conv on the CPU: that baseline row must say so, not fail."""

    def deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
        if x.dtype == torch.bfloat16:
            raise RuntimeError('"deformable_im2col" not implemented for \'BFloat16\'')
        return torch.zeros(1, 1, 3, 3, dtype=x.dtype)

    stand_in_torchvision(monkeypatch, deform_conv2d)
    cpu = torch.device("cpu")
    assert torchvision_problem(cpu, "fp32") is None
    reason = torchvision_problem(cpu, "bf16")
    assert reason and "bf16 on cpu" in reason and "not implemented for 'BFloat16'" in reason
    cfg = bench.BenchConfig(config=copy.deepcopy(TINY_V2), size=64, device="cpu", backends=["torch"],
                            precisions=["fp32", "bf16"], batches=[1])
    subjects = {(s.backend, s.precision): s for s in bench.make_subjects(cfg, None, cpu, None)}
    assert subjects["torchvision", "fp32"].unavailable is None
    assert subjects["torchvision", "bf16"].unavailable == reason


def test_report_round_trips_infinities_and_drops_empty_columns(tmp_path):
    rows = [{"backend": "reference", "precision": "fp32", "batch": 1, "device": "cpu", "median_ms": 2.0,
             "p90_ms": 3.0, "img_per_s": 500.0, "peak_mem_mb": None, "max_abs_err": 0.0, "psnr_db": math.inf,
             "status": "ok", "note": "a | b"}]
    path = report.write_json(tmp_path / "r.json", {"model": "m"}, rows)
    meta, back = report.load(path)
    assert back[0]["psnr_db"] == math.inf and meta == {"model": "m"}
    table = report.markdown_table(back)
    assert "peak MB" not in table and "| inf |" in table and "a / b" in table


def test_torch_peak_memory_counts_what_a_cuda_graph_replay_never_allocates(monkeypatch):
    """A replayed CUDA graph allocates nothing, so its activations live only in the reserved pool."""
    from deploy import bench

    mib = 2**20
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 300 * mib)  # weights + I/O
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 900 * mib)  # + the graph's pool
    assert bench.torch_peak_mb(torch.device("cuda")) == 900
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 200 * mib)  # eager: the peak is larger
    assert bench.torch_peak_mb(torch.device("cuda")) == 300


def test_without_sample_faces_the_run_says_it_times_synthetic_inputs(tmp_path, monkeypatch, capsys):
    """No --faces and no ../shared/faces/aligned: one line before any timing, and the same note in results.json."""
    monkeypatch.setenv("VQFR_SHARED", str(tmp_path / "no_shared"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # no busy-machine note, whatever else runs
    monkeypatch.setattr(bench, "make_subjects", lambda *args: [])  # the setup is what matters here
    out = tmp_path / "out"
    args = ["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--size", "32", "--device", "cpu", "--backends", "torch",
            "--restore-iters", "0", "--no-chart", "--out", str(out)]
    assert bench.main(args) == 0
    line = (f"no sample faces at {tmp_path / 'no_shared' / 'faces' / 'aligned'}: timing on synthetic inputs; "
            "pass --faces DIR")
    assert f"deploy.bench: {line}" in capsys.readouterr().err.splitlines()
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["notes"] == [line] and meta["inputs"].startswith("synthetic")
    assert line in (out / "results.md").read_text()

    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "a.png"), np.full((48, 48, 3), 128, np.uint8))
    assert bench.main([*args, "--faces", str(faces)]) == 0
    assert "synthetic" not in capsys.readouterr().err
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert "notes" not in meta and meta["inputs"].startswith(f"1 aligned faces from {faces}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, reason in ((tmp_path / "missing", "is not a folder"), (empty, "holds no .png or .jpg images")):
        assert bench.main([*args, "--faces", str(folder)]) == 2  # asked for: an error, not a silent fallback
        assert f"{folder}: {reason}" in capsys.readouterr().err


def test_a_busy_cpu_with_spinning_openmp_threads_is_noted(monkeypatch):
    """Other jobs on the cores and OMP_WAIT_POLICY unset: torch rows may be many times slower; the run says so."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    note = bench.busy_cpu_note(cpu, threads=2)
    assert note is not None and "load average 1.90 on 2 cores" in note and "OMP_WAIT_POLICY=PASSIVE" in note
    assert bench.busy_cpu_note(cpu, threads=1) is not None  # 1.9 > the one free core + 0.5
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert bench.busy_cpu_note(cpu, threads=2) is None  # quiet
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    assert bench.busy_cpu_note(torch.device("cuda"), threads=2) is None  # GPU timing: not this effect
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert bench.busy_cpu_note(cpu, threads=2) is None  # the user chose


@pytest.mark.parametrize("name,reason", [("gpu", "is not a device"), ("meta", "is not a device this benchmark times"),
                                         ("cuda:3", "torch sees 1 CUDA GPU")])
def test_a_device_that_cannot_run_is_a_clear_error(name, reason, monkeypatch):
    """A typo (``--device gpu``) raised torch's RuntimeError as a traceback; a device index past the last GPU or a
    device type the benchmark does not time failed later, inside the rows."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, for cuda:3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(VQFRError, match=reason):
        bench.resolve_device(name)
    assert bench.resolve_device("cuda:0") == torch.device("cuda:0")
    assert bench.resolve_device("cpu:0") == torch.device("cpu:0")


def test_a_bad_device_ends_the_cli_with_its_error_not_a_traceback(tmp_path, capsys):
    args = ["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--size", "32", "--device", "gpu", "--no-chart",
            "--out", str(tmp_path / "out")]
    assert bench.main(args) == 2
    assert "--device 'gpu' is not a device" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1,-2"])
def test_batch_sizes_below_one_are_refused(value, tmp_path, capsys):
    """--batch 0 used to run: every row 'failed' with a reshape error from inside the model."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--size", "32", "--device", "cpu", "--batch", value,
                    "--no-chart", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--batch sizes must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--warmup", "0"], "--warmup must be at least 1, got 0"),  # silently became 1
    (["--inputs", "0"], "--inputs must be at least 1, got 0"),  # silently became the default
    (["--threads", "0"], "--threads must be at least 1, got 0"),  # silently ignored
    (["--backends", "torch,tensorrtx"], "unknown backend 'tensorrtx' in --backends"),  # after the model was built
])
def test_counts_and_backends_that_cannot_be_timed_are_refused_before_the_run(flags, message, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--version", "v2", "--device", "cpu", "--no-chart", "--out", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_negative_v1_size_is_refused(tmp_path):
    """-64 passed the multiple-of-32 check and then failed inside make_faces."""
    model = vqfr.build_model(str(tiny_yml(tmp_path, SMALL_V1)))
    with pytest.raises(vqfr.VQFRError, match="--size must be a positive multiple of 32, got -64"):
        bench.face_size(model, -64)


def test_an_out_path_that_is_a_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    """It used to end, after the model was built, in a FileExistsError traceback from the first partial save."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the run started"))
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--device", "cpu", "--no-chart", "--out", str(out)])
    assert exc.value.code == 2 and f"--out {out} is a file" in capsys.readouterr().err


def test_without_matplotlib_the_chart_is_refused_before_the_run_with_the_extra(tmp_path, capsys, monkeypatch):
    """Without matplotlib the run used to time everything, then end in an ImportError traceback at the chart."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the run started"))
    args = ["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--device", "cpu", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'vqfr-deploy[bench]'" in err and "--no-chart" in err
    with pytest.raises(SystemExit) as exc:  # deploy.report the same way
        report.main([str(tmp_path / "results.json")])
    assert exc.value.code == 2 and "pip install 'vqfr-deploy[bench]'" in capsys.readouterr().err


def test_an_out_folder_with_an_earlier_run_keeps_no_stale_table_or_chart(tmp_path, monkeypatch):
    """Rerun into a folder that holds an earlier run's results: the Markdown table must follow results.json after
    every saved row (a run killed midway used to leave the earlier run's table beside the new JSON), and a chart that
    this run does not draw must not stay behind to contradict it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.md", "results.png"):
        (out / name).write_text("an earlier run")
    row = bench.Row("mine", "fp32", 1, "cpu", median_ms=2.0, img_per_s=500.0)

    def killed(cfg, on_subject=None, **kw):
        on_subject({"model": "m"}, [row])
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", killed)
    args = ["--config", str(tiny_yml(tmp_path, SMALL_V1)), "--device", "cpu", "--no-chart", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    assert json.loads((out / "results.json").read_text())["meta"]["partial"] is True
    table = (out / "results.md").read_text()
    assert "| mine | fp32 | 1 |" in table and "partial" in table
    assert not (out / "results.png").exists()
    (out / "results.png").write_text("an earlier run")
    monkeypatch.setattr(bench, "run", lambda cfg, on_subject=None, **kw: ({"model": "m"}, [row]))
    assert bench.main(args) == 0
    assert not (out / "results.png").exists() and "partial" not in (out / "results.md").read_text()


def test_report_refuses_a_file_that_is_not_a_results_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "missing.json"), "--no-chart"])
    assert exc.value.code == 2 and "missing.json" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text('{"meta": {}}')
    with pytest.raises(SystemExit) as exc:
        report.main([str(other), "--no-chart"])
    assert exc.value.code == 2 and "not a results.json" in capsys.readouterr().err
