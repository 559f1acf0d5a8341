"""Tokenizer training: the CLI end to end, config validation, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.data.conftest import BUILTIN_TEXTS
from z2all.tokenizer import TokenizerTrainConfig, Z2allTokenizer, train_tokenizer


def test_cli_trains_from_folder_of_mixed_formats(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.jsonl", "w", encoding="utf-8") as f:
        for t in BUILTIN_TEXTS * 5:
            f.write(json.dumps({"content": t}, ensure_ascii=False) + "\n")
        f.write("{broken\n")
    (data / "b.txt").write_text("\n\n".join(BUILTIN_TEXTS * 5), "utf-8")
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "z2all.tokenizer.train_tokenizer", f"--data_dir={data}", f"--save_dir={out}"]
    cmd += ["--vocab_size=400", "--tokenizer_type=hf_bbpe", "--max_chars=100000"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{out}\n"  # the result; the read report is a log line on stderr
    assert "invalid_json=1" in res.stderr and "a.jsonl:line 36" in res.stderr
    tok = Z2allTokenizer.from_pretrained(out)
    assert tok.tokenizer_type == "hf_bbpe" and tok.eos_id == 2
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "z2all_tokenizer.json",
    ):
        assert (out / name).is_file()
    bad = subprocess.run(cmd + ["--no_such_flag=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no_such_flag" in bad.stderr


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="tokenizer_type"):
        TokenizerTrainConfig(tokenizer_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerTrainConfig(vocab_size=200)


def test_sp_vocab_too_small_for_characters_is_a_clear_error(tmp_path):
    texts = ["".join(chr(0x4E00 + i + j) for j in range(50)) for i in range(0, 3000, 50)]
    cfg = TokenizerTrainConfig(
        save_dir=str(tmp_path), vocab_size=400, tokenizer_type="sp_bbpe", num_threads=1
    )
    with pytest.raises(ValueError, match="vocab_size=400 is too small"):
        train_tokenizer(texts, cfg)


def test_sp_long_documents_are_cut_for_training_not_dropped(tmp_path):
    # One 40 KB "document": sentencepiece would skip it whole; we cut it at line ends instead.
    doc = "\n".join(f"line {i} says hello world" for i in range(1500))
    cfg = TokenizerTrainConfig(
        save_dir=str(tmp_path), vocab_size=300, tokenizer_type="sp_bbpe", num_threads=1
    )
    tok = Z2allTokenizer.from_pretrained(train_tokenizer([doc], cfg))
    assert tok.vocab_size > 272 + 10  # learned merges, so the text was seen
    assert tok.decode(tok.encode(doc)) == doc


def test_sp_input_sentence_size_caps_what_sentencepiece_loads(tmp_path):
    """sp_bbpe trains on at most sp_input_sentence_size pieces: unshuffled, only the first ones, so the
    characters of the later half never become pieces; 0 loads everything."""
    latin = [f"the quick brown fox number {i} jumps" for i in range(200)]
    cjk = ["".join(chr(0x4E00 + (i * 7 + j) % 40) for j in range(12)) for i in range(200)]

    def pieces(**kw) -> set[str]:
        cfg = TokenizerTrainConfig(
            save_dir=str(tmp_path / str(len(kw)) / str(kw)), vocab_size=400, tokenizer_type="sp_bbpe",
            character_coverage=1.0, num_threads=1, **kw
        )  # fmt: skip
        out = train_tokenizer(latin + cjk, cfg)
        return set(json.loads((out / "tokenizer.json").read_text("utf-8"))["model"]["vocab"])

    cjk_chars = {chr(0x4E00 + k) for k in range(40)}
    assert cjk_chars <= pieces(sp_input_sentence_size=0)
    assert not cjk_chars & pieces(sp_input_sentence_size=200, sp_shuffle_input_sentence=False)
    assert TokenizerTrainConfig().sp_input_sentence_size == 10_000_000
    assert TokenizerTrainConfig().sp_shuffle_input_sentence is True
    with pytest.raises(ValueError, match="sp_input_sentence_size"):
        TokenizerTrainConfig(sp_input_sentence_size=-1)


def test_max_chars_cuts_the_corpus_exactly(tmp_path):
    """corpus_texts yields exactly max_chars characters: whole documents, then the head of the one that
    crosses the limit; never an empty piece; 0 means everything."""
    from z2all.data.readers import ReadStats, iter_documents, list_data_files
    from z2all.tokenizer.train_tokenizer import corpus_texts

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.jsonl", "w", encoding="utf-8") as f:
        for t in BUILTIN_TEXTS:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    (data / "b.txt").write_text("\n\n".join(BUILTIN_TEXTS[::-1]), "utf-8")
    docs = [d for p in list_data_files(data) for d in iter_documents(p)]
    total = sum(map(len, docs))
    first = len(docs[0])

    def expected(limit: int) -> list[str]:
        out, left = [], limit or total
        for d in docs:
            if left <= 0:
                break
            out.append(d[:left])
            left -= len(d)
        return out

    for limit in (1, first - 1, first, first + 1, total // 2, total - 1, total, total + 50, 0):
        cfg = TokenizerTrainConfig(data_dir=str(data), max_chars=limit)
        got = list(corpus_texts(cfg, ReadStats()))
        assert got == expected(limit), limit
        assert sum(map(len, got)) == (min(limit, total) if limit else total) and all(got), limit


@pytest.mark.parametrize("tokenizer_type", ["hf_bbpe", "sp_bbpe"])
def test_zero_documents_is_refused_and_nothing_is_saved(tmp_path, tokenizer_type):
    """hf_bbpe used to save a 272-token "tokenizer" (16 specials + 256 bytes) that looked finished."""
    save = tmp_path / "tok"
    cfg = TokenizerTrainConfig(
        data_dir="corpus/", save_dir=str(save), vocab_size=400, tokenizer_type=tokenizer_type, num_threads=1
    )
    with pytest.raises(ValueError, match="--data_dir=corpus/: no documents to train on; nothing saved"):
        train_tokenizer(iter([]), cfg)
    assert not save.exists()


@pytest.mark.parametrize("tokenizer_type", ["hf_bbpe", "sp_bbpe"])
def test_an_unreadable_file_while_training_keeps_its_own_error(tmp_path, tokenizer_type):
    """sentencepiece turned an error of its text iterator into ``RuntimeError: INTERNAL: ...``."""
    from z2all.data.readers import DataFileError

    def texts():
        yield from BUILTIN_TEXTS * 5
        raise DataFileError("x.parquet: corrupt or unreadable parquet data in row group 1 of 3")

    cfg = TokenizerTrainConfig(
        save_dir=str(tmp_path / "tok"), vocab_size=400, tokenizer_type=tokenizer_type, num_threads=1
    )
    with pytest.raises(DataFileError, match="x.parquet: corrupt"):
        train_tokenizer(texts(), cfg)
    assert not (tmp_path / "tok").exists()


def test_a_vocabulary_smaller_than_asked_is_a_warning(tmp_path, z2all_log):
    cfg = TokenizerTrainConfig(save_dir=str(tmp_path / "tok"), vocab_size=5000, num_threads=1)
    tok = Z2allTokenizer.from_pretrained(train_tokenizer(["tiny corpus, tiny vocabulary"] * 3, cfg))
    assert tok.vocab_size < 5000
    assert f"vocabulary {tok.vocab_size} < --vocab_size=5000: 3 documents" in z2all_log.text


def test_cli_corpus_without_a_good_document_exits_2_naming_the_folder(tmp_path, capsys):
    from z2all.tokenizer.train_tokenizer import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": ""}\n{broken\n')
    assert main([f"--data_dir={data}", f"--save_dir={tmp_path / 'tok'}", "--vocab_size=400"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"train_tokenizer: error: --data_dir={data}: no documents to train on" in err
    assert "0 good records, 2 bad records skipped" in err  # the read report says why
    assert not (tmp_path / "tok").exists()
