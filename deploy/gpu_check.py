"""Everything to check and time on one GPU, in one call: ``python -m deploy.gpu_check --out DIR``.

Steps, most important first, each in its own process and given what is left of ``--budget`` seconds (a step cut
short keeps the rows it finished: the benchmark saves them after every backend):

1. ``v2``: ``deploy.bench`` of VQFRv2 at 512, fp16, batch 1 and 8, fidelity 1: baselines (reference eager fp32 and
   fp16, torchvision when it imports), the torch backend eager (Triton kernels) and ``torch-max``.
2. ``v2_f0``: batch 1 at fidelity 0 (texture branch only), torch-max and baselines.
3. ``v1``: VQFRv1 at 512, fp16, batch 1 and 8.
4. ``profile``: ``deploy.profile_model`` of v2 batch 8 in max mode (compiled, no CUDA graphs): time per kernel
   category beside the roofline floors.
5. ``kernels``: ``deploy.bench_kernels`` (deformable conv and nearest-code search against torchvision and torch).

What it writes in ``--out`` (few files, so that they fit what a remote runner sends back): ``summary.md`` (the
issue's targets against the measured numbers and the official anchors, then every table), ``results.json`` (every
run's meta and rows), ``results.png``, ``profile.md``, ``kernels.json``, ``gpu_check.log``. Per-run folders go to
``--work`` (default ``--out``/runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy import report

__all__ = ["TARGETS", "Target", "STEPS", "evaluate", "summary", "main"]

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
            "--restore-iters", "5", "--row-seconds", "4", "--out", str(out)]


#: name -> (command builder(work, out), time cap in seconds)
STEPS = {
    "v2": (lambda work, out: _bench("v2", "1", "torch,torch-max", work / "v2"), 230),
    "v2_f0": (lambda work, out: _bench("v2", "0", "torch-max", work / "v2_f0", batches="1"), 100),
    "v1": (lambda work, out: _bench("v1", "1", "torch,torch-max", work / "v1"), 240),
    "profile": (lambda work, out: [sys.executable, "-m", "deploy.profile_model", "--version", "v2", "--batch", "8",
                                   "--mode", "max", "--out", str(out / "profile.md")], 90),
    "kernels": (lambda work, out: [sys.executable, "-m", "deploy.bench_kernels", "--json", str(out / "kernels.json"),
                                   "--iters", "30", "--warmup", "5"], 90),
}


def evaluate(target: Target, rows: Sequence[dict]) -> dict:
    """The best candidate (not a baseline) fp16 forward row for a target, whether it meets it, and the in-run
    reference fp16 eager row for comparison."""
    def matches(r: dict) -> bool:
        return (r.get("what") == "forward" and r.get("status") == "ok" and r.get("precision") == "fp16"
                and r.get("batch") == target.batch and r.get("fidelity") == target.fidelity
                and r.get("median_ms") is not None)

    candidates = [r for r in rows if matches(r) and not r.get("baseline")]
    baseline = next((r for r in rows if matches(r) and r.get("baseline") and r.get("backend") == "reference"), None)
    best = min(candidates, key=lambda r: r["median_ms"]) if candidates else None
    result = {"target": target, "best": best, "baseline": baseline, "met": None}
    if best is not None:
        checks = []
        if target.max_ms is not None:
            checks.append(best["median_ms"] <= target.max_ms)
        if target.min_img_s is not None:
            checks.append(best["img_per_s"] >= target.min_img_s)
        if target.max_mem_gb is not None and best.get("peak_mem_mb") is not None:
            checks.append(best["peak_mem_mb"] <= target.max_mem_gb * GB)
        result["met"] = all(checks)
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


def summary(runs: dict[str, tuple[dict, list[dict]]], log_tail: str = "") -> str:
    """Markdown: the targets against the measured numbers, then each run's facts and tables."""
    device = next((m.get("device_name") for m, _ in runs.values() if m.get("device_name")), "unknown device")
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
    for name in ("v2", "v2_f0", "v1"):
        path = work / name / "results.json"
        if path.is_file():
            runs[name] = report.load(path)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="per-run folders (default OUT/runs)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480)")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=list(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    out, work = args.out, args.work or args.out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    deadline = time.monotonic() + args.budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        for name in args.steps:
            build, cap = STEPS[name]
            command = build(work, out)
            left = deadline - time.monotonic()
            line = f"[gpu_check] {name}: {' '.join(command)} (cap {cap} s, {left:.0f} s left)"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            if args.dry_run:
                continue
            if left < 30:
                log.write(f"[gpu_check] {name}: skipped, out of budget\n")
                continue
            start = time.monotonic()
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      timeout=min(cap, left)).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            done = f"[gpu_check] {name}: exit {code} after {time.monotonic() - start:.0f} s"
            print(done, flush=True)
            log.write(done + "\n")
            log.flush()
    if args.dry_run:
        return 0
    runs = _load_runs(work)
    all_rows = [dict(r, run=name) for name, (_, rows) in runs.items() for r in rows]
    report.write_json(out / "results.json", {name: meta for name, (meta, _) in runs.items()}, all_rows)
    if all_rows:
        meta = next(iter(runs.values()))[0]
        chart_rows = [dict(r, backend=f"{r['run']} {r['backend']}") for r in all_rows if r.get("precision") == "fp16"]
        report.write_chart(out / "results.png", {**meta, "model": "v1 / v2"}, chart_rows)
    tail = "\n".join(log_path.read_text().splitlines()[-40:])
    text = summary(runs, tail)
    (out / "summary.md").write_text(text)
    print(text.split("\n# Run")[0])
    print(json.dumps({"wrote": sorted(p.name for p in out.iterdir() if p.is_file())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
