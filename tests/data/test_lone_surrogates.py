"""A lone surrogate ("\\ud800" is valid JSON) in one record is a counted bad record, never a crash:
SFT (both families), DPO (every layout), pretokenize_sft and the pretraining pretokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize
from data_preprocess.pretok_sft import PretokenizeSFTConfig, pretokenize_sft
from z2all.data import readers
from z2all.data.dpo_dataset import DPODataset
from z2all.data.pretrain_dataset import read_sidecar
from z2all.data.sft_dataset import SFTDataset

LONE = "bad \ud800 text"  # json.dumps writes it as the escape "\ud800": valid JSON, not encodable UTF-8


def _jsonl(path, records):
    # ensure_ascii=True (the default) keeps the surrogate as a JSON escape, as real broken dumps do
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD_CONV = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_sft_conversation_and_instruction_skip_and_count(tiny_tokenizer, tmp_path):
    conv = _jsonl(
        tmp_path / "c.jsonl",
        [GOOD_CONV, [{"role": "user", "content": "q"}, {"role": "assistant", "content": LONE}], GOOD_CONV],
    )
    ds = SFTDataset(conv, tiny_tokenizer, max_seq_len=64)
    report = ds.reports[0]
    assert len(ds) == 2 and report["n_records"] == 3 and report["n_bad"] == 1
    assert report["bad_examples"] == [
        f"{conv}:line 2: message 1 (assistant) content is not valid UTF-8 "
        "(surrogates not allowed at position 4)"
    ]
    alpaca = _jsonl(
        tmp_path / "i.jsonl",
        [{"instruction": "i", "output": "o"}, {"instruction": LONE, "output": "o"}, {"instruction": "i",
         "input": LONE, "output": "o"}, {"instruction": "i", "output": "o", "system": LONE}],
    )  # fmt: skip
    ds = SFTDataset(alpaca, tiny_tokenizer, max_seq_len=64, sft_type="instruction")
    assert len(ds) == 1 and ds.reports[0]["n_bad"] == 3
    assert [e.split(": ")[0] for e in ds.reports[0]["bad_examples"]] == [
        f"{alpaca}:line {n}" for n in (2, 3, 4)
    ]


def test_dpo_every_layout_skips_and_counts(tiny_tokenizer, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            good,  # 1
            {"prompt": LONE, "chosen": "a", "rejected": "b"},  # 2
            {"prompt": "q", "chosen": LONE, "rejected": "b"},  # 3
            {"question": "q", "response_chosen": "a", "response_rejected": LONE},  # 4
            {"prompt": "q", "answer": ["a", LONE]},  # 5
            {"prompt": "q", "answer": [LONE, "b"]},  # 6
            {"prompt": "q", "chosen": "a", "rejected": "b", "system": LONE},  # 7
            {"prompt": "q", "chosen": "a", "rejected": "b", "history": [["u", LONE]]},  # 8
            good,  # 9
        ],
    )
    ds = DPODataset(path, tiny_tokenizer, max_seq_len=64)
    report = ds.reports[0]
    assert len(ds) == 2 and report["n_records"] == 9 and report["n_bad"] == 7
    assert all("is not valid UTF-8" in e for e in report["bad_examples"])
    assert report["bad_examples"][0].startswith(f"{path}:line 2: 'prompt' is not valid UTF-8")


def test_pretokenize_sft_counts_the_record(tiny_tokenizer_dir, tmp_path):
    (tmp_path / "src").mkdir()
    src = _jsonl(
        tmp_path / "src" / "c.jsonl",
        [GOOD_CONV, [{"role": "user", "content": LONE}, {"role": "assistant", "content": "a"}]],
    )
    out = tmp_path / "out"
    (summary,) = pretokenize_sft(
        PretokenizeSFTConfig(
            data_dir=str(src), tokenizer_dir=str(tiny_tokenizer_dir), max_seq_len=64, save_dir=str(out)
        )
    )
    assert summary["status"] == "built" and summary["n_samples"] == 1 and summary["n_bad"] == 1


def test_pretrain_pretokenize_counts_invalid_utf8(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "a.jsonl", [{"text": "ok one"}, {"text": LONE}, {"text": "ok two"}])
    (data / "b.json").write_text(
        json.dumps([{"text": "ok one"}, {"text": LONE}, {"text": "ok two"}]), "utf-8"
    )
    out = tmp_path / "bin"
    pretokenize(
        PretokenizeConfig(
            data_dir=str(data), tokenizer_dir=str(tiny_tokenizer_dir), save_dir=str(out), num_workers=1
        )
    )
    eos = tiny_tokenizer.eos_id
    expected = tiny_tokenizer.encode("ok one") + [eos] + tiny_tokenizer.encode("ok two") + [eos]
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.fromfile(out / f"{name}.bin", dtype=np.uint16), expected)
        bad = read_sidecar(out / f"{name}.bin")["bad_records"]
        assert bad["bad"] == {"invalid_utf8": 1} and bad["good"] == 2


@pytest.mark.parametrize("block", [5, 7, 13, 1 << 20])
def test_json_array_scan_finds_only_lone_escapes_across_block_edges(tmp_path, monkeypatch, block):
    """ijson's C backend turns a lone escape into "?": the scan must route such files to the exact parser."""
    monkeypatch.setattr(readers, "_SCAN_BLOCK", block)
    paired = json.dumps([{"text": "emoji 😀 and 𝄞 " * 3}])  # ensure_ascii: surrogate *pairs* only
    lone_high = json.dumps([{"text": "ok 😀"}, {"text": "x\ud800"}, {"text": "y"}])
    lone_low = json.dumps([{"text": "ok"}, {"text": "\udc00x 😀"}])
    for name, text, expect in [("p", paired, False), ("h", lone_high, True), ("l", lone_low, True)]:
        path = tmp_path / f"{name}.json"
        path.write_text(text, "ascii")
        with open(path, "rb") as f:
            assert readers._has_lone_surrogate_escape(f) is expect, name
            assert f.tell() == 0
    stats = readers.ReadStats()
    assert list(readers.iter_documents(tmp_path / "h.json", stats=stats)) == ["ok 😀", "y"]
    assert stats.bad == {"invalid_utf8": 1} and stats.examples[0].endswith(
        "h.json:item 1: invalid_utf8 (surrogates not allowed)"
    )
    assert list(readers.iter_documents(tmp_path / "p.json")) == ["emoji 😀 and 𝄞 " * 3]
