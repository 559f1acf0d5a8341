"""A z2all tokenizer as GGUF describes it, so llama.cpp tokenizes text exactly as z2all does.

llama.cpp does not run ``tokenizer.json`` or ``tokenizer.model``: it rebuilds the tokenizer from the
``tokenizer.ggml.*`` metadata. :func:`gguf_vocab` produces that metadata for both kinds:

* ``hf_bbpe`` -> ``model = "gpt2"`` (byte-level BPE): the tokens in their byte-level spelling
  (``"Ġthe"``), the merges as ``"left right"`` strings in rank order, and ``pre = "gpt-2"``, the
  pre-tokenizer regex z2all trains with (``pre_tokenizers.ByteLevel(use_regex=True)``). llama.cpp's
  own converter guesses ``pre`` by hashing the ids of a fixed text, so it knows no newly trained
  vocabulary; here it is stated, after checking that ``tokenizer.json`` really has that pipeline.
* ``sp_bbpe`` -> ``model = "llama"`` (sentencepiece): the pieces with their scores (BPE: ``-rank``)
  and types (``<0xNN>`` byte pieces are ``BYTE``, the specials ``CONTROL``), and
  ``add_space_prefix = False``: z2all trains without sentencepiece's dummy ``"▁"`` prefix.

Invariants: ``tokens[i]`` is the token of id ``i``; ids ``0..15`` are the special tokens, never produced
from text (``CONTROL``; ``<unk>`` is ``UNKNOWN`` for sp_bbpe); the list is padded to the model's
``vocab_size`` (z2all rounds it up, e.g. to a multiple of 64) with ``UNUSED`` ``[PAD<id>]`` tokens, since
llama.cpp requires one token per embedding row. No BOS or EOS is added to a text: z2all's pretraining
data separates documents with EOS only and its chat template adds no BOS. ``<|im_end|>`` is the
end-of-turn token (``eot``), so generation stops after an assistant reply.

Tested in ``tests/tools/test_export_gguf.py``: a BPE rebuilt from the read-back tokens and merges, and a
llama.cpp-style sentencepiece merge over the read-back pieces and scores, both give z2all's ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum

from z2all.tokenizer.special_tokens import SPECIAL_TOKENS
from z2all.tokenizer.tokenizer import Z2allTokenizer


class TokenType(IntEnum):
    """llama.cpp's ``llama_token_type`` (the values of ``gguf.TokenType``; a test checks they agree)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


GPT2_PRE_TOKENIZER = "gpt-2"


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.ggml.*`` values of one tokenizer, padded to ``len(tokens)`` = the model's vocab."""

    model: str
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (sentencepiece)."""
    pre: str | None
    """The pre-tokenizer label (``"gpt-2"``) for ``gpt2``; None for ``llama``, which has none."""
    tokens: list[str]
    """Token text by id: byte-level spelling for gpt2, sentencepiece pieces for llama."""
    token_types: list[TokenType]
    """One :class:`TokenType` per token."""
    scores: list[float] | None
    """sentencepiece scores by id (``llama`` only; llama.cpp merges the highest-scoring pair first)."""
    merges: list[str] | None
    """BPE merges ``"left right"`` in rank order (``gpt2`` only)."""
    add_space_prefix: bool | None
    """``llama`` only: False, z2all's sentencepiece adds no dummy ``"▁"`` before a text."""
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    eot_id: int
    """``<|im_end|>``: ends an assistant turn, so llama.cpp stops generating there."""


def gguf_vocab(tok: Z2allTokenizer, n_vocab: int) -> GGUFVocab:
    """The GGUF description of ``tok`` for a model with ``n_vocab`` embedding rows (>= tok.vocab_size)."""
    if n_vocab < tok.vocab_size:
        raise ValueError(
            f"the model has {n_vocab} token rows but its tokenizer {tok.tok_dir} has {tok.vocab_size} "
            "tokens: not the tokenizer this model was trained with (pass --tokenizer_dir)"
        )
    if tok.tokenizer_type == "sp_bbpe":
        tokens, types, scores = _sentencepiece_pieces(tok)
        merges, model, pre, add_space_prefix = None, "llama", None, False
    else:
        tokens, merges = _byte_level_bpe(tok)
        types = [TokenType.CONTROL if i in tok.special_ids else TokenType.NORMAL for i in range(len(tokens))]
        scores, model, pre, add_space_prefix = None, "gpt2", GPT2_PRE_TOKENIZER, None
    n_real = len(tokens)
    taken = set(tokens)
    for i in range(n_real, n_vocab):  # rows past the tokenizer: never produced, never generated
        pad = f"[PAD{i}]"
        if pad in taken:
            raise ValueError(f"{tok.tok_dir}: a real token is spelled {pad!r}, the name of padding row {i}")
        tokens.append(pad)
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1e9)  # below every real piece: never chosen as a merge
    return GGUFVocab(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=merges,
        add_space_prefix=add_space_prefix,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        unk_id=tok.unk_id,
        pad_id=tok.pad_id,
        eot_id=tok.im_end_id,
    )


def _byte_level_bpe(tok: Z2allTokenizer) -> tuple[list[str], list[str]]:
    """(tokens by id, merges as ``"a b"``) of an hf_bbpe ``tokenizer.json``, after checking that its
    pipeline is the one llama.cpp's ``gpt-2`` pre-tokenizer reproduces."""
    path = tok.tok_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre, norm = spec.get("model", {}), spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    gpt2 = (
        model.get("type") == "BPE"
        and norm is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is True
        and pre.get("add_prefix_space") is False
    )
    if not gpt2:
        raise ValueError(
            f"{path}: not z2all's byte-level BPE (BPE model, no normalizer, ByteLevel pre-tokenizer with the "
            "GPT-2 regex and no prefix space): llama.cpp's gpt-2 pre-tokenizer would split text differently"
        )
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    if any(t is None for t in tokens):
        raise ValueError(f"{path}: ids are not contiguous 0..{tok.vocab_size - 1}")
    # tokenizers >= 0.20 writes a merge as ["a", "b"], older versions as "a b"; byte-level tokens hold
    # no space (a space byte is spelled "Ġ"), so the joined form is unambiguous.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _sentencepiece_pieces(tok: Z2allTokenizer) -> tuple[list[str], list[TokenType], list[float]]:
    """(pieces, types, scores) by id from an sp_bbpe ``tokenizer.model``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok.tok_dir / "tokenizer.model"))
    if sp.get_piece_size() != tok.vocab_size:
        raise ValueError(
            f"{tok.tok_dir}: tokenizer.model has {sp.get_piece_size()} pieces, not {tok.vocab_size}"
        )
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    # z2all's specials are sentencepiece control symbols (the trainer's control_symbols + bos/eos/pad):
    # a folder that says otherwise would let llama.cpp produce them from text.
    for i, s in enumerate(SPECIAL_TOKENS):
        if tokens[i] != s or types[i] not in (TokenType.CONTROL, TokenType.UNKNOWN):
            raise ValueError(
                f"{tok.tok_dir}: id {i} is {tokens[i]!r} ({types[i].name}), expected control {s!r}"
            )
    return tokens, types, scores
