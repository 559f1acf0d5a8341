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


def test_adamw_backend_is_the_optimizers_own_resolution(monkeypatch):
    """env reports what build_adamw(backend="auto") picks: apex only if FusedAdam really imports."""
    import optimizer.adamw as adamw
    from optimizer import resolve_adamw_backend
    from z2all import env

    p = torch.nn.Parameter(torch.zeros(2))
    if not torch.cuda.is_available():
        assert env.collect()["adamw_backend"] == resolve_adamw_backend([p]) == "foreach"
    # A CUDA machine where apex is installed (find_spec sees it) but its extension is broken:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env, "library_version", lambda name: "0.1")
    monkeypatch.setattr(env, "_devices", lambda: ["cuda:0 (fake)"])
    monkeypatch.setattr(env, "_nccl_version", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)
    monkeypatch.setattr(adamw, "_apex_fused_adam", lambda: None)
    assert env.collect()["adamw_backend"] == "fused"
    monkeypatch.setattr(adamw, "_apex_fused_adam", lambda: object)  # FusedAdam imports
    assert env.collect()["adamw_backend"] == "apex"
