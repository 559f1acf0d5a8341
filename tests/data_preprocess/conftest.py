"""Reuse the session-scoped tiny tokenizers of ``tests/data/conftest.py``."""

from tests.data.conftest import tiny_sp_tokenizer_dir, tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401
