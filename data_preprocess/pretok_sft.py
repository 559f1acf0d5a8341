"""Pretokenize SFT sources once, so every training run memory-maps them instead of tokenizing.

The library side of ``python -m data_preprocess.pretokenize_sft_data`` (as ``pretok_pretrain.py`` is of
``pretokenize_pretrain_data``). Per source file it writes the ``.sft.bin/.sft.mask/.sft.idx/.sft.json``
shard set of :mod:`z2all.data.sft_shards` (atomically, sidecar last). Idempotent: a source whose
stored set already has the current key (tokenizer fingerprint, source size + mtime, max_seq_len,
sft_type) is skipped, so rerunning after adding files only tokenizes the new ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from z2all.data.sft_build import build_shard
from z2all.data.sft_dataset import as_tokenizer, list_sources
from z2all.data.sft_formats import SFT_TYPES
from z2all.data.sft_shards import cache_key, read_sidecar, save_shard, sft_paths

logger = logging.getLogger(__name__)


@dataclass
class PretokenizeSFTConfig:
    """Every flag of ``python -m data_preprocess.pretokenize_sft_data``."""

    data_dir: str
    """A folder of .jsonl/.json/.parquet SFT files (searched recursively) or one such file."""
    tokenizer_dir: str
    """A z2all tokenizer folder (``Z2allTokenizer.from_pretrained``)."""
    max_seq_len: int
    """Samples are cut to this many tokens; samples left without a trainable token are dropped."""
    save_dir: str = ""
    """Where the .sft.* files go; empty = beside each source. Pass it as ``SFTDataset(cache_dir=...)``."""
    sft_type: str = "conversation"
    """``conversation`` (message lists, ShareGPT/BelleGroup) or ``instruction`` (Alpaca)."""
    force: bool = False
    """Rebuild even when the stored files are up to date."""

    def __post_init__(self):
        if self.sft_type not in SFT_TYPES:
            raise ValueError(f"--sft_type must be one of {SFT_TYPES}, got {self.sft_type!r}")
        if self.max_seq_len < 1:
            raise ValueError(f"--max_seq_len must be >= 1, got {self.max_seq_len}")
        if not self.data_dir or not Path(self.data_dir).exists():
            raise FileNotFoundError(f"--data_dir={self.data_dir!r} does not exist")
        if not self.tokenizer_dir or not Path(self.tokenizer_dir).is_dir():
            raise FileNotFoundError(f"--tokenizer_dir={self.tokenizer_dir!r} is not a folder")


def pretokenize_sft(cfg: PretokenizeSFTConfig) -> list[dict]:
    """Build (or keep) the pretokenized set of every source; returns one summary dict per source."""
    tok = as_tokenizer(cfg.tokenizer_dir)
    out_dir = cfg.save_dir or None
    summaries = []
    for source in list_sources(cfg.data_dir):
        paths = sft_paths(source, out_dir)
        key = cache_key(source, tok.fingerprint(), cfg.max_seq_len, cfg.sft_type)
        sidecar = read_sidecar(paths)
        if not cfg.force and sidecar is not None and sidecar.get("key") == key:
            logger.info("%s: up to date (%s)", source, paths["sidecar"])
            summaries.append({"source": str(source), "status": "up_to_date", **_counts(sidecar)})
            continue
        shard, report = build_shard(source, tok, cfg.max_seq_len, cfg.sft_type)
        report.log_summary()
        save_shard(shard, paths, key, tok.vocab_size, report.to_dict())
        summaries.append({"source": str(source), "status": "built", **_counts(read_sidecar(paths))})
    total = sum(s["n_samples"] for s in summaries)
    dropped = sum(s["n_dropped"] for s in summaries)
    logger.info("%d sources, %d samples, %d dropped", len(summaries), total, dropped)
    return summaries


def _counts(sidecar: dict) -> dict:
    report = sidecar["report"]
    return {
        "n_samples": sidecar["n_samples"],
        "n_tokens": sidecar["n_tokens"],
        "n_trainable_tokens": sidecar["n_trainable_tokens"],
        "n_bad": report["n_bad"],
        "n_dropped": sum(report["dropped"].values()),
    }
