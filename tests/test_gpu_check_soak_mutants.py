"""The GPU check's command lines, budget and outputs, and the folder soak's checks, pinned against stand-ins
(mutation-tested, round 18).

What these pin, beyond tests/test_bench_tools.py, tests/test_bench_tooling_mutants.py, tests/test_memory_map.py,
tests/test_deploy_export_behaviours.py and tests/test_reliability_soak.py:

- ``deploy.gpu_check``: each benchmark step's command (cuda, fp16, the documented counts, its own batches, fidelity,
  backends and ``--out`` folder, which is the one its results are read back from), parsed by deploy.bench's own parser
  with and without ``--no-chart``; the ``profile`` and ``folder`` commands; the kernel benchmark's JSON in ``--out``
  (where the summary reads the card) and its CUDA-graph run even after the first one failed; the GroupNorm step's 90 s
  cut, its A/B run even after a cut, at batch 8, into the folder read back; every AOTInductor case run and any failure
  reported; the checks' environment (``VQFR_TEST_DEVICE=cuda``, ``PYTHONFAULTHANDLER=1``) over the caller's, with the
  caller's own variables and ``PYTHONUNBUFFERED=1``; the trainer cut before its step's cap so the plot and the copies
  still run, into a fresh folder per call, its loss plot in ``--out``; rows that failed or were not forward never
  judged; 3 GB met at exactly 3 GB; the budget shared by all steps (a step gets what is left, the checks' jobs one
  common cap from their common start, 30 s left still runs, less is "skipped"); the default budget of 540 s and the
  warning when the caps exceed it; ``_wait``'s one-second floor; the checks' section with the last 12 lines of each log
  and only when the checks ran; ``summary.md`` with each run's table and the last 40 lines of the log; the digest's
  forward rows and notes of failed rows only, or the last 20 lines of the log of a benchmark without results;
  ``logs.tgz`` with the logs and small results only;
- ``deploy.soak``: the CLI's command and environment (``--aligned``, ``--batch``, ``-q``, unbuffered, the repository on
  ``PYTHONPATH``); exit code 0 expected without bad inputs; a FAILED line for a good input counted; decoder chatter and
  tracebacks on stderr named, blank lines not; the ``cmp`` output required at its size (a missing one not counted as an
  output); hidden temporary files not counted as outputs done; the warm-up a fraction of the good inputs; growth exactly
  at the tolerance passing; the samples of the exit left out (the sample that saw the summary line kept) and the final
  RSS taken before the exit; the RSS at warm-up from the first sample at the warm-up count, not the lowest; at least two
  samples after it; the summary in MiB of 1024 KiB; the RSS series' hits at exactly each tenth, each listed once; a
  non-empty results folder refused; ``main``'s defaults and options reaching the run, and a ``--bad-fraction`` of 0
  accepted.

No GPU and no heavy step runs: the interpreter, the clock, the launcher and the CLI process are stand-ins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tarfile
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from deploy import gpu_check, report, soak
from tests.test_bench_tools import row, stand_in_python

NS = argparse.Namespace


def _options(command: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (a flag followed by another flag maps to that flag)."""
    return dict(zip(command, command[1:], strict=False))


# ----------------------------------------------------------------------------------------------------- gpu_check
BENCH_COMMON = {"--device": "cuda", "--precision": "fp16", "--iters": "30", "--warmup": "3", "--restore-iters": "5",
                "--row-seconds": "4"}


@pytest.mark.parametrize("step,version,backends,batches,fidelity", [
    ("v2", "v2", "torch-max", "1,8", "1"),
    ("v2_f0", "v2", "torch-max", "1", "0"),
    ("v1", "v1", "torch-max", "1,8", "1"),
    ("v2_aoti", "v2", "aoti", "1", "1"),
    ("v2_autotune", "v2", "torch-max", "1", "1"),
])
def test_gpu_check_bench_steps_time_their_own_case_on_cuda_in_fp16_into_the_folder_read_back(
        step, version, backends, batches, fidelity, tmp_path):
    """Each benchmark step's deploy.bench command, as the module docstring lists them, writes into work/<step>, the
    folder that RUNS reads results.json from."""
    command = gpu_check.STEPS[step].command(tmp_path / "work", tmp_path / "out", NS(train_iters=200))
    assert command[1:3] == ["-m", "deploy.bench"]
    expected = {**BENCH_COMMON, "--version": version, "--backends": backends, "--batch": batches,
                "--fidelity": fidelity, "--out": str(tmp_path / "work" / step)}
    assert {k: _options(command)[k] for k in expected} == expected
    assert step in gpu_check.RUNS
    assert ("--compile-mode" in command) == (step == "v2_autotune")


def test_gpu_check_bench_commands_parse_with_the_benchmarks_own_parser(tmp_path, monkeypatch):
    """A flag deploy.bench does not know would end the step with argparse's exit 2 on the GPU, after the compile of
    nothing: every benchmark command gpu_check builds (with and without --no-chart) must parse."""
    import importlib.util

    from deploy import bench

    real = importlib.util.find_spec
    for chart in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",  # matplotlib there or not, whatever this machine has
                            lambda name, *a, chart=chart: (chart or None) if name == "matplotlib" else real(name, *a))
        for name in gpu_check.RUNS:
            if name == "groupnorm":
                command = gpu_check.STEPS[name].command(tmp_path, tmp_path, NS())[-1].split("; ")[1].split()
            else:
                command = gpu_check.STEPS[name].command(tmp_path, tmp_path, NS())
            args = bench.build_parser().parse_args(command[3:])
            assert args.device == "cuda" and args.out == tmp_path / name and args.no_chart is not chart


def test_gpu_check_profile_and_folder_steps_run_the_documented_commands(tmp_path):
    """``profile``: v2 batch 8 in max mode into OUT/profile.md; ``folder``: 128 faces, 1 and 8 I/O threads, fp16."""
    profile = gpu_check.STEPS["profile"].command(tmp_path, tmp_path / "out", NS())
    assert profile[1:] == ["-m", "deploy.profile_model", "--version", "v2", "--batch", "8", "--mode", "max", "--out",
                           str(tmp_path / "out" / "profile.md")]
    folder = gpu_check.STEPS["folder"].command(tmp_path, tmp_path / "out", NS())
    assert folder[1:] == ["-m", "deploy.bench_folder", "--count", "128", "--io-threads", "1,8", "--repeat", "1",
                          "--device", "cuda", "--precision", "fp16"]


def test_gpu_check_kernel_step_writes_kernels_json_into_out_and_times_graphs_after_a_failure(tmp_path, monkeypatch):
    """The first run's JSON goes to OUT/kernels.json (the summary names the card from it); the CUDA-graph run (20
    replays, batch 1, the 512 level) still runs when the first one fails."""
    calls = tmp_path / "calls.txt"
    stand_in_python(tmp_path, monkeypatch, f'echo "$*" >> {calls}\nexit 1\n')
    work, out = tmp_path / "work", tmp_path / "out"
    subprocess.run(gpu_check.STEPS["kernels"].command(work, out, NS()), check=False)
    assert calls.read_text().splitlines() == [
        f"-m deploy.bench_kernels --iters 30 --warmup 5 --levels 128x512x512 128x256x256 --json {out}/kernels.json",
        f"-m deploy.bench_kernels --iters 30 --warmup 5 --levels 128x512x512 --batches 1 --graphs 20 "
        f"--json {work}/kernels_graphs.json"]


def test_gpu_check_groupnorm_step_cuts_the_kernels_at_90_s_and_still_runs_the_model_ab(tmp_path, monkeypatch):
    """The kernel benchmark runs under ``timeout 90``; cut (exit 124) it does not stop the A/B, which runs at batch 8
    with the new backend first, into work/groupnorm (a run that RUNS reads back)."""
    calls = tmp_path / "calls.txt"
    stand_in_python(tmp_path, monkeypatch, f'echo "$*" >> {calls}\ncase "$*" in *bench_kernels*) exit 124;; esac\n')
    work, out = tmp_path / "work", tmp_path / "out"
    command = gpu_check.STEPS["groupnorm"].command(work, out, NS())
    assert command[-1].startswith(f"timeout 90 {gpu_check.sys.executable} -m deploy.bench_kernels")
    subprocess.run(command, check=False)
    kernels, bench = calls.read_text().splitlines()
    assert kernels == f"-m deploy.bench_kernels --ops group_norm --dtypes fp16 --iters 30 --warmup 5 --json " \
                      f"{out}/group_norm.json"
    expected = {**BENCH_COMMON, "--version": "v2", "--backends": "torch-max-gn,torch-max", "--batch": "8",
                "--fidelity": "1", "--out": str(work / "groupnorm")}
    options = _options(bench.split())
    assert {k: options[k] for k in expected} == expected and "groupnorm" in gpu_check.RUNS


@pytest.mark.parametrize("failing,status", [(None, 0), ("isolating and plain", 1), ("cuda_package_matches", 1)])
def test_gpu_check_aoti_tests_run_every_case_and_report_any_failure(failing, status, tmp_path, monkeypatch):
    """Three isolating packages then the small v2, one pytest process each, all run whatever fails before; the job
    exits 1 when any failed (a crash in one case must show as a failure, not as a pass)."""
    calls = tmp_path / "calls.txt"
    fail = f'case "$*" in *"{failing}"*) exit 139;; esac\n' if failing else ""
    stand_in_python(tmp_path, monkeypatch, f'echo "$*" >> {calls}\n{fail}')
    command = gpu_check.CHECKS["aoti_tests"].command(tmp_path, tmp_path, NS())
    assert subprocess.run(command, check=False).returncode == status
    prefix = "-m pytest -q -p no:cacheprovider tests/test_export_aoti.py -k"
    assert calls.read_text().splitlines() == [f"{prefix} isolating and plain and cuda",
                                              f"{prefix} isolating and deform and cuda",
                                              f"{prefix} isolating and nearest and cuda",
                                              f"{prefix} cuda_package_matches"]


def test_gpu_check_checks_run_on_cuda_with_the_fault_handler():
    """The GPU tests must run on the GPU (VQFR_TEST_DEVICE=cuda), and a crash of an AOTInductor case must print where
    (PYTHONFAULTHANDLER=1)."""
    assert gpu_check.CHECKS["gpu_tests"].env == {"VQFR_TEST_DEVICE": "cuda"}
    assert gpu_check.CHECKS["aoti_tests"].env == {"PYTHONFAULTHANDLER": "1"}


def test_gpu_check_jobs_get_the_step_env_over_the_callers_plus_the_callers_own_and_unbuffered_output(
        tmp_path, monkeypatch):
    """A caller's VQFR_TEST_DEVICE=cpu must not turn the GPU tests into CPU tests; the caller's other variables reach
    the job, and its output is unbuffered (what a killed job printed is in its log)."""
    monkeypatch.setenv("VQFR_TEST_DEVICE", "cpu")
    monkeypatch.setenv("FROM_CALLER", "kept")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    job = gpu_check.Step(lambda w, o, a: ["sh", "-c", "echo dev=$VQFR_TEST_DEVICE caller=$FROM_CALLER "
                                                      "unbuffered=$PYTHONUNBUFFERED"], 10, {"VQFR_TEST_DEVICE": "cuda"})
    monkeypatch.setattr(gpu_check, "CHECKS", {"env": job})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "checks", "--budget", "60"]) == 0
    assert (tmp_path / "runs" / "env.log").read_text() == "dev=cuda caller=kept unbuffered=1\n"


def test_gpu_check_trainer_is_cut_before_its_steps_cap_so_the_plot_and_copies_run():
    """The checks' training job: ``timeout 130`` under a 150 s cap; the ``train`` step: ``timeout 210`` under 230 s.
    A trainer cut only by the cap would take the loss plot and the profile copies with it."""
    for step, seconds in ((gpu_check.CHECKS["train_check"], 130), (gpu_check.STEPS["train"], 210)):
        script = step.command(Path("w"), Path("o"), NS(train_iters=200))[-1]
        assert script.startswith(f"timeout {seconds} ") and seconds < step.cap


def test_gpu_check_each_training_call_gets_a_folder_of_its_own(monkeypatch):
    """The trainer refuses a folder that holds a run: ``--steps checks train`` trains twice, into two folders."""
    stamps = iter(["211500", "211730"])
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(strftime=lambda fmt: next(stamps)))
    first = gpu_check._train(Path("w"), Path("o"), 200, 130)[-1]
    second = gpu_check._train(Path("w"), Path("o"), 200, 130)[-1]
    assert "--out w/train_211500 " in first and "--out w/train_211730 " in second


def test_gpu_check_plots_the_runs_own_metrics_into_out(tmp_path, monkeypatch):
    """The loss curve is read from the run's metrics.jsonl and written to OUT/train_loss.png (what comes back)."""
    calls = tmp_path / "calls.txt"
    stand_in_python(tmp_path, monkeypatch, f'case "$*" in *training.plot*) echo "$*" > {calls};; esac\n')
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(strftime=lambda fmt: "211500"))
    work, out = tmp_path / "work", tmp_path / "out"
    subprocess.run(gpu_check._train(work, out, 100, 5), check=False)
    assert calls.read_text() == f"-m training.plot {work}/train_211500/metrics.jsonl -o {out}/train_loss.png\n"


def test_gpu_check_shell_steps_quote_the_out_and_work_folders(tmp_path, monkeypatch):
    """Defect found in round 18: the kernels, groupnorm and train steps pasted ``--out``/``--work`` into their shell
    scripts unquoted (only profiles and memory quoted them), so a folder with a space split into two arguments: the
    kernel benchmark and the trainer refused their command lines, on the GPU. The stand-in interpreter records each
    argument in brackets; the trainer stand-in writes a profile into its --out."""
    calls = tmp_path / "calls.txt"
    stand_in_python(tmp_path, monkeypatch, f'printf "[%s]" "$@" >> "{calls}"; echo >> "{calls}"\n'
                    'case "$*" in *training.train*) while [ "$1" != "--out" ]; do shift; done; mkdir -p "$2"; '
                    'echo one > "$2/profile_iter_160.md";; esac\n')
    monkeypatch.setattr(gpu_check, "time", types.SimpleNamespace(strftime=lambda fmt: "211500"))
    work, out = tmp_path / "work dir", tmp_path / "out dir"
    out.mkdir()
    for command in (gpu_check._kernels(work, out), gpu_check._groupnorm(work, out),
                    gpu_check._train(work, out, 300, 5)):
        subprocess.run(command, check=False)
    text = calls.read_text()
    run = work / "train_211500"
    for argument in (f"[--json][{out}/kernels.json]", f"[--json][{work}/kernels_graphs.json]",
                     f"[--json][{out}/group_norm.json]", f"[--out][{work}/groupnorm]", f"[--out][{run}]",
                     f"[-m][training.plot][{run}/metrics.jsonl][-o][{out}/train_loss.png]"):
        assert argument in text, (argument, text)
    assert (out / "train_profile_iter_160.md").read_text() == "one\n"


def test_gpu_check_shell_steps_run_an_interpreter_whose_path_has_a_space(tmp_path, monkeypatch):
    """The profiles, memory and AOTInductor-test scripts quote the interpreter's path too (a virtual environment in
    a folder with a space): each of their runs reaches the interpreter, 4 + 3 + 4 of them."""
    calls = tmp_path / "calls.txt"
    folder = tmp_path / "py dir"
    folder.mkdir()
    stand_in_python(folder, monkeypatch, f'echo "$3" >> "{calls}"\n')
    out = tmp_path / "out"
    for command in (gpu_check._profiles(out), gpu_check._memory(out), gpu_check._aoti_tests()):
        assert subprocess.run(command, check=False).returncode == 0
    assert calls.read_text().split() == ["--version"] * 4 + ["--version"] * 3 + ["-q"] * 4


def test_gpu_check_never_judges_a_target_on_a_failed_or_restore_row():
    """A row that failed (status "error", with a partial median) or times the whole restore is no forward candidate:
    the 5 ms forward row is the best, and it misses the 4 ms goal."""
    rows = [row("torch-max", 1, 5.0), {**row("tensorrt", 1, 1.0), "status": "error"},
            {**row("torch-max", 1, 2.0), "what": "restore"}]
    e = gpu_check.evaluate(gpu_check.TARGETS[0], rows)
    assert e["best"]["median_ms"] == 5.0 and e["met"] is False


def test_gpu_check_memory_exactly_at_3_gb_meets_the_target():
    """3 GB = 3e9 bytes = 3e9 / 2**20 MiB = 2861.02294921875 MiB exactly: "<= 3 GB" is met there."""
    rows = [row("torch-max", 8, 10.0, mem=3e9 / 2**20)]
    assert gpu_check.evaluate(gpu_check.TARGETS[1], rows)["met"] is True


class _Clock:
    """A stand-in for ``gpu_check.time``: a clock that only the stand-in jobs move."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def strftime(self, fmt):
        return "000000"


def _fake_jobs(monkeypatch, durations: dict[str, float]):
    """Replace the launcher and the waiter: job ``j`` runs ``durations[j]`` seconds from its launch, side by side with
    the others; ``_wait`` moves the clock to the job's end or to ``until``, whichever comes first. Returns the list of
    (job, seconds from its launch to ``until``) that each wait was given."""
    clock = _Clock()
    monkeypatch.setattr(gpu_check, "time", clock)
    given = []

    def launch(step, command, log_path, env):
        return types.SimpleNamespace(job=log_path.stem, start=clock.now)

    def wait(proc, until):
        given.append((proc.job, until - proc.start))
        end = proc.start + durations[proc.job]
        clock.now = max(clock.now, min(end, until))
        return 0 if end <= until else "timeout"

    monkeypatch.setattr(gpu_check, "_launch", launch)
    monkeypatch.setattr(gpu_check, "_wait", wait)
    return given


def test_gpu_check_steps_share_one_budget_and_a_step_with_less_than_30_s_left_is_skipped(tmp_path, monkeypatch, capsys):
    """Budget 300 s. v2 (cap 200) takes 180 s: 120 s left. v2_f0 (cap 80) is cut at 80 s: 40 s left. v1 (cap 100) gets
    the 40 s left and takes 10 s: exactly 30 s left. v2_aoti (cap 100) still runs, given 30 s, and takes 5 s: 25 s
    left. folder is skipped and reported as such."""
    for name, cap in (("v2", 200), ("v2_f0", 80), ("v1", 100), ("v2_aoti", 100), ("folder", 100)):
        monkeypatch.setitem(gpu_check.STEPS, name, gpu_check.Step(lambda w, o, a: ["true"], cap))
    given = _fake_jobs(monkeypatch, {"v2": 180, "v2_f0": 100, "v1": 10, "v2_aoti": 5, "folder": 5})
    steps = ["v2", "v2_f0", "v1", "v2_aoti", "folder"]
    assert gpu_check.main(["--out", str(tmp_path), "--steps", *steps, "--budget", "300"]) == 0
    assert given == [("v2", 200), ("v2_f0", 80), ("v1", 40), ("v2_aoti", 30)]
    codes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exit"]
    assert codes == {"v2": 0, "v2_f0": "timeout", "v1": 0, "v2_aoti": 0, "folder": "skipped"}


def test_gpu_check_checks_jobs_share_one_cap_from_their_common_start(tmp_path, monkeypatch):
    """The checks' jobs start together: each is cut at start + its cap, not at its cap after the previous job ended
    (a: 60 s, b: 130 s, both capped at 100 s: b is cut at 100 s from the start)."""
    monkeypatch.setattr(gpu_check, "CHECKS", {"a": gpu_check.Step(lambda w, o, a: ["true"], 100),
                                              "b": gpu_check.Step(lambda w, o, a: ["true"], 100)})
    given = _fake_jobs(monkeypatch, {"a": 60, "b": 130})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "checks", "--budget", "500"]) == 0
    assert given == [("a", 100), ("b", 100)]
    assert "## `b`: exit timeout" in (tmp_path / "summary.md").read_text()


def _launched_commands(monkeypatch) -> dict[str, list[str]]:
    """Record the command each stand-in job (see :func:`_fake_jobs`) was launched with, by job."""
    commands: dict[str, list[str]] = {}
    fake = gpu_check._launch

    def launch(step, command, log_path, env):
        commands[log_path.stem] = command
        return fake(step, command, log_path, env)

    monkeypatch.setattr(gpu_check, "_launch", launch)
    return commands


def test_gpu_check_a_trainer_given_less_than_its_cap_still_leaves_20_s_for_the_plot(tmp_path, monkeypatch):
    """Budget 100 s: the checks' training job (cap 150 s) is given 100 s, so its trainer stops after 100 - 20 = 80 s,
    not after the 130 s it has with the whole cap (the job's kill at 100 s would take the loss plot with it). The
    ``train`` step with 230 s left keeps its 210 s."""
    given = _fake_jobs(monkeypatch, {"gpu_tests": 1, "aoti_tests": 1, "train_check": 1, "train": 1})
    commands = _launched_commands(monkeypatch)
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "checks", "--budget", "100"]) == 0
    assert ("train_check", 100) in given
    assert commands["train_check"][-1].startswith("timeout 80 ")
    assert gpu_check.main(["--out", str(tmp_path / "b"), "--steps", "train", "--budget", "230"]) == 0
    assert commands["train"][-1].startswith("timeout 210 ")


def test_gpu_check_checks_and_the_train_step_keep_their_own_logs_and_exit_codes(tmp_path, monkeypatch, capsys):
    """``--steps checks train`` trains twice: the checks' job (here ending in time) and the step (here cut) are
    reported apart, each with its own log, not the second overwriting the first."""
    _fake_jobs(monkeypatch, {"gpu_tests": 1, "aoti_tests": 1, "train_check": 5, "train": 500})
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "checks", "train", "--budget", "600"]) == 0
    codes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exit"]
    assert codes == {"gpu_tests": 0, "aoti_tests": 0, "train_check": 0, "train": "timeout"}
    assert "## `train_check`: exit 0" in (tmp_path / "summary.md").read_text()


def test_gpu_check_default_budget_is_540_s_and_caps_over_it_are_announced(tmp_path, capsys):
    """The default budget is 540 s; the caps of the chosen steps are compared with it: kernels alone (150 s) fits, a
    100 s budget does not."""
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--steps", "kernels"]) == 0
    printed = capsys.readouterr().out
    assert "(cap 150 s, 540 s left)" in printed and "caps add up" not in printed
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--steps", "kernels", "--budget", "100"]) == 0
    assert "the caps add up to 150 s, over the budget of 100 s" in capsys.readouterr().out


def test_gpu_check_wait_gives_a_job_past_its_deadline_one_second_then_kills_its_group(monkeypatch):
    """A deadline already past still gives the job 1 s to end; a job that does not end has its process group killed."""
    class Proc:
        pid = 4242

        def __init__(self, ends):
            self.ends, self.timeouts = ends, []

        def wait(self, timeout=None):
            self.timeouts.append(timeout)
            if timeout is not None and not self.ends:
                raise subprocess.TimeoutExpired("job", timeout)
            return 0

    killed = []
    monkeypatch.setattr(gpu_check.os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    quick = Proc(ends=True)
    assert gpu_check._wait(quick, time.monotonic() - 5) == 0 and quick.timeouts == [1.0]
    stuck = Proc(ends=False)
    assert gpu_check._wait(stuck, time.monotonic() - 5) == "timeout"
    assert killed == [(4242, gpu_check.signal.SIGKILL)] and stuck.timeouts == [1.0, None]


def test_gpu_check_checks_section_shows_the_last_12_lines_of_each_log(tmp_path):
    """pytest's verdict is at the end of its log: lines 19 to 30 of a 30-line log are shown, line 18 is not."""
    (tmp_path / "gpu_tests.log").write_text("".join(f"line {i:02d}\n" for i in range(1, 31)))
    text = gpu_check._checks_section(tmp_path, {"gpu_tests": 0})
    shown = text.split("## `gpu_tests`: exit 0\n\n```\n")[1].split("\n```")[0]
    assert shown.splitlines() == [f"line {i:02d}" for i in range(19, 31)]
    assert "## `aoti_tests`: exit not run\n\n```\n(no log)\n```" in text


def _measured(work: Path, name: str, rows: list[dict], meta: dict | None = None) -> None:
    (work / name).mkdir(parents=True, exist_ok=True)
    report.write_json(work / name / "results.json", meta or {"device_name": "H100"}, rows)


def test_gpu_check_summary_has_every_runs_table_the_log_end_and_checks_only_when_they_ran(tmp_path):
    """summary.md: the fidelity-0 target read from the v2_f0 run, each run's own table, the last 40 lines of
    gpu_check.log (lines 11 to 50 of 50); no checks section when ``checks`` was not among the steps."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "gpu_check.log").write_text("".join(f"log {i:02d}\n" for i in range(1, 51)))
    _measured(work, "v2_f0", [row("torch-max", 1, 2.0, fidelity=0.0)])
    text = gpu_check._save(NS(steps=["v2_f0"]), out, work, {"v2_f0": 0})
    assert "| v2, fidelity 0, batch 1 | <= 2.5 ms | 2.00 ms, 500 img/s (torch-max" in text
    assert "\n# Run `v2_f0`\n" in text and "| torch-max | fp16 | 1 | 0 | forward | 2 |" in text
    tail = text.split("# Log (end)\n\n```\n")[1].split("\n```")[0]
    assert tail.splitlines() == [f"log {i:02d}" for i in range(11, 51)]
    assert "# Checks" not in text and (out / "summary.md").read_text() == text


def test_gpu_check_digest_lists_forward_rows_with_the_notes_of_failed_ones_only(tmp_path):
    """The console digest of a benchmark: forward rows only; a failed row's note cut at 100 characters; an ok row's
    note (compile details) left out."""
    _measured(tmp_path, "v2", [{**row("torch-max", 1, 3.5), "note": "compiled in 40 s"},
                               {**row("tensorrt", 1, 9.0), "status": "error", "note": "x" * 150},
                               {**row("torch-max", 1, 7.0), "what": "restore"}])
    digest = gpu_check._digest("v2", tmp_path, tmp_path)
    lines = digest.splitlines()[2:]
    assert len(lines) == 2 and lines[0].endswith("| ok |") and lines[1].endswith(f"| error: {'x' * 100} |")


def test_gpu_check_digest_of_a_benchmark_that_wrote_no_results_is_the_last_20_lines_of_its_log(tmp_path):
    """A benchmark that died before its first row has no results.json: the console shows why (its log's end)."""
    (tmp_path / "v2.log").write_text("".join(f"line {i:02d}\n" for i in range(1, 31)))
    assert gpu_check._digest("v2", tmp_path, tmp_path).splitlines() == [f"line {i:02d}" for i in range(11, 31)]


def test_gpu_check_packs_the_logs_and_small_results_only(tmp_path):
    """logs.tgz: a 1 MiB log and a run's results.json go in; a 5 MiB JSON and a checkpoint stay out."""
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _measured(work, "v2", [row("torch-max", 1, 3.5)])
    (work / "gpu_tests.log").write_bytes(b"x" * 2**20)
    (work / "big.json").write_bytes(b"0" * 5 * 2**20)
    (work / "model.pt").write_bytes(b"weights")
    gpu_check._pack_logs(work, out)
    with tarfile.open(out / "logs.tgz") as tar:
        assert sorted(tar.getnames()) == ["gpu_tests.log", "v2/results.json"]


# ---------------------------------------------------------------------------------------------------------- soak
def _write_outputs(results: Path, stem: str, cmp_shape=(soak.FACE_SIZE, 2 * soak.FACE_SIZE, 3)) -> None:
    face = (soak.FACE_SIZE, soak.FACE_SIZE, 3)
    for group, shape in (("restored_faces", face), ("cropped_faces", face), ("cmp", cmp_shape)):
        (results / group).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(results / group / f"{stem}_00.png"), np.full(shape, 128, np.uint8))


@pytest.fixture
def soak_cli(tmp_path, monkeypatch):
    """Runs :func:`deploy.soak.run_soak` with a stand-in for the CLI process. The stand-in writes the outputs of the
    good inputs and one FAILED line per bad one as the CLI does (``behave(inputs, results, stderr)`` may change that),
    then plays ``trace``: one (outputs done, VmRSS KiB) per poll, the summary line printed on stdout just before the
    sample at ``summary_at`` (default: the last), then exits with ``exit_code`` (default: 3 with bad inputs, else 0).
    Each run gets a fresh folder. Returns (result, what the process was started with)."""
    started = {}
    state = {"done": 0, "rss": None, "runs": 0}

    def run(count=20, bad_fraction=0.1, *, trace, summary_at=None, exit_code=None, behave=None, **kwargs):
        class FakeCLI:
            pid = 0

            def __init__(self, command, stdout, stderr, env, cwd):
                started.update(command=command, env=env, cwd=cwd)
                inputs, results = Path(command[command.index("-i") + 1]), Path(command[command.index("-o") + 1])
                files = sorted(inputs.iterdir())
                bad = [p for p in files if p.stem.split("_", 1)[1] in soak.BAD_KINDS]
                for p in files:
                    if p in bad:
                        stderr.write(f"vqfr: FAILED {p}: cannot be read\n")
                    else:
                        _write_outputs(results, p.stem)
                if behave is not None:
                    behave(inputs, results, stderr)
                stderr.flush()
                self.stdout, self.polls, self.returncode = stdout, 0, None
                self.exit = (3 if bad else 0) if exit_code is None else exit_code

            def poll(self):
                if self.polls == len(trace):
                    self.returncode = self.exit
                    return self.returncode
                state["done"], state["rss"] = trace[self.polls]
                if self.polls == (len(trace) - 1 if summary_at is None else summary_at):
                    self.stdout.write("vqfr: 20 images, 18 faces restored\n")
                    self.stdout.flush()
                self.polls += 1
                return None

        monkeypatch.setattr(soak.subprocess, "Popen", FakeCLI)
        monkeypatch.setattr(soak, "_rss_kib", lambda pid: state["rss"])
        monkeypatch.setattr(soak, "_count_files", lambda folder: state["done"])
        state["runs"] += 1  # each run in a fresh folder: soak0, soak1, ...
        return soak.run_soak(count, bad_fraction, tmp_path / f"soak{state['runs'] - 1}", interval=0.0,
                             **kwargs), started

    return run


FLAT = [(0, 50_000), (2, 100_000), (10, 100_000), (18, 100_000)]  # 18 good inputs, warm-up 2: flat after it


def test_soak_runs_the_cli_on_aligned_faces_at_the_batch_asked_quietly_unbuffered_from_here(
        soak_cli, tmp_path, monkeypatch):
    """The CLI's summary line must reach its file when printed (the RSS window ends there), and the CLI must be this
    checkout's, ahead of the caller's PYTHONPATH."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    result, started = soak_cli(trace=FLAT, batch=4)
    out = tmp_path / "soak0"
    assert started["command"][1:] == ["-m", "vqfr", "-i", str(out / "inputs"), "-o", str(out / "results"),
                                      "--weights", str(out / "micro_v2.safetensors"), "--aligned", "--batch", "4",
                                      "-q"]
    root = Path(soak.__file__).resolve().parents[1]
    assert started["env"]["PYTHONUNBUFFERED"] == "1" and started["env"]["PYTHONPATH"] == f"{root}:/elsewhere"
    assert started["cwd"] == root and result.ok, result.problems


def test_soak_without_bad_inputs_expects_exit_code_0(soak_cli):
    """--bad-fraction 0: every input is good, so the CLI must exit 0 (3 means some input failed)."""
    result, _ = soak_cli(10, 0.0, trace=[(0, 50_000), (1, 100_000), (5, 100_000), (10, 100_000)])
    assert (result.bad, result.exit_code) == (0, 0) and result.ok, result.problems
    result, _ = soak_cli(10, 0.0, trace=[(0, 50_000), (1, 100_000), (5, 100_000), (10, 100_000)], exit_code=3)
    assert result.problems == ["exit code 3, expected 0"]


def test_soak_counts_a_failed_line_for_a_good_input(soak_cli):
    """Each bad input reported once is not enough: a FAILED line naming a good input is a third line for two bad."""
    def behave(inputs, results, stderr):
        stderr.write(f"vqfr: FAILED {sorted(inputs.iterdir())[1]}: cannot be read\n")

    result, _ = soak_cli(trace=FLAT, behave=behave)
    assert "3 FAILED lines for 2 bad inputs" in result.problems


def test_soak_names_decoder_chatter_and_tracebacks_and_lets_blank_stderr_lines_pass(soak_cli):
    """stderr holds the CLI's own ``vqfr: `` lines only: a libpng warning is a problem, a traceback is named as such,
    blank lines are not counted."""
    result, _ = soak_cli(trace=FLAT, behave=lambda i, r, stderr: stderr.write("\n   \n"))
    assert result.ok, result.problems
    result, _ = soak_cli(trace=FLAT, behave=lambda i, r, stderr: stderr.write("libpng warning: iCCP: bad profile\n"))
    assert result.problems == ["1 stderr lines besides the CLI's own (decoder chatter?): "
                               "['libpng warning: iCCP: bad profile']"]
    result, _ = soak_cli(trace=FLAT, behave=lambda i, r, stderr: stderr.write("Traceback (most recent call last):\n"))
    assert "a traceback was printed" in result.problems


def test_soak_requires_the_comparison_image_at_twice_the_width(soak_cli):
    """A good input without its cmp image is missing an output (and not counted); one with a square cmp image has
    outputs of the wrong size."""
    def behave(inputs, results, stderr):
        good = sorted(results.glob("cmp/*.png"))
        good[0].unlink()
        _write_outputs(results, good[1].stem[:-3], cmp_shape=(soak.FACE_SIZE, soak.FACE_SIZE, 3))

    result, _ = soak_cli(trace=FLAT, behave=behave)
    missing, wrong = sorted(results_problem for results_problem in result.problems)
    assert missing.endswith(": missing or undecodable output") and ": outputs of the wrong size" in wrong
    assert result.outputs == 17 and len(result.problems) == 2


def test_soak_accepts_growth_exactly_at_the_tolerance(soak_cli):
    """100,000 KiB at warm-up, peak 150,000 KiB: growth 0.5, tolerance 0.5: not over it."""
    result, _ = soak_cli(trace=[(0, 50_000), (2, 100_000), (10, 150_000), (18, 120_000)], rss_tolerance=0.5)
    assert result.rss_growth == 0.5 and result.ok, result.problems


def test_soak_warm_up_is_a_fraction_of_the_good_inputs(soak_cli):
    """20 inputs, half bad: warm-up 0.1 is 1 image (10% of the 10 good ones), not 2 (10% of 20). From 1 output on:
    100,000 then 120,000 KiB, a 20% growth."""
    result, _ = soak_cli(20, 0.5, trace=[(0, 50_000), (1, 100_000), (2, 120_000), (10, 120_000)])
    assert (result.good, result.warmup_images, result.rss_at_warmup_kib) == (10, 1, 100_000)
    assert result.problems == ["RSS grew 20.0% after warm-up (tolerance 10%)"]


def test_soak_leaves_the_exit_out_but_keeps_the_sample_that_saw_the_summary(soak_cli):
    """Warm-up 2 of 18 images. After it: 100,000, 104,000 and, at the sample that saw the summary line, 108,000 KiB;
    then 300,000 KiB while the interpreter exits. Peak and final are 108,000 (growth 8%, under 10%)."""
    trace = [(0, 50_000), (2, 100_000), (10, 104_000), (18, 108_000), (18, 300_000)]
    result, _ = soak_cli(trace=trace, summary_at=3)
    assert (result.rss_at_warmup_kib, result.rss_peak_after_kib, result.rss_final_kib) == (100_000, 108_000, 108_000)
    assert len(result.samples) == 5 and len(result.work_samples()) == 4 and result.ok, result.problems


def test_soak_rss_at_warm_up_is_the_first_sample_at_the_warm_up_count():
    """Samples from done == warm-up count on: the base is the first of them (100,000), not the lowest (90,000):
    growth 105,000 / 100,000 - 1 = 5%. One sample after the warm-up is too few to judge."""
    samples = [(0.1, 1, 40_000), (0.2, 2, 100_000), (0.3, 10, 90_000), (0.4, 18, 105_000)]
    base, peak, growth, _ = soak._rss_stats(samples, 2)
    assert (base, peak) == (100_000, 105_000) and growth == pytest.approx(0.05)
    assert soak._rss_stats(samples[:2], 2) == (None, None, None, None)


def test_soak_summary_prints_rss_in_mib_of_1024_kib():
    samples = [(0.1, 1, 102_400), (0.2, 2, 104_448)]
    result = soak.SoakResult(2, 2, 0, 0, 2, 0, [], samples, 1.0, 1, 102_400, 104_448, 104_448, 0.02, 2048.0, ["py"])
    assert "RSS: 100.0 MiB after 1 images (warm-up), peak after 102.0 MiB, final 102.0 MiB" in result.summary()


def test_soak_rss_series_hits_each_tenth_at_exactly_that_count():
    """10 good inputs, one sample per output: the series is at 1, 2, ..., 10 outputs, not one later."""
    samples = [(0.1 * d, d, 1000 + d) for d in range(11)]
    result = soak.SoakResult(10, 10, 0, 0, 10, 0, [], samples, 1.0, 1, None, None, None, None, None, ["py"])
    assert result.rss_series() == [(d, 1000 + d) for d in range(1, 11)]
    coarse = dataclasses.replace(result, samples=[(0.0, 0, 1000), (0.1, 5, 1005), (0.2, 10, 1010)])
    assert coarse.rss_series() == [(5, 1005), (10, 1010)]  # a sample that covers several tenths is listed once


def test_soak_counts_finished_outputs_not_hidden_temporary_files(tmp_path):
    (tmp_path / "img00001_png_00.png").write_bytes(b"x")
    (tmp_path / ".img00002_png_00.png.tmp").write_bytes(b"x")
    assert soak._count_files(tmp_path) == 1 and soak._count_files(tmp_path / "absent") == 0


def test_soak_refuses_a_results_folder_that_is_not_empty(tmp_path):
    (tmp_path / "results" / "restored_faces").mkdir(parents=True)
    (tmp_path / "results" / "restored_faces" / "old_00.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="is not empty; pass a fresh --out"):
        soak.run_soak(10, 0.1, tmp_path)


@pytest.mark.parametrize("argv,expected", [
    ([], (1000, 0.05, {"batch": 8, "warmup": 0.1, "rss_tolerance": 0.10, "interval": 0.1})),
    (["--count", "50", "--bad-fraction", "0", "--batch", "2", "--warmup", "0.2", "--rss-tolerance", "0.3",
      "--interval", "0.5"], (50, 0.0, {"batch": 2, "warmup": 0.2, "rss_tolerance": 0.3, "interval": 0.5})),
])
def test_soak_main_passes_its_documented_defaults_and_options_to_the_run(argv, expected, tmp_path, monkeypatch):
    """The defaults of the 1,000-image run (5% bad, batch 8, warm-up 10%, 10% tolerance, 0.1 s); every option reaches
    the run, and a --bad-fraction of 0 (all inputs good) is accepted."""
    calls = []
    passed = soak.SoakResult(1, 1, 0, 0, 1, 0, [], [], 1.0, 1, None, None, None, None, None, ["py"])
    monkeypatch.setattr(soak, "run_soak", lambda *a, **k: calls.append((a, k)) or passed)
    assert soak.main(["--out", str(tmp_path), *argv]) == 0
    (args, kwargs), = calls
    assert (args[0], args[1], kwargs) == expected


@pytest.mark.parametrize("count,fraction,refused", [(10, 1.0, True), (10, 0.96, True), (10, 0.94, False),
                                                    (1, 0.4, False)])
def test_soak_refuses_a_bad_fraction_that_leaves_no_good_input(count, fraction, refused, tmp_path, monkeypatch,
                                                              capsys):
    """The soak measures memory over the good inputs: 10 inputs at 0.96 round to 10 bad (refused, before any file is
    written), at 0.94 to 9 bad and one good (run); one input at 0.4 rounds to none bad."""
    calls = []
    passed = soak.SoakResult(1, 1, 0, 0, 1, 0, [], [], 1.0, 1, None, None, None, None, None, ["py"])
    monkeypatch.setattr(soak, "run_soak", lambda *a, **k: calls.append(a) or passed)
    argv = ["--out", str(tmp_path / "soak"), "--count", str(count), "--bad-fraction", str(fraction)]
    if refused:
        with pytest.raises(SystemExit) as exit_info:
            soak.main(argv)
        assert exit_info.value.code == 2 and "leaves no good input" in capsys.readouterr().err
        assert calls == [] and not (tmp_path / "soak").exists()
    else:
        (tmp_path / "soak").mkdir()  # run_soak, stood in for here, makes it
        assert soak.main(argv) == 0 and len(calls) == 1
