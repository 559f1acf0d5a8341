"""Long documents in pieces (``z2all.tokenizer.chunked``): the ids of the pieces are the ids of the whole
document, training on pieces learns the same tokenizer, and peak memory does not grow with the document.

Exactness is checked three ways: exhaustively for the GPT-2 pre-tokenizer on every short string over
an alphabet of tricky characters; over all of Unicode for the character classes the hf_bbpe rule
relies on; and with the real tiny tokenizers on adversarial, random and real text, at piece sizes down
to 5 characters, where only the hard cuts (no safe cut in a window) may change tokens.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import subprocess
import sys
import unicodedata
from itertools import islice
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import pre_tokenizers

from tests.conftest import REPO_ROOT, TextCorpus
from z2all.data.readers import iter_documents
from z2all.tokenizer import TokenizerTrainConfig, Z2allTokenizer, train_tokenizer
from z2all.tokenizer.chunked import (
    CUT_PUNCTUATION,
    CutStats,
    Gpt2Cutter,
    SentencePieceCutter,
    cutter_for,
    encode_long,
    hf_training_texts,
    iter_encode,
    iter_pieces,
    sp_training_sentences,
)

ADVERSARIAL = [
    "a" + " " * 300 + "b  c\t\t\td" + "\n" * 50 + "e \n \n\t \r\n  f",
    "  leading, trailing   \n\n\n   ",
    "mixed 中文English混排，标点！？“引号”（括号）《书名》……——～ and 日本語のテキスト、カタカナ。",
    "digits 1234567890 3.14159 -2e-10 0x1F 1,000,000 ١٢٣ ４５６ ½ Ⅻ",
    "it's don't we're I've I'm you'll he'd 'S 'T ''s '' ' 's'll rock'n'roll O'Neil's",
    "punct!!!...???,,,;;;:::---___***///\\\\\\|||@@@###$$$%%%^^^&&&(((())))[[]]{{}}<<>>``~~",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇨🇳🇺🇸 zwj\u200d zws\u200b bom\ufeff nbsp\u00a0\u00a0 ideographic\u3000space",
    "literal sentencepiece space \u2581 and \u2581\u2581 runs \u2581a\u2581 b\u2581",
    'no_whitespace_at_all,key=value;next:{"a":[1,2,3]},base64=QUJDREVGR0g=/+9zz.end',
    "control \x00\x01\x1c\x1d\x1e\x1f\x7f chars and\vvertical\ftabs \x85 next-line \u2028\u2029",
    'def f(x):\n    """Doc."""\n    return {"k": [x, x ** 2]}  # comment\n\n\nclass A:\n\tpass\n',
]
TRICKY_CHARS = " \n\t\r\u3000\u00a0as'1中。,.!😀\u2581\u0301é-"
"""Alphabet of the random texts: whitespace of several kinds, letters, digits, CJK, punctuation,
the contraction quote, an emoji (4 UTF-8 bytes), a literal ▁, a combining mark."""


@pytest.fixture(params=["hf_bbpe", "sp_bbpe"])
def tok(request, tiny_tokenizer_dir, tiny_sp_tokenizer_dir) -> Z2allTokenizer:
    tok_dir = tiny_tokenizer_dir if request.param == "hf_bbpe" else tiny_sp_tokenizer_dir
    return Z2allTokenizer.from_pretrained(tok_dir)


def _safe_cuts(text: str, cutter) -> list[int]:
    """Every position the cutter calls safe."""
    return [p for p in range(1, len(text)) if cutter.last_cut(text, p - 1, p) == p]


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TRICKY_CHARS) for _ in range(n))


# --------------------------------------------------------------------------------- the hf_bbpe rule
def test_gpt2_cuts_exact_on_every_short_string():
    """For every string of up to 5 characters over a tricky alphabet, cutting at a safe cut gives the
    same pre-tokens as the whole string (BPE never merges across pre-tokens, so the same ids)."""
    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    cutter = Gpt2Cutter()

    def pretok(s: str) -> list[str]:
        return [t for t, _ in pt.pre_tokenize_str(s)]

    alphabet = [" ", "\n", "\t", "a", "s", "1", ",", "'", "中", "。"]
    checked = 0
    for n in range(2, 6):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            cuts = _safe_cuts(s, cutter)
            if cuts:
                whole = pretok(s)
                for p in cuts:
                    assert pretok(s[:p]) + pretok(s[p:]) == whole, (s, p)
                checked += len(cuts)
    assert checked > 100_000
    # Why whitespace followed by a word is no safe cut: "\s+(?!\S)" leaves the last whitespace
    # character to the next pre-token, but a prefix ending in whitespace keeps the whole run.
    s = "a \n\nfoo"
    assert pretok(s) == ["a", "Ġ\u010a", "\u010a", "foo"] and pretok(s[:4]) == ["a", "Ġ\u010a\u010a"]
    assert 4 not in _safe_cuts(s, cutter)
    assert _safe_cuts("it's", cutter) == [2]  # before the quote; never between ' and s


def test_gpt2_character_classes_match_the_real_pretokenizer():
    """The rule's character classes, checked over every assigned code point (and private use) against
    the Rust pre-tokenizer: (a) every non-``isspace`` character is non-whitespace there; (b) every
    ``isalnum`` character is a letter or digit there; and every ``CUT_PUNCTUATION`` character is
    "other". (Unassigned code points pass too, checked once; left out to keep the test at ~1 s.)"""
    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    chars = [c for c in map(chr, range(0x110000)) if unicodedata.category(c) not in ("Cn", "Cs")]

    def separated(cs: list[str], sep: str) -> list[str]:
        """Characters c of ``cs`` for which ``c + sep`` does not split into c and sep."""
        bad = []
        for k in range(0, len(cs), 65_536):
            block = cs[k : k + 65_536]
            starts = {a for _, (a, _) in pt.pre_tokenize_str("".join(c + sep for c in block))}
            bad += [c for j, c in enumerate(block) if 2 * j not in starts or 2 * j + 1 not in starts]
        return bad

    # (a) "c\n": if c were whitespace, the run "\nc\n" would be one pre-token.
    assert separated([c for c in chars if not c.isspace()], "\n") == []
    # (b) "c,": if c were "other", "c," would be one pre-token; with (a), c is a letter or digit.
    assert separated([c for c in chars if c.isalnum()], ",") == []
    for c in CUT_PUNCTUATION:
        assert unicodedata.category(c)[0] in "PS", c
        assert len(pt.pre_tokenize_str(f"a{c}1{c}a")) == 5, c  # "a", c, "1", c, "a"


# ------------------------------------------------------------------------------ ids, both tokenizers
@pytest.mark.parametrize("text", ADVERSARIAL)
def test_cutting_at_every_safe_cut_at_once_gives_the_whole_ids(tok, text):
    cuts = _safe_cuts(text, cutter_for(tok))
    assert cuts, "no safe cut in an adversarial text"
    whole = tok.encode(text)
    assert [i for piece in _split(text, cuts) for i in tok.encode(piece)] == whole
    assert tok.decode(whole) == text


def test_sentencepiece_merges_across_no_space_but_inside_space_runs(tiny_sp_tokenizer_dir):
    """sentencepiece encodes the whole string as one sentence (no pre-tokenizer), yet with z2all's
    settings "a b" is "a" + " b"; inside a run of spaces it is not, and the cutter knows."""
    tok = Z2allTokenizer.from_pretrained(tiny_sp_tokenizer_dir)
    assert tok.encode("a b") == tok.encode("a") + tok.encode(" b")
    s = "x    y"
    assert tok.encode(s[:3]) + tok.encode(s[3:]) != tok.encode(s)  # "▁▁" and "▁▁▁▁" are pieces
    cuts = _safe_cuts(s, cutter_for(tok))
    assert 1 in cuts and not {2, 3, 4} & set(cuts)


@pytest.mark.parametrize("max_chars", [5, 7, 16, 97, 4096])
def test_encode_long_equals_whole_encode_but_at_hard_cuts(tok, max_chars):
    """Adversarial and random text in one document: the ids equal whole-document ids once the text is
    split at the hard cuts only (nothing is claimed there); with 4096-character windows there are none."""
    rng = random.Random(max_chars)
    text = "\n".join(ADVERSARIAL + [_random_text(rng, 3000) for _ in range(3)])
    cutter = cutter_for(tok)
    stats = CutStats()
    pieces = list(iter_pieces(text, cutter, max_chars, stats=stats))
    assert "".join(pieces) == text and all(len(p) <= max_chars for p in pieces)
    bounds = list(itertools.accumulate(len(p) for p in pieces))[:-1]
    hard = [p for p in bounds if cutter.last_cut(text, p - 1, p) != p]
    assert len(hard) == stats.hard_cuts and stats.pieces == len(pieces)
    ids = encode_long(tok, text, max_chars=max_chars)
    assert ids.tolist() == [i for seg in _split(text, hard) for i in tok.encode(seg)]
    assert tok.decode(ids.tolist()) == text
    if max_chars >= 4096:
        assert stats.hard_cuts == 0 and ids.tolist() == tok.encode(text)


def test_random_texts_at_random_piece_sizes(tok):
    rng = random.Random(9)
    cutter = cutter_for(tok)
    for _ in range(30):
        text = _random_text(rng, rng.randrange(50, 400))
        cuts = _safe_cuts(text, cutter)
        assert [i for piece in _split(text, cuts) for i in tok.encode(piece)] == tok.encode(text), text


def test_encode_long_on_real_corpus(tok, text_corpus: TextCorpus):
    """One long document made of a real corpus: no hard cut, the ids of the whole document."""
    docs, chars = [], 0
    for doc in iter_documents(text_corpus.pretrain):
        docs.append(doc)
        chars += len(doc)
        if chars > 150_000:
            break
    text = "\n\n".join(docs)
    assert len(text) > 60_000
    stats = CutStats()
    ids = encode_long(tok, text, max_chars=2000, stats=stats)
    assert stats.hard_cuts == 0 and stats.pieces > 50
    assert ids.tolist() == tok.encode(text)


def test_text_without_any_safe_cut_is_cut_hard_and_stays_lossless(tiny_tokenizer, caplog):
    text = "ab" * 5000  # one letter run: one pre-token, no safe cut anywhere
    stats = CutStats()
    ids = encode_long(tiny_tokenizer, text, max_chars=1000, stats=stats)
    assert stats.hard_cuts == 9 and tiny_tokenizer.decode(ids.tolist()) == text
    assert "cut hard 9 times" in caplog.text
    # letters and punctuation without whitespace still have safe cuts
    text = "key=value,next:{x};" * 2000
    stats = CutStats()
    assert encode_long(tiny_tokenizer, text, 1000, stats=stats).tolist() == tiny_tokenizer.encode(text)
    assert stats.hard_cuts == 0


def test_short_text_and_iter_encode_pass_through(tok):
    assert encode_long(tok, "").tolist() == [] and list(iter_encode(tok, "hi there")) == [
        tok.encode("hi there")
    ]
    text = "word, " * 1000
    assert [i for ids in iter_encode(tok, text, max_chars=50) for i in ids] == tok.encode(text)


def test_unknown_pipeline_is_encoded_whole(tiny_tokenizer_dir, tmp_path, caplog):
    """A foreign tokenizer.json whose pre-tokenizer adds a prefix space has no known safe cuts."""
    copy = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, copy)
    spec = json.loads((copy / "tokenizer.json").read_text("utf-8"))
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (copy / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    tok = Z2allTokenizer.from_pretrained(copy)
    assert cutter_for(tok) is None
    text = "hello world " * 100
    assert encode_long(tok, text, max_chars=64).tolist() == tok.encode(text)
    assert "encoding 1200 characters whole" in caplog.text


def test_sentencepiece_cutter_reads_pairs_from_the_vocabulary():
    cutter = SentencePieceCutter(["ab", "▁▁", "▁c"])
    assert _safe_cuts("xab", cutter) == [1]
    assert _safe_cuts("a  c", cutter) == [1]  # not inside the space run, not before "c"
    assert _safe_cuts("ab\u2581ab", cutter) == [2, 3]  # beside a literal ▁


def test_pieces_respect_char_and_byte_limits():
    text = "中文 mixed 😀 text, " * 500
    for max_bytes in (4, 9, 64, 1000):
        pieces = list(iter_pieces(text, Gpt2Cutter(), 10_000, max_bytes=max_bytes))
        assert "".join(pieces) == text
        assert all(len(p.encode("utf-8")) <= max_bytes for p in pieces)
    with pytest.raises(ValueError):
        list(iter_pieces(text, Gpt2Cutter(), 0))


# ---------------------------------------------------------------------------------------- training
def _train(texts, tokenizer_type: str, save_dir: Path, vocab_size: int) -> bytes:
    cfg = TokenizerTrainConfig(
        save_dir=str(save_dir),
        vocab_size=vocab_size,
        tokenizer_type=tokenizer_type,
        character_coverage=0.98,
        max_sentence_bytes=1_000_000,  # whole documents reach sentencepiece unchanged
        num_threads=1,
    )
    train_tokenizer(texts, cfg)
    return (save_dir / ("tokenizer.json" if tokenizer_type == "hf_bbpe" else "tokenizer.model")).read_bytes()


def test_hf_training_on_pieces_learns_the_same_tokenizer(text_corpus, tmp_path):
    docs = list(islice(iter_documents(text_corpus.pretrain), 200))
    docs = ["\n\n".join(docs[i : i + 20]) for i in range(0, len(docs), 20)]  # 10 long documents
    stats = CutStats()
    pieces = hf_training_texts(docs, max_chars=200, stats=stats)
    assert _train(pieces, "hf_bbpe", tmp_path / "pieces", 1000) == _train(
        docs, "hf_bbpe", tmp_path / "whole", 1000
    )
    assert stats.hard_cuts == 0 and stats.pieces > 10 * len(docs)


def test_sp_training_on_word_cuts_learns_the_same_tokenizer(text_corpus, tmp_path):
    """Cuts before a space that follows a non-space leave sentencepiece's words unchanged."""
    docs = list(islice(iter_documents(text_corpus.code), 10))
    stats = CutStats()
    sentences = list(sp_training_sentences(docs, max_bytes=1000, stats=stats))
    assert stats.fallback_cuts == stats.hard_cuts == 0 and len(sentences) > len(docs) + 5
    assert all(len(s.encode("utf-8")) <= 1000 for s in sentences)
    assert _train(sentences, "sp_bbpe", tmp_path / "pieces", 800) == _train(
        docs, "sp_bbpe", tmp_path / "whole", 800
    )


def test_sp_training_sentences_never_end_in_a_line_break():
    text = "行一\n行二\r\n" * 300 + "end"  # no space: cut before line breaks (fallback)
    stats = CutStats()
    sentences = list(sp_training_sentences([text], max_bytes=100, stats=stats))
    assert "".join(sentences) == text and stats.fallback_cuts == len(sentences) - 1
    assert not any(s.endswith(("\r", "\n")) for s in sentences)


def _sp_vocab(sentences: list[str], max_sentence_length: int = 4192) -> set[str]:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        model_type="bpe",
        vocab_size=300,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        max_sentence_length=max_sentence_length,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    return {sp.id_to_piece(i) for i in range(sp.get_piece_size())}


def test_sentencepiece_drops_long_sentences_and_trailing_line_breaks_silently():
    """The two sentencepiece behaviours ``sp_training_sentences`` works around."""
    base = ["hello world"] * 20
    assert "ω" not in _sp_vocab(base + ["ω" * 26], max_sentence_length=50)  # 52 bytes: skipped
    assert "ω" in _sp_vocab(base + ["ω" * 25], max_sentence_length=50)  # 50 bytes: kept
    assert "\n" not in _sp_vocab(base + ["ab\n", "cd\r\n"])  # trailing line breaks dropped
    assert "\n" in _sp_vocab(base + ["ab\ncd"])


# ------------------------------------------------------------------------------------------ memory
_MEMORY_CHILD = """
import json, sys
from z2all.tokenizer import Z2allTokenizer
from z2all.tokenizer.chunked import iter_encode

def peak_rss_kb():  # VmHWM: the peak RSS of this process image, fresh after exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

tok = Z2allTokenizer.from_pretrained(sys.argv[1])
block = open(sys.argv[2], encoding="utf-8").read()
text = block * (int(sys.argv[3]) // len(block))  # allocated once: the high-water mark before encoding
del block
before = peak_rss_kb()
n = sum(len(ids) for ids in iter_encode(tok, text))
print(json.dumps({"chars": len(text), "ids": n, "before_kb": before, "after_kb": peak_rss_kb()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_does_not_grow_with_document_size(tok, tmp_path):
    """A ~5 M and a ~20 M character document, each encoded in a fresh process: the memory added by
    encoding (peak RSS minus the RSS holding the text) must not grow with the document.

    The peak is VmHWM, not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries ru_maxrss over from the
    forking parent into the exec'd child, so under a large pytest process it would read the parent's
    RSS and hide the child's peak.

    Tolerance 48 MB: whole-document encoding would add ~50 (sentencepiece) to ~250 (HF) bytes per
    character, i.e. 0.75-3.7 GB more for the 15 M extra characters; chunked encoding adds at most
    ``_BATCH_PIECES`` pieces' working set (~100 MB) whatever the size, plus allocator noise."""
    rng = random.Random(0)
    words = ["the", "quick", "fox's", "don't", "1234", "3.14", "中文", "床前明月光，", "。", "😀", "x=y+1;"]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "\t"]
    block = "".join(rng.choice(words) + rng.choice(seps) for _ in range(20_000))
    (tmp_path / "block.txt").write_text(block, "utf-8")
    added = {}
    for n_chars in (5_000_000, 20_000_000):
        cmd = [
            sys.executable,
            "-c",
            _MEMORY_CHILD,
            str(tok.tok_dir),
            str(tmp_path / "block.txt"),
            str(n_chars),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["ids"] > out["chars"] // 4
        added[n_chars] = (out["after_kb"] - out["before_kb"]) / 1024
    assert added[20_000_000] < added[5_000_000] + 48, added
    assert added[20_000_000] < 400, added
