"""The tokenizer inside an exported GGUF file tokenizes like z2all, as llama.cpp would run it.

hf_bbpe: the tokens and merges read back rebuild a byte-level BPE that gives z2all's ids, and
llama.cpp's ``gpt-2`` pre-tokenizer regex splits text as z2all's pipeline does (the label is right).
sp_bbpe: llama.cpp's sentencepiece merge over the read-back pieces, scores and types gives z2all's ids
(``tests/tools/gguf_helpers.spm_encode``), which needs ``add_space_prefix`` false. Both on built-in
text always and on the real corpora when they exist.
"""

from __future__ import annotations

import json
import shutil
from itertools import islice

import pytest

from tests.conftest import shared_corpus
from tests.data.conftest import BUILTIN_TEXTS
from tests.tools.gguf_helpers import fields, gpt2_pretokenize, spm_encode
from z2all.data.readers import iter_documents
from z2all.export_gguf import export_gguf
from z2all.tokenizer import Z2allTokenizer
from z2all.tokenizer.gguf_vocab import TokenType, gguf_vocab

gguf = pytest.importorskip("gguf")

TEXTS = BUILTIN_TEXTS + [
    "Hello world! It's 2024; we're testing   spaces\tand\ttabs.\n\nNew paragraph...",
    "literal specials stay text: <|im_end|> <s> </s> <unk> <|im_start|>assistant",
    "UTF-8 outside the alphabet: Ωμέγα, עברית, 한국어, ₿, 🦙🧪",
    " leading space and trailing ",
]


@pytest.fixture(scope="module")
def hf_gguf(tiny_run, tmp_path_factory):
    path = export_gguf(tiny_run.run_dir, tmp_path_factory.mktemp("gguf_hf") / "m.gguf")
    return fields(path), Z2allTokenizer.from_pretrained(tiny_run.tokenizer_dir)


@pytest.fixture(scope="module")
def sp_gguf(tiny_sp_run, tmp_path_factory):
    path = export_gguf(tiny_sp_run.run_dir, tmp_path_factory.mktemp("gguf_sp") / "m.gguf")
    return fields(path), Z2allTokenizer.from_pretrained(tiny_sp_run.tokenizer_dir)


def real_texts(shared_data, n=300) -> list[str]:
    corpus = shared_corpus(shared_data)
    texts = list(islice(iter_documents(corpus.pretrain), n)) + list(islice(iter_documents(corpus.code), 5))
    with open(corpus.sft_messages, encoding="utf-8") as f:
        texts += [m["content"] for line in islice(f, n) for m in json.loads(line)]
    return texts


def test_token_types_are_llama_cpp_s():
    assert {t.name: int(t) for t in TokenType} == {t.name: int(t) for t in gguf.TokenType}


# --- hf_bbpe ----------------------------------------------------------------------------------------
def _bpe_from_gguf(meta):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return bpe


def test_hf_bbpe_tokens_and_merges_round_trip(hf_gguf, tiny_run):
    meta, tok = hf_gguf
    n_vocab = tiny_run.model.config.vocab_size
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, n_vocab)]
    assert types[:16] == [TokenType.CONTROL] * 16
    assert set(types[16 : tok.vocab_size]) == {TokenType.NORMAL}
    assert set(types[tok.vocab_size :]) == {TokenType.UNUSED}
    spec = json.loads((tiny_run.tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]


def _check_hf(meta, tok, texts):
    from tokenizers import pre_tokenizers

    bpe = _bpe_from_gguf(meta)
    ours = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in texts:
        assert bpe.encode(text).ids == tok.encode(text), text[:80]
        # llama.cpp splits with its gpt-2 regex; z2all's pipeline splits the same way.
        assert [w for w, _ in ours.pre_tokenize_str(text)] == [
            "".join(_byte_level_char(b) for b in piece.encode("utf-8")) for piece in gpt2_pretokenize(text)
        ], text[:80]


_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_UNPRINTABLE = sorted(set(range(256)) - set(_PRINTABLE))


def _byte_level_char(b: int) -> str:
    """GPT-2's printable spelling of byte ``b`` (the byte-to-unicode table of byte-level BPE)."""
    return chr(b) if b in _PRINTABLE else chr(256 + _UNPRINTABLE.index(b))


def test_hf_bbpe_tokenizes_like_z2all(hf_gguf):
    _check_hf(*hf_gguf, TEXTS)


def test_hf_bbpe_tokenizes_like_z2all_on_real_text(hf_gguf, shared_data):
    _check_hf(*hf_gguf, real_texts(shared_data))


def test_hf_bbpe_with_another_pipeline_is_refused(tiny_tokenizer_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFKC"}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="llama.cpp's gpt-2 pre-tokenizer would split text differently"):
        gguf_vocab(Z2allTokenizer.from_pretrained(folder), 1024)
    with pytest.raises(ValueError, match="not the tokenizer this model was trained with"):
        gguf_vocab(Z2allTokenizer.from_pretrained(tiny_tokenizer_dir), 512)


# --- sp_bbpe ----------------------------------------------------------------------------------------
def test_sp_bbpe_pieces_scores_and_types(sp_gguf, tiny_sp_run):
    import sentencepiece as spm

    meta, tok = sp_gguf
    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_run.tokenizer_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert scores[:n] == pytest.approx([sp.get_score(i) for i in range(n)])  # stored as float32
    assert types[0] == TokenType.UNKNOWN and types[1:16] == [TokenType.CONTROL] * 15
    byte_ids = [i for i, t in enumerate(types) if t == TokenType.BYTE]
    assert [tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert (
        set(types[tok.vocab_size :]) == {TokenType.UNUSED}
        and len(tokens) == tiny_sp_run.model.config.vocab_size
    )
    assert max(scores[tok.vocab_size :]) < min(scores[:n])


def _check_sp(meta, tok, texts):
    checked = 0
    for text in texts:
        if "\u2581" in text:  # z2all encodes a literal "▁" as bytes (lossless); llama.cpp reads a space
            continue
        assert spm_encode(text, meta) == tok.encode(text), text[:80]
        checked += 1
    assert checked >= len(texts) * 0.9


def test_sp_bbpe_tokenizes_like_z2all(sp_gguf):
    meta, tok = sp_gguf
    _check_sp(meta, tok, TEXTS)
    # Without add_space_prefix false, llama.cpp prepends "▁" to every text: no longer z2all's ids.
    assert spm_encode("Hello world", {**meta, "tokenizer.ggml.add_space_prefix": True}) != tok.encode(
        "Hello world"
    )


def test_sp_bbpe_tokenizes_like_z2all_on_real_text(sp_gguf, shared_data):
    _check_sp(*sp_gguf, real_texts(shared_data))
