"""What a watchdog (monitor_process.py) reads in the run folder: a heartbeat and the reason of a
deliberate exit. Rank 0 writes both; neither is ever read by training.

``heartbeat.json`` = ``{"step": completed steps, "time": time.time(), "phase": ..., "pid": ...}``,
rewritten (temp file + rename: a reader never sees half a file; no fsync: a lost heartbeat after a
power cut costs nothing) when the process starts ("startup", before the model is built: loading and
torch.compile may take minutes), after every optimizer step ("step"), and when an evaluation or a
checkpoint save starts ("eval", "save"). The monitor treats a "step" heartbeat older than its
``--heartbeat_timeout`` as a hang and grants the other phases a longer grace.

``exit_code.json`` = ``{"code": int, "rank": int, "time": float, "reason": str}``, written just before
a deliberate exit with exit_codes.USER_ERROR, NONFINITE or PREEMPTED: under torchrun the agent exits 1
for any failed rank, so this file is how a supervisor tells "resume" or "do not restart" from a crash.
``reason`` "exit_after_minutes" means the allocation's time is up: resume in the next one, not here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HEARTBEAT = "heartbeat.json"
EXIT_CODE = "exit_code.json"


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class Heartbeat:
    """``beat(step, phase)``; a no-op off rank 0 or when the run folder does not exist yet."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool):
        self.path = Path(out_dir) / HEARTBEAT
        self.enabled = enabled

    def beat(self, step: int, phase: str) -> None:
        if not self.enabled or not self.path.parent.is_dir():
            return
        try:
            _write(self.path, {"step": step, "time": time.time(), "phase": phase, "pid": os.getpid()})
        except OSError:
            pass  # a full disk must not stop training for the sake of a watchdog's file


def write_exit_code(out_dir: str | os.PathLike, code: int, rank: int, reason: str = "") -> None:
    """Record a deliberate exit (see the module docstring); rank 0 only, best effort. ``reason``:
    ``"exit_after_minutes"`` tells a supervisor not to resume within this allocation."""
    path = Path(out_dir) / EXIT_CODE
    if rank != 0 or not path.parent.is_dir():
        return
    try:
        _write(path, {"code": code, "rank": rank, "time": time.time(), "reason": reason})
    except OSError:
        pass
