"""Tokenize one SFT source into an :class:`~z2all.data.sft_shards.SFTShard`, with a drop report.

Pipeline per record: shared reader (JSON, line numbers) -> :mod:`z2all.data.sft_formats` (messages)
-> :func:`z2all.data.chat.render_chats` (ids + trainable mask, one ``encode_batch`` per chunk)
-> truncation.

Truncation keeps the first ``max_seq_len`` tokens (the dialogue's start, where the context is). A
sample must keep at least one trainable token, otherwise it would add a 0/0 term to the loss: samples
with no assistant turn (``no_assistant``) and samples whose every trainable token lies past
``max_seq_len`` (``replies_past_max_seq_len``) are dropped, counted, and the first few named.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from z2all.data.chat import render_chats
from z2all.data.sft_formats import record_to_messages
from z2all.data.sft_records import BuildReport, iter_parsed_chunks
from z2all.data.sft_shards import SFTShard, ids_dtype


def truncate_sample(
    ids: list[int], trainable: list[bool], max_seq_len: int
) -> tuple[list[int], list[bool], str]:
    """Keep the first ``max_seq_len`` tokens; status is ``ok``, ``truncated`` or a drop reason."""
    if not any(trainable):
        return ids, trainable, "no_assistant"
    if len(ids) <= max_seq_len:
        return ids, trainable, "ok"
    ids, trainable = ids[:max_seq_len], trainable[:max_seq_len]
    return ids, trainable, ("truncated" if any(trainable) else "replies_past_max_seq_len")


def build_shard(
    path: str | os.PathLike, tok: Any, max_seq_len: int, sft_type: str
) -> tuple[SFTShard, BuildReport]:
    """Tokenize every good record of ``path``; returns the in-memory shard and its report."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    report = BuildReport(source=str(path))
    dtype = ids_dtype(tok.vocab_size)
    id_chunks: list[np.ndarray] = []
    mask_chunks: list[np.ndarray] = []
    lengths: list[int] = []

    def flush(chunk: list[tuple[list, str]]) -> None:
        rendered = render_chats(tok, [m for m, _ in chunk], wheres=[w for _, w in chunk])
        for (ids, trainable), (_, where) in zip(rendered, chunk):
            ids, trainable, status = truncate_sample(ids, trainable, max_seq_len)
            if status not in ("ok", "truncated"):
                report.add_dropped(where, status)
                continue
            report.n_truncated += status == "truncated"
            id_chunks.append(np.asarray(ids, dtype=dtype))
            mask_chunks.append(np.asarray(trainable, dtype=np.uint8))
            lengths.append(len(ids))

    parse = lambda record, where: record_to_messages(record, sft_type, where)
    for chunk in iter_parsed_chunks(path, parse, report):
        flush(chunk)
    report.n_samples = len(lengths)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (n_samples + 1,)
    np.cumsum(lengths, out=offsets[1:])
    shard = SFTShard(
        ids=np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=dtype),
        mask=np.concatenate(mask_chunks) if mask_chunks else np.zeros(0, dtype=np.uint8),
        offsets=offsets,
    )
    return shard, report
