"""The top floor: build, then run (configuration, builder, loop, checkpoints, metrics, tasks).

``from z2all.training import TrainConfig, parse_args, train``; see docs/training.md and
docs/architecture.md.
"""

from z2all.training.config import ConfigError, TrainConfig, parse_args
from z2all.training.run import train

__all__ = ["ConfigError", "TrainConfig", "parse_args", "train"]
