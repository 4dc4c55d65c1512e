"""The profiler summary, the kernel and folder benchmarks and the AOTInductor export and backend, pinned against hand
calculations and stand-ins (mutation-tested, round 7).

What these pin, beyond tests/test_bench_tools.py, tests/test_kernels_bench.py, tests/test_bench_tooling_mutants.py
and tests/test_export_aoti.py:

- ``deploy.profile_model``: each operator's category (grid sampling as deformable conv, softmax as attention, bmm as a
  matrix product, names matched whatever their case, the rest "other"); times and launches divided by the profiled
  forwards, in ms from the profiler's microseconds; the VQFR ops' totals; ``warmup`` untimed calls and ``iters``
  profiled ones; the table's shares, order and shortened names; the CLI's flags reaching the profile (fp32 on the
  CPU, ``--size``, ``--no-compile``, ``--fused-group-norm``, ``--out``) and its refusal of ``--batch 0``;
- ``deploy.bench_kernels``: percentiles by rounded rank, ``perf_counter`` milliseconds around each call, the CPU's
  defaults (3 calls after 1, fp32, the reference), ``--reference``, ``--channels-last`` and ``--rotate`` reaching
  the benchmarks, distinct input copies, offsets of about 2 px, the JSON rows as named fields, a skipped row's reason
  in the table, a CUDA-graph row's note, and the refusal of empty levels, codebooks and ``--rotate 0``;
- ``deploy.bench_folder``: distinct faces, a failed or refused CLI run reported with the CLI's own message, the CLI
  getting ``--batch`` and each ``--io-threads``, ``--identity-ms`` slept per face, and ``--repeat``/``--count``
  below 1 and a negative ``--identity-ms`` refused;
- ``export.aoti``: the precision, device and no-CUDA refusals before any work, the custom ops checked on the export's
  device, opcheck failures reported rather than raised, size-1 strides not counted, ``inductor_configs`` passed to
  the compiler, the sidecar's device, format and fp32 islands (read back as a CPU package), and every CLI option
  reaching the export;
- ``vqfr.backends.aoti``: the package's device read from its sidecar, a local torch version suffix accepted, a
  compute capability compared in full (minor included), a load failure classed as a broken package or a missing
  CUDA, and a v1 package called without fidelity.
"""

from __future__ import annotations

import contextlib
import copy
import json
import types
from pathlib import Path

import pytest
import torch

from deploy import bench_folder, bench_kernels, profile_model
from tests.test_bench import SMALL_V1

# ------------------------------------------------------------------------------------------------ profile_model


@pytest.mark.parametrize("name,expected", [
    ("aten::grid_sampler_2d", "deformable conv"),  # the reference DCN's sampling
    ("aten::_softmax", "attention"),
    ("aten::bmm", "matrix product"),
    ("aten::mm", "matrix product"),
    ("Memcpy HtoD (Pageable -> Device)", "copy / layout"),  # CUDA's names are capitalised
    ("aten::lift_fresh", "other"),
])
def test_profile_categories_of_operator_names(name, expected):
    assert profile_model.category(name) == expected


def _event(key: str, self_us: float, count: int, total_us: float | None = None):
    return types.SimpleNamespace(key=key, self_cpu_time_total=self_us, count=count,
                                 cpu_time_total=self_us if total_us is None else total_us)


def stand_in_profiler(monkeypatch, events: list) -> dict[str, int]:
    """Replace the torch backend and torch.profiler with stand-ins: the profiler's ``key_averages()`` returns
    ``events``. Returns the count of ``infer`` calls outside ("warm-up") and inside ("profiled") the profiler."""
    calls = {"warm-up": 0, "profiled": 0}
    profiling = {"on": False}

    class Backend:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, x, f):
            calls["profiled" if profiling["on"] else "warm-up"] += 1

    class Profiler:
        def __init__(self, activities):
            pass

        def __enter__(self):
            profiling["on"] = True
            return self

        def __exit__(self, *exc):
            profiling["on"] = False
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr("vqfr.backends.torch.TorchBackend", Backend)
    monkeypatch.setattr(torch.profiler, "profile", Profiler)
    return calls


def test_profile_divides_by_the_profiled_forwards_after_the_warm_up(monkeypatch):
    """4 profiled forwards after 2 warm-up calls, the profiler's totals scripted (microseconds): 8000 us of
    convolution over 8 launches is 2 ms and 2 launches a forward; the deformable conv op's 4000 us with children
    is its 1 ms total; a CUDA runtime call is no CPU operator."""
    events = [_event("aten::convolution", 8000, 8), _event("aten::native_group_norm", 2000, 4),
              _event("vqfr::modulated_deform_conv2d", 400, 4, total_us=4000), _event("aten::bmm", 1200, 4),
              _event("aten::grid_sampler_2d", 800, 4), _event("aten::_softmax", 600, 4),
              _event("aten::lift_fresh", 100, 4), _event("cudaLaunchKernel", 5000, 40)]
    calls = stand_in_profiler(monkeypatch, events)
    p = profile_model.profile(None, "cpu", "fp32", batch=1, size=16, mode="eager", iters=4, warmup=2)
    assert calls == {"warm-up": 2, "profiled": 4} and p.calls == 4
    assert p.per_category == pytest.approx({"convolution": 2.0, "normalisation": 0.5, "deformable conv": 0.3,
                                            "matrix product": 0.3, "attention": 0.15, "other": 0.025})
    assert p.total_ms == pytest.approx(3.275)
    assert p.vqfr_ops == pytest.approx({"vqfr::modulated_deform_conv2d": 1.0})
    assert [(n, round(ms, 6), c) for n, ms, c in p.top] == [
        ("aten::convolution", 2.0, 2), ("aten::native_group_norm", 0.5, 1), ("aten::bmm", 0.3, 1),
        ("aten::grid_sampler_2d", 0.2, 1), ("aten::_softmax", 0.15, 1), ("vqfr::modulated_deform_conv2d", 0.1, 1),
        ("aten::lift_fresh", 0.025, 1)]


def test_profile_report_shares_order_and_shortened_names():
    long = "aten::" + "x" * 100
    p = profile_model.Profile("cpu", {"normalisation": 1.0, "convolution": 3.0}, [(long, 3.0, 2)], 4.0, 5,
                              {"vqfr::modulated_deform_conv2d": 0.5})
    text = profile_model.report(p, "tiny")
    assert "4.000 ms of operator time per forward (5 profiled)." in text
    assert ("`vqfr::modulated_deform_conv2d` in total (children included): 0.500 ms per forward, 12.5% of the time."
            in text)
    assert text.index("| convolution | 3.000 | 75.0% |") < text.index("| normalisation | 1.000 | 25.0% |")
    assert f"| `aten::{'x' * 81}...` | other | 3.000 | 2 |" in text


def test_profile_cli_passes_its_flags_and_writes_the_report(tmp_path, monkeypatch, capsys):
    import yaml

    seen = {}

    def profile(model, device, precision, batch, size, mode, fidelity, iters, warmup, **kwargs):
        seen.update(device=device, precision=precision, batch=batch, size=size, mode=mode, fidelity=fidelity,
                    iters=iters, warmup=warmup, **kwargs)
        return profile_model.Profile("cpu", {"convolution": 1.0}, [("aten::convolution", 1.0, 3)], 1.0, iters)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profile_model, "profile", profile)
    config = tmp_path / "v1.yml"
    config.write_text(yaml.safe_dump({"network_sr": copy.deepcopy(SMALL_V1)}))
    out = tmp_path / "profile.md"
    assert profile_model.main(["--config", str(config), "--size", "32", "--batch", "2", "--mode", "eager",
                               "--fidelity", "0.5", "--iters", "4", "--warmup", "2", "--no-compile",
                               "--fused-group-norm", "--out", str(out)]) == 0
    assert seen == {"device": "cpu", "precision": "fp32", "batch": 2, "size": 32, "mode": "eager", "fidelity": 0.5,
                    "iters": 4, "warmup": 2, "compile": False, "fused_group_norm": True}
    printed = capsys.readouterr().out
    assert "## VQFRv1 eager fp32, batch 2, 32x32, fidelity 0.5, on CPU" in printed
    assert out.read_text() == printed


def test_profile_cli_refuses_an_empty_batch(monkeypatch, capsys):
    """``--batch 0`` built the model, then ended in an IndexError from the backend."""
    monkeypatch.setattr(profile_model, "profile", lambda *a, **k: pytest.fail("profiled"))
    with pytest.raises(SystemExit) as exc:
        profile_model.main(["--config", "v2", "--device", "cpu", "--batch", "0"])
    assert exc.value.code == 2 and "--batch must be at least 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bench_kernels
def test_kernel_bench_percentiles_round_the_rank(monkeypatch):
    """4 calls of 1..4 ms: p20 is rank round(0.2 * 3) = 1 (2 ms, not the fastest), p80 rank round(2.4) = 2 (3 ms);
    the median 2.5 ms."""
    monkeypatch.setattr(bench_kernels, "time_calls", lambda *a: [4.0, 1.0, 3.0, 2.0])
    t = bench_kernels._run("op", "case", "fp32", "impl", lambda *a: None, "", [[]], torch.device("cpu"), 4, 0)
    assert (t.median_ms, t.p20_ms, t.p80_ms) == (2.5, 2.0, 3.0)


def test_kernel_bench_cpu_times_are_perf_counter_milliseconds_around_each_call(monkeypatch):
    """A clock that each call moves on by (i + 1) ms: the warm-up's call is not timed, the two timed ones take 1 and
    2 ms."""
    clock = {"s": 100.0}

    def call(i):
        clock["s"] += (i + 1) / 1e3

    monkeypatch.setattr(bench_kernels, "time", types.SimpleNamespace(perf_counter=lambda: clock["s"]))
    times = bench_kernels.time_calls(call, torch.device("cpu"), iters=2, warmup=1)
    assert times == pytest.approx([1.0, 2.0])


@pytest.fixture
def bench_args(monkeypatch):
    """Runs bench_kernels.main with the benchmarks replaced by recorders; returns {op: their arguments}."""
    seen: dict = {}
    for op in ("deform", "nearest", "group_norm"):
        monkeypatch.setattr(bench_kernels, f"bench_{op}", lambda *a, op=op: seen.setdefault(op, a) and [])
    monkeypatch.setattr(bench_kernels, "environment", lambda device: {"date": "d", "torch": "t", "triton": None})
    return seen


def test_kernel_bench_cpu_defaults(bench_args, monkeypatch):
    """The module docstring: on the CPU, 3 calls after 1, fp32 only, and the reference always."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench_kernels.main([])
    levels, batches, dtypes, device, iters, warmup, rotate, reference, channels_last, graphs = bench_args["deform"]
    assert (device.type, dtypes, iters, warmup, reference, channels_last) == ("cpu", ["fp32"], 3, 1, True, False)


def test_kernel_bench_flags_reach_the_benchmarks(bench_args, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing runs: the benchmarks are recorders
    bench_kernels.main(["--ops", "deform", "nearest", "group_norm", "--reference", "--channels-last", "--rotate", "3",
                        "--batches", "2", "--gn-levels", "64x8x8"])
    _, batches, _, _, _, _, rotate, reference, channels_last, _ = bench_args["deform"]
    assert (batches, rotate, reference, channels_last) == ([2], 3, True, True)
    assert bench_args["nearest"][6] == 3  # --rotate
    gn_levels, gn_batches, *_ = bench_args["group_norm"]
    assert [tuple(lvl) for lvl in gn_levels] == [(64, 8, 8)] and gn_batches == [2]


def test_kernel_bench_inputs_are_distinct_copies_with_offsets_of_about_2_px():
    copies = bench_kernels._copies(lambda: bench_kernels.deform_inputs(1, 4, 16, 16, torch.float32,
                                                                         torch.device("cpu")), 3)
    assert len(copies) == 3 and len({id(c[0]) for c in copies}) == 3
    assert not torch.equal(copies[0][0], copies[1][0])
    x, offset, mask, weight, bias = copies[0]
    assert offset.shape == (1, 72, 16, 16) and 1.8 < offset.std() < 2.2  # 18432 samples of 2 * N(0, 1)
    assert mask.shape == (1, 36, 16, 16) and 0 < mask.min() and mask.max() < 1


def test_kernel_bench_json_rows_are_named_fields(tmp_path, monkeypatch):
    row = bench_kernels.Timing("nearest_code", "4 tokens, 8x4 codebook", "fp32", "torch distance+argmin", 1.5, 1.0,
                               2.0, 3)
    monkeypatch.setattr(bench_kernels, "bench_nearest", lambda *a: [row])
    monkeypatch.setattr(bench_kernels, "environment", lambda device: {"date": "d", "torch": "t", "triton": None,
                                                                      "device": "cpu", "cpu": "c"})
    bench_kernels.main(["--device", "cpu", "--ops", "nearest", "--json", str(tmp_path / "k.json")])
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["environment"] == {"date": "d", "torch": "t", "triton": None, "device": "cpu", "cpu": "c"}
    assert report["timings"] == [{"op": "nearest_code", "case": "4 tokens, 8x4 codebook", "dtype": "fp32",
                                  "impl": "torch distance+argmin", "median_ms": 1.5, "p20_ms": 1.0, "p80_ms": 2.0,
                                  "iters": 3, "note": "", "config": ""}]


def test_kernel_bench_environment_on_the_cpu_names_the_threads():
    env = bench_kernels.environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__


def test_kernel_bench_table_says_why_a_row_is_missing():
    rows = [bench_kernels.Timing("deform_conv", "1x8x6x7", "fp32", "torchvision", None, None, None, 0,
                                 "torchvision not installed")]
    text = bench_kernels.markdown(rows, {"date": "d", "torch": "t", "triton": None, "cpu": "c"})
    assert "| 1x8x6x7 | fp32 | n/a (torchvision not installed) |" in text


def test_kernel_bench_graph_rows_say_how_many_calls_a_replay_holds(monkeypatch):
    monkeypatch.setattr(bench_kernels, "time_graph_replays", lambda *a: [1.0, 2.0, 3.0])
    t = bench_kernels._run("op", "case", "fp32", "impl", lambda *a: None, "tf32", [[]], torch.device("cpu"), 3, 0,
                           graphs=5)
    assert t.note == "tf32; CUDA graph of 5 calls" and t.median_ms == 2.0


@pytest.mark.parametrize("args,message", [
    (["--levels", "8x0x8"], "level 8x0x8: give CxHxW"),  # an empty feature map times nothing
    (["--codebook", "0x4"], "--codebook must be KxD"),  # used to end in argmin's IndexError
    (["--codebook", "8x0"], "--codebook must be KxD"),  # used to time a search over no dimension
    (["--rotate", "0"], "--rotate must be at least 1, got 0"),
], ids=["empty level", "no codes", "no dimension", "rotate 0"])
def test_kernel_bench_refuses_empty_problems(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(["--device", "cpu", "--ops", "nearest", "--tokens", "4", "--codebook", "8x4", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- bench_folder
def test_folder_bench_faces_are_distinct_512_pngs(tmp_path):
    import cv2

    paths = bench_folder.make_faces(tmp_path, 3)
    assert [p.name for p in paths] == ["face0000.png", "face0001.png", "face0002.png"]
    assert len({p.read_bytes() for p in paths}) == 3
    assert all(cv2.imread(str(p)).shape == (512, 512, 3) for p in paths)


def _cli(printed: str, code: int = 0, *, exit_code: int | None = None, error: str = ""):
    def main(argv):
        import sys

        print(printed)
        if exit_code is not None:
            print(error, file=sys.stderr)
            raise SystemExit(exit_code)
        return code

    return main


def test_folder_bench_reports_a_failed_or_refused_cli_run(tmp_path, monkeypatch):
    """A run with failures (exit 1) is no row; a flag the CLI's argparse refuses (``--io-threads 0``, a mistyped
    ``--wieghts`` passed on) made the benchmark exit 2 silently, its message swallowed with the CLI's output."""
    import vqfr.cli

    summary = "vqfr: 2 images, 1 faces restored, 1 failed in 1.0 s (1.00 faces/s; the model alone 9.00) on x"
    monkeypatch.setattr(vqfr.cli, "main", _cli(summary, 1))
    with pytest.raises(RuntimeError, match=r"the CLI run failed \(exit 1\)"):
        bench_folder.time_run(tmp_path, tmp_path / "out", [])
    monkeypatch.setattr(vqfr.cli, "main", _cli("", exit_code=2, error="vqfr: error: --io-threads must be at least 1"))
    with pytest.raises(RuntimeError, match=r"(?s)\(exit 2\):.*--io-threads must be at least 1"):
        bench_folder.time_run(tmp_path, tmp_path / "out", ["--io-threads", "0"])


def test_folder_bench_passes_batch_threads_and_identity_ms(tmp_path, monkeypatch, capsys):
    runs, identity = [], []

    @contextlib.contextmanager
    def identity_model(ms_per_face=0.0):
        identity.append(ms_per_face)
        yield

    def time_run(inputs, out, cli_args):
        runs.append(cli_args)
        return {"exit": 0, "faces": 4, "faces_per_s": 8.0, "model_faces_per_s": 16.0}

    monkeypatch.setattr(bench_folder, "make_faces", lambda folder, count: [])
    monkeypatch.setattr(bench_folder, "_identity_model", identity_model)
    monkeypatch.setattr(bench_folder, "time_run", time_run)
    assert bench_folder.main(["--count", "4", "--io-threads", "1,4", "--repeat", "1", "--batch", "3", "--identity",
                              "--identity-ms", "2.5", "--work", str(tmp_path), "--device", "cpu"]) == 0
    assert runs == [["--device", "cpu", "--batch", "3", "--io-threads", "1"],
                    ["--device", "cpu", "--batch", "3", "--io-threads", "4"]]
    assert identity == [2.5]
    printed = capsys.readouterr().out
    assert "model: identity, 2.5 ms a face" in printed and "| 4 | 8.0 | 16.0 | 0.50 |" in printed


def test_folder_bench_identity_model_sleeps_per_face(monkeypatch):
    import time

    import numpy as np

    from vqfr.runtime import Runtime

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    crops = np.zeros((4, 8, 8, 3), np.uint8)
    with bench_folder._identity_model(2.5):
        out = Runtime._restore_crops(None, crops, 1.0)
    assert slept == [pytest.approx(0.01)]  # 4 faces x 2.5 ms
    assert np.array_equal(out, crops) and out is not crops


@pytest.mark.parametrize("args,message", [
    (["--repeat", "0"], "--repeat must be at least 1, got 0"),  # ended in "max() arg is an empty sequence"
    (["--count", "0"], "--count must be at least 1, got 0"),
    (["--identity", "--identity-ms", "-1"], "--identity-ms must be at least 0, got -1"),  # every face failed
], ids=["repeat 0", "count 0", "negative wait"])
def test_folder_bench_refuses_counts_that_time_nothing(args, message, monkeypatch, capsys):
    monkeypatch.setattr(bench_folder, "make_faces", lambda *a: pytest.fail("faces written"))
    with pytest.raises(SystemExit) as exc:
        bench_folder.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- export.aoti
@pytest.fixture
def no_work(monkeypatch):
    """export.aoti with every step after the argument checks failing the test."""
    monkeypatch.setattr("export.aoti.custom_op_problems", lambda device: pytest.fail("ops checked"))
    monkeypatch.setattr("export.aoti.trace_engine", lambda *a: pytest.fail("traced"))


@pytest.mark.parametrize("kwargs,error,message", [
    ({"precision": "bf16", "device": "cpu"}, "ConfigError", "precision must be one of"),
    ({"device": "mps"}, "ConfigError", "device must be cuda or cpu, got 'mps'"),
    ({"device": "cuda"}, "BackendUnavailable", "needs a CUDA GPU, and torch sees none"),
], ids=["bf16", "mps", "cuda without a GPU"])
def test_aoti_export_refuses_before_any_work(kwargs, error, message, no_work, tmp_path, monkeypatch):
    import vqfr.errors
    from export.aoti import export_aoti

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(getattr(vqfr.errors, error), match=message):
        export_aoti(None, tmp_path / "m.pt2", config=SMALL_V1, random_weights=0, size=16, **kwargs)
    assert not list(tmp_path.iterdir())


def test_aoti_export_checks_the_custom_ops_on_its_device(tmp_path, monkeypatch):
    """A CUDA export checks the ops' CUDA kernels (their layouts are what the package will meet)."""
    from export.aoti import export_aoti
    from vqfr.errors import EngineError

    checked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("export.aoti.custom_op_problems", lambda device: checked.append(device) or ["op: bad"])
    with pytest.raises(EngineError, match="op: bad"):
        export_aoti(None, tmp_path / "m.pt2", config=SMALL_V1, random_weights=0, size=16, device="cuda")
    assert checked == ["cuda"]


@torch.library.custom_op("vqfr_test_round7::row_of_a_column", mutates_args=())
def _row_of_a_column(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1).clone().t()  # shape (1, n), strides (1, 1)


@_row_of_a_column.register_fake
def _(x):
    return x.new_empty((1, x.numel()))  # shape (1, n), strides (n, 1): only the size-1 dimension's differs


@torch.library.custom_op("vqfr_test_round7::no_fake_kernel", mutates_args=())
def _no_fake_kernel(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_aoti_layout_guard_skips_size_one_strides_and_reports_a_missing_fake_kernel():
    from export.aoti import custom_op_problems

    x = torch.randn(5)
    assert custom_op_problems(probes={"row": (torch.ops.vqfr_test_round7.row_of_a_column.default, (x,))}) == []
    problems = custom_op_problems(probes={"nofake": (torch.ops.vqfr_test_round7.no_fake_kernel.default, (x,))})
    assert len(problems) == 1 and problems[0].startswith("nofake: ") and "fake" in problems[0]


@pytest.fixture
def fake_compile(monkeypatch):
    """export.aoti with the op check passing and the compilation writing a stand-in; returns the compile calls."""
    compiled = []

    def compile_and_package(program, package_path, inductor_configs):
        compiled.append(inductor_configs)
        with open(package_path, "wb") as f:
            f.write(b"package")
        return package_path

    monkeypatch.setattr("export.aoti.custom_op_problems", lambda device: [])
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    return compiled


def test_aoti_cpu_sidecar_reads_back_as_a_cpu_package(fake_compile, tmp_path):
    from export.aoti import export_aoti
    from vqfr.backends import BACKENDS
    from vqfr.backends.aoti import AOTIBackend, package_device
    from vqfr.sidecar import read_sidecar

    path = export_aoti(None, tmp_path / "m.pt2", config=SMALL_V1, random_weights=0, size=16, device="cpu",
                       inductor_configs={"max_autotune": False})
    assert fake_compile == [{"max_autotune": False}]
    meta = read_sidecar(path)
    assert (meta.precision, meta.built_with["device"], meta.extra["format"], meta.extra["fp32_modules"]) == (
        "fp32", "cpu", "aoti", [])
    assert package_device(meta) == "cpu"
    cpu_row = next(e for e in BACKENDS if e.label == "aoti[cpu]")
    assert AOTIBackend.engine_problem(cpu_row, meta) is None


def test_aoti_cli_passes_every_option(tmp_path, monkeypatch):
    from export.aoti import main

    seen = {}

    def export_aoti(weights, output, **kwargs):
        seen.update(weights=weights, output=output, **kwargs)
        return output

    monkeypatch.setattr("export.aoti.export_aoti", export_aoti)
    assert main(["--weights", "w.pth", "--config", "v1", "--device", "cpu", "--precision", "fp16", "--batch", "2",
                 "--size", "64", "--dynamic-size", "--random-weights", "7", "-o", str(tmp_path / "m.pt2")]) == 0
    assert seen == {"weights": Path("w.pth"), "output": tmp_path / "m.pt2", "config": "v1", "precision": "fp16",
                    "device": "cpu", "batch": 2, "size": 64, "dynamic_size": True, "random_weights": 7}


# ---------------------------------------------------------------------------------------------- backends.aoti
def _aoti_meta(**built_with):
    from vqfr.sidecar import EngineMeta, TensorSpec

    return EngineMeta(arch="VQFRv1", options={}, face_size=16, precision="fp32",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)),), outputs=(TensorSpec("output", (-1, 3, 16, 16)),),
                      built_with=built_with)


def _aoti_row(label: str):
    from vqfr.backends import BACKENDS

    return next(e for e in BACKENDS if e.label == label)


def test_aoti_package_device_from_the_sidecar():
    """``built_with.device`` (what export.aoti writes), ``extra.device`` with a GPU index, else a compute capability."""
    import dataclasses

    from vqfr.backends.aoti import package_device

    assert package_device(_aoti_meta(device="cuda")) == "cuda"
    assert package_device(dataclasses.replace(_aoti_meta(device="cpu"), extra={"device": "cuda:1"})) == "cuda"
    assert package_device(_aoti_meta(compute_capability="9.0")) == "cuda" and package_device(_aoti_meta()) == "cpu"


def test_aoti_backend_ignores_the_local_part_of_torchs_version():
    """A package built with torch 2.x.y+cu128 runs on 2.x.y+cpu of the same release."""
    from vqfr.backends.aoti import AOTIBackend

    release = torch.__version__.split("+")[0]
    meta = _aoti_meta(device="cpu", torch=release + "+cu999")
    assert AOTIBackend.engine_problem(_aoti_row("aoti[cpu]"), meta) is None


def test_aoti_backend_compares_the_minor_compute_capability(monkeypatch):
    """A package compiled for 8.9 (Ada) is refused on an 8.6 GPU (Ampere), not only one for another major."""
    from vqfr.backends.aoti import AOTIBackend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    meta = _aoti_meta(device="cuda", torch=torch.__version__, compute_capability="8.9")
    assert AOTIBackend.engine_problem(_aoti_row("aoti[cuda]"), meta) == (
        "package compiled for compute capability 8.9, this GPU is 8.6")


@pytest.mark.parametrize("text,error,message", [
    ("PytorchStreamReader failed reading zip archive", "EngineError", "is not a loadable AOTInductor package"),
    ("CUDA driver version is insufficient for CUDA runtime version", "BackendUnavailable",
     "cannot start the package here"),
], ids=["broken file", "no CUDA driver"])
def test_aoti_backend_classes_a_load_failure(text, error, message, tmp_path, monkeypatch):
    import vqfr.errors
    from vqfr.backends.aoti import AOTIBackend

    def load(path, device_index=-1):
        raise RuntimeError(text)

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    backend = AOTIBackend(_aoti_row("aoti[cpu]"), tmp_path / "m.pt2", meta=_aoti_meta(device="cpu"))
    with pytest.raises(getattr(vqfr.errors, error), match=message) as exc:
        backend.load()
    assert exc.value.path == tmp_path / "m.pt2" and text in str(exc.value)


def test_aoti_backend_calls_a_v1_package_without_fidelity(tmp_path, monkeypatch):
    from vqfr.backends.aoti import AOTIBackend

    calls = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, device_index=-1: lambda *args: calls.append(args) or [args[0] + 1])
    backend = AOTIBackend(_aoti_row("aoti[cpu]"), tmp_path / "m.pt2", meta=_aoti_meta(device="cpu"))
    backend.load()
    x = torch.zeros(2, 3, 16, 16)
    assert torch.equal(backend.infer(x, torch.ones(2)), x + 1) and len(calls[0]) == 1
