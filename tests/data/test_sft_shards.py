"""The on-disk format of tokenized SFT shards (``z2all.data.sft_shards``): reuse from ``cache_dir``,
pickling as file names, refusal of incomplete or corrupt sets, and the sidecar as commit point."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.data.conftest import assert_same_sft_items, write_small_sft_source
from z2all.data import sft_shards
from z2all.data.sft_dataset import SFTDataset
from z2all.data.sft_shards import sft_paths


def test_cache_dir_is_written_then_reused(tiny_tokenizer_dir, tmp_path):
    source = write_small_sft_source(tmp_path)
    cache = tmp_path / "cache"
    first = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert first.origins == ["tokenized"] and sft_paths(source, cache)["sidecar"].is_file()
    second = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert second.origins == ["pretokenized"]
    assert_same_sft_items(first, second)
    # Pickling (DataLoader workers under "spawn") re-maps the files rather than copying the tokens.
    blob = pickle.dumps(second)
    assert second.shards[0].__getstate__().keys() == {"mapped_from"}
    assert second.shards[0].ids.tobytes() not in blob
    clone = pickle.loads(blob)
    assert isinstance(clone.shards[0].ids, np.memmap)
    assert_same_sft_items(second, clone)
    assert_same_sft_items(first, pickle.loads(pickle.dumps(first)))  # in-memory shards pickle whole


def test_incomplete_or_corrupt_sets_are_not_used(tiny_tokenizer_dir, tmp_path, z2all_log):
    source = write_small_sft_source(tmp_path)
    cache = tmp_path / "cache"
    reference = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    paths = sft_paths(source, cache)
    # A bin file cut short (e.g. a copy interrupted): sizes disagree with the sidecar -> rebuilt.
    paths["bin"].write_bytes(paths["bin"].read_bytes()[:-2])
    ds = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert ds.origins == ["tokenized"] and "sidecar says" in z2all_log.text
    assert_same_sft_items(reference, ds)
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["pretokenized"]
    # No sidecar (the commit point) -> the arrays alone are never trusted.
    paths["sidecar"].unlink()
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["tokenized"]
    paths["sidecar"].write_text("{not json")
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["tokenized"]


def test_crash_between_array_files_never_leaves_the_old_sidecar(tmp_path, monkeypatch):
    """A rewrite that dies after replacing .sft.bin but before .sft.mask leaves no sidecar at all, even
    when the new arrays have the old sizes (so a size check alone could not tell the mix apart)."""
    paths = sft_paths(tmp_path / "chat.jsonl")
    old = sft_shards.SFTShard(
        np.array([5, 6, 7, 8], dtype=np.uint16),
        np.array([0, 1, 0, 1], np.uint8),
        np.array([0, 2, 4], np.int64),
    )
    sft_shards.save_shard(old, paths, {"k": 1}, 1000, {})
    assert sft_shards.read_sidecar(paths) is not None
    new = sft_shards.SFTShard(old.ids + 10, 1 - old.mask, old.offsets.copy())  # same sizes, other content
    real_open, opened = sft_shards.atomic_open, []

    def crash_on_mask(path, *args, **kwargs):
        opened.append(path)
        if path == paths["mask"]:
            raise KeyboardInterrupt("simulated crash between files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sft_shards, "atomic_open", crash_on_mask)
    with pytest.raises(KeyboardInterrupt):
        sft_shards.save_shard(new, paths, {"k": 2}, 1000, {})
    assert opened == [paths["bin"], paths["mask"]]
    assert np.array_equal(np.fromfile(paths["bin"], np.uint16), new.ids)  # the mix exists on disk ...
    assert not paths["sidecar"].exists() and sft_shards.read_sidecar(paths) is None  # ... and is not used
