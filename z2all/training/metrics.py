"""What a run reports: ``metrics.jsonl`` (one JSON object per optimizer step), the console line and
``run_info.json``. Only rank 0 writes; callers guard with ``rank == 0``.

Invariant of ``metrics.jsonl``: steps are strictly increasing and never exceed the newest checkpoint
a resumed run continues from. :meth:`MetricsWriter.truncate_after` drops the lines a crashed run wrote
after its last checkpoint, so a resumed run appends a consistent history.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from z2all.atomic import atomic_write_text

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON line per step to ``<out_dir>/metrics.jsonl``, flushed at once."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step`` > ``step`` (and a torn last line); returns how many were dropped."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not valid JSON (torn write?); dropping it", self.path, lineno)
                dropped += 1
                continue
            if rec.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
            logger.info(
                "metrics.jsonl: dropped %d line(s) after step %d (written after the last checkpoint)",
                dropped,
                step,
            )
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, ensure_ascii=False) + "\n")
            f.flush()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (for tests, plots and the demo)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(rec: dict[str, Any], max_iters: int, step_seconds: float, peak_mem_gb: float | None) -> str:
    """``step 10/100 | loss 3.4512 | lr 3.0e-04 | gnorm 1.23 | 12.3k tok/s | mem 3.1G | eta 2m10s``."""
    parts = [f"step {rec['step']}/{max_iters}", f"loss {rec['loss']:.4f}"]
    if rec.get("val_loss") is not None:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    tps = rec.get("tokens_per_s") or 0.0
    parts.append(f"{tps / 1e3:.1f}k tok/s")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if peak_mem_gb is not None:
        parts.append(f"mem {peak_mem_gb:.2f}G")
    if "rewards/accuracies" in rec:
        parts.append(f"acc {rec['rewards/accuracies']:.2f} margin {rec['rewards/margins']:.3f}")
    parts.append(f"eta {_fmt_duration(step_seconds * (max_iters - rec['step']))}")
    return " | ".join(parts)


def write_run_info(out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``run_info.json`` atomically (world size, ddp impl, parameter count, versions, devices...)."""
    path = Path(out_dir) / "run_info.json"
    atomic_write_text(path, json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n")
    return path
