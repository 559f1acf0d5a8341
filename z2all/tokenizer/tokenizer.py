"""``Z2allTokenizer``: z2all's own loader for a folder written by :mod:`z2all.tokenizer.trainer`.

It needs only ``tokenizers`` (hf_bbpe) or ``sentencepiece`` (sp_bbpe), never transformers.

Security invariant: :meth:`Z2allTokenizer.encode` treats its input as plain text. A document or a chat
message containing the literal string ``<|im_end|>`` encodes to ordinary byte/merge ids, never to a
special id (ids ``0..15``); only a chat template (``z2all.data.chat``) inserts special ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import z2all.tokenizer.special_tokens as st

_SP_SPACE = "\u2581"


class TokenizerFileError(ValueError):
    """A file of a tokenizer folder that cannot be loaded (not JSON, not a tokenizer, missing special
    tokens); the message names the file and, for JSON, the line and column."""


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 text (byte {e.start}); is it a tokenizer file?") from e
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


class _HFBackend:
    """tokenizer.json through HF ``tokenizers`` (Rust)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception ("data did not match any variant ...")
            raise TokenizerFileError(f"{path}: not a tokenizers file ({e})") from e
        # Added (special) tokens are not split out of the input: "<|im_end|>" in text stays text.
        self.tok.encode_special_tokens = True
        self._fast = hasattr(self.tok, "encode_batch_fast")

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast:  # no offsets/alignments: about 2x faster
            return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode_plain(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class _SPBackend:
    """tokenizer.model through ``sentencepiece`` (C++). Control symbols (our specials) decode to ''
    in sentencepiece, so :meth:`Z2allTokenizer.decode` renders them itself.

    sentencepiece writes a space as "▁" (U+2581), so a literal "▁" in the text would come back as a
    space. To stay lossless, text is split at literal "▁" and each one is encoded as its three UTF-8
    byte pieces, which decode back to "▁".
    """

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerFileError(f"{path}: not a sentencepiece model ({e})") from e
        self._space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode("utf-8")]

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.sp.id_to_piece(i)) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    def encode(self, text: str) -> list[int]:
        if _SP_SPACE in text:
            return self._encode_with_literal_space(text)
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self.sp.encode(texts, out_type=int)
        for i, text in enumerate(texts):
            if _SP_SPACE in text:
                out[i] = self._encode_with_literal_space(text)
        return out

    def _encode_with_literal_space(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(_SP_SPACE)):
            if k:
                ids.extend(self._space_bytes)
            ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode_plain(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class Z2allTokenizer:
    """A trained z2all tokenizer. Build it with :meth:`from_pretrained`."""

    def __init__(self, tok_dir: str | os.PathLike, tokenizer_type: str, backend, fingerprint: str):
        self.tok_dir = Path(tok_dir)
        self.tokenizer_type = tokenizer_type
        self._backend = backend
        self._fingerprint = fingerprint
        self.vocab_size: int = backend.vocab_size()
        ids = {}
        for s in (st.UNK, st.BOS, st.EOS, st.PAD, st.IM_START, st.IM_END):
            i = backend.token_to_id(s)
            if i is None:
                raise TokenizerFileError(f"{self.tok_dir}: tokenizer has no special token {s!r}")
            ids[s] = i
        self.unk_id, self.bos_id, self.eos_id = ids[st.UNK], ids[st.BOS], ids[st.EOS]
        self.pad_id, self.im_start_id, self.im_end_id = ids[st.PAD], ids[st.IM_START], ids[st.IM_END]
        # Every special id, z2all's fixed ones plus any extra added tokens of a foreign tokenizer.json.
        self.special_ids: frozenset[int] = frozenset(
            i for s in st.SPECIAL_TOKENS if (i := backend.token_to_id(s)) is not None
        )
        template_file = self.tok_dir / "chat_template.jinja"
        self.chat_template = template_file.read_text("utf-8") if template_file.is_file() else st.CHAT_TEMPLATE

    @classmethod
    def from_pretrained(cls, tok_dir: str | os.PathLike) -> Z2allTokenizer:
        """Load ``tok_dir``: sentencepiece when ``z2all_tokenizer.json`` says sp_bbpe, else tokenizer.json."""
        tok_dir = Path(tok_dir)
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"tokenizer folder {tok_dir} does not exist")
        meta_file = tok_dir / "z2all_tokenizer.json"
        tokenizer_type = "hf_bbpe"
        if meta_file.is_file():
            meta = _read_json(meta_file)
            if not isinstance(meta, dict) or "tokenizer_type" not in meta:
                raise TokenizerFileError(f"{meta_file}: no tokenizer_type: not a z2all tokenizer description")
            tokenizer_type = meta["tokenizer_type"]
        if tokenizer_type == "sp_bbpe":
            model_file = tok_dir / "tokenizer.model"
            if not model_file.is_file():
                raise FileNotFoundError(f"{model_file} missing (z2all_tokenizer.json says sp_bbpe)")
            backend = _SPBackend(model_file)
            content = model_file.read_bytes()
        elif tokenizer_type == "hf_bbpe":
            json_file = tok_dir / "tokenizer.json"
            if not json_file.is_file():
                raise FileNotFoundError(f"{json_file} missing: not a tokenizer folder")
            # Parsed here first: a JSON error then names its line; tokenizers' own message does not.
            # Canonical JSON so re-serialising the same tokenizer keeps the fingerprint.
            content = json.dumps(_read_json(json_file), sort_keys=True).encode("utf-8")
            backend = _HFBackend(json_file)
        else:
            raise TokenizerFileError(f"{meta_file}: unknown tokenizer_type {tokenizer_type!r}")
        fingerprint = hashlib.sha256(tokenizer_type.encode() + b"\0" + content).hexdigest()
        return cls(tok_dir, tokenizer_type, backend, fingerprint)

    # ------------------------------------------------------------------------------------------ api
    def encode(self, text: str) -> list[int]:
        """Plain text to ids: never parses special tokens, adds no BOS/EOS."""
        return self._backend.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (backends batch and multithread internally)."""
        return self._backend.encode_batch(list(texts))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids to text; special ids render as their strings unless ``skip_special_tokens``."""
        ids = [int(i) for i in ids]
        if self.special_ids.isdisjoint(ids):  # fast path: plain text
            return self._backend.decode_plain(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self._backend.decode_plain(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._backend.id_to_token(i))
            else:
                run.append(i)
        if run:
            out.append(self._backend.decode_plain(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    def fingerprint(self) -> str:
        """sha256 (hex) of the tokenizer type and model file: identical tokenizers, identical ids."""
        return self._fingerprint

    @property
    def num_special_tokens(self) -> int:
        return st.NUM_SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Z2allTokenizer(type={self.tokenizer_type}, vocab_size={self.vocab_size}, "
            f"dir={str(self.tok_dir)!r}, fingerprint={self._fingerprint[:12]})"
        )
