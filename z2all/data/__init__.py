"""Data: streaming readers, pretokenized pretraining data with a sample index, the global sampler.

Above the tokenizer floor, knows no model. File formats and the sampling rule: ``docs/data.md``.
Submodules are imported on first use so ``import z2all.data.readers`` stays light (no torch).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataFileError": "z2all.data.readers",
    "ReadStats": "z2all.data.readers",
    "iter_documents": "z2all.data.readers",
    "iter_records": "z2all.data.readers",
    "list_data_files": "z2all.data.readers",
    "PretokDatasetWithIndex": "z2all.data.pretrain_dataset",
    "GlobalBatchSampler": "z2all.data.sampler",
    "render_chat": "z2all.data.chat",
    "SFTDataset": "z2all.data.sft_dataset",
    "sft_collate": "z2all.data.sft_dataset",
    "DPODataset": "z2all.data.dpo_dataset",
    "dpo_collate": "z2all.data.dpo_dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'z2all.data' has no attribute {name!r}")
