"""Turn one DPO record into ``(prompt messages, chosen text, rejected text)``.

Accepted layouts (detected per record from its keys):

* DPO-En-Zh-20k: ``{"system"?, "history"?, "question", "response_chosen", "response_rejected"}``
* hiyouga/DPO-En-Zh-20k: ``{"system"?, "history"?, "prompt", "answer": [chosen, rejected]}``
* plain: ``{"system"?, "history"?, "prompt", "chosen", "rejected"}``

``history`` is a list of ``[user, assistant]`` pairs that precede the question. The prompt messages
are ``[system (if non-empty), user_1, assistant_1, ..., user_n, assistant_n, question]``; the caller
renders them with the generation prompt and appends each response + ``<|im_end|>``.
"""

from __future__ import annotations

from typing import Any

from z2all.data.chat import ChatFormatError, check_utf8, validate_messages


class DPORecordError(ChatFormatError):
    """A record in none of the accepted DPO layouts."""


def _check_utf8(text: str, where: str, what: str) -> None:
    """:func:`~z2all.data.chat.check_utf8` raising this module's error (a lone surrogate is a bad record)."""
    try:
        check_utf8(text, where, what)
    except ChatFormatError as e:
        raise DPORecordError(str(e)) from None


def _str_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise DPORecordError(f"{where}: '{key}' is {kind}, expected a string")
    _check_utf8(value, where, f"'{key}'")
    return value


def _history(record: dict, where: str) -> list[dict]:
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DPORecordError(f"{where}: 'history' must be a list of [user, assistant] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DPORecordError(f"{where}: history[{i}] is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def dpo_record_to_parts(record: Any, where: str) -> tuple[list[dict], str, str]:
    """``(prompt_messages, chosen, rejected)``; raises :class:`DPORecordError` naming ``where``."""
    if not isinstance(record, dict):
        raise DPORecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record:
        question = _str_field(record, "question", where)
        chosen = _str_field(record, "response_chosen", where)
        rejected = _str_field(record, "response_rejected", where)
    elif "prompt" in record and "answer" in record:
        question = _str_field(record, "prompt", where)
        answer = record["answer"]
        if not (isinstance(answer, list) and len(answer) == 2 and all(isinstance(a, str) for a in answer)):
            raise DPORecordError(f"{where}: 'answer' must be [chosen, rejected], two strings")
        chosen, rejected = answer
        _check_utf8(chosen, where, "'answer[0]'")
        _check_utf8(rejected, where, "'answer[1]'")
    elif "prompt" in record:
        question = _str_field(record, "prompt", where)
        chosen = _str_field(record, "chosen", where)
        rejected = _str_field(record, "rejected", where)
    else:
        raise DPORecordError(
            f"{where}: no 'question' or 'prompt' key (expected question/response_chosen/response_rejected, "
            "prompt/answer, or prompt/chosen/rejected)"
        )
    system = _str_field(record, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages += _history(record, where) + [{"role": "user", "content": question}]
    validate_messages(messages, where)
    return messages, chosen, rejected
