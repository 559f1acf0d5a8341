"""The model floor imports torch, the optional kernel libraries and the stdlib-only basement, nothing else
of ours (STYLE.md, "Layers"): no tokenizer, no data, no training loop, no parallel wrappers."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_the_model_loads_only_the_basement_of_ours():
    code = (
        "import json, sys, z2all.model\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('z2all', 'parallel', 'optimizer', 'data_preprocess'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    outside = {m for m in json.loads(out) if not m.startswith("z2all.model")}
    assert outside == {"z2all", "z2all.atomic", "z2all.labels"}
