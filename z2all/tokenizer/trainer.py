"""Train a tokenizer from an iterator of texts and save it in a folder both z2all and transformers load.

Two kinds, both lossless (``decode(encode(text)) == text``, no Unicode normalization) and both with the
special tokens of :mod:`z2all.tokenizer.special_tokens` at ids ``0..15``:

* ``hf_bbpe``: byte-level BPE with Hugging Face ``tokenizers`` (GPT-2 style: every byte is a symbol,
  so there is no ``<unk>``; the GPT-2 regex splits words, digits and punctuation before merging).
* ``sp_bbpe``: BPE with ``sentencepiece`` and ``byte_fallback`` (characters outside the learned
  alphabet become ``<0xNN>`` byte pieces). ``tokenizer.model`` is the reference; a converted
  ``tokenizer.json`` is written next to it so ``AutoTokenizer`` loads the folder too.

Files in the saved folder::

    tokenizer.json            HF tokenizers pipeline (both kinds)
    tokenizer.model           sentencepiece model (sp_bbpe only; z2all's loader uses it)
    tokenizer_config.json     transformers: class, special tokens, ChatML chat_template (assistant
                              turns in {% generation %}), sp_bbpe: "add_prefix_space": false
    special_tokens_map.json   transformers: bos/eos/unk/pad + additional special tokens
    chat_template.jinja       the same ChatML template, for transformers >= 4.43 style loading
    z2all_tokenizer.json      z2all: tokenizer_type, vocab_size, special token ids

This module knows nothing about file formats of corpora: the ``python -m z2all.tokenizer.train_tokenizer``
face feeds it texts from :mod:`z2all.data.readers`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from z2all.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from z2all.tokenizer.chunked import hf_training_texts, sp_training_sentences
from z2all.tokenizer.special_tokens import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    INFERENCE_CHAT_TEMPLATE,
    NUM_SPECIAL_TOKENS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
)

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("hf_bbpe", "sp_bbpe")
SP_SPACE = "\u2581"  # sentencepiece's visible space "▁"


@dataclass
class TokenizerTrainConfig:
    """How to train a tokenizer (every flag of ``python -m z2all.tokenizer.train_tokenizer``)."""

    data_dir: str = ""
    """Folder with .jsonl/.json/.parquet/.txt files (searched recursively)."""
    save_dir: str = ""
    """Output folder; created if missing, files in it are replaced atomically."""
    vocab_size: int = 32000
    """Total vocabulary including the 16 special tokens (and, for sp_bbpe, the 256 byte pieces)."""
    tokenizer_type: str = "hf_bbpe"
    """``hf_bbpe`` (HF tokenizers byte-level BPE) or ``sp_bbpe`` (sentencepiece BPE + byte_fallback)."""
    max_chars: int = 0
    """Stop reading after this many characters of training text (0 = read everything)."""
    text_field: str = ""
    """Record field holding the text; empty tries ``text`` then ``content``."""
    min_frequency: int = 2
    """hf_bbpe: a pair must occur this often to be merged."""
    character_coverage: float = 0.9995
    """sp_bbpe: share of characters kept as symbols; the rest fall back to bytes. Lower it for tiny vocabs."""
    max_sentence_bytes: int = 8192
    """sp_bbpe: documents are cut into training pieces of at most this many UTF-8 bytes, before a space
    (else before a line break; ``z2all.tokenizer.chunked``). sentencepiece silently skips longer ones."""
    sp_input_sentence_size: int = 10_000_000
    """sp_bbpe: train on at most this many pieces (sentencepiece's ``input_sentence_size``; 0 = all).
    sentencepiece holds every piece it trains on in memory (~tens of GB for a 10 GB corpus), so the
    default caps memory at roughly ``this x max_sentence_bytes`` in the worst case, far less on real text."""
    sp_shuffle_input_sentence: bool = True
    """sp_bbpe: when there are more pieces than ``sp_input_sentence_size``, sample them uniformly
    (reservoir sampling over the whole stream); false takes the first ones in file order."""
    num_threads: int = 0
    """Trainer threads (0 = all cores)."""

    def __post_init__(self):
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"--tokenizer_type must be one of {TOKENIZER_TYPES}, got {self.tokenizer_type!r}"
            )
        min_vocab = NUM_SPECIAL_TOKENS + 256
        if self.vocab_size <= min_vocab:
            raise ValueError(f"--vocab_size must exceed {min_vocab} (16 special tokens + 256 bytes)")
        if self.sp_input_sentence_size < 0:
            raise ValueError(f"--sp_input_sentence_size must be >= 0, got {self.sp_input_sentence_size}")
        if self.num_threads <= 0:
            self.num_threads = os.cpu_count() or 1


class _TextStream:
    """The training texts, counted as the trainer takes them.

    An exception raised while producing them (a corrupt data file) ends the iteration and is kept, so
    :func:`train_tokenizer` re-raises it unchanged: sentencepiece would turn it into
    ``RuntimeError("INTERNAL: ...")``, which no longer names the error's type.
    """

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._texts:
                self.count += 1
                yield text
        except Exception as e:
            self.error = e


def train_tokenizer(texts: Iterable[str], cfg: TokenizerTrainConfig) -> Path:
    """Train on ``texts`` and save to ``cfg.save_dir``; returns the folder.

    Nothing is written unless training succeeded on at least one text: 0 texts would give a tokenizer of
    the 256 bytes only, smaller than ``cfg.vocab_size``, that looks like a finished one.
    """
    save_dir = Path(cfg.save_dir)
    stream = _TextStream(texts)
    model_bytes = None
    try:
        if cfg.tokenizer_type == "hf_bbpe":
            tokenizer_json = _train_hf_bbpe(stream, cfg)
        else:
            model_bytes = _train_sp_bbpe(stream, cfg)
            tokenizer_json = sp_model_to_tokenizer_json(model_bytes)
    except RuntimeError:
        if stream.error is None and stream.count:
            raise
        # sentencepiece fails on an empty or cut-short stream; the checks below say why.
    if stream.error is not None:
        raise stream.error
    if not stream.count:
        where = f"--data_dir={cfg.data_dir}" if cfg.data_dir else "the training texts"
        raise ValueError(f"{where}: no documents to train on; nothing saved to {save_dir}")
    if model_bytes is not None:
        atomic_write_bytes(save_dir / "tokenizer.model", model_bytes)
    atomic_write_text(save_dir / "tokenizer.json", tokenizer_json)
    vocab_size = len(json.loads(tokenizer_json)["model"]["vocab"])
    write_config_files(save_dir, cfg.tokenizer_type, vocab_size)
    logger.info("saved %s tokenizer (vocab %d) to %s", cfg.tokenizer_type, vocab_size, save_dir)
    if vocab_size < cfg.vocab_size:
        logger.warning(
            "%s: vocabulary %d < --vocab_size=%d: %d documents held too few distinct pairs to learn more "
            "merges; train on more text for the full size",
            save_dir,
            vocab_size,
            cfg.vocab_size,
            stream.count,
        )
    return save_dir


def write_config_files(save_dir: Path, tokenizer_type: str, vocab_size: int) -> None:
    """The transformers-compatible config files plus z2all's own ``z2all_tokenizer.json``."""
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[4:],
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
        "add_eos_token": False,
        # Lossless decode: transformers must not "clean up" spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if tokenizer_type == "sp_bbpe":
        # sentencepiece's "dummy prefix" is off (``add_dummy_prefix=False`` below): converters that read
        # this key (llama.cpp's) would otherwise prepend "▁" to every text.
        tok_config["add_prefix_space"] = False
    atomic_write_json(save_dir / "special_tokens_map.json", special_map)
    atomic_write_json(save_dir / "tokenizer_config.json", tok_config)
    atomic_write_text(save_dir / "chat_template.jinja", CHAT_TEMPLATE)
    atomic_write_json(
        save_dir / "z2all_tokenizer.json",
        {
            "format_version": 1,
            "tokenizer_type": tokenizer_type,
            "vocab_size": vocab_size,
            "special_tokens": {tok: i for i, tok in enumerate(SPECIAL_TOKENS)},
            "im_start": IM_START,
            "im_end": IM_END,
        },
    )


def upgrade_config_files(folder: Path) -> list[str]:
    """Bring the transformers files of a copy of a z2all tokenizer folder (an export) up to what
    :func:`write_config_files` writes today; returns the names of the files it rewrote.

    Folders trained before the ``{% generation %}`` markers keep their template (a run's tokenizer
    folder is never changed); their exports get the marked :data:`CHAT_TEMPLATE`, which renders the same
    text, and sp_bbpe's ``"add_prefix_space": false``. Only z2all's own older template is replaced: a
    template edited by hand, or the folder of a foreign tokenizer (no ``z2all_tokenizer.json``), is kept.
    """
    meta_file = folder / "z2all_tokenizer.json"
    if not meta_file.is_file():
        return []
    tokenizer_type = json.loads(meta_file.read_text(encoding="utf-8")).get("tokenizer_type")
    rewritten = []
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        changed = dict(config)
        if config.get("chat_template") == INFERENCE_CHAT_TEMPLATE:
            changed["chat_template"] = CHAT_TEMPLATE
        if tokenizer_type == "sp_bbpe":
            changed.setdefault("add_prefix_space", False)
        if changed != config:
            atomic_write_json(config_file, changed)
            rewritten.append(config_file.name)
    template_file = folder / "chat_template.jinja"
    if template_file.is_file() and template_file.read_text(encoding="utf-8") == INFERENCE_CHAT_TEMPLATE:
        atomic_write_text(template_file, CHAT_TEMPLATE)
        rewritten.append(template_file.name)
    return rewritten


# ---------------------------------------------------------------------------------------------- hf_bbpe
def _train_hf_bbpe(texts: Iterable[str], cfg: TokenizerTrainConfig) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No normalizer: lossless. add_prefix_space=False: "Hello" at the start of a text is not " Hello".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..15 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    # Long documents reach the trainer in pieces cut where the pre-tokenizer never merges across:
    # the same pair counts, with memory bounded per piece (z2all.tokenizer.chunked).
    tok.train_from_iterator(hf_training_texts(texts), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return tok.to_str()


# ---------------------------------------------------------------------------------------------- sp_bbpe
def _train_sp_bbpe(texts: Iterable[str], cfg: TokenizerTrainConfig) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    try:
        _sp_train(spm, texts, cfg, out)
    except RuntimeError as e:
        if "required_chars" in str(e):
            raise ValueError(
                f"--vocab_size={cfg.vocab_size} is too small for sp_bbpe: the characters needed for "
                f"--character_coverage={cfg.character_coverage} do not fit ({str(e).split('. ')[-2]}). "
                "Raise --vocab_size or lower --character_coverage (sentencepiece allows >= 0.98)."
            ) from e
        raise
    return out.getvalue()


def _sp_train(spm, texts: Iterable[str], cfg: TokenizerTrainConfig, out: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sp_training_sentences(texts, cfg.max_sentence_bytes),
        model_writer=out,
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        byte_fallback=True,
        character_coverage=cfg.character_coverage,
        # Lossless: no NFKC, no dummy "▁" prefix, keep runs of spaces.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=cfg.max_sentence_bytes,
        input_sentence_size=cfg.sp_input_sentence_size,
        shuffle_input_sentence=cfg.sp_shuffle_input_sentence,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        # control symbols are never produced from text: injection-proof by construction.
        control_symbols=SPECIAL_TOKENS[4:],
        num_threads=cfg.num_threads,
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size: a soft maximum
        minloglevel=2,
    )


def sp_model_to_tokenizer_json(model_bytes: bytes) -> str:
    """Convert a sentencepiece BPE model to an equivalent HF ``tokenizer.json``.

    sentencepiece BPE pieces are stored in merge order (score = -rank), so the merge that builds piece
    ``p`` is any split ``p = a + b`` with both halves in the vocab, ranked by ``p``'s id. Equivalence with
    sentencepiece is checked by tests on real text.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if pid < NUM_SPECIAL_TOKENS or sp.is_byte(pid) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=UNK,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", SP_SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok.to_str()
