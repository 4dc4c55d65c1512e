"""Loss curves from a run's ``metrics.jsonl``: ``python -m training.plot OUT/metrics.jsonl -o curve.png``.

One panel per series (``loss_total`` and every ``l_*`` term by default), raw values and a moving average.
Needs matplotlib (``pip install 'vqfr-deploy[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from training.arguments import whole_number
from vqfr._optional import require
from vqfr.errors import InputError, run_command

__all__ = ["read_metrics", "plot_metrics", "main"]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order (a resumed run's repeated iterations keep the last). A line
    that is not a record (a write cut off when the run was killed) is skipped with a warning."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror})", path=path, fix="pass the metrics.jsonl of a run") from exc
    by_iter: dict[int, dict] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                by_iter[int(record["iter"])] = record
            except (ValueError, KeyError, TypeError):
                logging.getLogger("training").warning("%s:%d is not a metrics record (cut off?); skipped", path, number)
    return [by_iter[k] for k in sorted(by_iter)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_metrics(records: list[dict], out: str | Path, keys: list[str] | None = None, title: str | None = None,
                 window: int = 5) -> Path:
    """Write a PNG with one panel per key. Returns its path."""
    matplotlib = require("matplotlib", "plotting loss curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no records to plot")
    if keys is None:
        names = {k for r in records for k in r}
        keys = ["loss_total"] + sorted(k for k in names if k.startswith("l_"))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["iter"], r[key]) for r in records if key in r]
        if points:
            its, vals = zip(*points, strict=True)
            ax.plot(its, vals, color="0.7", linewidth=1, label="per iteration")
            ax.plot(its, _smooth(list(vals), window), color="C0", linewidth=1.8, label=f"mean of {window}")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--keys", help="comma-separated series (default: loss_total and every l_* term)")
    parser.add_argument("--title")
    parser.add_argument("--window", type=whole_number(1), default=5, help="moving-average window (iterations)")
    args = parser.parse_args(argv)
    keys = args.keys.split(",") if args.keys else None

    def plot() -> str:
        records = read_metrics(args.metrics)
        if not records:
            raise InputError("holds no records yet", path=args.metrics,
                             fix="plot it once the run has logged an iteration (logger.print_freq)")
        return str(plot_metrics(records, args.out, keys, args.title, args.window))

    return run_command(plot)


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
