"""Behaviours of the benchmark, its engine cache, the soak and the exporters that users rely on and that no other test
pinned down (found by mutation testing): each test here fails when the behaviour it names is broken.

Everything runs on the CPU in seconds: tiny models, fake exporters, a fake CLI for the soak, and a fake ``tensorrt``
module for the parts of ``export.trt.build_engine`` that only configure the builder.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy import bench
from tests.conftest import TINY_V2
from tests.fake_tensorrt import STRONGLY_TYPED_BIT, BuildLog, fake_tensorrt

# Three levels and 16x16 faces, as in test_bench.py: every code path, a fraction of the time.
SMALL_V2 = {**copy.deepcopy(TINY_V2), "channel_multipliers": [1, 1, 2],
            "quantizer_opt": {**TINY_V2["quantizer_opt"], "spatial_size": [4, 4]}}


# ---------------------------------------------------------------------------------------------------- deploy.bench
class Recorder:
    """A runner computing the model's output (plus ``offset``), recording what each call was given; it raises
    RuntimeError at ``fail_batch`` (as an out-of-memory error would)."""

    max_batch = None
    device = "cpu"

    def __init__(self, model, offset=0.0, fail_batch=None):
        self.model, self.offset, self.fail_batch = model, offset, fail_batch
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def infer(self, x, fidelity):
        self.calls.append((x.clone(), fidelity.clone(), torch.get_num_threads()))
        if x.shape[0] == self.fail_batch:
            raise RuntimeError("CUDA out of memory (simulated)")
        with torch.no_grad():
            return self.model(x, fidelity=fidelity) + self.offset

    def close(self):
        pass


def _run(tmp_path, make, **options):
    """bench.run of the fp32 reference and one extra subject ("rec", built by ``make(model)``) on SMALL_V2."""
    made = []

    def extra(model, device):
        def build():
            made.append(make(model))
            return made[-1]
        return [bench.Subject("rec", "fp32", False, build)]

    cfg = bench.BenchConfig(**{"config": copy.deepcopy(SMALL_V2), "device": "cpu", "backends": [], "batches": [1],
                               "iters": 1, "warmup": 1, "inputs": 2, "restore_iters": 0, "out": tmp_path,
                               "chart": False, **options})
    meta, rows = bench.run(cfg, log=lambda line: None, extra=extra)
    return rows, made[0] if made else None


def test_each_fidelity_row_runs_the_model_at_its_fidelity(tmp_path):
    """``--fidelity 0,1``: the fidelity-0 row must time the texture branch, not fidelity 1 again."""
    rows, runner = _run(tmp_path, Recorder, fidelities=(0.0, 1.0))
    assert {(r.fidelity, r.status) for r in rows if r.backend == "rec"} == {(0.0, "ok"), (1.0, "ok")}
    assert sorted({f.tolist()[0] for _, f, _ in runner.calls}) == [0.0, 1.0]


def test_speedup_is_the_reference_time_over_the_rows_time(tmp_path):
    """``x ref fp32`` above 1 means faster than the reference: reference median / row median."""
    rows, _ = _run(tmp_path, Recorder, batches=[1, 2], restore_iters=1)
    ref = {(r.what, r.batch): r.median_ms for r in rows if r.backend == "reference" and r.precision == "fp32"}
    checked = 0
    for r in rows:
        if r.backend == "rec":
            assert r.speedup == pytest.approx(ref[(r.what, r.batch)] / r.median_ms)
            checked += 1
    assert checked == 4


def test_every_input_set_is_timed_and_compared_even_when_fewer_calls_ran(tmp_path):
    """--inputs 3 with one warm-up and one timed call: the third set is still run (and compared), and the sets are
    distinct slices of the faces, not one batch repeated."""
    rows, runner = _run(tmp_path, Recorder, inputs=3, batches=[2])
    (row,) = [r for r in rows if r.backend == "rec"]
    assert row.status == "ok" and row.max_abs_err is not None and row.max_abs_err < 1e-4
    seen = {tuple(x.flatten()[:64].tolist()) for x, _, _ in runner.calls}
    assert len(seen) == 3 and all(x.shape[0] == 2 for x, _, _ in runner.calls)


def test_restore_rows_time_the_subjects_backend_with_their_own_count(tmp_path):
    """The restore row must run the subject's backend inside Runtime.restore_batch (a wrong backend shows up there
    too), ``--restore-iters`` times; the forward row ``--iters`` times after a separately timed first call."""
    rows, runner = _run(tmp_path, lambda model: Recorder(model, offset=0.25), iters=1, restore_iters=3)
    forward, restore = ([r for r in rows if r.backend == "rec" and r.what == w] for w in ("forward", "restore"))
    assert forward[0].iters == 1 and forward[0].first_call_s is not None and forward[0].first_call_s > 0
    assert restore[0].iters == 3 and restore[0].status == "ok"
    # 0.25 in [-1, 1] space is 0.125 * 255 ~ 32 levels before clipping: clearly not the reference's output
    assert restore[0].max_abs_err > 10
    assert forward[0].max_abs_err == pytest.approx(0.25, abs=1e-4)


def test_threads_option_is_applied_before_timing(tmp_path):
    rows, runner = _run(tmp_path, Recorder, threads=1)
    assert {threads for _, _, threads in runner.calls} == {1}


def test_a_row_that_fails_is_failed_and_the_run_goes_on(tmp_path):
    """Out of memory at batch 2 is a failed row (the exit status is then 1), not a skipped one; batch 1 stays ok."""
    rows, _ = _run(tmp_path, lambda model: Recorder(model, fail_batch=2), batches=[1, 2])
    status = {r.batch: r.status for r in rows if r.backend == "rec"}
    assert status == {1: "ok", 2: "failed"}


def test_a_backend_that_fails_to_build_fails_the_cli(tmp_path, monkeypatch, capsys):
    """A candidate whose build raises (not an ImportError or BackendUnavailable: a real failure) is a "failed" row,
    and the CLI exits 1, so that a CI job running the benchmark notices."""
    real = bench.make_subjects

    def broken(*args):
        raise RuntimeError("engine build crashed")

    def make_subjects(cfg, model, device, engines):
        return real(cfg, model, device, engines) + [bench.Subject("broken", "fp32", False, broken)]

    monkeypatch.setattr(bench, "make_subjects", make_subjects)
    import yaml

    config = tmp_path / "small.yml"
    config.write_text(yaml.safe_dump({"network_sr": copy.deepcopy(SMALL_V2)}))
    out = tmp_path / "out"
    rc = bench.main(["--config", str(config), "--device", "cpu", "--backends", "torch", "--iters", "1",
                     "--warmup", "1", "--inputs", "1", "--restore-iters", "0", "--no-chart", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["backend"] == "broken"] == ["failed"]
    assert rc == 1


# ---------------------------------------------------------------------------------------------------- deploy.engines
class _FakeExporters:
    """export.onnx / export.trt / export.aoti as EngineCache calls them: each build writes the file and its sidecar
    and is recorded."""

    def __init__(self, onnx_seconds=0.0):
        self.builds: list[tuple] = []
        self.onnx_seconds = onnx_seconds
        self.BuildOptions = lambda **kw: kw

    def _write(self, path, what):
        Path(path).write_text(what)
        Path(str(path) + ".json").write_text("{}")
        return path

    def export_onnx(self, weights, path, config, precision):
        time.sleep(self.onnx_seconds)
        self.builds.append(("onnx", precision))
        return self._write(path, f"onnx {precision}")

    def build_engine(self, onnx_path, path, options):
        self.builds.append(("trt", Path(onnx_path).name, options["min_batch"], options["opt_batch"],
                            options["max_batch"]))
        return self._write(path, "engine")

    def export_aoti(self, weights, path, config, precision, device):
        self.builds.append(("aoti", precision, device))
        return self._write(path, f"aoti {device}")


@pytest.fixture
def engine_cache(tmp_path, monkeypatch):
    import vqfr
    from deploy import engines

    fake = _FakeExporters(onnx_seconds=0.05)
    monkeypatch.setattr(engines, "_exporter", lambda module: fake)
    model = vqfr.build_model(copy.deepcopy(SMALL_V2)).eval()
    # A checkpoint of the user's, as with --weights (random weights: the test below).
    weights = vqfr.save_safetensors(model, tmp_path / "weights.safetensors")
    return (lambda rebuild=False: engines.EngineCache(tmp_path / "engines", model, weights, rebuild=rebuild)), fake


def test_engine_cache_keys_engines_by_precision_batch_and_device(engine_cache):
    """A cached engine is reused only for the same precision, max batch and device: an fp32 ONNX served as the fp16
    row, or a batch-1 engine as the batch-8 one, would time the wrong engine."""
    make, fake = engine_cache
    cache = make()
    fp32, built = cache.onnx("fp32")
    fp16, built16 = cache.onnx("fp16")
    assert fp32 != fp16 and built is not None and built16 is not None
    assert fp16.read_text() == "onnx fp16"
    assert cache.onnx("fp32") == (fp32, None)  # reused: no build time
    b8, _ = cache.tensorrt("fp16", 8)
    b1, _ = cache.tensorrt("fp16", 1)
    assert b8 != b1
    assert [b for b in fake.builds if b[0] == "trt"] == [("trt", fp16.name, 1, 8, 8), ("trt", fp16.name, 1, 1, 1)]
    cpu, _ = cache.aoti("fp32", torch.device("cpu"))
    gpu, _ = cache.aoti("fp32", torch.device("cuda"))  # only named: nothing runs on it
    assert cpu != gpu and cpu.read_text() == "aoti cpu" and gpu.read_text() == "aoti cuda"
    assert fake.builds.count(("onnx", "fp32")) == 1


def test_engine_cache_rebuilds_when_asked_or_when_the_sidecar_is_missing(engine_cache):
    make, fake = engine_cache
    path, _ = make().onnx("fp32")
    assert make().onnx("fp32")[1] is None and len(fake.builds) == 1  # a new cache (a new run) reuses the file
    assert make(rebuild=True).onnx("fp32")[1] is not None and len(fake.builds) == 2
    Path(str(path) + ".json").unlink()  # an engine without its sidecar cannot be loaded: rebuilt
    assert make().onnx("fp32")[1] is not None and len(fake.builds) == 3


def test_engine_cache_reuses_engines_of_the_same_random_weights_from_run_to_run(tmp_path, monkeypatch):
    """Without --weights the random weights are saved again by every run, and safetensors writes its header in no
    fixed order: the digest of the file, and so every engine name, changed from run to run (each run rebuilt its
    engines, minutes for TensorRT, and left the old ones behind)."""
    import vqfr
    from deploy import engines

    fake = _FakeExporters(onnx_seconds=0.0)
    monkeypatch.setattr(engines, "_exporter", lambda module: fake)
    model = vqfr.build_model(copy.deepcopy(SMALL_V2)).eval()
    names = {engines.EngineCache(tmp_path / "engines", model, None).onnx("fp32")[0].name for _ in range(6)}
    assert len(names) == 1 and fake.builds == [("onnx", "fp32")]
    other = vqfr.build_model(copy.deepcopy(SMALL_V2)).eval()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert engines.EngineCache(tmp_path / "engines", other, None).onnx("fp32")[0].name not in names


def test_engine_cache_counts_a_fresh_onnx_in_the_tensorrt_build_time(engine_cache):
    make, fake = engine_cache
    _, seconds = make().tensorrt("fp32", 2)
    assert fake.builds[0] == ("onnx", "fp32") and seconds >= fake.onnx_seconds


# ---------------------------------------------------------------------------------------------------- deploy.soak
_FAKE_CLI = """\
import os, shutil, sys, time
from pathlib import Path

args = sys.argv[1:]  # -m vqfr -i INPUTS -o RESULTS ...
inputs, results = Path(args[args.index("-i") + 1]), Path(args[args.index("-o") + 1])
mode, bad_kinds = os.environ["FAKE_SOAK_MODE"], os.environ["FAKE_SOAK_BAD"].split(",")
face, wide, small = os.environ["FAKE_SOAK_FACE"], os.environ["FAKE_SOAK_CMP"], os.environ["FAKE_SOAK_SMALL"]

def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

files = sorted(inputs.iterdir())
bad = [p for p in files if p.stem.split("_", 1)[1] in bad_kinds]
good = [p for p in files if p not in bad]
leak, chunk = [], int(0.6 * rss() / len(good))
for i, p in enumerate(files):
    if p in bad:
        times = {"twice": 2 if p == bad[0] else 0 if p == bad[1] else 1}.get(mode, 1)
        for _ in range(times):
            print(f"vqfr: FAILED {p}: cannot be read", file=sys.stderr, flush=True)
        continue
    for group, src in (("restored_faces", small if mode == "wrong_size" else face), ("cropped_faces", face),
                       ("cmp", wide)):
        (results / group).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, results / group / f"{p.stem}_00.png")
    if mode == "leak":
        leak.append(b"\\x01" * chunk)
    time.sleep(0.03)
if mode == "stray":
    (results / "restored_faces" / "img.partial.png").write_bytes(b"")
if mode == "touch_input":
    with open(good[0], "ab") as f:
        f.write(b"\\0")
print(f"vqfr: {len(files)} images, {len(good)} faces restored", flush=True)
sys.exit(0 if mode == "exit0" or not bad else 3)
"""


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """An executable that stands in for ``python`` in the soak's ``python -m vqfr ...`` command: it writes outputs
    for the good inputs and reports the bad ones as the CLI does, misbehaving as FAKE_SOAK_MODE says."""
    import cv2

    from deploy.soak import BAD_KINDS, FACE_SIZE

    if not Path("/proc/self/status").is_file():
        pytest.skip("the soak samples /proc/PID/status (Linux)")
    folder = tmp_path / "fake"
    folder.mkdir()
    for name, shape in (("face", (FACE_SIZE, FACE_SIZE, 3)), ("cmp", (FACE_SIZE, 2 * FACE_SIZE, 3)),
                        ("small", (FACE_SIZE // 2, FACE_SIZE // 2, 3))):
        cv2.imwrite(str(folder / f"{name}.png"), np.full(shape, 128, np.uint8))
        monkeypatch.setenv(f"FAKE_SOAK_{name.upper()}", str(folder / f"{name}.png"))
    monkeypatch.setenv("FAKE_SOAK_BAD", ",".join(BAD_KINDS))
    script = folder / "python"
    script.write_text(f"#!{sys.executable}\n" + _FAKE_CLI)
    script.chmod(0o755)

    def run(mode):
        from deploy.soak import run_soak

        monkeypatch.setenv("FAKE_SOAK_MODE", mode)
        return run_soak(20, 0.1, tmp_path / mode, interval=0.01, python=str(script))

    return run


@pytest.mark.parametrize("mode,problem", [
    ("ok", None),
    ("exit0", "exit code 0, expected 3"),
    ("twice", "reported 2 times, expected once"),
    ("leak", "RSS grew"),
    ("stray", "unexpected files in the results"),
    ("touch_input", "the input folder changed"),
    ("wrong_size", "outputs of the wrong size"),
])
def test_soak_reports_what_a_misbehaving_cli_does(mode, problem, fake_cli):
    result = fake_cli(mode)
    if problem is None:
        assert result.ok, result.summary()
        assert result.good == 18 and result.bad == 2 and result.outputs == 18 and result.exit_code == 3
    else:
        assert not result.ok and any(problem in p for p in result.problems), result.problems


def test_soak_cli_exits_1_when_a_check_failed(tmp_path, monkeypatch, capsys):
    from deploy import soak

    failed = soak.SoakResult(10, 9, 1, 0, 9, 1, ["exit code 0, expected 3"], [], 1.0, 1, None, None, None, None,
                             None, ["python"])
    monkeypatch.setattr(soak, "run_soak", lambda *args, **kwargs: failed)
    assert soak.main(["--count", "10", "--out", str(tmp_path)]) == 1
    assert "PROBLEM: exit code 0, expected 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "soak.json").read_text())["ok"] is False


# ---------------------------------------------------------------------------------------------------- export.aoti
def test_aoti_sidecar_and_program_follow_the_requested_batch_and_precision(tmp_path, monkeypatch):
    """``--batch 2 --precision fp16``: the traced program has a static batch of 2, and the sidecar (which the runtime
    trusts for the shapes and the precision) says batch 2, fp16 and the modules kept in fp32. Compilation itself is
    skipped: its output is not what is checked here."""
    import yaml

    import export.aoti as aoti
    from vqfr.sidecar import read_sidecar

    programs = []

    def compile_and_package(program, package_path, inductor_configs):
        programs.append(program)
        Path(package_path).write_bytes(b"package")
        return package_path

    monkeypatch.setattr(aoti, "custom_op_problems", lambda device: [])
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    config = tmp_path / "small.yml"
    config.write_text(yaml.safe_dump({"network_sr": copy.deepcopy(SMALL_V2)}))
    fixed = tmp_path / "fixed.pt2"
    assert aoti.main(["--random-weights", "0", "--config", str(config), "--device", "cpu", "--precision", "fp16",
                      "--batch", "2", "-o", str(fixed)]) == 0
    meta = read_sidecar(fixed)
    assert meta.precision == "fp16" and [t.shape for t in meta.inputs] == [(2, 3, 16, 16), (2,)]
    assert meta.extra["fp32_modules"] == list(aoti.FP32_MODULES["VQFRv2"])
    dynamic = aoti.export_aoti(None, tmp_path / "dynamic.pt2", config=SMALL_V2, random_weights=0, device="cpu")
    assert read_sidecar(dynamic).inputs[0].shape == (-1, 3, 16, 16) and read_sidecar(dynamic).precision == "fp32"
    batch_dims = [[n.meta["val"].shape[0] for n in p.graph.nodes if n.op == "placeholder" and "val" in n.meta
                   and n.meta["val"].dim() >= 1 and n.name in ("input", "fidelity")] for p in programs]
    assert batch_dims[0] == [2, 2] and all(isinstance(d, torch.SymInt) for d in batch_dims[1])


# ---------------------------------------------------------------------------------------------------- export.trt
@pytest.fixture
def fake_trt_build(tmp_path, monkeypatch):
    """build(precision of the ONNX, **BuildOptions) -> (the engine path, what TensorRT was asked)."""
    import export.trt as trt_export
    from vqfr.sidecar import EngineMeta, TensorSpec, write_sidecar

    def build(precision="fp32", cli=None, version="10.9.0", **options):
        onnx_path = tmp_path / f"m_{precision}.onnx"
        onnx_path.write_bytes(b"onnx " + precision.encode())
        write_sidecar(onnx_path, EngineMeta(
            arch="VQFRv2", options={"type": "VQFRv2"}, face_size=64, precision=precision,
            inputs=(TensorSpec("input", (-1, 3, 64, 64)), TensorSpec("fidelity", (-1,))),
            outputs=(TensorSpec("output", (-1, 3, 64, 64)),)))
        log = BuildLog()
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(
            version, log, {"input": (-1, 3, 64, 64), "fidelity": (-1,)}))
        monkeypatch.setattr(trt_export, "_onnx_bytes", lambda path, meta, opts: (b"graph", set()))
        output = tmp_path / f"m_{precision}.engine"
        if cli is not None:
            assert trt_export.main([str(onnx_path), "-o", str(output), *cli]) == 0
        else:
            trt_export.build_engine(onnx_path, output, trt_export.BuildOptions(**options))
        return output, log

    return build


def test_trt_profile_spans_min_opt_max_batch(fake_trt_build):
    _, log = fake_trt_build(min_batch=1, opt_batch=4, max_batch=8)
    assert log.profile == {"input": ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)),
                           "fidelity": ((1,), (4,), (8,))}
    _, log = fake_trt_build(cli=["--min-batch", "2", "--opt-batch", "3", "--max-batch", "5"])
    assert log.profile["input"] == ((2, 3, 64, 64), (3, 3, 64, 64), (5, 3, 64, 64))


def test_trt_fp16_of_an_fp32_onnx_sets_the_fp16_flags_and_says_fp16(fake_trt_build):
    """TensorRT 10, fp32 ONNX with --fp16: weakly typed fp16 with precision constraints obeyed; the sidecar (which the
    runtime checks the requested precision against) says fp16. Without --fp16 it is an fp32 engine without TF32."""
    from vqfr.sidecar import read_sidecar

    engine, log = fake_trt_build(fp16=True)
    assert {"FP16", "OBEY"} <= log.flags and log.network_flags == 0
    assert read_sidecar(engine).precision == "fp16" and engine.read_bytes() == b"engine"
    engine, log = fake_trt_build()
    assert "FP16" not in log.flags and "TF32" not in log.flags  # fp32 means fp32
    assert read_sidecar(engine).precision == "fp32"
    _, log = fake_trt_build(tf32=True)
    assert "TF32" in log.flags


def test_trt_fp16_onnx_builds_a_strongly_typed_network(fake_trt_build):
    from vqfr.sidecar import read_sidecar

    engine, log = fake_trt_build("fp16")
    assert log.network_flags == 1 << STRONGLY_TYPED_BIT and "FP16" not in log.flags
    assert read_sidecar(engine).extra["strongly_typed"] is True and read_sidecar(engine).precision == "fp16"


def test_trt_timing_cache_is_loaded_then_saved(fake_trt_build, tmp_path):
    cache = tmp_path / "trt.cache"
    _, log = fake_trt_build(timing_cache=cache)  # absent: an empty cache, then saved
    assert log.cache_data == b"" and cache.read_bytes() == b"tuned after "
    cache.write_bytes(b"tuned")
    _, log = fake_trt_build(timing_cache=cache)
    assert log.cache_data == b"tuned" and cache.read_bytes() == b"tuned after tuned"


def test_trt_a_failed_engine_write_leaves_no_sidecar(fake_trt_build, monkeypatch, tmp_path):
    """The sidecar describes the engine beside it: written after the engine, never for an engine that is not there."""
    import export.trt as trt_export
    from vqfr.sidecar import sidecar_path

    def failing_write(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trt_export, "atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left"):
        fake_trt_build()
    assert not (tmp_path / "m_fp32.engine").exists() and not sidecar_path(tmp_path / "m_fp32.engine").exists()


# ---------------------------------------------------------------------------------------------------- export.onnx
def test_onnx_cli_passes_every_option_to_the_export(tmp_path, monkeypatch, capsys):
    import export.onnx as onnx_export
    from vqfr.errors import ConfigError

    asked = {}

    def spy(weights, output, **kwargs):
        asked.update(kwargs, weights=weights, output=output)
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    out = tmp_path / "m.onnx"
    assert onnx_export.main(["--random-weights", "3", "--config", "v1", "--precision", "fp16", "--batch", "2",
                             "--size", "64", "--dynamic-size", "--opset", "20", "--check", "-o", str(out)]) == 1
    assert "stopped by the test" in capsys.readouterr().err
    assert asked == {"weights": None, "output": out, "config": "v1", "precision": "fp16", "batch": 2, "size": 64,
                     "dynamic_size": True, "opset": 20, "check": True, "random_weights": 3}


@pytest.fixture
def micro_check(monkeypatch):
    """check_onnx(precision, error) on the micro v2 with onnxruntime replaced by the PyTorch output plus ``error``
    (a function of that output): the check's thresholds, without exporting anything."""
    pytest.importorskip("onnxruntime")
    import export.onnx as onnx_export
    from deploy.soak import MICRO_V2
    from export import source

    model = source.load_source_model(None, MICRO_V2, 0)
    spec = source.export_spec(model)

    def check(precision, error):
        def fake_ort(path, inputs, names):
            with torch.no_grad():
                y = source.engine_module(model)(*inputs).numpy()
            return (y + error(y)).astype(np.float32)

        monkeypatch.setattr(onnx_export, "run_onnxruntime", fake_ort)
        return onnx_export.check_onnx("m.onnx", model, spec, precision)

    return check


def test_onnx_check_holds_fp32_to_its_tolerance_and_fp16_to_its_psnr(micro_check):
    from export.onnx import FP16_MIN_PSNR, FP32_TOLERANCE
    from vqfr.errors import EngineError

    assert micro_check("fp32", lambda y: np.full_like(y, FP32_TOLERANCE / 2)).max_abs <= FP32_TOLERANCE
    with pytest.raises(EngineError, match="onnxruntime differs from PyTorch"):
        micro_check("fp32", lambda y: np.full_like(y, 3 * FP32_TOLERANCE))
    rng = np.random.default_rng(0)
    assert micro_check("fp16", lambda y: 1e-3 * rng.standard_normal(y.shape)).psnr_db >= FP16_MIN_PSNR
    with pytest.raises(EngineError, match="fp16 onnxruntime output is too far"):
        micro_check("fp16", lambda y: 0.05 * rng.standard_normal(y.shape))  # about 32 dB


# ---------------------------------------------------------------------------------------------------- export.source
def test_check_inputs_span_both_fidelity_branches_and_are_reproducible():
    """The inputs every exporter's --check compares on: fidelities from 0 (texture branch alone) to 1 (the whole
    network) across the batch, images in [-1, 1], the same for the same seed."""
    import vqfr
    from export import source

    spec = source.export_spec(vqfr.build_model(copy.deepcopy(SMALL_V2)).eval())
    x, fidelity = source.check_inputs(spec, batch=3)
    assert x.shape == (3, 3, spec.height, spec.width) and float(x.abs().max()) <= 1
    assert fidelity.tolist() == [0.0, 0.5, 1.0]
    assert torch.equal(source.check_inputs(spec, batch=3)[0], x)
    assert not torch.equal(source.check_inputs(spec, batch=3, seed=1)[0], x)


def test_a_v2_size_other_than_its_grid_and_a_batch_below_one_are_refused():
    """A v2 engine traced at another size would not be the model the checkpoint describes; --batch 0 would export
    an engine that takes nothing."""
    import argparse

    import vqfr
    from export import source
    from vqfr.errors import ConfigError

    model = vqfr.build_model(copy.deepcopy(SMALL_V2)).eval()  # spatial_size 4 x patch 4: 16x16
    assert source.export_spec(model, size=16).height == 16
    with pytest.raises(ConfigError, match=r"takes 16x16 inputs, not 32") as err:
        source.export_spec(model, size=32)
    assert "--size 16" in err.value.fix
    with pytest.raises(ConfigError, match="batch must be a positive integer"):
        source.export_spec(model, batch=0)
    parser = argparse.ArgumentParser()
    source.add_model_arguments(parser, ("fp32",))
    assert parser.parse_args(["--batch", "dynamic"]).batch is None and parser.parse_args(["--batch", "4"]).batch == 4
    for bad in ("0", "-2", "four"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--batch", bad])
