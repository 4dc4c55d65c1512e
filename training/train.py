"""Command line: ``python -m training.train --config training/configs/<name>.yml [--max-iters N] [--out DIR]
[--resume PATH] [--device cpu|cuda] [--threads N]``.

``--out`` defaults to the resumed run's folder with ``--resume`` (the folder given, or ``<run>`` for
``<run>/training_states/<iter>.state``), else ``experiments/<name>``; the first line logged names it.

One GPU: run it as is. Several GPUs or nodes: launch it with torchrun, e.g.
``torchrun --nproc_per_node=8 -m training.train --config training/configs/vqfr_v2.yml``; ``datasets.train.
batch_size_per_gpu`` is per process. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from training.arguments import whole_number
from training.config import load_config
from training.trainer import Trainer, error_message, saved_states
from vqfr.errors import VQFRError


def _iterations(text: str) -> tuple[int, ...]:
    """Comma-separated iteration numbers, each at least 1 (``--profile-iters 160,161``)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated iteration numbers, e.g. 160,161; got {text!r}") \
            from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"iterations start at 1, got {text!r}")
    return values


def resumed_run_folder(resume: Path) -> Path | None:
    """The output folder of the run that ``--resume`` names: the folder itself, or ``<run>`` for a
    ``<run>/training_states/<iter>.state`` file; None for a state file kept anywhere else."""
    if resume.is_dir():
        return resume
    if resume.parent.name == "training_states":
        return resume.parent.parent
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description="Train VQGAN (stage 1) or VQFR "
                                     "(stage 2) from an official-style yml.", epilog="Exit codes: 0 done, 2 an error "
                                     "in the command, config, data or a file (named, with the fix), 130 interrupted "
                                     "(Ctrl-C; the message says how to go on).")
    parser.add_argument("--config", required=True, type=Path, help="training yml (training/configs/*.yml)")
    parser.add_argument("--max-iters", type=whole_number(1), help="stop after this many iterations (overrides "
                        "train.total_iter)")
    parser.add_argument("--out", type=Path, help="output folder (default: the resumed run's folder with --resume, "
                        "else experiments/<name>)")
    parser.add_argument("--resume", type=Path, help="a training_states/<iter>.state file, or an output folder to "
                        "resume from its latest state; the run goes on in its folder unless --out says otherwise")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--threads", type=whole_number(1), help="CPU threads for torch (torch.set_num_threads)")
    parser.add_argument("--profile-iters", type=_iterations, default=(), metavar="N[,N...]",
                        help="run these iterations under torch.profiler and write profile_iter_N.md (GPU kernels and "
                        "host operators by self time) into the output folder, e.g. 160,161: an iteration with the "
                        "lazy R1 penalty (every train.net_d_reg_every) and one without")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 reports progress; the others report warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path | None = None
    trainer: Trainer | None = None
    try:
        overrides = {"train": {"total_iter": args.max_iters}} if args.max_iters else {}
        cfg = load_config(args.config, overrides)
        out = args.out
        if out is None and args.resume is not None:
            out = resumed_run_folder(args.resume)
        if out is None:
            out = Path("experiments") / str(cfg.get("name", args.config.stem))
        logging.getLogger("training").info("output folder: %s", out)
        trainer = Trainer(cfg, out, device=args.device, resume=args.resume, profile_iters=args.profile_iters)
        trainer.train()
    except (VQFRError, ImportError) as exc:  # ImportError: a missing optional package, named with its extra
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say where the run can go on from instead of a traceback
        if trainer is not None:
            trainer.close()
        states = saved_states(out) if out is not None else []
        more = f" --max-iters {args.max_iters}" if args.max_iters else ""
        where = (f"the latest state is iteration {states[-1].stem}; go on with: python -m training.train --config "
                 f"{args.config} --resume {out}{more}" if states else "no training state was saved yet")
        print(f"interrupted: {where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
