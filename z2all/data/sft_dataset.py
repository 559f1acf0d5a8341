"""SFT dataset: ``(input_ids, labels)`` of variable length, labels -100 outside assistant replies.

``SFTDataset(path_or_dir, tokenizer, max_seq_len)`` reads every .jsonl/.json/.parquet source (sorted),
in the format ``sft_type`` names (see :mod:`z2all.data.sft_formats`). Per source it uses, in order:

1. a pretokenized set (``python -m data_preprocess.pretokenize_sft_data``) in ``cache_dir`` or beside
   the source, if its key (tokenizer fingerprint, source size + mtime, max_seq_len, sft_type) matches:
   memory-mapped, O(item) memory per item;
2. otherwise it tokenizes the source now, in one batched pass, and keeps the compact arrays in memory
   (shared through an in-process LRU, so the valid split reuses the train split's work); with
   ``cache_dir`` set it also writes them there (atomically) so the next run memory-maps them.

The source is tokenized up front rather than item by item because dropping is part of the sample
set: a dialogue whose replies all fall past ``max_seq_len`` is no sample, so ``len()`` and the
train/valid split are only known after tokenizing. Both paths produce identical items (tested).

Labels align with ``input_ids`` positions (``labels[t] = input_ids[t]`` on trainable tokens); the
model shifts them. See ``docs/sft_dpo_data.md`` for the picture.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from z2all.data.readers import list_data_files
from z2all.data.sft_build import build_shard
from z2all.data.sft_formats import SFT_TYPES
from z2all.data.sft_records import BUILD_MEMO
from z2all.data.sft_shards import (
    SIDECAR_SUFFIX,
    SFTShard,
    cache_key,
    load_shard,
    save_shard,
    sft_paths,
)
from z2all.labels import IGNORE_INDEX
from z2all.tokenizer import Z2allTokenizer

logger = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLITS = ("train", "valid", "all")


def as_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, loading ``Z2allTokenizer`` when given its directory."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return Z2allTokenizer.from_pretrained(tokenizer)
    return tokenizer


def list_sources(path_or_dir: str | os.PathLike) -> list[Path]:
    """The .jsonl/.json/.parquet files under a folder (recursive, sorted, sidecars skipped), or the file."""
    path = Path(path_or_dir)
    if path.is_file():
        if path.suffix not in SOURCE_SUFFIXES:
            raise ValueError(f"{path}: unsupported SFT/DPO file type {path.suffix!r} (use {SOURCE_SUFFIXES})")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data path {path} does not exist")
    sources = [
        p
        for p in list_data_files(path)
        if p.suffix in SOURCE_SUFFIXES and not p.name.endswith(SIDECAR_SUFFIX)
    ]
    if not sources:
        raise FileNotFoundError(f"no {'/'.join(SOURCE_SUFFIXES)} files under {path}")
    return sources


def split_indices(n: int, split: str, valid_ratio: float, seed: int) -> np.ndarray:
    """Sorted sample indices of ``split``: a seeded permutation's first ``round(n * valid_ratio)`` are valid.

    A pure function of ``(n, valid_ratio, seed)``: every rank and every run agree. When
    ``valid_ratio > 0`` and ``n >= 2`` both splits get at least one sample.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"valid_ratio must be in [0, 1), got {valid_ratio}")
    if split == "all":
        return np.arange(n, dtype=np.int64)
    n_valid = int(round(n * valid_ratio))
    if valid_ratio > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[:n_valid] if split == "valid" else perm[n_valid:]
    return np.sort(chosen).astype(np.int64)


def load_or_build_shard(
    source: Path, tok: Any, max_seq_len: int, sft_type: str, cache_dir: str | os.PathLike | None
) -> tuple[SFTShard, dict, str]:
    """``(shard, report, origin)``; origin is ``"pretokenized"`` (memory-mapped) or ``"tokenized"``."""
    key = cache_key(source, tok.fingerprint(), max_seq_len, sft_type)
    dirs = ([Path(cache_dir)] if cache_dir is not None else []) + [source.parent]
    for d in dirs:
        loaded = load_shard(sft_paths(source, d), key)
        if loaded is not None:
            shard, sidecar = loaded
            logger.info("%s: using pretokenized %s (%d samples)", source, d, len(shard))
            return shard, sidecar["report"], "pretokenized"
    memo_key = BUILD_MEMO.make_key("sft", source, key)
    memo = BUILD_MEMO.get(memo_key)
    if memo is not None:
        shard, report = memo
        logger.info("%s: reusing the tokenization done earlier in this process", source)
    else:
        shard, report = build_shard(source, tok, max_seq_len, sft_type)
        report.log_summary()
        BUILD_MEMO.put(memo_key, (shard, report), shard.ids.nbytes + shard.mask.nbytes + shard.offsets.nbytes)
    if cache_dir is not None:
        save_shard(shard, sft_paths(source, cache_dir), key, tok.vocab_size, report.to_dict())
    return shard, report.to_dict(), "tokenized"


class SFTDataset(Dataset):
    """Variable-length SFT samples; ``ds[i] -> (input_ids, labels)``, int64 tensors of shape (T,), T <= L."""

    def __init__(
        self,
        data_path_or_dir: str | os.PathLike,
        tokenizer: Any,
        max_seq_len: int,
        sft_type: str = "conversation",
        cache_dir: str | os.PathLike | None = None,
        *,
        split: str = "train",
        valid_ratio: float = 0.0,
        seed: int = 0,
    ):
        if sft_type not in SFT_TYPES:
            raise ValueError(f"sft_type must be one of {SFT_TYPES}, got {sft_type!r}")
        tok = as_tokenizer(tokenizer)
        self.max_seq_len = int(max_seq_len)
        self.sources = list_sources(data_path_or_dir)
        self.shards: list[SFTShard] = []
        self.reports: list[dict] = []  # per source, BuildReport.to_dict()
        self.origins: list[str] = []  # per source, "pretokenized" or "tokenized"
        for source in self.sources:
            shard, report, origin = load_or_build_shard(source, tok, self.max_seq_len, sft_type, cache_dir)
            self.shards.append(shard)
            self.reports.append(report)
            self.origins.append(origin)
        # starts[k] = global index of shard k's first sample; starts[-1] = total.
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        total = int(self.starts[-1])
        if total == 0:
            raise ValueError(f"{data_path_or_dir}: no usable SFT samples (reports: {self.reports})")
        self.indices = split_indices(total, split, valid_ratio, seed)

    @property
    def n_dropped(self) -> int:
        """Valid records of all sources that yielded no sample (see ``reports[k]["dropped"]``)."""
        return sum(sum(r["dropped"].values()) for r in self.reports)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = int(self.indices[i])
        k = int(np.searchsorted(self.starts, g, side="right")) - 1
        return self.shards[k].item(g - int(self.starts[k]))


def sft_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item: ``(input_ids, labels, attention_mask)``, each (B, T) int64.

    Padding positions hold ``pad_id`` / -100 / 0, so they neither attend nor count in the loss.
    """
    if not batch:
        raise ValueError("sft_collate got an empty batch")
    T = max(len(ids) for ids, _ in batch)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, (ids, lab) in enumerate(batch):
        if len(ids) != len(lab):
            raise ValueError(f"sft_collate: item {b} has {len(ids)} input_ids but {len(lab)} labels")
        input_ids[b, : len(ids)] = ids
        labels[b, : len(lab)] = lab
        attention_mask[b, : len(ids)] = 1
    return input_ids, labels, attention_mask
