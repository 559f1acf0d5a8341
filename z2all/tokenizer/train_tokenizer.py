"""Train a tokenizer on a folder of corpora.

    python -m z2all.tokenizer.train_tokenizer --data_dir=DIR --save_dir=TOKDIR --vocab_size=N \\
        --tokenizer_type=hf_bbpe|sp_bbpe [--max_chars=N] [--text_field=text] [--debug]

Face only: reads documents with :mod:`z2all.data.readers` and hands them to
:func:`z2all.tokenizer.trainer.train_tokenizer`. This ``python -m`` entry point is the one module of
the tokenizer package allowed to import ``z2all.data`` (the package itself, and everything
``z2all.tokenizer`` exports, stays on the ground floor); nothing imports this module.
Prints the tokenizer folder on stdout; logs go to stderr; an unreadable file or a corpus without a
single document stops it with ``train_tokenizer: error: ...`` (status 2).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

from z2all.cli_args import run_cli
from z2all.data.readers import ReadStats, iter_documents, list_data_files
from z2all.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

logger = logging.getLogger(__name__)


def corpus_texts(cfg: TokenizerTrainConfig, stats: ReadStats) -> Iterator[str]:
    """Documents of every file under ``cfg.data_dir``; stops after ``cfg.max_chars`` characters."""
    files = list_data_files(cfg.data_dir)
    if not files:
        raise FileNotFoundError(f"--data_dir={cfg.data_dir}: no .jsonl/.json/.parquet/.txt files found")
    chars = 0
    for path in files:
        for text in iter_documents(path, cfg.text_field or None, stats):
            if cfg.max_chars and chars + len(text) > cfg.max_chars:
                rest = cfg.max_chars - chars
                if rest > 0:
                    yield text[:rest]
                logger.info("reached --max_chars=%d", cfg.max_chars)
                return
            chars += len(text)
            yield text


def _run(cfg: TokenizerTrainConfig) -> None:
    if not cfg.data_dir or not cfg.save_dir:
        raise ValueError("--data_dir and --save_dir are required")
    stats = ReadStats()
    t0 = time.perf_counter()
    try:
        save_dir = train_tokenizer(corpus_texts(cfg, stats), cfg)
    finally:  # also when it failed: the bad records may be why there was no document
        logger.info("read: %s", stats.summary())
    logger.info("trained in %.1fs", time.perf_counter() - t0)
    print(save_dir)


def main(argv: list[str] | None = None) -> int:
    return run_cli(TokenizerTrainConfig, _run, argv, __doc__, prog="train_tokenizer")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
