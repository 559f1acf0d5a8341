"""Tokenizers: training (:mod:`~z2all.tokenizer.trainer`) and loading (:class:`Z2allTokenizer`).

Ground floor: imports neither the model nor the data package. The exception is the command-line
face :mod:`z2all.tokenizer.train_tokenizer`, which reads corpora with ``z2all.data.readers`` and is
never imported by this package. See ``docs/data.md``.
"""

from z2all.tokenizer.special_tokens import (
    CHAT_TEMPLATE,
    INFERENCE_CHAT_TEMPLATE,
    NUM_SPECIAL_TOKENS,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
)
from z2all.tokenizer.tokenizer import TokenizerFileError, Z2allTokenizer
from z2all.tokenizer.trainer import (
    TOKENIZER_TYPES,
    TokenizerTrainConfig,
    train_tokenizer,
    upgrade_config_files,
)

__all__ = [
    "CHAT_TEMPLATE",
    "INFERENCE_CHAT_TEMPLATE",
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "TOKENIZER_TYPES",
    "TokenizerFileError",
    "TokenizerTrainConfig",
    "Z2allTokenizer",
    "train_tokenizer",
    "upgrade_config_files",
]
