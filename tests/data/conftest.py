"""Fixtures for data and tokenizer tests: tiny trained tokenizers, built once per session.

``tiny_tokenizer_dir`` (hf_bbpe, vocab 1000) and ``tiny_sp_tokenizer_dir`` (sp_bbpe, vocab <= 2000) are
trained on the first documents of the shared Chinese corpus and a few standard-library modules when
the shared corpora exist (``tests.conftest.SHARED_DATA``), else on built-in bilingual text; either way
they are real trained tokenizers with the special tokens at ids 0..15. ``tiny_tokenizer`` is the
loaded hf_bbpe ``Z2allTokenizer``. Other test folders reuse them with ``from tests.data.conftest import ...``.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, TextCorpus, shared_corpus
from z2all.data.readers import iter_documents
from z2all.tokenizer import TokenizerTrainConfig, Z2allTokenizer, train_tokenizer

BUILTIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    'def add(a, b):\n    """Return a + b."""\n    return a + b\n\nprint(add(1, 2))\n',
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？ Learning is a treasure that follows its owner.",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue\n\tprint(i, end=' ')\n",
    "Numbers 0123456789, emoji 😀🎉, and mixed 中文English混排 text with  double  spaces.",
]


def corpus_texts(corpus: TextCorpus, max_docs: int = 200, max_code_docs: int = 3) -> list[str]:
    """The first documents of a corpus and of its Python code, plus the built-in text: what a
    tokenizer for that corpus is trained on."""
    texts = list(islice(iter_documents(corpus.pretrain), max_docs))
    return texts + list(islice(iter_documents(corpus.code), max_code_docs)) + BUILTIN_TEXTS


def fixture_texts() -> list[str]:
    """Training texts: real documents when the shared corpora exist, else built-in text (repeated)."""
    if SHARED_DATA is None:
        return BUILTIN_TEXTS * 20
    return corpus_texts(shared_corpus(SHARED_DATA))


def build_tokenizer(
    save_dir: Path, tokenizer_type: str, vocab_size: int, texts: list[str] | None = None
) -> Path:
    """A tokenizer trained on ``texts`` (default: ``fixture_texts()``)."""
    cfg = TokenizerTrainConfig(
        save_dir=str(save_dir),
        vocab_size=vocab_size,
        tokenizer_type=tokenizer_type,
        character_coverage=0.98,
        num_threads=1,
    )
    return train_tokenizer(fixture_texts() if texts is None else texts, cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A trained hf_bbpe tokenizer folder (vocab 1000)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_hf_bbpe"), "hf_bbpe", 1000)


@pytest.fixture(scope="session")
def tiny_sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A trained sp_bbpe tokenizer folder (vocab at most 2000: Chinese needs ~1600 character pieces)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_sp_bbpe"), "sp_bbpe", 2000)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir) -> Z2allTokenizer:
    return Z2allTokenizer.from_pretrained(tiny_tokenizer_dir)


# ----------------------------------------------------------------------------- small pretokenized corpora
SMALL_CORPUS = {
    "a.jsonl": [json.dumps({"text": t}, ensure_ascii=False) for t in BUILTIN_TEXTS * 3] + ["{bad json"],
    "b.txt": ["\n\n".join(BUILTIN_TEXTS[::-1] * 2)],
    "sub/c.jsonl": [json.dumps({"content": t * 4}, ensure_ascii=False) for t in BUILTIN_TEXTS],
    "d.jsonl": [json.dumps({"text": "tiny"})],  # fewer tokens than one window
}


def write_small_corpus(data_dir: Path) -> Path:
    """A folder of small corpus files (with one bad record) for the pretokenize/index/dataset tests."""
    for name, lines in SMALL_CORPUS.items():
        p = data_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n", "utf-8")
    return data_dir


def pretokenize_small_corpus(root: Path, tokenizer_dir: Path, max_seq_len: int | None = None) -> Path:
    """Write the small corpus under ``root/data``, pretokenize to ``root/bin``, index it for max_seq_len."""
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all
    from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize

    data = write_small_corpus(root / "data")
    out = root / "bin"
    pretokenize(
        PretokenizeConfig(
            data_dir=str(data), tokenizer_dir=str(tokenizer_dir), save_dir=str(out), num_workers=1
        )
    )
    if max_seq_len:
        build_all(IndexConfig(data_dir=str(out), max_seq_len=max_seq_len))
    return out


def write_corrupt_parquet(path: Path, row_groups: int = 3, rows: int = 1000) -> Path:
    """A snappy parquet file of ``row_groups`` groups, 64 bytes of group 1's data page overwritten:
    reading fails in row group 1 with pyarrow's ``OSError: Corrupt snappy compressed data.``"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "abcdefgh "[i % 9] * (i % 97 + 50) for i in range(row_groups * rows)]
    pq.write_table(
        pa.table({"text": texts}), path, row_group_size=rows, compression="snappy", use_dictionary=False
    )
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    at = col.data_page_offset + col.total_compressed_size // 2
    data[at : at + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


# ----------------------------------------------------------------------------- small SFT sources
def write_small_sft_source(tmp_path: Path, n: int = 12) -> Path:
    """``tmp_path/data/small.jsonl``: ``n`` one-turn dialogues (message lists) for the SFT shard tests."""
    records = [
        [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(n)
    ]
    path = tmp_path / "data" / "small.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_same_sft_items(a, b) -> None:
    """Two SFT datasets hold the same ``(input_ids, labels)`` items, int64, in the same order."""
    assert len(a) == len(b)
    for i in range(len(a)):
        (x1, y1), (x2, y2) = a[i], b[i]
        assert torch.equal(x1, x2) and torch.equal(y1, y2), i
        assert x1.dtype == x2.dtype == torch.long
