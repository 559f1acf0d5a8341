"""ChatML rendering with a per-token "trainable" mask: the one place that turns messages into ids.

Every dialogue the project trains on or samples from goes through :func:`render_chat`, so SFT labels,
DPO prompts and the chat REPL agree token for token. The template (ChatML, as used by Qwen) is::

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n
    <|im_start|>user\\nHi<|im_end|>\\n
    <|im_start|>assistant\\nHello!<|im_end|>\\n
                          ^^^^^^^^^^^^^^^^^  trainable: the reply and its <|im_end|>, nothing else

Invariants (tested in ``tests/data/test_chat.py``):

* Only this module inserts special ids (``im_start_id``, ``im_end_id``). Every piece of text, message
  content included, goes through ``tok.encode``, which never parses special tokens, so a user who
  types ``<|im_end|>`` gets ordinary tokens, not a forged turn boundary.
* Each piece (``"{role}\\n"`` header, content, the ``"\\n"`` after ``<|im_end|>``) is encoded on its
  own, so piece boundaries are token boundaries: the mask is exact, and the ids of
  ``render_chat(msgs[:k], add_generation_prompt=True)`` are a prefix of the ids of any continuation
  that adds an assistant turn (DPO and the sampler rely on this).
* ``trainable`` is True exactly on the tokens of each assistant reply and its ``<|im_end|>``; never on
  ``<|im_start|>``, the role header, or the trailing newline (the model must not learn to emit
  what the template adds anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A message list that the template cannot render (unknown role, non-string content, ...)."""


def check_utf8(text: str, where: str, what: str) -> None:
    """Raise :class:`ChatFormatError` if ``text`` cannot be encoded as UTF-8.

    Valid JSON may hold a lone surrogate (``"\\ud800"``); Python keeps it in the ``str`` but no
    tokenizer can encode it (the HF tokenizer raises ``TypeError`` deep inside ``encode_batch``), so
    such a record must be rejected here, where it is counted as bad, not when the batch is encoded.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatFormatError(
            f"{where}: {what} is not valid UTF-8 ({e.reason} at position {e.start})"
        ) from None


class ChatTokenizer(Protocol):
    """What rendering needs from a tokenizer (``z2all.tokenizer.Z2allTokenizer`` provides it)."""

    im_start_id: int
    im_end_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def validate_messages(messages: Any, where: str = "messages") -> None:
    """Raise :class:`ChatFormatError` naming ``where`` (e.g. ``"a.jsonl line 7"``) if not renderable."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(
            f"{where}: expected a non-empty list of messages, got {type(messages).__name__}"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"{where}: message {i} is a {type(msg).__name__}, expected an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: message {i} has unknown role {role!r} (expected one of {ROLES})")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ChatFormatError(
                f"{where}: message {i} ({role}) has content of type {type(content).__name__}, "
                "expected a string"
            )
        check_utf8(content, where, f"message {i} ({role}) content")


class _Pieces:
    """The template's fixed pieces, encoded once per tokenizer: headers, newline and the two specials."""

    def __init__(self, tok: ChatTokenizer):
        self.im_start = int(tok.im_start_id)
        self.im_end = int(tok.im_end_id)
        encoded = tok.encode_batch([f"{role}\n" for role in ROLES] + ["\n"])
        self.header = {role: list(ids) for role, ids in zip(ROLES, encoded)}
        self.newline = list(encoded[-1])


def _assemble(
    pieces: _Pieces, messages: list[dict], contents: Sequence[list[int]], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trainable: list[bool] = []
    for msg, content in zip(messages, contents):
        learn = msg["role"] == "assistant"
        head = [pieces.im_start, *pieces.header[msg["role"]]]
        ids += head
        trainable += [False] * len(head)
        ids += content
        ids.append(pieces.im_end)
        trainable += [learn] * (len(content) + 1)  # the reply and its <|im_end|>
        ids += pieces.newline
        trainable += [False] * len(pieces.newline)
    if add_generation_prompt:
        head = [pieces.im_start, *pieces.header["assistant"]]
        ids += head
        trainable += [False] * len(head)
    return ids, trainable


def render_chat(
    tok: ChatTokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    *,
    where: str = "messages",
) -> tuple[list[int], list[bool]]:
    """ChatML ids of ``messages`` and a parallel mask of the tokens an SFT loss should learn.

    ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
    ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` (for sampling or a DPO prompt).
    ``where`` names the record in error messages. Returns ``(ids, trainable)`` of equal length.
    """
    return render_chats(tok, [messages], add_generation_prompt, wheres=[where])[0]


def render_chats(
    tok: ChatTokenizer,
    conversations: list[list[dict]],
    add_generation_prompt: bool = False,
    *,
    wheres: list[str] | None = None,
) -> list[tuple[list[int], list[bool]]]:
    """:func:`render_chat` over many conversations with a single ``encode_batch`` call (the fast path)."""
    wheres = wheres if wheres is not None else [f"conversation {i}" for i in range(len(conversations))]
    for messages, where in zip(conversations, wheres):
        validate_messages(messages, where)
    pieces = _Pieces(tok)
    flat = tok.encode_batch([m["content"] for messages in conversations for m in messages])
    out = []
    pos = 0
    for messages in conversations:
        out.append(_assemble(pieces, messages, flat[pos : pos + len(messages)], add_generation_prompt))
        pos += len(messages)
    return out
