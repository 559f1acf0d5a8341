"""``python -m z2all.env``: everything a bug report needs about this machine, as "key: value" lines.

z2all / Python / platform / torch / CUDA / cuDNN / NCCL versions, the visible devices, which optional
libraries are installed (with versions), the fused-kernel backends a model built now would use, the
AdamW backend ``optimizer.build_adamw(backend="auto")`` picks for parameters on the default device
(CUDA when available; same resolution code), and the torch.distributed backends available.
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys

import torch

import z2all
from optimizer.adamw import auto_adamw_backend
from z2all.model import kernels

OPTIONAL_LIBRARIES = (
    "flash_attn",
    "apex",
    "xformers",
    "liger_kernel",
    "transformers",
    "tokenizers",
    "safetensors",
    "tensorboard",
    "swanlab",
    "wandb",
)

# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"flash_attn": "flash-attn", "liger_kernel": "liger-kernel"}


def library_version(name: str) -> str | None:
    """Installed version of an optional library, or None when it is absent.

    Read from the package metadata without importing (importing transformers alone takes seconds);
    whether a kernel library actually imports shows in the kernel-backend line.
    """
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _devices() -> list[str]:
    if not torch.cuda.is_available():
        return [f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor})")
    return out


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def collect() -> dict:
    """The report as a dict (what ``--json`` prints)."""
    dist = torch.distributed
    backends = []
    if dist.is_available():
        for name, check in (
            ("gloo", "is_gloo_available"),
            ("nccl", "is_nccl_available"),
            ("mpi", "is_mpi_available"),
        ):
            if getattr(dist, check, lambda: False)():
                backends.append(name)
    # The optimizer's own resolution (apex only if FusedAdam imports), for parameters on the default device.
    adamw = auto_adamw_backend(on_cuda=torch.cuda.is_available())
    return {
        "z2all": z2all.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda
        if torch.cuda.is_available()
        else f"not available (built for {torch.version.cuda})",
        "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None,
        "nccl": _nccl_version(),
        "devices": _devices(),
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "libraries": {name: library_version(name) for name in OPTIONAL_LIBRARIES},
        "kernel_backends": kernels.active_backends(),
        "adamw_backend": adamw,
        "distributed_backends": backends,
    }


def format_report(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if key == "libraries":
            for lib, version in value.items():
                lines.append(f"{lib}: {version if version is not None else 'not installed'}")
        elif key == "kernel_backends":
            lines.append("kernel backends: " + ", ".join(f"{op}={b}" for op, b in value.items()))
        elif key == "devices":
            lines.append("devices: " + "; ".join(value))
        elif key == "distributed_backends":
            lines.append("torch.distributed backends: " + (", ".join(value) or "none"))
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m z2all.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
