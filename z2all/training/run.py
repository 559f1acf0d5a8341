"""``train(cfg)``: join the process group, build, run, leave. The whole of what train_my_ddp.py does
after parsing, importable for tests, notebooks and the demo."""

from __future__ import annotations

from z2all.training.build import Components, build_trainer
from z2all.training.config import TrainConfig
from z2all.training.loop import TrainResult
from z2all.training.runtime import distributed_runtime


def train(cfg: TrainConfig, components: Components | None = None) -> TrainResult:
    """Run (or resume) the training ``cfg`` describes; ``components`` replace what the builder would
    read from the config (model, optimizer factory, task, data)."""
    with distributed_runtime(cfg) as rt:
        return build_trainer(cfg, rt, components).run()
