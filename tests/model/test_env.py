"""``python -m z2all.env`` runs as a subprocess and prints the lines a bug report needs."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import z2all
from z2all.model import kernels


def _run(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "z2all.env", *args], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_env_report_lines():
    out = _run()
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["z2all"] == z2all.__version__
    assert lines["torch"] == torch.__version__
    assert lines["python"] == sys.version.split()[0]
    for key in ("cuda", "nccl", "devices", "kernel backends", "torch.distributed backends", "adamw_backend"):
        assert key in lines, key
    for lib in (
        "flash_attn",
        "apex",
        "xformers",
        "liger_kernel",
        "transformers",
        "tensorboard",
        "swanlab",
        "wandb",
    ):
        assert lib in lines, lib
    import transformers

    assert lines["transformers"] == transformers.__version__
    assert "gloo" in lines["torch.distributed backends"]
    expected = ", ".join(f"{op}={b}" for op, b in kernels.active_backends().items())
    assert lines["kernel backends"] == expected


def test_env_json():
    import io
    from contextlib import redirect_stdout

    from z2all.env import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["--json"]) == 0
    info = json.loads(buf.getvalue())
    assert info["kernel_backends"] == kernels.active_backends()
    assert set(info["libraries"]) >= {"flash_attn", "apex", "xformers", "liger_kernel", "wandb"}
