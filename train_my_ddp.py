"""The training entry point: pretrain, SFT or DPO, on one process or under torchrun.

    python train_my_ddp.py [CONFIG.json] --task_type=pretrain --data_dir=... --tokenizer_dir=...
    torchrun --standalone --nproc_per_node=4 train_my_ddp.py ...
    python train_my_ddp.py --help

Thin on purpose: parse the configuration, set up logging, call :func:`z2all.training.train`.
Everything else lives in ``z2all/training`` (see docs/training.md).
"""

from __future__ import annotations

import sys

from z2all.log import setup_logging
from z2all.training import ConfigError, parse_args, train
from z2all.training.config import help_text


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"train_my_ddp.py: error: {e}", file=sys.stderr)
        return 2
    setup_logging(debug=cfg.debug)
    try:
        train(cfg)
    except ConfigError as e:  # raised while building (bad data_dir, tokenizer, model config...)
        print(f"train_my_ddp.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
