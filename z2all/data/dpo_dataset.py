"""DPO dataset: a prompt rendered with ChatML, then a chosen and a rejected assistant continuation.

For each pair (layouts in :mod:`z2all.data.dpo_formats`)::

    prompt   = render_chat([system?, history..., question], add_generation_prompt=True)   all -100
    chosen   = prompt + encode(chosen_text)   + [<|im_end|>]      labels: -100 on prompt, ids after
    rejected = prompt + encode(rejected_text) + [<|im_end|>]

The ids of ``prompt + response`` equal those :func:`~z2all.data.chat.render_chat` gives the full
dialogue (without its final ``"\\n"``), so DPO scores exactly what SFT taught and the sampler emits.

Truncation to ``max_seq_len`` (L) keeps both sides on the same prompt, as the DPO objective assumes:
the prompt keeps its last ``min(P, max(L - R, L // 2))`` tokens (R = the longer response), i.e. it
gives up its start first but keeps at least half the window if it needs it; then each response is
cut to the room left, ``>= L - L // 2 >= 1`` tokens. So no side ever lacks a labelled token. A pair
whose two responses are identical (``identical_responses``) or become so when cut
(``identical_after_truncation``) has no preference to learn: it is dropped, counted and named.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from z2all.data.chat import render_chats
from z2all.data.dpo_formats import dpo_record_to_parts
from z2all.data.sft_dataset import as_tokenizer, list_sources, split_indices
from z2all.data.sft_records import BUILD_MEMO, BuildReport, iter_parsed_chunks
from z2all.data.sft_shards import ids_dtype
from z2all.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_seq_len: int
) -> tuple[list[int], list[int], list[int], bool]:
    """Fit ``prompt + response`` into ``max_seq_len`` for both responses; returns the pieces + truncated?"""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(max_seq_len - longest, max_seq_len // 2))
    room = max_seq_len - keep  # >= max_seq_len - max_seq_len // 2 >= 1
    return prompt[len(prompt) - keep :], chosen[:room], rejected[:room], True


def build_pairs(
    source: os.PathLike, tok: Any, max_seq_len: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], BuildReport]:
    """Tokenize the pairs of one source: ``(prompts, chosen, rejected, report)``, arrays per kept pair."""
    dtype = ids_dtype(tok.vocab_size)
    report = BuildReport(source=str(source))
    prompts: list[np.ndarray] = []
    chosens: list[np.ndarray] = []
    rejecteds: list[np.ndarray] = []

    def flush(chunk: list[tuple[tuple[list, str, str], str]]) -> None:
        rendered = render_chats(
            tok, [p[0] for p, _ in chunk], add_generation_prompt=True, wheres=[w for _, w in chunk]
        )
        responses = tok.encode_batch([text for p, _ in chunk for text in (p[1], p[2])])
        for k, ((prompt, _), (_, where)) in enumerate(zip(rendered, chunk)):
            chosen = [*responses[2 * k], tok.im_end_id]
            rejected = [*responses[2 * k + 1], tok.im_end_id]
            if chosen == rejected:
                report.add_dropped(where, "identical_responses")
                continue
            prompt, chosen, rejected, truncated = truncate_pair(prompt, chosen, rejected, max_seq_len)
            if chosen == rejected:
                report.add_dropped(where, "identical_after_truncation")
                continue
            report.n_truncated += truncated
            prompts.append(np.asarray(prompt, dtype=dtype))
            chosens.append(np.asarray(chosen, dtype=dtype))
            rejecteds.append(np.asarray(rejected, dtype=dtype))

    for chunk in iter_parsed_chunks(source, dpo_record_to_parts, report):
        flush(chunk)
    report.n_samples = len(prompts)
    return prompts, chosens, rejecteds, report


class DPODataset(Dataset):
    """Preference pairs; ``ds[i]`` is a dict of int64 (T,) tensors, see :data:`ITEM_KEYS`.

    ``chosen_*`` and ``rejected_*`` may differ in length; :func:`dpo_collate` pads both to one T.
    """

    ITEM_KEYS = tuple(f"{side}_{k}" for side in SIDES for k in ("input_ids", "labels", "attention_mask"))

    def __init__(
        self,
        data_path_or_dir: str | os.PathLike,
        tokenizer: Any,
        max_seq_len: int,
        *,
        split: str = "train",
        valid_ratio: float = 0.0,
        seed: int = 0,
    ):
        if max_seq_len < 2:
            raise ValueError(
                f"max_seq_len must be >= 2 (a prompt token and a response token), got {max_seq_len}"
            )
        tok = as_tokenizer(tokenizer)
        self.max_seq_len = int(max_seq_len)
        self.sources = list_sources(data_path_or_dir)
        # One entry per kept pair: the three pieces as compact arrays (prompt shared by both sides).
        self._prompts: list[np.ndarray] = []
        self._chosen: list[np.ndarray] = []
        self._rejected: list[np.ndarray] = []
        self.reports: list[dict] = []  # per source, BuildReport.to_dict()
        for source in self.sources:
            key = {"tokenizer_fingerprint": tok.fingerprint(), "max_seq_len": self.max_seq_len}
            st = os.stat(source)
            key |= {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
            memo_key = BUILD_MEMO.make_key("dpo", source, key)
            built = BUILD_MEMO.get(memo_key)
            if built is None:
                built = build_pairs(source, tok, self.max_seq_len)
                built[-1].log_summary()
                nbytes = sum(a.nbytes for part in built[:3] for a in part)
                BUILD_MEMO.put(memo_key, built, nbytes)
            prompts, chosen, rejected, report = built
            self._prompts += prompts
            self._chosen += chosen
            self._rejected += rejected
            self.reports.append(report.to_dict())
        if not self._prompts:
            raise ValueError(f"{data_path_or_dir}: no usable DPO pairs (reports: {self.reports})")
        self.indices = split_indices(len(self._prompts), split, valid_ratio, seed)

    @property
    def n_dropped(self) -> int:
        return sum(sum(r["dropped"].values()) for r in self.reports)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = int(self.indices[i])
        prompt = torch.from_numpy(self._prompts[g].astype(np.int64))  # (P,)
        masked = torch.full_like(prompt, IGNORE_INDEX)  # (P,)
        item = {}
        for side, response in (("chosen", self._chosen[g]), ("rejected", self._rejected[g])):
            resp = torch.from_numpy(response.astype(np.int64))  # (R,)
            item[f"{side}_input_ids"] = torch.cat([prompt, resp])  # (P + R,)
            item[f"{side}_labels"] = torch.cat([masked, resp])  # (P + R,)
            item[f"{side}_attention_mask"] = torch.ones(len(prompt) + len(resp), dtype=torch.long)
        return item


def dpo_collate(
    batch: list[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected to ONE common length T; returns (B, T) int64 tensors.

    One T for both sides lets a trainer run ``cat([chosen, rejected])`` in a single forward. Padding
    holds ``pad_id`` in input_ids, -100 in labels and 0 in attention_mask.
    """
    if not batch:
        raise ValueError("dpo_collate got an empty batch")
    T = max(len(item[f"{side}_input_ids"]) for item in batch for side in SIDES)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(batch)
    out = {}
    for side in SIDES:
        for key, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            padded = torch.full((B, T), fill, dtype=torch.long)  # (B, T)
            for b, item in enumerate(batch):
                value = item[f"{side}_{key}"]
                padded[b, : len(value)] = value
            out[f"{side}_{key}"] = padded
    return out
