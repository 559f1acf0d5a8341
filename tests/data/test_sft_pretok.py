"""Pretokenized SFT data: the CLI's files, pretokenized == on-the-fly items, idempotence, staleness,
the cache_dir path, and refusal of incomplete sets."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from data_preprocess.pretokenize_sft_data import main as cli_main
from z2all.data.sft_dataset import SFTDataset
from z2all.data.sft_pretok import ids_dtype, sft_paths


def pretokenize_main(argv: list[str]) -> list[dict]:
    """The CLI in this process; it prints one JSON summary per source on stdout (logs go to stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def assert_same_items(a: SFTDataset, b: SFTDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        (x1, y1), (x2, y2) = a[i], b[i]
        assert torch.equal(x1, x2) and torch.equal(y1, y2), i
        assert x1.dtype == x2.dtype == torch.long


def flags(data, tok_dir, save_dir, max_seq_len=96, *extra):
    out = [f"--data_dir={data}", f"--tokenizer_dir={tok_dir}", f"--max_seq_len={max_seq_len}", *extra]
    return out + ([f"--save_dir={save_dir}"] if save_dir else [])


@pytest.mark.parametrize(
    "layout, sft_type", [("sft_messages", "conversation"), ("sft_instruction", "instruction")]
)
def test_pretokenized_items_equal_on_the_fly_items(
    tiny_tokenizer_dir, text_corpus, tmp_path, layout, sft_type
):
    source = getattr(text_corpus, layout)
    # max_seq_len 96 truncates long dialogues and drops a few (shared: 16 of 2493 conversations; stdlib:
    # none, its prompts are short): both paths must agree on those too.
    (summary,) = pretokenize_main(flags(source, tiny_tokenizer_dir, tmp_path, 96, f"--sft_type={sft_type}"))
    assert summary["status"] == "built" and summary["n_samples"] > 0.95 * text_corpus.n_dialogues
    for split in ("train", "valid"):
        kw = dict(sft_type=sft_type, split=split, valid_ratio=0.05, seed=1)
        fly = SFTDataset(source, tiny_tokenizer_dir, 96, **kw)
        pre = SFTDataset(source, tiny_tokenizer_dir, 96, cache_dir=tmp_path, **kw)
        assert fly.origins == ["tokenized"] and pre.origins == ["pretokenized"]
        assert isinstance(pre.shards[0].ids, np.memmap)  # O(item) memory per read
        assert pre.reports == fly.reports
        assert_same_items(fly, pre)


def test_sidecar_and_files(tiny_tokenizer, tiny_tokenizer_dir, text_corpus, tmp_path):
    source = text_corpus.sft_belle
    pretokenize_main(flags(source, tiny_tokenizer_dir, tmp_path, 4096))
    paths = sft_paths(source, tmp_path)
    side = json.loads(paths["sidecar"].read_text())
    st = os.stat(source)
    assert side["key"] == {
        "format_version": 1,
        "tokenizer_fingerprint": tiny_tokenizer.fingerprint(),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "max_seq_len": 4096,
        "sft_type": "conversation",
    }
    ids = np.fromfile(paths["bin"], dtype=np.uint16)
    mask = np.fromfile(paths["mask"], dtype=np.uint8)
    offsets = np.fromfile(paths["idx"], dtype=np.int64)
    assert side["n_samples"] == len(offsets) - 1 == text_corpus.n_dialogues and side["report"]["n_bad"] == 0
    assert side["n_tokens"] == len(ids) == len(mask) == offsets[-1] and offsets[0] == 0
    assert side["n_trainable_tokens"] == int(mask.sum()) and set(np.unique(mask).tolist()) == {0, 1}
    # Sample 0, read straight from the files, is "<|im_start|>user\n...": the human turn, then the reply.
    first = ids[offsets[0] : offsets[1]].tolist()
    with open(source, encoding="utf-8") as f:
        conv = json.loads(f.readline())["conversations"]
    assert tiny_tokenizer.decode(first) == (
        f"<|im_start|>user\n{conv[0]['value']}<|im_end|>\n<|im_start|>assistant\n{conv[1]['value']}<|im_end|>\n"
    )
    assert (
        tiny_tokenizer.decode([t for t, m in zip(first, mask[: len(first)]) if m])
        == conv[1]["value"] + "<|im_end|>"
    )
    assert ids_dtype(65536) == np.uint16 and ids_dtype(65537) == np.uint32


def small_source(tmp_path, n=12):
    records = [
        [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(n)
    ]
    path = tmp_path / "data" / "small.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_idempotent_and_rebuilt_when_the_source_changes(tiny_tokenizer_dir, tmp_path):
    source = small_source(tmp_path)
    # Default save_dir: beside the source, where SFTDataset finds it without cache_dir.
    assert [s["status"] for s in pretokenize_main(flags(source.parent, tiny_tokenizer_dir, None, 64))] == [
        "built"
    ]
    paths = sft_paths(source)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert [s["status"] for s in pretokenize_main(flags(source.parent, tiny_tokenizer_dir, None, 64))] == [
        "up_to_date"
    ]
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps  # nothing rewritten
    ds = SFTDataset(source.parent, tiny_tokenizer_dir, 64)
    assert ds.origins == ["pretokenized"] and len(ds) == 12
    # The folder listing skips the sidecars: only small.jsonl is a source.
    assert [p.name for p in ds.sources] == ["small.jsonl"]

    # Another max_seq_len: the stored set is stale for that dataset, which tokenizes instead.
    assert SFTDataset(source, tiny_tokenizer_dir, 32).origins == ["tokenized"]
    # The source grows: stale again, and the tool rebuilds it.
    with open(source, "a", encoding="utf-8") as f:
        f.write(
            json.dumps([{"role": "user", "content": "new"}, {"role": "assistant", "content": "one"}]) + "\n"
        )
    assert SFTDataset(source, tiny_tokenizer_dir, 64).origins == ["tokenized"]
    assert [s["status"] for s in pretokenize_main(flags(source, tiny_tokenizer_dir, None, 64))] == ["built"]
    ds = SFTDataset(source, tiny_tokenizer_dir, 64)
    assert ds.origins == ["pretokenized"] and len(ds) == 13
    assert [
        s["status"] for s in pretokenize_main(flags(source, tiny_tokenizer_dir, None, 64, "--force=true"))
    ] == ["built"]


def test_cache_dir_is_written_then_reused(tiny_tokenizer_dir, tmp_path):
    source = small_source(tmp_path)
    cache = tmp_path / "cache"
    first = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert first.origins == ["tokenized"] and sft_paths(source, cache)["sidecar"].is_file()
    second = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert second.origins == ["pretokenized"]
    assert_same_items(first, second)
    # Pickling (DataLoader workers under "spawn") re-maps the files rather than copying the tokens.
    blob = pickle.dumps(second)
    assert second.shards[0].__getstate__().keys() == {"mapped_from"}
    assert second.shards[0].ids.tobytes() not in blob
    clone = pickle.loads(blob)
    assert isinstance(clone.shards[0].ids, np.memmap)
    assert_same_items(second, clone)
    assert_same_items(first, pickle.loads(pickle.dumps(first)))  # in-memory shards pickle whole


def test_incomplete_or_corrupt_sets_are_not_used(tiny_tokenizer_dir, tmp_path, z2all_log):
    source = small_source(tmp_path)
    cache = tmp_path / "cache"
    reference = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    paths = sft_paths(source, cache)
    # A bin file cut short (e.g. a copy interrupted): sizes disagree with the sidecar -> rebuilt.
    paths["bin"].write_bytes(paths["bin"].read_bytes()[:-2])
    ds = SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache)
    assert ds.origins == ["tokenized"] and "sidecar says" in z2all_log.text
    assert_same_items(reference, ds)
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["pretokenized"]
    # No sidecar (the commit point) -> the arrays alone are never trusted.
    paths["sidecar"].unlink()
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["tokenized"]
    paths["sidecar"].write_text("{not json")
    assert SFTDataset(source, tiny_tokenizer_dir, 64, cache_dir=cache).origins == ["tokenized"]


def test_cli_rejects_bad_flags(tiny_tokenizer_dir, tmp_path, capsys):
    """Each bad flag: status 2 and ``pretokenize_sft_data: error: <message naming the flag>``."""
    source = small_source(tmp_path)
    cases = [
        (flags(source, tiny_tokenizer_dir, tmp_path, 64, "--sft_type=chat"), "--sft_type must be one of"),
        (flags(tmp_path / "nope", tiny_tokenizer_dir, tmp_path, 64), "--data_dir="),
        (flags(source, tmp_path / "nope", tmp_path, 64), "--tokenizer_dir="),
        (flags(source, tiny_tokenizer_dir, tmp_path, 64, "--unknown_flag=1"), "unrecognized arguments"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "pretokenize_sft_data: error: " in err and message in err, err


def test_cli_flags_snapshot():
    """Renaming a flag breaks users' scripts: make it a conscious change by updating this list."""
    import dataclasses

    from z2all.data.sft_pretokenize import PretokenizeSFTConfig

    assert [f.name for f in dataclasses.fields(PretokenizeSFTConfig)] == [
        "data_dir",
        "tokenizer_dir",
        "max_seq_len",
        "save_dir",
        "sft_type",
        "force",
    ]


def test_crash_between_array_files_never_leaves_the_old_sidecar(tmp_path, monkeypatch):
    """A rewrite that dies after replacing .sft.bin but before .sft.mask leaves no sidecar at all, even
    when the new arrays have the old sizes (so a size check alone could not tell the mix apart)."""
    from z2all.data import sft_pretok

    paths = sft_paths(tmp_path / "chat.jsonl")
    old = sft_pretok.SFTShard(
        np.array([5, 6, 7, 8], dtype=np.uint16),
        np.array([0, 1, 0, 1], np.uint8),
        np.array([0, 2, 4], np.int64),
    )
    sft_pretok.save_shard(old, paths, {"k": 1}, 1000, {})
    assert sft_pretok.read_sidecar(paths) is not None
    new = sft_pretok.SFTShard(old.ids + 10, 1 - old.mask, old.offsets.copy())  # same sizes, other content
    real_open, opened = sft_pretok.atomic_open, []

    def crash_on_mask(path, *args, **kwargs):
        opened.append(path)
        if path == paths["mask"]:
            raise KeyboardInterrupt("simulated crash between files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sft_pretok, "atomic_open", crash_on_mask)
    with pytest.raises(KeyboardInterrupt):
        sft_pretok.save_shard(new, paths, {"k": 2}, 1000, {})
    assert opened == [paths["bin"], paths["mask"]]
    assert np.array_equal(np.fromfile(paths["bin"], np.uint16), new.ids)  # the mix exists on disk ...
    assert not paths["sidecar"].exists() and sft_pretok.read_sidecar(paths) is None  # ... and is not used
