"""The data floor may use the tokenizer and the stdlib-only basement (``z2all.labels``, ``z2all.atomic``,
``z2all.log``), never the model, the training loop or the tools above it (``data_preprocess``)."""

from __future__ import annotations

import json
import subprocess
import sys

ALLOWED = {"z2all", "z2all.atomic", "z2all.labels", "z2all.log"}


def test_importing_every_data_module_loads_no_model_training_or_tools():
    code = (
        "import importlib, json, pkgutil, sys, z2all.data\n"
        "for m in pkgutil.iter_modules(z2all.data.__path__):\n"
        "    importlib.import_module('z2all.data.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('z2all', 'parallel', 'optimizer', 'data_preprocess'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "z2all.data.sft_shards" in loaded  # every submodule was imported
    outside = {m for m in loaded if not m.startswith(("z2all.data", "z2all.tokenizer"))}
    assert outside <= ALLOWED, outside - ALLOWED
