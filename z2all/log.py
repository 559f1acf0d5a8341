"""One rank-aware logger for the whole project.

Library modules log through ``logging.getLogger(__name__)`` and never ``print``. Entry points call
:func:`setup_logging` once: only rank 0 logs at INFO unless ``debug`` is set, in which case every rank
logs and each line carries its rank.

Log lines go to stderr, in every entry point: stdout carries a tool's results only (the text
``python -m z2all.sample`` generates, the report of ``python -m z2all.env``), so
``python -m z2all.sample ... > out.txt`` captures the text alone.
"""

from __future__ import annotations

import logging
import os
import sys

# Top-level loggers of the project's packages (and of entry-point scripts run as __main__).
PROJECT_LOGGERS = ("z2all", "parallel", "optimizer", "data_preprocess", "__main__")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, debug: bool):
        super().__init__()
        self.rank = rank
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        # Warnings and errors from any rank always get through: a failing rank must be heard.
        return self.debug or self.rank == 0 or record.levelno >= logging.WARNING


def env_rank() -> int:
    """The global rank torchrun gave this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(rank: int | None = None, debug: bool = False) -> logging.Logger:
    """Configure the ``z2all``/``parallel``/``optimizer``/``data_preprocess`` loggers; idempotent."""
    rank = env_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s rank%(rank)s %(levelname)s] %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_RankFilter(rank, debug))
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(logging.DEBUG if debug else logging.INFO)
        lg.propagate = False
    return logging.getLogger("z2all")
