"""Encode (and train on) long documents in bounded pieces, with exactly the tokens of the whole document.

Encoding one string costs memory in proportion to its length: HF ``tokenizers`` holds ~180-260 bytes
per character while it encodes (pre-tokens, offsets, the ``Encoding``), sentencepiece ~40
(``benchmarks/bench_long_document.py``), so one 60 MB JSON line peaked at 9.6 GB in pretokenize
(issue 9). Here a long text is cut into pieces of at most ``max_chars`` characters and the pieces are
encoded a batch at a time, so the peak no longer depends on the document's length.

THE invariant: a piece ends only at a *safe cut*, a position ``p`` where, for the tokenizer in use,
``encode(text) == encode(text[:p]) + encode(text[p:])``. Then the ids of the pieces, concatenated,
are the ids of the whole document, and ``decode(ids) == text`` as before. Which cuts are safe depends
on how the tokenizer splits text before merging:

* ``hf_bbpe`` (:class:`Gpt2Cutter`): BPE merges never cross a pre-token, and the GPT-2 regex of
  ``ByteLevel(add_prefix_space=False, use_regex=True)``::

      's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

  makes pre-tokens that are single-class runs (letters, digits, other, whitespace), except that one
  leading ``" "`` joins a following non-space run and ``'`` starts a contraction. A cut is safe where
  (a) a non-whitespace character is followed by one of ``" \\t\\n\\r"``, or (b) a letter or digit is
  followed by punctuation from :data:`CUT_PUNCTUATION`. Why: no pre-token holds a non-space followed
  by a space (a) or a letter/digit followed by "other" (b), so ``p`` ends a pre-token of the whole
  text; the scan of ``text[p:]`` alone is the same scan (the regex looks behind nothing); and the scan
  of ``text[:p]`` alone is the same, because the only context-dependent alternative, ``\\s+(?!\\S)``,
  comes after every alternative that can end on the non-space at ``p - 1``, and no whitespace run
  reaches ``p``. *Not* safe, for example: between whitespace and the word after it (``"a \\n\\nfoo"``
  pre-tokenizes as ``" \\n"``, ``"\\n"``, ``"foo"``, but its prefix ``"a \\n\\n"`` alone as ``" \\n\\n"``),
  after ``'`` (contractions), between two letters.
* ``sp_bbpe`` (:class:`SentencePieceCutter`): sentencepiece's BPE does no pre-tokenization at encode
  time; it repeatedly merges the adjacent pair whose concatenation is the best-scoring vocabulary
  piece. If no piece of the vocabulary contains the two characters around ``p`` next to each other
  (a space counted as ``▁``), no symbol ever spans ``p`` and each side is merged exactly as it would be
  alone (the best pair of the whole text is the best pair of its side, ties go left on both). The
  cutter reads that set of adjacent pairs from the model itself, so the rule is exact for the model at
  hand; z2all's training settings (``split_by_whitespace``, ``split_digits``, one Unicode script per
  piece) make it plentiful: before every space that follows a non-space, next to most digits, at most
  script changes. Cuts beside a literal ``▁`` are safe too: the z2all backend already encodes the text
  between literal ``▁`` separately. Requires an identity normalizer (no dummy prefix, no whitespace
  removal), which :func:`cutter_for` checks.

When a window of ``max_chars`` characters holds no safe cut (a letter run longer than the window, one
huge whitespace run, a model whose pieces cover every pair), the piece is cut hard at the window's end:
still lossless (``decode(ids) == text``), but the tokens next to that point may differ from
whole-document encoding. Hard cuts are counted in :class:`CutStats` and logged once per document.

Training uses the same cuts (:func:`hf_training_texts`, :func:`sp_training_sentences`), so a long
document reaches a trainer as bounded pieces. For hf_bbpe the trainer counts pre-tokens, and safe cuts
leave the multiset of pre-tokens unchanged: the trained tokenizer is the same as from whole documents.
For sp_bbpe a cut before a space that follows a non-space leaves sentencepiece's words unchanged.

Tested in ``tests/tokenizer/test_chunked.py``; memory figures from ``benchmarks/bench_long_document.py``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from z2all.tokenizer.tokenizer import Z2allTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 65_536
"""Longest piece handed to a tokenizer in one call: ~15 MB of HF ``tokenizers`` working memory."""
_BATCH_PIECES = 8
"""Pieces per ``encode_batch`` call: the backends multithread a batch, and 8 pieces bound the peak."""
_SP_SPACE = "\u2581"  # sentencepiece's visible space "▁"

CUT_PUNCTUATION = (
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"  # ASCII punctuation and symbols
    "\u00b7\u2014\u2018\u2019\u201c\u201d\u2026"  # · — ‘ ’ “ ” …
    "\u3001\u3002\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011"  # 、 。 《 》 「 」 『 』 【 】
    "\uff01\uff08\uff09\uff0c\uff1a\uff1b\uff1f\uff5e"  # ！ （ ） ， ： ； ？ ～
)
"""Characters that are neither whitespace, letter nor digit for the GPT-2 regex (tested against the
real pre-tokenizer): a cut right before one of them, after a letter or digit, is safe for hf_bbpe."""


@dataclass
class CutStats:
    """What :func:`iter_pieces` did, summed over the documents it was given."""

    long_documents: int = 0
    """Documents longer than one window, so cut into pieces."""
    pieces: int = 0
    """Pieces yielded for those documents."""
    fallback_cuts: int = 0
    """Cuts made by the ``fallback`` cutter (sp_bbpe training only: at a line break, splitting a word)."""
    hard_cuts: int = 0
    """Cuts made at a window's end, no cut found: the only places where tokens may differ from
    whole-document encoding (in training, where a pre-token or word was split)."""


class Cutter(Protocol):
    """Finds safe cuts for one tokenizer (see the module docstring)."""

    def last_cut(self, text: str, lo: int, hi: int) -> int:
        """The largest safe cut ``p`` with ``lo < p <= hi`` (``hi < len(text)``), or -1 if none."""
        ...


class _RegexCutter:
    """Safe cuts are the (zero-width) matches of ``pattern``: searched backwards from ``hi`` in a
    growing tail of the window, so a window full of cuts costs a few hundred characters of regex."""

    def __init__(self, pattern: str):
        self._re = re.compile(pattern)

    def last_cut(self, text: str, lo: int, hi: int) -> int:
        span = 256
        while True:
            start = max(lo + 1, hi - span)
            last = -1
            # endpos=hi+1: a lookahead at p == hi sees text[hi]; lookbehinds see text before start.
            for m in self._re.finditer(text, start, hi + 1):
                last = m.start()
            if last >= 0 or start == lo + 1:
                return last
            span *= 8


class Gpt2Cutter(_RegexCutter):
    """Safe cuts for the GPT-2 ``ByteLevel`` pre-tokenizer of hf_bbpe: (a) a non-whitespace character
    followed by a space, tab, newline or carriage return; (b) a letter or digit (``[^\\W_]``, i.e.
    ``str.isalnum``) followed by :data:`CUT_PUNCTUATION`. Python's ``\\s`` is ``str.isspace``, a superset
    of the Rust regex's ``\\s``, so "non-whitespace" here is non-whitespace there, and ``isalnum`` is
    letter-or-digit there (both tested against the pre-tokenizer on every assigned code point)."""

    def __init__(self):
        punct = re.escape(CUT_PUNCTUATION)
        super().__init__(rf"(?<=\S)(?=[ \t\n\r])|(?<=[^\W_])(?=[{punct}])")


class SentencePieceCutter:
    """Safe cuts for a sentencepiece BPE model: ``p`` where no piece contains ``text[p-1] + text[p]``
    (spaces as ``▁``), or where either character is a literal ``▁`` (the z2all backend splits there)."""

    def __init__(self, pieces: Iterable[str]):
        # Every piece, control and byte pieces included: a superset of what merges can build only
        # removes cuts, never makes an unsafe one.
        self._pairs = frozenset(p[i : i + 2] for p in pieces for i in range(len(p) - 1))

    def last_cut(self, text: str, lo: int, hi: int) -> int:
        pairs = self._pairs
        for p in range(hi, lo, -1):
            a, b = text[p - 1], text[p]
            if a == _SP_SPACE or b == _SP_SPACE:
                return p
            if (a + b).replace(" ", _SP_SPACE) not in pairs:
                return p
        return -1


class _SentencePieceWordCutter(_RegexCutter):
    """sp_bbpe training: before a space that follows a character other than space, CR or LF.
    sentencepiece's trainer starts a word at such a space, so the pieces hold the same words as the
    whole document; and it drops the trailing CR/LF of every sentence it is fed (tested), so no piece
    may end with one."""

    def __init__(self):
        super().__init__(r"(?<=[^ \r\n])(?= )")


class _LineBreakCutter(_RegexCutter):
    """Fallback for sp_bbpe training: before a line break that follows a character other than CR or LF
    (the newline is kept; the sentencepiece word around it is split)."""

    def __init__(self):
        super().__init__(r"(?<=[^\r\n])(?=[\r\n])")


def _window_end(text: str, lo: int, max_chars: int, max_bytes: int) -> int:
    """End of the longest window from ``lo`` with at most ``max_chars`` characters and, if
    ``max_bytes``, at most ``max_bytes`` UTF-8 bytes."""
    hi = min(len(text), lo + max_chars)
    if max_bytes and hi - lo > max_bytes // 4:  # a character is at most 4 bytes
        raw = text[lo:hi].encode("utf-8")
        if len(raw) > max_bytes:
            hi = lo + len(raw[:max_bytes].decode("utf-8", errors="ignore"))
    return hi


def iter_pieces(
    text: str,
    cutter: Cutter,
    max_chars: int,
    max_bytes: int = 0,
    fallback: Cutter | None = None,
    stats: CutStats | None = None,
) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars`` characters (and ``max_bytes`` UTF-8
    bytes if given), each ending at the last cut ``cutter`` finds in its window; else at the last one
    ``fallback`` finds; else at the window's end (a hard cut). ``"".join(pieces) == text``; a text
    that fits one window is yielded unchanged."""
    if max_chars < 1 or (max_bytes and max_bytes < 4):
        raise ValueError(f"need max_chars >= 1 and max_bytes 0 or >= 4, got {max_chars}, {max_bytes}")
    lo, n = 0, len(text)
    hi = _window_end(text, lo, max_chars, max_bytes)
    if hi >= n:
        yield text
        return
    pieces = fallbacks = hard = 0
    while hi < n:
        p = cutter.last_cut(text, lo, hi)
        if p < 0 and fallback is not None:
            p = fallback.last_cut(text, lo, hi)
            fallbacks += p >= 0
        if p < 0:
            p = hi
            hard += 1
        yield text[lo:p]
        pieces += 1
        lo = p
        hi = _window_end(text, lo, max_chars, max_bytes)
    yield text[lo:]
    pieces += 1
    if hard:
        logger.warning(
            "a document of %d characters was cut hard %d times (no cut within %d characters): "
            "its tokens (or training statistics) may differ from the whole document's there",
            n,
            hard,
            max_chars,
        )
    if stats is not None:
        stats.long_documents += 1
        stats.pieces += pieces
        stats.fallback_cuts += fallbacks
        stats.hard_cuts += hard


# ----------------------------------------------------------------------------------------- encoding
@functools.lru_cache(maxsize=8)
def cutter_for(tokenizer: Z2allTokenizer) -> Cutter | None:
    """The cutter for ``tokenizer``, or None when its pipeline is not one whose safe cuts are known
    (a foreign tokenizer.json with a normalizer, another pre-tokenizer, dropout, or non-special added
    tokens; a sentencepiece model that normalizes). Read from the files in ``tokenizer.tok_dir``."""
    if tokenizer.tokenizer_type == "sp_bbpe":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer.tok_dir / "tokenizer.model"))
        probe = "a  b Ａ\u0301\t"  # a dummy prefix, whitespace removal or NFKC would change it
        if sp.normalize(probe) != probe.replace(" ", _SP_SPACE):
            return None
        return SentencePieceCutter(sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    spec = json.loads((tokenizer.tok_dir / "tokenizer.json").read_text("utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    if (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", True)
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and all(t.get("special") for t in spec.get("added_tokens", []))
    ):
        return Gpt2Cutter()
    return None


def iter_encode(
    tokenizer: Z2allTokenizer, text: str, max_chars: int = DEFAULT_MAX_CHARS, stats: CutStats | None = None
) -> Iterator[list[int]]:
    """The ids of ``text`` as consecutive lists whose concatenation is ``tokenizer.encode(text)``; at
    most ``_BATCH_PIECES`` pieces of ``max_chars`` are being encoded at any time. No BOS/EOS: a caller
    adds them once per document."""
    cutter = cutter_for(tokenizer) if len(text) > max_chars else None
    if cutter is None:
        if len(text) > max_chars:
            logger.warning(
                "%r: no known safe cuts for this tokenizer pipeline, encoding %d characters whole",
                tokenizer,
                len(text),
            )
        yield tokenizer.encode(text)
        return
    batch: list[str] = []
    for piece in iter_pieces(text, cutter, max_chars, stats=stats):
        batch.append(piece)
        if len(batch) == _BATCH_PIECES:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def encode_long(
    tokenizer: Z2allTokenizer,
    text: str,
    max_chars: int = DEFAULT_MAX_CHARS,
    dtype: np.dtype | type = np.int32,
    stats: CutStats | None = None,
) -> np.ndarray:
    """``tokenizer.encode(text)`` as a 1-D array of ``dtype``, with memory bounded by ``max_chars``
    rather than by ``len(text)``. An array, not a list: a list of 50 M Python ints alone is ~2 GB."""
    parts = [np.asarray(ids, dtype=dtype) for ids in iter_encode(tokenizer, text, max_chars, stats)]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


# ----------------------------------------------------------------------------------------- training
def hf_training_texts(
    texts: Iterable[str], max_chars: int = DEFAULT_MAX_CHARS, stats: CutStats | None = None
) -> Iterator[str]:
    """``texts`` for ``Tokenizer.train_from_iterator`` (hf_bbpe), long ones as pieces of at most
    ``max_chars`` cut at :class:`Gpt2Cutter` cuts: the trainer sees the same pre-tokens as from the
    whole documents, so it learns the same tokenizer, with memory bounded per piece."""
    cutter = Gpt2Cutter()
    for text in texts:
        yield from iter_pieces(text, cutter, max_chars, stats=stats)


def sp_training_sentences(
    texts: Iterable[str], max_bytes: int, stats: CutStats | None = None
) -> Iterator[str]:
    """``texts`` for sentencepiece's ``sentence_iterator`` (sp_bbpe), long ones as sentences of at
    most ``max_bytes`` UTF-8 bytes: sentencepiece *silently skips* a sentence longer than its
    ``max_sentence_length``, so ``max_bytes`` must not exceed it. Cut before a space that follows a
    character other than space/CR/LF when the window has one (sentencepiece's words are unchanged),
    else before a line break (``stats.fallback_cuts``), else hard."""
    cutter, fallback = _SentencePieceWordCutter(), _LineBreakCutter()
    for text in texts:
        yield from iter_pieces(text, cutter, max_bytes, max_bytes=max_bytes, fallback=fallback, stats=stats)
