"""``deploy.memory_map``: the peak of live allocations, the pool of each and where it was made, read from snapshot
dictionaries laid out as ``torch.cuda.memory._snapshot()`` returns them (built by hand here: the CPU has no caching
allocator to record), the refusal without a GPU, and Inductor's own plan of a compiled graph (recorded from a real
compile on the CPU, and reported by ``--device cpu`` beside the roofline's eager count)."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from deploy import gpu_check, memory_map

MIB = 2**20


def alloc(addr: int, mib: float, frames=(), pool=None) -> dict:
    entry = {"action": "alloc", "addr": addr, "size": int(mib * MIB), "frames": list(frames), "stream": 0}
    if pool is not None:
        entry["pool_id"] = pool
    return entry


def free(addr: int, mib: float, completed: bool = False) -> dict:
    return {"action": "free_completed" if completed else "free_requested", "addr": addr, "size": int(mib * MIB)}


def test_peak_is_the_most_bytes_live_at_once_and_lists_what_was_live_then():
    trace = [alloc(1, 100), alloc(2, 200), free(1, 100), free(1, 100, completed=True), alloc(3, 50),
             alloc(4, 10), free(2, 200), alloc(5, 250)]
    peak = memory_map.peak_live(trace)
    # live: 100, 300, 200, 200, 250, 260, 60, 310 -> the last allocation reaches 310 MiB with blocks 3, 4 and 5
    assert peak.bytes == 310 * MIB and peak.index == 7
    assert sorted(e["addr"] for e in peak.live) == [3, 4, 5]
    earlier = memory_map.peak_live(trace[:7])
    assert earlier.bytes == 300 * MIB and earlier.index == 1
    assert sorted(e["addr"] for e in earlier.live) == [1, 2]


def test_free_completed_does_not_end_a_block_and_unknown_frees_are_ignored():
    # free_completed alone (no free_requested) leaves the block live; a free of a block allocated before the
    # recording (the weights) must not lower the count below what was recorded
    trace = [free(99, 500), alloc(1, 100), free(1, 100, completed=True), alloc(2, 100)]
    peak = memory_map.peak_live(trace)
    assert peak.bytes == 200 * MIB and peak.index == 3


def test_start_skips_an_earlier_batch_and_its_frees():
    trace = [alloc(1, 400), free(1, 400), alloc(2, 100), alloc(3, 100), free(1, 400)]
    peak = memory_map.peak_live(trace, start=2)
    assert peak.bytes == 200 * MIB and peak.index == 3 and sorted(e["addr"] for e in peak.live) == [2, 3]


def test_nothing_allocated_gives_an_empty_peak():
    assert memory_map.peak_live([free(1, 10)]) == memory_map.Peak(0, -1, [])


def test_pool_filter_by_pool_id_and_by_segment_when_the_trace_has_no_pool_id():
    graph_pool = (1, 0)
    with_ids = [alloc(10, 300, pool=(0, 0)), alloc(20, 100, pool=graph_pool), alloc(30, 100, pool=graph_pool),
                free(10, 300), free(20, 100)]
    assert memory_map.peak_live(with_ids, "default").bytes == 300 * MIB
    assert memory_map.peak_live(with_ids, "private (1, 0)").bytes == 200 * MIB
    # older torch: no pool_id in trace entries; the final snapshot's segments say which pool holds an address
    segments = [{"address": 0, "total_size": 16, "segment_pool_id": (0, 0)},
                {"address": 16, "total_size": 32, "segment_pool_id": graph_pool}]
    without = [alloc(4, 300), alloc(20, 100), alloc(40, 100), alloc(100, 7)]
    assert memory_map.peak_live(without, "default", segments).bytes == 300 * MIB
    assert memory_map.peak_live(without, "private (1, 0)", segments).bytes == 200 * MIB
    assert memory_map.peak_live(without, "unknown", segments).bytes == 7 * MIB  # address 100: no segment
    # segment ends are exclusive: 16 opens the private segment, 48 is past it
    edges = [alloc(15, 1), alloc(16, 2), alloc(47, 4), alloc(48, 8)]
    assert [memory_map.peak_live(edges, name, segments).bytes // MIB for name in
            ("default", "private (1, 0)", "unknown")] == [1, 6, 8]
    assert memory_map.pool_name(None) == memory_map.pool_name([0, 0]) == "default"


def test_where_names_the_first_frame_outside_torch_with_its_source_line(tmp_path):
    generated = tmp_path / "torchinductor_root" / "ab" / "cabcdef.py"
    generated.parent.mkdir(parents=True)
    generated.write_text("def call(args):\n    buf7 = empty_strided_cuda((8, 64, 512, 512), (1, 1, 1, 1))\n")
    torch_frame = {"filename": f"{os.sep}x{os.sep}site-packages{os.sep}torch{os.sep}_ops.py", "line": 3,
                   "name": "__call__"}
    frames = [torch_frame, {"filename": str(generated), "line": 2, "name": "call"},
              {"filename": str(tmp_path / "pkg" / "model.py"), "line": 9, "name": "forward"}]
    text = memory_map.where(frames)
    assert text == "(inductor) cabcdef.py:2 call: buf7 = empty_strided_cuda((8, 64, 512, 512), (1, 1, 1, 1))"
    package_file = tmp_path / "pkg" / "model.py"
    package_file.parent.mkdir()
    package_file.write_text("\n" * 8 + "x = torch.cat([a, b])\n")
    assert memory_map.where(frames[2:], root=str(tmp_path)) == f"pkg{os.sep}model.py:9 forward: x = torch.cat([a, b])"
    # only library frames: the innermost one; no frames at all: said so
    assert memory_map.where([torch_frame]).startswith(torch_frame["filename"] + ":3 __call__")
    assert memory_map.where([]) == "(no Python frame)"


def test_summary_and_report_per_pool(tmp_path):
    code = tmp_path / "model.py"
    code.write_text("a = conv(x)\nb = cat(a)\n")
    at_a = [{"filename": str(code), "line": 1, "name": "f"}]
    at_b = [{"filename": str(code), "line": 2, "name": "f"}]
    pool = (1, 0)
    snapshot = {
        "segments": [
            {"address": 0, "total_size": 512 * MIB, "allocated_size": 64 * MIB, "segment_pool_id": (0, 0)},
            {"address": 1 << 40, "total_size": 1000 * MIB, "allocated_size": 10 * MIB, "segment_pool_id": pool},
            {"address": 1 << 41, "total_size": 24 * MIB, "allocated_size": 0, "segment_pool_id": pool},
        ],
        "device_traces": [[alloc(1, 300, at_a, (0, 0)), free(1, 300),
                           alloc(2, 200, at_a, pool), alloc(3, 100, at_a, pool), alloc(4, 400, at_b, pool),
                           free(2, 200), free(3, 100), alloc(5, 50, at_b, pool)]],
    }
    pools = memory_map.summarise(snapshot, root=str(tmp_path))
    assert [p.name for p in pools] == ["default", "private (1, 0)"]
    default, private = pools
    assert (default.reserved, default.allocated, default.segments, default.peak.bytes) == (512 * MIB, 64 * MIB, 1,
                                                                                           300 * MIB)
    assert (private.reserved, private.allocated, private.segments, private.peak.bytes) == (1024 * MIB, 10 * MIB, 2,
                                                                                           700 * MIB)
    assert private.groups == [("model.py:2 f: b = cat(a)", 400 * MIB, 1), ("model.py:1 f: a = conv(x)", 300 * MIB, 2)]
    largest = memory_map.largest_allocations(snapshot, count=2, root=str(tmp_path))
    assert largest == [(400 * MIB, "private (1, 0)", "model.py:2 f: b = cat(a)"),
                       (300 * MIB, "default", "model.py:1 f: a = conv(x)")]
    text = memory_map.report("v2 batch 8", pools, largest, [("weights", "1.0 MiB")], top=1)
    assert "- weights: 1.0 MiB" in text
    # reserved - live peak: 1024 - 700 = 324 MiB of the private pool never live at its peak
    assert "| private (1, 0) | 1024.0 | 10.0 | 2 | 700.0 | 324.0 |" in text
    assert "| default | 512.0 | 64.0 | 1 | 300.0 | 212.0 |" in text
    # top=1: the largest place, then the rest summed
    assert "| 400.0 | 1 | `model.py:2 f: b = cat(a)` |" in text and "| 300.0 | 2 | (1 other places) |" in text


def test_main_without_a_gpu_says_where_to_run_it(capsys, monkeypatch):
    monkeypatch.setattr(memory_map.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        memory_map.main(["--batches", "8"])
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory_map.main(["--batches", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_gpu_check_memory_step_runs_the_map_as_benchmarked_with_memory_planning_and_expandable_segments(
        tmp_path):
    assert "memory" in gpu_check.ON_REQUEST
    command = gpu_check.STEPS["memory"].command(tmp_path, tmp_path / "out", argparse.Namespace())
    script = command[-1]
    first, planned, second = script.split("; ")
    assert "-m deploy.memory_map --version v2 --batches 8" in first and "PYTORCH_CUDA_ALLOC_CONF" not in first
    assert first.endswith(f"--out {tmp_path / 'out' / 'memory.md'}") and "--memory-planning" not in first
    assert planned.endswith(f"--memory-planning --out {tmp_path / 'out' / 'memory_planning.md'}")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in planned
    assert second.startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ")
    assert second.endswith(f"--out {tmp_path / 'out' / 'memory_expandable.md'}")


def test_gpu_check_digest_of_the_memory_step_keeps_each_batch_pool_table_not_the_details(tmp_path):
    peak = memory_map.Peak(300 * MIB, 4, [alloc(1, 300)])
    groups = [("gen.py:2 call: buf1 = x", 300 * MIB, 1)]
    pools = [memory_map.PoolSummary("private (1, 0)", 400 * MIB, 0, 1, peak, groups)]
    parts = [memory_map.report(f"VQFRv2 batch {b}", pools, [(300 * MIB, "private (1, 0)", "gen.py:2")]) for b in (1, 8)]
    (tmp_path / "memory.md").write_text("\n\n".join(parts) + "\n")
    digest = gpu_check._digest("memory", tmp_path, tmp_path)
    assert digest.count("| private (1, 0) | 400.0 | 0.0 | 1 | 300.0 | 100.0 |") == 2
    assert "VQFRv2 batch 1" in digest and "VQFRv2 batch 8" in digest
    # the expandable-segments run (the planning one cut short, absent) follows the first run's batches
    (tmp_path / "memory_expandable.md").write_text(memory_map.report("expandable batch 8", pools, []) + "\n")
    digest = gpu_check._digest("memory", tmp_path, tmp_path)
    assert digest.count("| private (1, 0) | 400.0 | 0.0 | 1 | 300.0 | 100.0 |") == 3
    assert digest.index("VQFRv2 batch 8") < digest.index("expandable batch 8")
    assert "Live at the peak" not in digest and "Largest single" not in digest


def test_main_runs_each_batch_reads_the_allocator_and_writes_the_report_after_each(tmp_path, monkeypatch):
    """The whole command with the CUDA calls replaced: a tiny v2, batches 1 then 2, a snapshot whose trace grows by
    one batch's allocations each time; each batch's report counts only its own entries."""
    import yaml

    import vqfr.backends.torch as torch_backend
    from tests.conftest import TINY_V2

    cuda = memory_map.torch.cuda
    state = {"trace": [], "calls": [], "history": []}

    class FakeBackend:
        def __init__(self, entry, model, precision, mode, fast, device):
            assert (entry.device, precision, mode, device) == ("cuda", "fp16", "max", "cuda")
            assert fast.fused_group_norm is False and fast.cuda_graphs is None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, x, f):
            from torch._inductor import config as inductor_config

            assert inductor_config.memory_planning is False  # only with --memory-planning
            batch = x.shape[0]
            state["calls"].append((tuple(x.shape), f.tolist()))
            if len(state["calls"]) % 4 == 1:  # the first call of a batch size allocates; replays do not
                base = 100 * batch
                state["trace"] += [alloc(base, 10 * batch, pool=(1, 0)), alloc(base + 1, 5, pool=(1, 0)),
                                   free(base + 1, 5)]

    monkeypatch.setattr(torch_backend, "TorchBackend", FakeBackend)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a: 3 * MIB)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: 40 * MIB)
    monkeypatch.setattr(cuda, "memory_reserved", lambda *a: 64 * MIB)
    monkeypatch.setattr(cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(cuda.memory, "_record_memory_history", lambda *a, **k: state["history"].append(k))
    monkeypatch.setattr(cuda.memory, "_snapshot", lambda *a: {
        "segments": [{"address": 0, "total_size": 64 * MIB, "allocated_size": 0, "segment_pool_id": (1, 0)}],
        "device_traces": [list(state["trace"])]})
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(TINY_V2))
    out = tmp_path / "memory.md"
    assert memory_map.main(["--config", str(config), "--batches", "1,2", "--out", str(out)]) == 0
    size = TINY_V2["quantizer_opt"]["spatial_size"][0] * 32
    assert [c[0] for c in state["calls"]] == [(1, 3, size, size)] * 4 + [(2, 3, size, size)] * 4
    assert state["history"][0]["stacks"] == "python" and state["history"][-1] == {"enabled": None}
    text = out.read_text()
    one, two = text.split("\n\n## ")
    # batch 1 peaks at 10 + 5 MiB; batch 2's report starts after batch 1's entries: 20 + 5, not 10 + 20 + 5
    assert "batch 1," in one and "| private (1, 0) | 64.0 | 0.0 | 1 | 15.0 | 49.0 |" in one
    assert "batch 2," in two and "| private (1, 0) | 64.0 | 0.0 | 1 | 25.0 | 39.0 |" in two
    assert "- the benchmark's peak rule (the larger of max allocated and reserved): 64.0 MiB" in one
    assert "- weights and buffers on the device before any call: 3.0 MiB" in one
    assert "- recorded trace entries for this batch: 3" in two


def test_a_long_trace_without_pool_ids_is_read_in_seconds():
    """Traces of a compile and capture hold tens of thousands of entries; finding each one's segment must not scan
    every segment (older torch has no pool_id in the trace)."""
    import time

    segments = [{"address": i * 1000, "total_size": 1000, "allocated_size": 0, "segment_pool_id": (i % 2, 0)}
                for i in range(2000)]
    trace = [e for i in range(50_000) for e in (alloc(i * 37 % 2_000_000, 1), free(i * 37 % 2_000_000, 1))]
    start = time.perf_counter()
    pools = memory_map.summarise({"segments": segments, "device_traces": [trace]})
    assert time.perf_counter() - start < 10
    assert [p.name for p in pools] == ["default", "private (1, 0)"] and all(p.peak.bytes == MIB for p in pools)


def _log(message: str, *args) -> None:
    logging.getLogger("torch._inductor.memory").info(message, *args)


def test_inductor_plans_reads_one_plan_per_graph_and_keeps_the_lowest_order():
    with memory_map.inductor_plans() as plans:
        _log("topological_sort_dfs peak memory: %d", 1)  # no graph yet: ignored
        _log("Reordering for peak memory -- %d nodes", 433)
        _log("Baseline peak memory: %d", 100)
        _log("topological_sort_lpmf peak memory: %d", 90)
        _log("topological_sort_dfs peak memory: %d", 80)
        _log("topological_sort_bfs peak memory: %d", 120)
        _log("Baseline peak memory: %d", 50)
        _log("topological_sort_dfs peak memory: %d", 70)
    assert [(p.baseline, p.chosen) for p in plans] == [(100, 80), (50, 50)]
    assert plans[0].orders == {"topological_sort_lpmf": 90, "topological_sort_dfs": 80, "topological_sort_bfs": 120}
    assert memory_map._plan_facts(plans)[1] == (
        "Inductor's plan of the compiled graph 2 (peak of its live buffers, weights excluded)",
        "0.0 MiB in the order it kept; 0.0 MiB in its first order")
    assert "no graph was planned" in memory_map._plan_facts([])[0][1]


def test_inductor_plans_records_a_real_compile_and_restores_logger_and_caches():
    """A real Inductor compile on the CPU: two extern matrix products with a ReLU between them. Its buffers are the
    first product (n x 256 fp32), the ReLU's output and the result (n x 256 each), so the plan lies between one and
    three of them and doubles with n; the graph caches are off inside the block (else a cached graph would not be
    planned again) and everything is as before after it."""
    import torch._inductor.config as inductor_config

    logger = logging.getLogger("torch._inductor.memory")
    before = (logger.level, logger.propagate, list(logger.handlers), inductor_config.fx_graph_cache)
    w = torch.randn(256, 256)

    def f(x):
        return torch.mm(torch.mm(x, w).relu(), w)

    estimates = {}
    for n in (64, 128):
        torch._dynamo.reset()
        with memory_map.inductor_plans() as plans:
            assert inductor_config.fx_graph_cache is False
            torch.compile(f, backend="inductor", dynamic=False)(torch.randn(n, 256))
        assert len(plans) == 1
        estimates[n] = plans[0].chosen
        one = n * 256 * 4
        assert one <= plans[0].chosen <= 3 * one + 256 * 256 * 4
    assert estimates[128] == 2 * estimates[64]
    assert (logger.level, logger.propagate, list(logger.handlers), inductor_config.fx_graph_cache) == before


def test_main_on_the_cpu_reports_the_plan_beside_the_roofline_count(tmp_path, monkeypatch):
    """``--device cpu`` with the compile replaced by its log lines: per batch the roofline's eager count of a tiny
    v2 (counted on meta tensors, as ``deploy.roofline`` does), the plan logged during the call, and their ratio."""
    import yaml

    import vqfr
    import vqfr.backends.torch as torch_backend
    from deploy import roofline
    from tests.conftest import TINY_V2

    calls = []

    class FakeBackend:
        def __init__(self, entry, model, precision, mode, fast, device):
            assert (entry.device, precision, mode, device) == ("cpu", "fp16", "max", "cpu")
            assert fast.compile is True and fast.cuda_graphs is False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, x, f):
            from torch._inductor import config as inductor_config

            calls.append((x.shape[0], inductor_config.memory_planning))
            if x.shape[0] == 2:  # batch 1's part is on disk before batch 2 runs (a run cut short keeps it)
                assert "batch 1," in out.read_text()
            _log("Baseline peak memory: %d", 3 * MIB * x.shape[0])
            _log("topological_sort_dfs peak memory: %d", 2 * MIB * x.shape[0])

    monkeypatch.setattr(torch_backend, "TorchBackend", FakeBackend)
    monkeypatch.setattr(memory_map.torch.cuda, "is_available", lambda: False)  # the CPU mode needs no GPU
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(TINY_V2))
    out = tmp_path / "plan.md"
    from torch._inductor import config as inductor_config

    planning = inductor_config.memory_planning
    assert memory_map.main(["--device", "cpu", "--config", str(config), "--batches", "1,2", "--memory-planning",
                            "--out", str(out)]) == 0
    assert calls == [(1, True), (2, True)] and inductor_config.memory_planning == planning  # set for the run only
    one, two = out.read_text().split("\n\n## ")
    size = TINY_V2["quantizer_opt"]["spatial_size"][0] * 32
    eager = roofline.count(vqfr.build_model(TINY_V2), 2, size, torch.float16).peak_live_bytes
    assert f"the most activations live at once in an eager run: {eager / MIB:.1f} MiB" in two
    assert "2.0 MiB in the order it kept; 3.0 MiB in its first order" in one
    assert "4.0 MiB in the order it kept; 6.0 MiB in its first order" in two
    assert f"- plan / eager count: {4 * MIB / eager:.2f}" in two
    assert "batch 2," in two and "compiled on the CPU, Inductor's memory planning" in two
