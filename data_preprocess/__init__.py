"""data_preprocess: command-line tools that turn raw corpora into token files and index maps.

The tools face above ``z2all/data`` (which owns the file formats); nothing in ``z2all`` imports it. A
pretokenizer is a library module plus a thin ``python -m`` face: ``pretok_pretrain.py`` /
``pretokenize_pretrain_data.py`` and ``pretok_sft.py`` / ``pretokenize_sft_data.py``.
"""
