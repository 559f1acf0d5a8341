"""The tokenizer floor imports nothing of ours but the stdlib-only basement (STYLE.md, "Layers").

The exception is the command-line face ``z2all.tokenizer.train_tokenizer``, which reads corpora with
``z2all.data.readers``; the package never imports it, and it is not imported here.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_the_tokenizer_loads_only_the_basement_of_ours():
    code = (
        "import json, sys\n"
        "import z2all.tokenizer, z2all.tokenizer.chunked, z2all.tokenizer.trainer\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('z2all', 'parallel', 'optimizer', 'data_preprocess'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    outside = {m for m in json.loads(out) if not m.startswith("z2all.tokenizer")}
    assert outside == {"z2all", "z2all.atomic"}
