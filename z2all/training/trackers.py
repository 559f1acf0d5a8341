"""Experiment trackers behind one interface: ``log(metrics, step)`` and ``close()``.

Rank 0 only. ``metrics.jsonl`` is always written by the loop; a tracker is an extra view. A tracker
whose package is missing is a clear error at start-up, not a silent no-op.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)


class Tracker:
    """No-op base: what ``--tracker=none`` gives."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _require(module: str, flag: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"--tracker={flag} needs the {module!r} package: pip install {flag}") from None


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: str):
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=log_dir)

    def log(self, metrics, step):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any], log_dir: str):
        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(project=project, name=name, config=config, dir=log_dir, resume="allow")

    def log(self, metrics, step):
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self):
        self.run.finish()


class SwanlabTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any], log_dir: str):
        self.swanlab = _require("swanlab", "swanlab")
        self.run = self.swanlab.init(project=project, experiment_name=name, config=config, logdir=log_dir)

    def log(self, metrics, step):
        self.swanlab.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self):
        self.swanlab.finish()


def build_tracker(kind: str, out_dir: str, run_name: str, config: dict[str, Any]) -> Tracker:
    """The tracker for ``--tracker=kind``; logs go under ``<out_dir>/tracker``."""
    log_dir = f"{out_dir}/tracker"
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(log_dir)
    if kind == "wandb":
        return WandbTracker("z2all", run_name, config, log_dir)
    if kind == "swanlab":
        return SwanlabTracker("z2all", run_name, config, log_dir)
    raise ValueError(f"unknown --tracker={kind!r}")
