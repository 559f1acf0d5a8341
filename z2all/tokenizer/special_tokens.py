"""The special tokens every z2all tokenizer reserves, with fixed low ids.

Invariant: ids ``0 .. NUM_SPECIAL_TOKENS-1`` are exactly :data:`SPECIAL_TOKENS` in this order, for both
tokenizer types, so a model, a chat template and a pretokenized ``.bin`` can rely on e.g. ``eos_id == 2``
without reading the tokenizer. The reserved slots let later versions add tokens (tool calls, FIM, ...)
without shifting the ids of learned merges.
"""

from __future__ import annotations

UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_RESERVED = 10

SPECIAL_TOKENS: list[str] = [UNK, BOS, EOS, PAD, IM_START, IM_END] + [
    f"<|reserved_{i}|>" for i in range(NUM_RESERVED)
]
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
SPECIAL_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

# ChatML, the only place special ids enter a sequence. ``add_generation_prompt`` opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
