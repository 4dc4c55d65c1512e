"""CPU latency of the reference model at the official size: ``python -m deploy.cpu_latency [--version v2]``.

Random weights of the official architecture (the released weights give the same timing). Prints one Markdown
table row per (version, fidelity) with the median of ``--iters`` runs after ``--warmup`` runs, wall and process time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import vqfr


def time_model(model, x: torch.Tensor, kwargs: dict, iters: int, warmup: int) -> tuple[float, float]:
    """Median wall and process seconds of ``model(x, **kwargs)`` under no_grad."""
    walls, cpus = [], []
    with torch.inference_mode():
        for i in range(warmup + iters):
            w0, c0 = time.perf_counter(), time.process_time()
            model(x, **kwargs)
            if i >= warmup:
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.cpu_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v2", choices=["v1", "v2"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    for flag, value in (("--iters", args.iters), ("--threads", args.threads)):
        if value < 1:  # no median of zero runs; torch refuses zero threads
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:  # would take timed runs away (none left: no median, after building the model)
        parser.error(f"--warmup must be at least 0, got {args.warmup}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vqfr.build_model(args.version).eval()
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    cases = [({}, "-")] if args.version == "v1" else [({"fidelity": 1.0}, "1.0"), ({"fidelity": 0.0}, "0.0")]
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"1x3x{args.size}x{args.size} fp32, median of {args.iters} after {args.warmup} warm-up")
    print("| model | fidelity | wall s | process CPU s |\n|---|---|---|---|")
    for kwargs, label in cases:
        wall, cpu = time_model(model, x, kwargs, args.iters, args.warmup)
        print(f"| VQFR{args.version} | {label} | {wall:.2f} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
