"""pretokenize_sft_data (``data_preprocess.pretok_sft``): the files it writes, pretokenized items equal
to on-the-fly items, idempotence and rebuilds, flag errors and the flag list."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

import numpy as np
import pytest

from data_preprocess.pretok_sft import PretokenizeSFTConfig
from data_preprocess.pretokenize_sft_data import main as cli_main
from tests.data.conftest import assert_same_sft_items, write_small_sft_source
from z2all.data.sft_dataset import SFTDataset
from z2all.data.sft_shards import ids_dtype, sft_paths


def pretokenize_main(argv: list[str]) -> list[dict]:
    """The CLI in this process; it prints one JSON summary per source on stdout (logs go to stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


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
        assert_same_sft_items(fly, pre)


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


def test_idempotent_and_rebuilt_when_the_source_changes(tiny_tokenizer_dir, tmp_path):
    source = write_small_sft_source(tmp_path)
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


def test_cli_rejects_bad_flags(tiny_tokenizer_dir, tmp_path, capsys):
    """Each bad flag: status 2 and ``pretokenize_sft_data: error: <message naming the flag>``."""
    source = write_small_sft_source(tmp_path)
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
    assert [f.name for f in dataclasses.fields(PretokenizeSFTConfig)] == [
        "data_dir",
        "tokenizer_dir",
        "max_seq_len",
        "save_dir",
        "sft_type",
        "force",
    ]
