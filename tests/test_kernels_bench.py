"""deploy.bench_kernels runs end to end on the CPU with tiny sizes (the GPU numbers need a GPU)."""

import json

import pytest

from deploy import bench_kernels
from kernels import dispatch

TINY = ["--device", "cpu", "--levels", "8x6x7", "--batches", "1", "2", "--tokens", "20", "--codebook", "24x8",
        "--iters", "2", "--warmup", "0", "--rotate", "2"]


def test_bench_runs_on_cpu_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = bench_kernels.main([*TINY, "--json", str(tmp_path / "kernels.json")])
    out = capsys.readouterr().out
    assert "### deform_conv" in out and "### nearest_code" in out
    assert "| 2x8x6x7 | fp32 |" in out and "| 20 tokens, 24x8 codebook | fp32 |" in out
    # each row is also printed as soon as it is measured, so a run cut short by a time limit keeps it
    assert out.index("deform_conv 1x8x6x7 fp32 dense conv2d: ") < out.index("### deform_conv")
    timed = {(r.op, r.case, r.impl) for r in rows if r.median_ms is not None}
    assert ("deform_conv", "1x8x6x7", "dense conv2d") in timed
    assert ("deform_conv", "2x8x6x7", "vqfr reference") in timed
    assert ("nearest_code", "20 tokens, 24x8 codebook", "torch distance+argmin") in timed
    skipped = {r.impl: r.note for r in rows if r.median_ms is None}
    assert "TRITON_INTERPRET" in skipped["vqfr triton"]
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["environment"]["device"] == "cpu" and len(report["timings"]) == len(rows)


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed")
@pytest.mark.skipif(dispatch.interpreter_problem() is not None, reason=str(dispatch.interpreter_problem()))
def test_bench_times_the_triton_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = bench_kernels.main([*TINY, "--batches", "1", "--iters", "1"])
    triton_rows = [r for r in rows if r.impl == "vqfr triton"]
    assert len(triton_rows) == 2 and all(r.median_ms is not None for r in triton_rows)
    # Each Triton row names the autotune config it ran, so a GPU table says which tile won.
    assert all("BLOCK_" in r.config and "warps" in r.config for r in triton_rows)
    assert all(r.config == "" for r in rows if r.impl != "vqfr triton")


@pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed")
@pytest.mark.skipif(dispatch.interpreter_problem() is not None, reason=str(dispatch.interpreter_problem()))
def test_group_norm_bench_times_ours_against_the_fp32_island(monkeypatch, capsys):
    """``--ops group_norm`` (on request only): our op and torch's fp32 island on channels-last x; the compiled rows
    are CUDA-only and say so on the CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = bench_kernels.main(["--device", "cpu", "--ops", "group_norm", "--gn-levels", "32x5x7", "--batches", "2",
                               "--dtypes", "fp16", "--iters", "1", "--warmup", "0", "--rotate", "1"])
    assert "### group_norm" in capsys.readouterr().out
    timed = {r.impl: r for r in rows if r.median_ms is not None}
    assert set(timed) == {"vqfr triton", "torch fp32 island"}
    assert {r.case for r in rows} == {"2x32x5x7, 32 groups, channels-last"}
    assert "stats: BLOCK_P" in timed["vqfr triton"].config and "apply: BLOCK_P" in timed["vqfr triton"].config
    assert all("CUDA only" in r.note for r in rows if r.median_ms is None)


def test_bench_rejects_bad_levels(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(["--device", "cpu", "--levels", "6x8x8"])  # 6 channels do not split in 4 groups
    assert exc.value.code == 2
    assert "level 6x8x8: give CxHxW with C divisible by 4 (4 offset groups)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_kernels.main(["--device", "cpu", "--ops", "group_norm", "--gn-levels", "48x8x8"])
    assert "--gn-levels 48x8x8: give CxHxW with C divisible by 32" in capsys.readouterr().err


def test_graph_timing_needs_cuda_and_says_so(capsys):
    import torch

    with pytest.raises(ValueError, match="CUDA"):
        bench_kernels.time_graph_replays(lambda i: None, torch.device("cpu"), iters=2, warmup=1, calls_per_graph=4)
    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(["--device", "cpu", "--graphs", "10", "--ops", "nearest"])
    assert exc.value.code == 2 and "--graphs needs a CUDA device" in capsys.readouterr().err


def test_a_capture_failure_becomes_a_row_note_not_a_crash(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench_kernels, "time_graph_replays", refuse)
    row = bench_kernels._run("nearest_code", "4 tokens", "fp32", "impl", lambda *a: None, "", [[]],
                             torch.device("cpu"), 2, 1, graphs=5)
    assert row.median_ms is None and row.note.startswith("CUDA graph capture failed: operation not permitted")


@pytest.mark.parametrize("args,message", [
    (["--iters", "0"], "--iters must be at least 1"),  # used to time 3 calls (50 on a GPU) instead
    (["--iters", "-1"], "--iters must be at least 1"),  # used to end in statistics.StatisticsError
    (["--device", "gpu"], "--device 'gpu' is not a device"),  # used to end in torch's RuntimeError
    (["--codebook", "1024"], "--codebook must be KxD"),  # used to end in a ValueError while unpacking
    (["--tokens", "0"], "--tokens must be at least 1, got 0"),  # used to time an empty search
    (["--batches", "0"], "--batches must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
], ids=["iters 0", "iters -1", "device typo", "codebook without D", "tokens 0", "batches 0", "warmup -1"])
def test_bench_refuses_arguments_that_cannot_time_anything(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(["--device", "cpu", "--ops", "nearest", "--tokens", "4", "--codebook", "8x4", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
