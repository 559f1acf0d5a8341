"""Charts of training runs: ``python -m z2all.plot DIR [DIR ...] [--out=PNG]``.

Reads each run's ``metrics.jsonl`` (one JSON object per optimizer step, written by rank 0) and draws
one panel per metric (loss, val_loss, lr, grad_norm, tokens_per_s; any other numeric key with
``--metrics``) against ``step``, one line per run. Uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from z2all.atomic import atomic_write_bytes
from z2all.log import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a bad line is an error naming file and line, except
    an unterminated last line (a writer killed mid-line), which is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a z2all run folder?)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                logger.warning("%s:%d: skipping an unterminated last line", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' key")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no metrics records")
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the records that carry a finite number under ``key``."""
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(rec["step"])
            ys.append(float(v))
    return xs, ys


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, metrics=DEFAULT_METRICS) -> Path:
    """Draw ``metrics`` of every run into one PNG; returns its path (default ``<first run>/metrics.png``)."""
    try:  # optional: only this function needs it (pip install -e .[plot])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "z2all.plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])"
        ) from e
    if not run_dirs:
        raise ValueError("z2all.plot: give at least one run folder")
    runs = {str(d): read_metrics(d) for d in run_dirs}
    present = [m for m in metrics if any(series(recs, m)[0] for recs in runs.values())]
    if not present:
        raise ValueError(f"none of the metrics {list(metrics)} appear in {', '.join(runs)}")
    cols = min(2, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        for name, recs in runs.items():
            xs, ys = series(recs, metric)
            if xs:
                # val_loss exists only on eval steps: markers make sparse points visible.
                ax.plot(xs, ys, label=Path(name).name or name, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dirs[0]) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Render to memory, then write atomically: a half-written PNG never appears under `out`.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    logger.info("wrote %s (%s)", out, ", ".join(present))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m z2all.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: <first DIR>/metrics.png)")
    p.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated keys of metrics.jsonl to draw"
    )
    args = p.parse_args(argv)
    setup_logging()
    return plot_runs(args.run_dirs, args.out, tuple(m for m in args.metrics.split(",") if m))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"python -m z2all.plot: error: {e}")
