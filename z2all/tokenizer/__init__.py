"""Tokenizers: training (:mod:`~z2all.tokenizer.trainer`) and loading (:class:`Z2allTokenizer`).

Ground floor: imports neither the model nor the data package. See ``docs/data.md``.
"""

from z2all.tokenizer.special_tokens import (
    CHAT_TEMPLATE,
    NUM_SPECIAL_TOKENS,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
)
from z2all.tokenizer.tokenizer import Z2allTokenizer
from z2all.tokenizer.trainer import TOKENIZER_TYPES, TokenizerTrainConfig, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "TOKENIZER_TYPES",
    "TokenizerTrainConfig",
    "Z2allTokenizer",
    "train_tokenizer",
]
