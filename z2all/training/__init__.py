"""The top floor: training loop, configuration, tasks, metrics, trackers and checkpoints.

``from z2all.training import TrainConfig, parse_args, train``; see docs/training.md.
"""

from z2all.training.config import ConfigError, TrainConfig, parse_args

__all__ = ["ConfigError", "TrainConfig", "parse_args", "train"]


def train(cfg, components=None):
    """Run (or resume) a training run; see :func:`z2all.training.loop.train`."""
    from z2all.training.loop import train as _train

    return _train(cfg, components)
