"""The special tokens every z2all tokenizer reserves, with fixed low ids, and the ChatML chat template.

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
# Each assistant reply and its <|im_end|> sit inside transformers' ``{% generation %}`` block: exactly
# the tokens z2all's SFT labels train (``z2all.data.chat``), so ``apply_chat_template(...,
# return_assistant_tokens_mask=True)`` and TRL's ``SFTTrainer(assistant_only_loss=True)`` mask the same
# tokens. The markers add no text: it renders exactly what INFERENCE_CHAT_TEMPLATE renders (tested on
# real dialogues in tests/tokenizer/test_chat_template.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same ChatML without the markers, the template every tokenizer folder trained before them carries
# (those folders keep it). Inference engines get this one (``python -m z2all.export_gguf``): the
# ``generation`` tag is a transformers extension for training that plain Jinja2 refuses to parse
# ("Encountered unknown tag 'generation'"; recent llama.cpp and llama-cpp-python skip it), and this is
# the stock ChatML text that template-matching engines (Ollama) know.
INFERENCE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
