"""Turn one SFT record, in any accepted layout, into a ChatML message list.

Two families, picked by ``sft_type`` (there is no guessing between them):

``conversation``
    * a bare JSON list of ``{"role", "content"}`` messages (one per line in .jsonl);
    * ``{"messages": [...]}`` or ``{"conversations": [...]}`` holding such a list;
    * ShareGPT / BelleGroup: ``{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system",
      "value": str}, ...]}``, optionally with a top-level ``"system"`` string.
``instruction``
    Alpaca: ``{"instruction", "input"?, "output", "system"?}``; the user turn is the instruction,
    followed by a newline and the input when the input is non-empty (LLaMA-Factory's convention).

Errors are :class:`SFTRecordError` and name the record (``where``), e.g. ``"a.jsonl line 12"``; the
dataset builders count them as bad records and go on.
"""

from __future__ import annotations

from typing import Any

from z2all.data.chat import ChatFormatError, validate_messages

SFT_TYPES = ("conversation", "instruction")

# ShareGPT "from" values -> ChatML roles.
_FROM_TO_ROLE = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class SFTRecordError(ChatFormatError):
    """A record that does not match the selected SFT format."""


def _convert_message(msg: Any, i: int, where: str) -> dict:
    if not isinstance(msg, dict):
        raise SFTRecordError(f"{where}: message {i} is a {type(msg).__name__}, expected an object")
    if "role" in msg:
        return {"role": msg["role"], "content": msg.get("content")}
    if "from" in msg:
        role = _FROM_TO_ROLE.get(msg["from"]) if isinstance(msg["from"], str) else None
        if role is None:
            raise SFTRecordError(
                f"{where}: message {i} has unknown 'from' {msg['from']!r} "
                f"(expected one of {sorted(_FROM_TO_ROLE)})"
            )
        return {"role": role, "content": msg.get("value")}
    raise SFTRecordError(f"{where}: message {i} has neither 'role'/'content' nor 'from'/'value' keys")


def conversation_to_messages(record: Any, where: str) -> list[dict]:
    """Messages of a conversation-type record (see the module docstring for the layouts)."""
    system = None
    if isinstance(record, list):
        raw = record
    elif isinstance(record, dict):
        key = next((k for k in ("messages", "conversations") if k in record), None)
        if key is None:
            raise SFTRecordError(
                f"{where}: expected a message list or an object with 'messages'/'conversations'"
            )
        raw = record[key]
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise SFTRecordError(f"{where}: 'system' must be a string, got {type(system).__name__}")
        if not isinstance(raw, list):
            raise SFTRecordError(f"{where}: '{key}' must be a list, got {type(raw).__name__}")
    else:
        raise SFTRecordError(f"{where}: expected a JSON list or object, got {type(record).__name__}")
    messages = [_convert_message(m, i, where) for i, m in enumerate(raw)]
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    validate_messages(messages, where)
    return messages


def _optional_str(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SFTRecordError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def instruction_to_messages(record: Any, where: str) -> list[dict]:
    """Messages of an Alpaca record: optional system, the user turn, the assistant output."""
    if not isinstance(record, dict):
        raise SFTRecordError(f"{where}: expected an Alpaca object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise SFTRecordError(
                f"{where}: missing or non-string '{key}' (Alpaca needs instruction and output)"
            )
    system = _optional_str(record, "system", where)
    extra = _optional_str(record, "input", where)
    user = record["instruction"] if not extra else f"{record['instruction']}\n{extra}"
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    validate_messages(messages, where)  # catches text no tokenizer can encode (lone surrogates)
    return messages


def record_to_messages(record: Any, sft_type: str, where: str) -> list[dict]:
    """Dispatch on ``sft_type``; raises :class:`SFTRecordError` (naming ``where``) for a bad record."""
    if sft_type == "conversation":
        return conversation_to_messages(record, where)
    if sft_type == "instruction":
        return instruction_to_messages(record, where)
    raise ValueError(f"sft_type must be one of {SFT_TYPES}, got {sft_type!r}")
