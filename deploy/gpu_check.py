"""Everything to check and time on one GPU, in one call: ``python -m deploy.gpu_check --out DIR``.

Steps, most important first. Each runs in its own process and is given what is left of ``--budget`` seconds (a step
cut short keeps the rows it finished: the benchmark saves them after every row).

``checks`` runs three untimed jobs side by side, since none of them is a timing:

- ``gpu_tests``: the Triton kernels against the references on the GPU (``tests/test_kernels_triton.py``, and the
  Triton cases of ``tests/test_kernels_export_behaviours.py``) and the
  golden parity of the whole v1/v2 models with the Triton kernels in fp32 (``VQFR_TEST_DEVICE=cuda``
  ``tests/test_golden.py``; needs ``VQFR_SHARED``);
- ``aoti_tests``: the AOTInductor CUDA package of a small v2 against PyTorch, fp32 and fp16, after three packages
  that isolate the loader crash seen on the H100 (no custom op, the deformable conv alone, the code search alone),
  each in its own process with ``PYTHONFAULTHANDLER=1``;
- ``train_check``: a short stage-2 run of ``training/configs/gpu_short_vqfr_v2.yml`` (``--train-iters``) and its
  loss curve. Its first intervals share the GPU with the two test jobs; later ones have it alone. Iterations 160 (with
  the lazy R1 penalty) and 161 (without) run under torch.profiler when the run gets that far
  (``train_profile_iter_160.md``, ``train_profile_iter_161.md``).

Then the timings, one at a time:

1. ``kernels``: ``deploy.bench_kernels`` (deformable conv and nearest-code search against torchvision and torch),
   calls timed one by one, then the target cases again as CUDA-graph replays (``--graphs 20``: device time).
2. ``v2``: ``deploy.bench`` of VQFRv2 at 512, fp16, batch 1 and 8, fidelity 1: baselines (reference eager fp32 and
   fp16, torchvision when it imports) and ``torch-max``. (The torch backend eager, measured on 2026-11-26, is left
   out to leave time for the rest: ``python -m deploy.bench --backends torch`` times it.)
3. ``v2_f0``: batch 1 at fidelity 0 (texture branch only), torch-max and baselines.
4. ``profile``: ``deploy.profile_model`` of v2 batch 8 in max mode (compiled, no CUDA graphs): time per kernel
   category beside the roofline floors.
5. ``v1``: VQFRv1 at 512, fp16, batch 1 and 8: baselines and ``torch-max``.
6. ``v2_aoti``: the AOTInductor package of the whole v2 in fp16 at batch 1, timed like the others.
7. ``v2_autotune``: torch-max at batch 1 compiled with ``max-autotune-no-cudagraphs``, where Inductor also tries its
   Triton conv templates against cuDNN (minutes of autotuning; only when asked for).

8. ``folder``: ``deploy.bench_folder``, a CLI folder run of 128 aligned faces through v2 in fp16 with 1 and 8 I/O
   threads (reading and PNG writing overlap the model).
9. ``groupnorm`` (only when asked for): the fused GroupNorm + SiLU, not yet measured on a GPU. First
   ``deploy.bench_kernels --ops group_norm`` in fp16 (ours eager and compiled against the fp32 island eager and
   compiled; at most 90 s, JSON in ``group_norm.json``), then ``deploy.bench`` of v2 at batch 8 with
   ``--backends torch-max-gn,torch-max``: the same compiled model with and without the fused GroupNorm.

10. ``memory`` (only when asked for): ``deploy.memory_map`` of v2 at batch 8 in max mode: the memory reserved per
    pool, the live peak of each and the allocations live at it, by the line of Inductor's generated code that made
    them, beside Inductor's own plan of the graph (``memory.md``); then the same with Inductor's pooled allocation
    of its intermediates (``--memory-planning``, ``memory_planning.md``) and with
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (``memory_expandable.md``). (The benchmark's batch-8 row
    also holds the batch-1 graph, captured first into the same pool.)

11. ``profiles`` (only when asked for): ``deploy.profile_model`` in max mode for the other targets, in this order,
    each in its own file: v2 batch 1 (``profile_v2_b1.md``), v2 batch 1 at fidelity 0 (``profile_v2_f0_b1.md``), v1
    batch 1 (``profile_v1_b1.md``) and v1 batch 8 (``profile_v1_b8.md``). Inductor's caches from the benchmark
    steps of the same call shorten their compiles.

``train`` (only when asked for) is the checks' training job on its own, with the GPU to itself and 210 s instead
of 130 s: enough for ``--train-iters 300``. Both stop the trainer :data:`PLOT_S` seconds before the time the job is
given (its cap, or what is left of the budget when that is less), so that the loss plot and the profile copies run.

What it writes in ``--out`` (few files, so that they fit what a remote runner sends back): ``summary.md`` (the
issue's targets against the measured numbers and the official anchors, the checks' outcomes, then every table),
``results.json`` (every run's meta and rows), ``profile.md``, ``profile_*.md``, ``kernels.json``, ``group_norm.json``,
``memory.md``, ``memory_planning.md``, ``memory_expandable.md``, ``train_loss.png``, ``train_profile_iter_*.md``,
``gpu_check.log`` and ``logs.tgz`` (every step's log and small result files). Per-run folders go to ``--work``
(default ``--out``/runs). ``summary.md``, ``results.json`` and ``logs.tgz`` are rewritten after every step, and each
step's results are printed as it ends, so that a call killed from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deploy import report
from vqfr.atomic import atomic_write_with

__all__ = ["TARGETS", "Target", "Step", "CHECKS", "STEPS", "evaluate", "summary", "main"]

GB = 1e9 / 2**20  # MiB per GB (peak_mem_mb is in MiB)


@dataclasses.dataclass(frozen=True)
class Target:
    """One line of the issue's target table (H100, 512x512, fp16, official architectures)."""

    label: str
    run: str  # which step's results hold it
    batch: int
    fidelity: float | None
    max_ms: float | None = None
    min_img_s: float | None = None
    max_mem_gb: float | None = None
    official: str = ""


TARGETS: tuple[Target, ...] = (
    Target("v2, batch 1", "v2", 1, 1.0, max_ms=4.0, official="eager fp16 30.2 ms; torch.compile 12.4 ms"),
    Target("v2, batch 8", "v2", 8, 1.0, min_img_s=500, max_mem_gb=3.0,
           official="eager fp16 68 img/s, 6.1 GB; torch.compile 82 img/s"),
    Target("v2, fidelity 0, batch 1", "v2_f0", 1, 0.0, max_ms=2.5, official="(the official code always runs the "
           "main branch: 30.2 ms)"),
    Target("v1, batch 1", "v1", 1, None, max_ms=8.0, official="eager fp16 87.8 ms"),
    Target("v1, batch 8", "v1", 8, None, min_img_s=200, max_mem_gb=4.0, official="eager fp16 34 img/s, 9.7 GB"),
)


def _bench(version: str, fidelity: str, backends: str, out: Path, batches: str = "1,8") -> list[str]:
    return [sys.executable, "-m", "deploy.bench", "--version", version, "--device", "cuda", "--backends", backends,
            "--precision", "fp16", "--batch", batches, "--fidelity", fidelity, "--iters", "30", "--warmup", "3",
            "--restore-iters", "5", "--row-seconds", "4", "--out", str(out),
            # deploy.bench refuses to start without matplotlib unless told to skip the chart; the JSON and the table
            # are what this check reads, and the device image may lack matplotlib
            *([] if importlib.util.find_spec("matplotlib") else ["--no-chart"])]


def _python() -> str:
    """This interpreter's path, quoted for the shell scripts of the steps (a folder with a space stays one word)."""
    return shlex.quote(sys.executable)


#: Seconds a training job keeps after the trainer for the loss plot and the profile copies.
PLOT_S = 20


def _trainer_seconds(args: argparse.Namespace, longest: float) -> float:
    """The trainer's own timeout: ``longest``, or less when the job is given less time (``args.granted_s``, set by
    :func:`_run_steps`), keeping :data:`PLOT_S` for what follows it."""
    return max(1.0, min(longest, getattr(args, "granted_s", math.inf) - PLOT_S))


#: Iterations of the training check profiled when the run gets that far: 160 holds the lazy R1 penalty of
#: gpu_short_vqfr_v2.yml (every 16 iterations, discriminators from 100), 161 does not.
TRAIN_PROFILE_ITERS = (160, 161)


def _train(work: Path, out: Path, iters: int, seconds: float) -> list[str]:
    """Train for ``iters`` iterations or ``seconds``, whichever comes first, then plot what was logged and copy the
    profiles of :data:`TRAIN_PROFILE_ITERS` (``train_profile_iter_N.md``). Each call trains into a folder of its
    own (the trainer refuses a folder that already holds a run)."""
    # every path is quoted for the shell (a folder with a space would split in two)
    python, run = _python(), shlex.quote(str(work / f"train_{time.strftime('%H%M%S')}"))
    out_q = shlex.quote(str(out))
    profiled = ",".join(str(i) for i in TRAIN_PROFILE_ITERS if i <= iters)
    script = (f"timeout {seconds:.0f} {python} -m training.train --config "
              f"training/configs/gpu_short_vqfr_v2.yml --max-iters {iters} --out {run}"
              + (f" --profile-iters {profiled}" if profiled else "") + "; "
              f"{python} -m training.plot {run}/metrics.jsonl -o {out_q}/train_loss.png; status=$?; "
              f"for f in {run}/profile_iter_*.md; do [ -f \"$f\" ] && cp \"$f\" {out_q}/train_$(basename \"$f\"); "
              "done; exit $status")
    return ["sh", "-c", script]


def _kernels(work: Path, out: Path) -> list[str]:
    """The kernel benchmark twice: calls timed one by one (what an eager caller sees), then CUDA-graph replays
    (the device time, as inside a compiled model) for the target cases."""
    bench = f"{_python()} -m deploy.bench_kernels --iters 30 --warmup 5"
    first, graphs = shlex.quote(str(out / "kernels.json")), shlex.quote(str(work / "kernels_graphs.json"))
    return ["sh", "-c", f"{bench} --levels 128x512x512 128x256x256 --json {first}; "
                        f"{bench} --levels 128x512x512 --batches 1 --graphs 20 --json {graphs}"]


def _groupnorm(work: Path, out: Path) -> list[str]:
    """The GroupNorm + SiLU kernel benchmark (cut at 90 s), then the v2 model A/B: torch-max against torch-max-gn."""
    kernels = (f"timeout 90 {_python()} -m deploy.bench_kernels --ops group_norm --dtypes fp16 "
               f"--iters 30 --warmup 5 --json {shlex.quote(str(out / 'group_norm.json'))}")
    # Batch 8 only, where normalisation was 45% of the kernel time: two compiles (about 50 s each) and the baseline
    # rows fit the cap; batch 1 as well would not. The new backend first, so that a cut keeps it.
    bench = " ".join(shlex.quote(arg) for arg in _bench("v2", "1", "torch-max-gn,torch-max", work / "groupnorm",
                                                        batches="8"))
    return ["sh", "-c", f"{kernels}; {bench}"]


#: (file stem, profile_model arguments) of the ``profiles`` step, most wanted first.
PROFILES = (("profile_v2_b1", ("--version", "v2", "--batch", "1")),
            ("profile_v2_f0_b1", ("--version", "v2", "--batch", "1", "--fidelity", "0")),
            ("profile_v1_b1", ("--version", "v1", "--batch", "1")),
            ("profile_v1_b8", ("--version", "v1", "--batch", "8")))


def _profiles(out: Path) -> list[str]:
    """``deploy.profile_model`` (max mode) for each of :data:`PROFILES`, one after the other; a cut at the step's
    cap keeps the files already written."""
    runs = [" ".join([_python(), "-m", "deploy.profile_model", *args, "--mode", "max", "--out",
                      shlex.quote(str(out / f"{stem}.md"))]) for stem, args in PROFILES]
    return ["sh", "-c", "; ".join(runs)]


#: The reports of the ``memory`` step, in the order it writes them.
MEMORY_MAPS = ("memory.md", "memory_planning.md", "memory_expandable.md")


def _memory(out: Path) -> list[str]:
    """The memory map of v2 at batch 8 as the benchmark runs it, then with Inductor's memory planning, then with
    expandable segments (each its own process: the allocator reads its settings once)."""
    base = f"{_python()} -m deploy.memory_map --version v2 --batches 8"
    first, planned, expandable = (shlex.quote(str(out / name)) for name in MEMORY_MAPS)
    return ["sh", "-c", f"{base} --out {first}; {base} --memory-planning --out {planned}; "
                        f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True {base} --out {expandable}"]


def _aoti_tests() -> list[str]:
    """The AOTInductor CUDA tests, one pytest process each, so that a segfault (torch 2.11 crashed loading the v2
    package) stops only its own case: a package without custom ops, each custom op alone, then the small v2."""
    pytest = f"{_python()} -m pytest -q -p no:cacheprovider tests/test_export_aoti.py"
    cases = [f"'isolating and {name} and cuda'" for name in ("plain", "deform", "nearest")] + ["cuda_package_matches"]
    return ["sh", "-c", "; ".join(f"{pytest} -k {case} || status=1" for case in cases) + "; exit ${status:-0}"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One job: ``command(work, out, args)``, its time cap in seconds, and extra environment variables. ``args`` also
    holds ``granted_s``, the seconds the job is given: its cap, or what is left of the budget when that is less."""

    command: Callable[[Path, Path, argparse.Namespace], list[str]]
    cap: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)


#: Untimed jobs that ``checks`` runs side by side.
CHECKS = {
    "gpu_tests": Step(lambda work, out, a: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                            "tests/test_kernels_triton.py", "tests/test_golden.py",
                                            "tests/test_kernels_export_behaviours.py"],
                      150, {"VQFR_TEST_DEVICE": "cuda"}),
    "aoti_tests": Step(lambda work, out, a: _aoti_tests(), 150, {"PYTHONFAULTHANDLER": "1"}),
    # Named apart from the ``train`` step, so that ``--steps checks train`` keeps both logs and exit codes.
    "train_check": Step(lambda work, out, a: _train(work, out, a.train_iters, _trainer_seconds(a, 130)), 150),
}

#: name -> the step; ``checks`` stands for the jobs in CHECKS.
STEPS = {
    "checks": Step(lambda work, out, a: [], 150),
    "kernels": Step(lambda work, out, a: _kernels(work, out), 150),  # autotunes 11 DCN configs per shape
    "v2": Step(lambda work, out, a: _bench("v2", "1", "torch-max", work / "v2"), 280),
    "v2_f0": Step(lambda work, out, a: _bench("v2", "0", "torch-max", work / "v2_f0", batches="1"), 80),
    # A cold compile of v2 at batch 8 took 65 s in the bench: with the imports and the profiler, 80 s was short.
    "profile": Step(lambda work, out, a: [sys.executable, "-m", "deploy.profile_model", "--version", "v2",
                                          "--batch", "8", "--mode", "max", "--out", str(out / "profile.md")], 120),
    "v1": Step(lambda work, out, a: _bench("v1", "1", "torch-max", work / "v1"), 300),  # 150 s was short
    "v2_aoti": Step(lambda work, out, a: _bench("v2", "1", "aoti", work / "v2_aoti", batches="1"), 150),
    # A CLI folder run of v2 (random weights, torch backend) with 1 and 8 I/O threads: whole-run faces/s.
    "folder": Step(lambda work, out, a: [sys.executable, "-m", "deploy.bench_folder", "--count", "128", "--io-threads",
                                         "1,8", "--repeat", "1", "--device", "cuda", "--precision", "fp16"], 120),
    # The checks' training job alone on the GPU, with the time for a few hundred iterations (0.4-1 s each, shared).
    "train": Step(lambda work, out, a: _train(work, out, a.train_iters, _trainer_seconds(a, 210)), 230),
    # Inductor also benchmarks its own Triton conv templates against cuDNN, which reached only 27% of peak here.
    "v2_autotune": Step(lambda work, out, a: _bench("v2", "1", "torch-max", work / "v2_autotune", batches="1")
                        + ["--compile-mode", "max-autotune-no-cudagraphs"], 300),
    # Two compiled models (torch-max and torch-max-gn) at two batch sizes after the kernel benchmark.
    "groupnorm": Step(lambda work, out, a: _groupnorm(work, out), 300),
    # Four compiles (v1 at batch 8 took more than 150 s cold); each profile is its own file.
    "profiles": Step(lambda work, out, a: _profiles(out), 300),
    # Three processes, each compiling v2 at batch 8 (Inductor's caches off, to read its plan) with the allocator
    # recording; about 80 s each, judging by the benchmark's 46 s first call at batch 8.
    "memory": Step(lambda work, out, a: _memory(out), 300),
}
RUNS = ("v2", "v2_f0", "v1", "v2_aoti", "v2_autotune", "groupnorm")  # the steps that write a deploy.bench results.json
#: The columns of a benchmark's rows printed as its step ends.
DIGEST = ("backend", "precision", "batch", "fidelity", "median_ms", "img_per_s", "peak_mem_mb", "first_call_s",
          "max_abs_err", "psnr_db", "status")
#: Left out of the default steps (``checks`` trains already; the fused GroupNorm is an opt-in A/B; the memory map and
#: the batch-1 and v1 profiles are diagnoses).
ON_REQUEST = ("train", "v2_autotune", "groupnorm", "memory", "profiles")


def evaluate(target: Target, rows: Sequence[dict]) -> dict:
    """The best candidate (not a baseline) fp16 forward row for a target, whether it meets it (None when a goal of
    the target was not measured, e.g. the memory of a backend that allocates outside torch, unless another goal is
    missed), and the in-run reference fp16 eager row for comparison."""
    def matches(r: dict) -> bool:
        return (r.get("what") == "forward" and r.get("status") == "ok" and r.get("precision") == "fp16"
                and r.get("batch") == target.batch and r.get("fidelity") == target.fidelity
                and r.get("median_ms") is not None)

    candidates = [r for r in rows if matches(r) and not r.get("baseline")]
    baseline = next((r for r in rows if matches(r) and r.get("baseline") and r.get("backend") == "reference"), None)
    best = min(candidates, key=lambda r: r["median_ms"]) if candidates else None
    result: dict[str, Any] = {"target": target, "best": best, "baseline": baseline, "met": None}
    if best is not None:
        checks = []
        if target.max_ms is not None:
            checks.append(best["median_ms"] <= target.max_ms)
        if target.min_img_s is not None:
            checks.append(best["img_per_s"] >= target.min_img_s)
        if target.max_mem_gb is not None:  # unmeasured memory leaves the target undecided, never met
            mem = best.get("peak_mem_mb")
            checks.append(None if mem is None else mem <= target.max_mem_gb * GB)
        result["met"] = False if False in checks else (None if None in checks else True)
    return result


def _goal(t: Target) -> str:
    parts = []
    if t.max_ms is not None:
        parts.append(f"<= {t.max_ms:g} ms")
    if t.min_img_s is not None:
        parts.append(f">= {t.min_img_s:g} img/s")
    if t.max_mem_gb is not None:
        parts.append(f"<= {t.max_mem_gb:g} GB")
    return ", ".join(parts)


def summary(runs: dict[str, tuple[dict, list[dict]]], log_tail: str = "", device: str | None = None) -> str:
    """Markdown: the targets against the measured numbers, then each run's facts and tables. ``device`` names the
    card when no benchmark run did (a call of ``kernels``, ``train`` or ``profile`` alone)."""
    device = next((m.get("device_name") for m, _ in runs.values() if m.get("device_name")), device or "unknown device")
    lines = ["# GPU check", "", f"Device: {device}.", "",
             "| target | goal | measured (best fp16 candidate) | peak GB | met | reference eager fp16, same run "
             "| official anchor |", "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        _, rows = runs.get(t.run, ({}, []))
        e = evaluate(t, rows)
        best, base = e["best"], e["baseline"]
        measured = "not measured" if best is None else (
            f"{best['median_ms']:.2f} ms, {best['img_per_s']:.0f} img/s ({best['backend']}; max abs err "
            f"{report.cell(best.get('max_abs_err'), '{:.1e}')}, PSNR {report.cell(best.get('psnr_db'), '{:.1f}')} dB)")
        mem = "-" if best is None or best.get("peak_mem_mb") is None else f"{best['peak_mem_mb'] / GB:.2f}"
        met = {None: "-", True: "yes", False: "**no**"}[e["met"]]
        base_text = "-" if base is None else f"{base['median_ms']:.1f} ms, {base['img_per_s']:.0f} img/s"
        lines.append(f"| {t.label} | {_goal(t)} | {measured} | {mem} | {met} | {base_text} | {t.official} |")
    for name, (meta, rows) in runs.items():
        lines += ["", f"# Run `{name}`", "", report.markdown(meta, rows).split("\n", 1)[1]]
    if log_tail:
        lines += ["", "# Log (end)", "", "```", log_tail, "```"]
    return "\n".join(lines) + "\n"


def _load_runs(work: Path) -> dict[str, tuple[dict, list[dict]]]:
    runs = {}
    for name in RUNS:
        path = work / name / "results.json"
        if path.is_file():
            runs[name] = report.load(path)
    return runs


def _log(log, text: str) -> None:
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()


def _launch(step: Step, command: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    """Start a job in its own process group (so that a kill reaches its children; not its own session, which would
    outlive a kill of this call's session), its output going to ``log_path``."""
    with open(log_path, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                env={**env, **step.env}, process_group=0)


def _wait(proc: subprocess.Popen, until: float) -> object:
    """Wait until ``until``; past it, kill the job with every process it started (a shell's children too)."""
    try:
        return proc.wait(timeout=max(1.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def _run_steps(args: argparse.Namespace, out: Path, work: Path, log) -> dict[str, object]:
    """Run the chosen steps within the budget; returns each job's exit code (or "timeout"/"skipped")."""
    deadline = time.monotonic() + args.budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    codes: dict[str, object] = {}
    caps = sum(STEPS[name].cap for name in args.steps)
    if caps > args.budget:
        _log(log, f"[gpu_check] the caps add up to {caps:g} s, over the budget of {args.budget:g} s: the last steps "
                  "get what is left")
    for name in args.steps:
        left = deadline - time.monotonic()
        jobs = CHECKS if name == "checks" else {name: STEPS[name]}
        commands = {job: step.command(work, out, argparse.Namespace(**vars(args), granted_s=min(step.cap, left)))
                    for job, step in jobs.items()}
        for job, step in jobs.items():
            _log(log, f"[gpu_check] {job}: {' '.join(commands[job])} (cap {step.cap:g} s, {left:.0f} s left)")
        if args.dry_run:
            continue
        if left < 30:
            codes.update({job: "skipped" for job in jobs})
            _log(log, f"[gpu_check] {name}: skipped, out of budget")
            continue
        start = time.monotonic()
        procs = {job: _launch(step, commands[job], work / f"{job}.log", env)
                 for job, step in jobs.items()}
        for job, proc in procs.items():
            codes[job] = _wait(proc, start + min(jobs[job].cap, left))
            _log(log, f"[gpu_check] {job}: exit {codes[job]} after {time.monotonic() - start:.0f} s")
        try:
            _save(args, out, work, codes)
            for job in jobs:
                print(f"[gpu_check] {job} measured:\n{_digest(job, out, work)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the steps still to run matter more than this copy
            _log(log, f"[gpu_check] saving after {name} failed: {exc!r}")
    return codes


def _checks_section(work: Path, codes: dict[str, object]) -> str:
    lines = ["", "# Checks (untimed)", ""]
    for job in CHECKS:
        path = work / f"{job}.log"
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-12:]) if path.is_file() else "(no log)"
        lines += [f"## `{job}`: exit {codes.get(job, 'not run')}", "", "```", tail, "```", ""]
    return "\n".join(lines)


def _digest(job: str, out: Path, work: Path, lines: int = 20) -> str:
    """What a finished job measured, short enough for the end of the console output: a benchmark's forward rows, the
    profile's categories, else the end of the job's log."""
    results = work / job / "results.json"
    if job in RUNS and results.is_file():
        _, rows = report.load(results)
        rows = [{**r, "note": r.get("note", "")[:100] if r.get("status") != "ok" else ""} for r in rows
                if r.get("what", "forward") == "forward"]
        return report.markdown_table(rows, [c for c in report.COLUMNS if c[0] in DIGEST])
    if job == "profile" and (out / "profile.md").is_file():
        return (out / "profile.md").read_text().split("\n| kernel |")[0]
    if job == "profiles":  # each profile's categories
        done = [out / f"{stem}.md" for stem, _ in PROFILES if (out / f"{stem}.md").is_file()]
        if done:
            return "\n\n".join(path.read_text().split("\n| kernel |")[0] for path in done)
    maps = [out / name for name in MEMORY_MAPS if (out / name).is_file()]
    if job == "memory" and maps:  # each run's and batch's facts and pool table
        return "\n".join(part.split("\n### ")[0] for path in maps for part in path.read_text().split("\n\n## "))
    path = work / f"{job}.log"
    tail = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
    return "\n".join(line[:200] for line in tail)


def _kernels_device(out: Path) -> str | None:
    """The card that ``deploy.bench_kernels`` recorded in ``kernels.json``, if it ran."""
    try:
        env = json.loads((out / "kernels.json").read_text())["environment"]
        return f"{env['gpu']} (sm_{env['compute_capability'].replace('.', '')})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _save(args: argparse.Namespace, out: Path, work: Path, codes: dict[str, object]) -> str:
    """``results.json``, ``summary.md`` and ``logs.tgz`` in ``out`` from what the runs have written so far; returns
    the summary."""
    runs = _load_runs(work)
    all_rows = [dict(r, run=name) for name, (_, rows) in runs.items() for r in rows]
    report.write_json(out / "results.json", {name: meta for name, (meta, _) in runs.items()}, all_rows)
    tail = "\n".join((out / "gpu_check.log").read_text().splitlines()[-40:])
    text = summary(runs, tail, device=_kernels_device(out))
    if "checks" in args.steps:
        text += _checks_section(work, codes)
    (out / "summary.md").write_text(text)
    _pack_logs(work, out)
    return text


def _pack_logs(work: Path, out: Path) -> None:
    """Every log and small result file of the work folder, in one archive (checkpoints and engines left out),
    replacing the previous archive only once written."""
    import tarfile

    def pack(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".md", ".png", ".txt", ".yml") \
                        and path.stat().st_size < 4 * 2**20:
                    tar.add(path, arcname=str(path.relative_to(work)))

    atomic_write_with(out / "logs.tgz", pack)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="per-run folders (default OUT/runs)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps (default 540)")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=[s for s in STEPS if s not in ON_REQUEST],
                        help=f"default: all but {', '.join(ON_REQUEST)}")
    parser.add_argument("--train-iters", type=int, default=200, help="iterations of the training check (default 200)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    out, work = args.out, args.work or args.out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    with open(log_path, "a") as log:
        codes = _run_steps(args, out, work, log)
    if args.dry_run:
        return 0
    text = _save(args, out, work, codes)
    print(text.split("\n# Run")[0].split("\n# Checks")[0])
    print(_checks_section(work, codes) if "checks" in args.steps else "")
    print(json.dumps({"exit": codes, "wrote": sorted(p.name for p in out.iterdir() if p.is_file())}))
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
