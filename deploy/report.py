"""Benchmark results on disk: ``results.json``, a Markdown table (``results.md``) and a PNG chart (``results.png``).

``results.json`` is ``{"meta": {...}, "rows": [...]}``; each row is a dict with at least ``backend``, ``precision``,
``batch``, ``device``, ``median_ms``, ``p90_ms``, ``img_per_s``, ``peak_mem_mb`` and ``max_abs_err`` (see
:class:`deploy.bench.Row` for every field). ``python -m deploy.report results.json`` re-renders the table and the
chart from a results file (for example one copied back from a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vqfr._optional import require
from vqfr.atomic import atomic_write_bytes, atomic_write_with

__all__ = ["COLUMNS", "cell", "markdown_table", "markdown", "write_json", "check_chart", "write_chart", "write_all",
           "load", "main"]

#: (row key, column title, format) of the Markdown table, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("backend", "backend", "{}"),
    ("precision", "precision", "{}"),
    ("batch", "batch", "{}"),
    ("fidelity", "fidelity", "{:g}"),
    ("what", "timed", "{}"),
    ("median_ms", "median ms", "{:.4g}"),
    ("p10_ms", "p10 ms", "{:.4g}"),
    ("p90_ms", "p90 ms", "{:.4g}"),
    ("img_per_s", "img/s", "{:.4g}"),
    ("cpu_ms", "CPU ms", "{:.4g}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("build_s", "build s", "{:.3g}"),
    ("first_call_s", "first call s", "{:.3g}"),
    ("max_abs_err", "max abs err", "{:.2e}"),
    ("psnr_db", "PSNR dB", "{:.1f}"),
    ("speedup", "x ref fp32", "{:.2f}"),
    ("status", "status", "{}"),
)


def cell(value: Any, fmt: str) -> str:
    """One value as table text: '-' for None, 'inf' for infinity."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _status(row: dict) -> str:
    status = row.get("status", "ok")
    note = row.get("note") or ""
    text = status if not note else f"{status}: {note}"
    return text.replace("|", "/").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """The rows as a Markdown table; columns that are empty in every row are left out."""
    used = [c for c in columns if c[0] in ("backend", "status") or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        cells = [_status(row) if key == "status" else cell(row.get(key), fmt) for key, _, fmt in used]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _meta_lines(meta: dict) -> list[str]:
    keys = ("date", "command", "model", "weights", "input_size", "device_name", "host", "threads", "environment",
            "load_average", "versions", "timing", "inputs", "wall_s", "notes", "partial")
    lines = []
    for key in keys:
        value = meta.get(key)
        if value in (None, "", [], {}):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "; ".join(map(str, value))
        lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    return lines


def markdown(meta: dict, rows: Sequence[dict]) -> str:
    """A Markdown report: the run's facts, then one table for the forward rows and one for the restore rows."""
    parts = ["# VQFR latency benchmark", "", *_meta_lines(meta), ""]
    for what, title in (("forward", "Model forward"), ("restore", "Runtime.restore of aligned faces")):
        mine = [r for r in rows if r.get("what", "forward") == what]
        if mine:
            parts += [f"## {title}", "", markdown_table(mine), ""]
    parts += ["`x ref fp32`: speed-up over the reference model in eager fp32 at the same batch, fidelity and timing.",
              "`max abs err` / `PSNR`: against the fp32 reference output on the same inputs (forward: model output "
              "in [-1, 1]; restore: 8-bit images).", ""]
    return "\n".join(parts)


def write_json(path: str | Path, meta: dict, rows: Sequence[dict]) -> Path:
    """Write ``{"meta": meta, "rows": rows}`` atomically (infinities as the string ``"inf"``)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = Path(path)
    text = json.dumps(clean({"meta": meta, "rows": list(rows)}), indent=1)
    atomic_write_bytes(path, (text + "\n").encode())
    return path


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """Read a ``results.json``: (meta, rows), with ``"inf"`` turned back into a float."""
    data = json.loads(Path(path).read_text())

    def restore(value: Any) -> Any:
        if value in ("inf", "-inf", "nan"):
            return float(value)
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        return value

    return data.get("meta", {}), [restore(r) for r in data["rows"]]


def _label(row: dict) -> str:
    fid = row.get("fidelity")
    fid_text = "" if fid is None else f" f{fid:g}"
    return f"{row['backend']} {row['precision']} b{row['batch']}{fid_text}"


def check_chart() -> None:
    """Raise ImportError naming the pip extra when :func:`write_chart` cannot run (call it before the work)."""
    require("matplotlib", "the benchmark chart")


def write_chart(path: str | Path, meta: dict, rows: Sequence[dict]) -> Path:
    """A horizontal bar chart of images/s per forward row (log scale), with the median latency on each bar."""
    matplotlib = require("matplotlib", "the benchmark chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r.get("what", "forward") == "forward" and r.get("img_per_s")]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 0.42 * max(len(mine), 1) + 1.6))
    if mine:
        labels = [_label(r) for r in mine]
        values = [r["img_per_s"] for r in mine]
        colors = ["#9e9e9e" if r.get("baseline") else "#1f77b4" for r in mine]
        bars = ax.barh(range(len(mine)), values, color=colors)
        ax.set_yticks(range(len(mine)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for bar, row in zip(bars, mine, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['median_ms']:.3g} ms", va="center",
                    fontsize=7)
    else:
        ax.text(0.5, 0.5, "no timed forward rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("images / s (log scale; grey: baselines)")
    ax.set_title(f"VQFR {meta.get('model', '')} on {meta.get('device_name', meta.get('device', ''))}", fontsize=9)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write_with(path, save)
    plt.close(fig)
    return path


def write_all(out_dir: str | Path, meta: dict, rows: Sequence[dict], chart: bool = True) -> dict[str, Path]:
    """results.json, results.md and (with ``chart``) results.png in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "results.json", meta, rows)}
    md = out / "results.md"
    atomic_write_bytes(md, markdown(meta, rows).encode())
    paths["markdown"] = md
    if chart:
        paths["chart"] = write_chart(out / "results.png", meta, rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.report", description="Re-render a results.json as "
                                     "Markdown (printed and written beside it) and a PNG chart.")
    parser.add_argument("results", type=Path, help="a results.json written by python -m deploy.bench")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    if not args.no_chart:
        try:
            check_chart()
        except ImportError as exc:
            parser.error(f"{exc}; or pass --no-chart")
    try:
        meta, rows = load(args.results)
    except OSError as exc:
        parser.error(f"{args.results}: cannot be read ({exc.strerror or exc})")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        parser.error(f"{args.results}: not a results.json of python -m deploy.bench ({type(exc).__name__}: {exc})")
    paths = write_all(args.results.parent, meta, rows, chart=not args.no_chart)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
