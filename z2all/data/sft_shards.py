"""On-disk format of a tokenized SFT source: ids, a parallel label mask, an offsets index, a sidecar.

For a source file ``chat.jsonl`` the four files are (``D`` is the data folder or the cache/save dir)::

    D/chat.jsonl.sft.bin    token ids, uint16 when vocab_size <= 65536 else uint32    (n_tokens,)
    D/chat.jsonl.sft.mask   uint8, 1 where the token is trainable (label = id), else 0  (n_tokens,)
    D/chat.jsonl.sft.idx    int64 offsets: sample i is tokens [idx[i], idx[i+1])      (n_samples + 1,)
    D/chat.jsonl.sft.json   sidecar: the cache key, counts, drop report, the byte size of the three files

Invariants:

* Each file is written atomically (temp + fsync + rename); a rewrite deletes the old sidecar FIRST and
  writes the new one LAST, so a sidecar that exists and whose recorded sizes match the three files
  describes a complete, consistent set, even after a crash in the middle of a rewrite.
* The sidecar's ``key`` (format version, tokenizer fingerprint, source size + mtime, max_seq_len,
  sft_type) says which inputs produced the ids; a set whose key differs from the caller's is stale and
  is never used (it is rebuilt or ignored).
* Reading memory-maps the files, so an item costs O(its length) memory, whatever the file size.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z2all.atomic import atomic_open, atomic_write_json, fsync_dir
from z2all.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Part of the cache key: bump it whenever rendering (chat.py), truncation or this layout changes.
FORMAT_VERSION = 1
_SUFFIXES = {"bin": ".sft.bin", "mask": ".sft.mask", "idx": ".sft.idx"}
SIDECAR_SUFFIX = ".sft.json"


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sft_paths(source: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the bin/mask/idx/sidecar files of ``source`` in ``out_dir`` (default: beside it)."""
    source = Path(source)
    base = Path(out_dir) if out_dir is not None else source.parent
    paths = {kind: base / (source.name + suffix) for kind, suffix in _SUFFIXES.items()}
    paths["sidecar"] = base / (source.name + SIDECAR_SUFFIX)
    return paths


def cache_key(source: str | os.PathLike, fingerprint: str, max_seq_len: int, sft_type: str) -> dict:
    """Everything the tokenized ids depend on; a stored set is valid only under an equal key."""
    st = os.stat(source)
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": fingerprint,
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "max_seq_len": int(max_seq_len),
        "sft_type": sft_type,
    }


@dataclass
class SFTShard:
    """The tokenized samples of one source: flat ids + mask, cut into samples by ``offsets``."""

    ids: np.ndarray  # (n_tokens,) uint16/uint32, in memory or memory-mapped
    mask: np.ndarray  # (n_tokens,) uint8, 1 = trainable
    offsets: np.ndarray  # (n_samples + 1,) int64, offsets[0] == 0, offsets[-1] == n_tokens
    mapped_from: dict[str, str] | None = None  # bin/mask/idx paths + ids_dtype when memory-mapped

    def __post_init__(self):
        if len(self.ids) != len(self.mask) or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError(
                f"inconsistent SFT shard: {len(self.ids)} ids, {len(self.mask)} mask bytes, "
                f"offsets {int(self.offsets[0])}..{int(self.offsets[-1])}"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    # A memory-mapped shard pickles as its file names (a DataLoader worker started with "spawn"
    # re-maps the files instead of receiving a copy of every token).
    def __getstate__(self) -> dict:
        if self.mapped_from is not None:
            return {"mapped_from": self.mapped_from}
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        if set(state) == {"mapped_from"}:
            state = _mapped_arrays(state["mapped_from"])
        self.__dict__.update(state)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, int64 of length T; labels are ``IGNORE_INDEX`` where the mask is 0."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        input_ids = torch.from_numpy(np.asarray(self.ids[lo:hi], dtype=np.int64))  # (T,)
        keep = torch.from_numpy(np.asarray(self.mask[lo:hi], dtype=np.bool_))  # (T,)
        labels = torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))  # (T,)
        return input_ids, labels


def save_shard(shard: SFTShard, paths: dict[str, Path], key: dict, vocab_size: int, report: dict) -> None:
    """Write the three arrays, then the sidecar (the commit point); each atomically.

    The old sidecar is removed (and the removal made durable) BEFORE any array is replaced: a crash
    between two array renames must leave no sidecar next to a mix of old and new arrays (the sizes
    alone could still agree, e.g. after an edit that keeps every token count).
    """
    paths["sidecar"].unlink(missing_ok=True)
    fsync_dir(paths["sidecar"].parent)
    arrays = {
        "bin": np.ascontiguousarray(shard.ids, dtype=ids_dtype(vocab_size)),
        "mask": np.ascontiguousarray(shard.mask, dtype=np.uint8),
        "idx": np.ascontiguousarray(shard.offsets, dtype=np.int64),
    }
    for kind, arr in arrays.items():
        with atomic_open(paths[kind], "wb") as f:
            f.write(arr.tobytes())
    sidecar = {
        "key": key,
        "vocab_size": int(vocab_size),
        "ids_dtype": arrays["bin"].dtype.name,
        "n_samples": len(shard),
        "n_tokens": int(len(shard.ids)),
        "n_trainable_tokens": int(arrays["mask"].sum(dtype=np.int64)),
        "report": report,
        "file_bytes": {kind: int(arr.nbytes) for kind, arr in arrays.items()},
    }
    atomic_write_json(paths["sidecar"], sidecar)


def read_sidecar(paths: dict[str, Path]) -> dict | None:
    """The sidecar if present and its three files have the recorded sizes, else None (with the reason)."""
    if not paths["sidecar"].is_file():
        return None
    try:
        sidecar = json.loads(paths["sidecar"].read_text(encoding="utf-8"))
        sizes = sidecar["file_bytes"]
        for kind in _SUFFIXES:
            actual = paths[kind].stat().st_size if paths[kind].is_file() else None
            if actual != sizes[kind]:
                logger.warning(
                    "%s: %s is %s bytes, sidecar says %s; ignoring",
                    paths["sidecar"],
                    kind,
                    actual,
                    sizes[kind],
                )
                return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: unreadable sidecar (%s); ignoring", paths["sidecar"], e)
        return None
    return sidecar


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty array is what an empty file holds.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_shard(paths: dict[str, Path], key: dict) -> tuple[SFTShard, dict] | None:
    """Memory-map a stored set if it is complete and was built under ``key``; else None."""
    sidecar = read_sidecar(paths)
    if sidecar is None:
        return None
    if sidecar.get("key") != key:
        diff = sorted(k for k in key if sidecar.get("key", {}).get(k) != key[k])
        logger.info("%s: stale (differs in %s); not used", paths["sidecar"], ", ".join(diff))
        return None
    mapped_from = {kind: str(paths[kind]) for kind in _SUFFIXES} | {"ids_dtype": sidecar["ids_dtype"]}
    return SFTShard(**_mapped_arrays(mapped_from)), sidecar


def _mapped_arrays(mapped_from: dict[str, str]) -> dict:
    return {
        "ids": _map(Path(mapped_from["bin"]), np.dtype(mapped_from["ids_dtype"])),
        "mask": _map(Path(mapped_from["mask"]), np.dtype(np.uint8)),
        "offsets": _map(Path(mapped_from["idx"]), np.dtype(np.int64)),
        "mapped_from": mapped_from,
    }
