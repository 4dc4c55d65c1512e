"""The roofline count, the memory map's CPU-side reading and the profiler's grouping, pinned against hand calculations
and stand-ins (mutation-tested, round 13).

What these pin, beyond tests/test_bench_tools.py, tests/test_bench_tooling_mutants.py, tests/test_memory_map.py and
tests/test_bench_tools_aoti_mutants.py:

- ``deploy.roofline``: ``addmm`` and ``baddbmm`` counted from their last two operands (the added tensor is no
  factor); a deformable conv with a non-square kernel counted as ``kh*kw``; a linear layer's transposed weight (a view
  of a parameter) left out of the ideal bytes; the peak of live activations named after the module that first
  reached it; fidelity 0 skipping the v2 main branch's deformable convs; the table's FLOPs by size shown down to
  0.5%, taken from the first batch, and the peak named from the last; v1 titled at fidelity 1 whatever
  ``--fidelity`` says; ``--by-kind`` reaching the tables; the CLI's defaults (v2 then v1, batches 1 and 8, 790
  TFLOP/s and 3.0 TB/s);
- ``deploy.memory_map``: a peak reached twice kept at the first entry; the set live at a pool's peak holding that
  pool's blocks only; ``where`` falling back to the innermost frame, cutting ``root`` only at a directory boundary
  and cutting the source at 120 characters; a log value that is not a whole number ignored (not raised into the
  compile); a single plan labelled without a number; a device without a trace read as empty; a pool known only from
  the trace listed with 0 reserved; the largest allocations counted from ``start``; the report's per-pool section
  (blocks, trace entry) and its absence for a pool with nothing live; the titles' notes; the CPU mode's count taken
  at the run's precision and fidelity, its inputs in [-1, 1] at the run's fidelity and its fused GroupNorm flag;
  the GPU mode's ``--no-cuda-graphs`` and ``--fused-group-norm``; a ``--batches`` that is not numbers refused;
  Inductor's log kept from torch's own handlers within :func:`inductor_plans`;
- ``deploy.profile_model``: a kernel or operator name per key of each category (FlashAttention's
  ``flash_fwd_kernel`` as attention, not as the deformable conv's ``_fwd_kernel``, and cuDNN's ``..._sdpa_...``
  kernels as attention, not as convolutions: defects, fixed), the top 25
  kernels, the GPU report's wording, the floors' line, a 90-character name shown whole, and the VQFR ops listed in
  name order.
"""

from __future__ import annotations

import copy
import logging
import os
import types

import pytest
import torch
import torch.nn.functional as F

import kernels
from deploy import memory_map, profile_model, roofline
from tests.test_bench import SMALL_V2
from tests.test_bench_tools_aoti_mutants import stand_in_profiler

META, HALF, MIB = "meta", torch.float16, 2**20


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _empty(*shape, dtype=HALF):
    return torch.empty(*shape, device=META, dtype=dtype)


def _count_ops(fn, weights=()) -> roofline.Cost:
    cost = roofline.Cost()
    with torch.no_grad(), roofline._Counter(cost, {id(w) for w in weights}):
        fn()
    return cost


# ------------------------------------------------------------------------------------------------------ roofline
def test_roofline_counts_addmm_and_baddbmm_from_their_last_two_operands():
    """``addmm(c, a, b)`` and ``baddbmm(c, a, b)``: 2*M*N*K per batch, the added c no factor."""
    c, a, b = _empty(5, 2), _empty(5, 7), _empty(7, 2)
    assert _count_ops(lambda: torch.addmm(c, a, b)).flops == {"matmul": 2 * 5 * 2 * 7}
    c3, a3, b3 = _empty(3, 5, 2), _empty(3, 5, 7), _empty(3, 7, 2)
    assert _count_ops(lambda: torch.baddbmm(c3, a3, b3)).flops == {"matmul": 2 * 3 * 5 * 2 * 7}


def test_roofline_counts_a_non_square_deformable_kernel_as_kh_times_kw():
    """A 3x1 kernel: 2*N*Cout*Cin*3*1*H*W."""
    x, off, mask, w = _empty(1, 4, 6, 5), _empty(1, 2 * 3, 6, 5), _empty(1, 3, 6, 5), _empty(2, 4, 3, 1)
    cost = _count_ops(lambda: kernels.modulated_deform_conv2d(x, off, mask, w, None, 1, (1, 0), 1), weights=[w])
    assert cost.flops == {"deform_conv": 2 * 1 * 2 * 4 * 3 * 1 * 6 * 5}


def test_roofline_leaves_a_linear_layers_transposed_weight_out_of_the_ideal_bytes():
    """F.linear reaches the counter as ``t(w)`` and ``addmm(b, x, t(w))``: the transposed weight is a view of a
    parameter, counted once with the weights, so the ideal bytes are x and the output (fp16)."""
    x, w, b = _empty(5, 7), _empty(2, 7), _empty(2)
    cost = _count_ops(lambda: F.linear(x, w, b), weights=[w, b])
    assert cost.ideal_bytes == 5 * 7 * 2 + 5 * 2 * 2
    assert cost.flops == {"matmul": 2 * 5 * 2 * 7}


def test_roofline_names_the_module_that_first_reached_the_peak():
    """1 KiB live in module "a", freed, then 1 KiB again in "b": the peak (1 KiB) was reached in "a"."""
    x = torch.empty(1, 4, 8, 8, device=META)
    cost = roofline.Cost()
    counter = roofline._Counter(cost, set())
    with torch.no_grad(), counter:
        counter.modules.append("a")
        y = x + 1
        del y
        counter.modules[-1] = "b"
        z = x + 1
    assert z.shape == x.shape
    assert cost.peak_live_bytes == 4 * 8 * 8 * 4 and cost.peak_at == "a"


def test_roofline_at_fidelity_0_counts_no_deformable_conv():
    """v2 at fidelity 0 skips the main branch, whose warping holds every deformable conv."""
    one = roofline.count(copy.deepcopy(SMALL_V2), batch=1, size=32, fidelity=1.0)
    zero = roofline.count(copy.deepcopy(SMALL_V2), batch=1, size=32, fidelity=0.0)
    assert one.flops["deform_conv"] > 0 and zero.flops.get("deform_conv", 0.0) == 0.0


def _cost(peak_at: str, by_size: dict[str, float]) -> roofline.Cost:
    flops = {"conv": sum(by_size.values()), "deform_conv": 0.0, "attention": 0.0, "matmul": 0.0, "nearest_code": 0.0}
    return roofline.Cost(flops=flops, flops_by_size=by_size, peak_at=peak_at,
                         bytes_by_kind={"conv": 1e9}, ops={"conv": 1})


def test_roofline_table_sizes_from_the_first_batch_down_to_half_a_percent_and_the_peak_from_the_last(monkeypatch):
    """Sizes of 99%, 0.6% and 0.4% of the FLOPs: the first two shown (the line says batch 1's); the peak is the last
    batch's."""
    costs = {1: _cost("enc", {"512x512": 990e9, "256x256": 6e9, "tokens": 4e9}),
             8: _cost("dec", {"64x64": 1e12})}
    monkeypatch.setattr(roofline, "count", lambda options, batch, size, fidelity=1.0: costs[batch])
    table = roofline._table("v2", [1, 8], 1.0, roofline.H100)
    assert "FLOPs by feature-map size (batch 1): 512x512 99%, 256x256 1%." in table
    assert "Peak live activations (batch 8) while running `dec`." in table


def test_roofline_cli_defaults_v1_fidelity_and_by_kind(monkeypatch, capsys):
    """No flags: v2 then v1, batches 1 and 8, at 790 TFLOP/s and 3.0 TB/s. ``--fidelity`` is v2's only: v1 is
    counted and titled at 1. ``--by-kind`` adds the per-kind tables."""
    seen = []

    def count(options, batch, size, fidelity=1.0):
        seen.append((options["type"], batch, fidelity))
        return _cost("dec", {"512x512": 1e12})

    monkeypatch.setattr(roofline, "count", count)
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    assert [s[:2] for s in seen] == [("VQFRv2", 1), ("VQFRv2", 8), ("VQFRv1", 1), ("VQFRv1", 8)]
    assert out.count("(790 TFLOP/s, 3.0 TB/s)") == 2 and "by kind of op" not in out
    seen.clear()
    assert roofline.main(["--version", "v1", "--batch", "2", "--fidelity", "0.5", "--by-kind"]) == 0
    out = capsys.readouterr().out
    assert seen == [("VQFRv1", 2, 1.0)] and "fidelity 1 (" in out and "fidelity 0.5" not in out
    assert "batch 2, fidelity 1: by kind of op" in out and "| conv | 1 | 1000.0 |" in out


# ------------------------------------------------------------------------------------------------------ memory_map
def _alloc(addr: int, mib: float, pool=None, frames=()) -> dict:
    entry = {"action": "alloc", "addr": addr, "size": int(mib * MIB), "frames": list(frames)}
    if pool is not None:
        entry["pool_id"] = pool
    return entry


def _free(addr: int) -> dict:
    return {"action": "free_requested", "addr": addr}


def test_memory_peak_reached_twice_is_the_first_and_lists_its_own_pools_blocks():
    """100 MiB, freed, then 100 MiB again: the peak is the first allocation. A pool's peak lists only that pool's
    blocks, though another pool's block was live then."""
    peak = memory_map.peak_live([_alloc(1, 100), _free(1), _alloc(2, 100)])
    assert (peak.bytes, peak.index, [e["addr"] for e in peak.live]) == (100 * MIB, 0, [1])
    trace = [_alloc(1, 50, (0, 0)), _alloc(2, 100, (1, 0))]
    private = memory_map.peak_live(trace, "private (1, 0)")
    assert (private.bytes, [e["addr"] for e in private.live]) == (100 * MIB, [2])


def test_where_falls_back_to_the_innermost_frame_cuts_root_at_a_folder_and_source_at_120(tmp_path):
    lib = f"{os.sep}x{os.sep}torch{os.sep}"
    frames = [{"filename": lib + "a.py", "line": 1, "name": "inner"}, {"filename": lib + "b.py", "line": 2,
                                                                      "name": "outer"}]
    assert memory_map.where(frames) == f"{lib}a.py:1 inner"
    root, sibling = tmp_path / "pkg", tmp_path / "pkg2" / "m.py"
    sibling.parent.mkdir()
    sibling.write_text("y = " + "x" * 200 + "\n")
    text = memory_map.where([{"filename": str(sibling), "line": 1, "name": "f"}], root=str(root))
    assert text == f"{sibling}:1 f: y = {'x' * 116}"


def test_plan_log_ignores_a_value_that_is_not_a_whole_number_and_labels_a_single_plan_without_a_number():
    plans: list[memory_map.InductorPlan] = []
    handler = memory_map._PlanLog(plans)
    for message in ("Baseline peak memory: 1.5 GB", "Baseline peak memory: 2048", "dfs peak memory: n/a"):
        handler.emit(logging.LogRecord("torch._inductor.memory", logging.INFO, __file__, 1, message, (), None))
    assert plans == [memory_map.InductorPlan(2048)]
    assert memory_map._plan_facts([memory_map.InductorPlan(2 * MIB, {"dfs": MIB})]) == [
        ("Inductor's plan of the compiled graph (peak of its live buffers, weights excluded)",
         "1.0 MiB in the order it kept; 2.0 MiB in its first order")]


def test_inductor_plans_keep_the_estimates_from_torchs_own_handlers():
    """Inside the block the estimates go to the plan, not up to ``torch._inductor``'s handlers (which would print
    every one); outside it they reach them again."""
    parent, got = logging.getLogger("torch._inductor"), []

    class Catch(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    catch, level = Catch(logging.INFO), parent.level
    parent.addHandler(catch)
    try:
        with memory_map.inductor_plans() as plans:
            logging.getLogger("torch._inductor.memory").info("Baseline peak memory: %d", 5)
        assert plans == [memory_map.InductorPlan(5)] and got == []
    finally:
        parent.removeHandler(catch)
        parent.setLevel(level)


def test_summary_of_a_missing_device_a_pool_without_segments_and_largest_from_start(tmp_path):
    snapshot = {"segments": [{"address": 0, "total_size": 64 * MIB, "allocated_size": 0, "segment_pool_id": (0, 0)}],
                "device_traces": [[_alloc(1, 500, (0, 0)), _free(1), _alloc(2, 30, (2, 0)), _alloc(3, 10, (0, 0))]]}
    assert memory_map.summarise(snapshot, device_index=1) == [
        memory_map.PoolSummary("default", 64 * MIB, 0, 1, memory_map.Peak(0, -1, []), [])]
    pools = memory_map.summarise(snapshot, start=2)
    assert [(p.name, p.reserved, p.segments, p.peak.bytes) for p in pools] == [
        ("default", 64 * MIB, 1, 10 * MIB), ("private (2, 0)", 0, 0, 30 * MIB)]
    assert [(b, pool) for b, pool, _ in memory_map.largest_allocations(snapshot, start=2)] == [
        (30 * MIB, "private (2, 0)"), (10 * MIB, "default")]


def test_report_section_per_pool_with_its_blocks_and_trace_entry_and_none_for_an_empty_pool():
    live = [_alloc(1, 1), _alloc(2, 2), _alloc(3, 3)]
    busy = memory_map.PoolSummary("private (1, 0)", 8 * MIB, 0, 1, memory_map.Peak(6 * MIB, 7, live),
                                  [("gen.py:1", 6 * MIB, 3)])
    idle = memory_map.PoolSummary("default", 2 * MIB, 0, 1, memory_map.Peak(0, -1, []), [])
    text = memory_map.report("t", [idle, busy], [])
    assert "### Live at the peak of the private (1, 0) pool (6.0 MiB, 3 blocks; trace entry 7)" in text
    assert "Live at the peak of the default pool" not in text


def _args(**kw) -> types.SimpleNamespace:
    base = {"device": "cuda", "fused_group_norm": False, "memory_planning": False, "no_cuda_graphs": False,
            "precision": "fp16", "fidelity": 1.0}
    return types.SimpleNamespace(**{**base, **kw})


def test_memory_map_titles_name_the_options_that_change_the_graph():
    model = types.SimpleNamespace(options={"type": "VQFRv2"})
    assert memory_map._title(model, _args(fused_group_norm=True, no_cuda_graphs=True), 8, 512) == (
        "VQFRv2 max fp16, batch 8, 512x512, fidelity 1, fused GroupNorm, no CUDA graphs")
    assert memory_map._title(model, _args(device="cpu", no_cuda_graphs=True, fidelity=0.5), 2, 64) == (
        "VQFRv2 max fp16, batch 2, 64x64, fidelity 0.5, compiled on the CPU")


def _fake_backend(monkeypatch, seen: dict):
    import vqfr.backends.torch as torch_backend

    class FakeBackend:
        def __init__(self, entry, model, precision, mode, fast, device):
            seen["fast"] = fast

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, x, f):
            seen.setdefault("inputs", []).append((x.clone(), f.clone()))

    monkeypatch.setattr(torch_backend, "TorchBackend", FakeBackend)


def _tiny_config(tmp_path):
    import yaml

    from tests.conftest import TINY_V2

    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(TINY_V2))
    return config, TINY_V2["quantizer_opt"]["spatial_size"][0] * 32


def test_memory_map_on_the_cpu_counts_at_the_runs_precision_and_fidelity(tmp_path, monkeypatch, capsys):
    """``--precision fp32 --fidelity 0.5 --fused-group-norm``: the eager count is taken in fp32 at 0.5, the
    compiled call gets inputs in [-1, 1] and fidelity 0.5, the fused GroupNorm on; ``--size`` does not override
    the v2 face size."""
    seen: dict = {}
    _fake_backend(monkeypatch, seen)

    def count(model, batch, size, dtype=torch.float16, fidelity=1.0):
        seen["count"] = (batch, size, dtype, fidelity)
        return roofline.Cost(weight_bytes=3 * MIB, peak_live_bytes=2 * MIB, peak_at="dec")

    monkeypatch.setattr(roofline, "count", count)
    config, size = _tiny_config(tmp_path)
    assert memory_map.main(["--device", "cpu", "--config", str(config), "--batches", "2", "--precision", "fp32",
                            "--fidelity", "0.5", "--fused-group-norm", "--size", str(size * 2)]) == 0
    assert seen["count"] == (2, size, torch.float32, 0.5) and seen["fast"].fused_group_norm is True
    (x, f), = seen["inputs"]
    assert x.shape == (2, 3, size, size) and f.tolist() == [0.5, 0.5]
    assert x.min() < -0.5 and x.max() > 0.5 and x.abs().max() <= 1
    out = capsys.readouterr().out
    assert "- weights: 3.0 MiB" in out and "2.0 MiB (in dec)" in out


def test_memory_map_on_a_gpu_passes_no_cuda_graphs_and_the_fused_group_norm(tmp_path, monkeypatch):
    seen: dict = {}
    _fake_backend(monkeypatch, seen)
    cuda = memory_map.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        monkeypatch.setattr(cuda, name, lambda *a: 0)
    monkeypatch.setattr(cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(cuda.memory, "_record_memory_history", lambda *a, **k: None)
    monkeypatch.setattr(cuda.memory, "_snapshot", lambda *a: {"segments": [], "device_traces": [[]]})
    config, _ = _tiny_config(tmp_path)
    out = tmp_path / "map.md"
    assert memory_map.main(["--config", str(config), "--batches", "1", "--no-cuda-graphs", "--fused-group-norm",
                            "--out", str(out)]) == 0
    assert seen["fast"].cuda_graphs is False and seen["fast"].fused_group_norm is True
    assert "fused GroupNorm, no CUDA graphs" in out.read_text()


def test_memory_map_refuses_batches_that_are_not_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        memory_map.main(["--device", "cpu", "--batches", "1,x"])
    assert exc.value.code == 2 and "comma-separated whole numbers, got '1,x'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ profile_model
@pytest.mark.parametrize("name,expected", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("flash_fwd_splitkv_kernel", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("_fwd_kernel", "deformable conv"),
    ("aten::native_layer_norm", "normalisation"),
    ("triton_red_fused_var_mean_welford_0", "normalisation"),
    ("volta_scudnn_128x64_relu_interior_nn_v1", "convolution"),
    ("winograd_4x4_kernel", "convolution"),
    ("cublasLt_splitKreduce_kernel", "matrix product"),
    ("cutlass::Kernel", "matrix product"),
    ("aten::cat", "copy / layout"),
    ("aten::contiguous", "copy / layout"),
    ("aten::clone", "copy / layout"),
    ("triton_per_fused_sum_0", "elementwise (fused)"),
    ("aten::upsample_nearest2d", "elementwise (fused)"),
])
def test_profile_category_of_each_key(name, expected):
    """A name that only one key of its category matches. FlashAttention's forward kernel holds ``_fwd_kernel``, the
    deformable conv's Triton kernel name, and was counted as deformable conv; cuDNN's attention kernels
    (``cudnn_...sdpa``) were counted as convolutions. (Defects, fixed.)"""
    assert profile_model.category(name) == expected


def test_profile_keeps_the_top_25_operators(monkeypatch):
    events = [types.SimpleNamespace(key=f"aten::op{i}", self_cpu_time_total=1000.0 * (i + 1), count=1,
                                    cpu_time_total=0.0) for i in range(30)]
    stand_in_profiler(monkeypatch, events)
    p = profile_model.profile(None, "cpu", "fp32", batch=1, size=16, mode="eager", iters=1, warmup=0)
    assert [n for n, _, _ in p.top] == [f"aten::op{i}" for i in range(29, 4, -1)]
    assert p.total_ms == pytest.approx(sum(range(1, 31)))


def test_profile_report_on_a_gpu_with_floors_a_90_character_name_and_the_vqfr_ops_in_name_order():
    name = "k" * 90
    p = profile_model.Profile("cuda:0", {"other": 2.0}, [(name, 2.0, 1)], 2.0, 5,
                              {"vqfr::nearest_code": 0.5, "vqfr::modulated_deform_conv2d": 1.0})
    text = profile_model.report(p, "t", {"compute_ms": 1.0, "ideal_bytes_ms": 2.0, "eager_bytes_ms": 3.0})
    assert "2.000 ms of kernel time per forward (5 profiled)." in text
    assert "Roofline floors: compute 1.00 ms, ideal bytes 2.00 ms, eager bytes 3.00 ms." in text
    assert f"| `{name}` | other | 2.000 | 1 |" in text
    assert text.index("`vqfr::modulated_deform_conv2d` in total") < text.index("`vqfr::nearest_code` in total")
