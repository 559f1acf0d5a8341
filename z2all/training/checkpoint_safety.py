"""Loading checkpoint files without ever unpickling arbitrary objects.

Three doors into a z2all checkpoint could run code if left as PyTorch ships them, and each is
closed here (design: ``docs/checkpoint.md``):

- per-rank files (``rank_*.pt``): :func:`safe_torch_load` = ``torch.load(weights_only=True)``;
- DCP's ``.metadata`` is a plain pickle that ``FileSystemReader`` reads with ``pickle.load``:
  :class:`SafeFileSystemReader` reads it with an unpickler that resolves only DCP's metadata
  classes, ``torch.Size``, dtypes and paths;
- DCP's non-tensor items (e.g. optimizer ``param_groups``) are loaded by the default planner with
  ``weights_only=False``: :class:`SafeLoadPlanner` first proves the same bytes load with
  ``weights_only=True``.

Anything else raises :class:`UnsafeCheckpointError` naming the file (and the offending global).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need arbitrary unpickling (a custom class or callable) to load."""


# Globals DCP's .metadata pickle legitimately references. Everything else is refused.
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class AllowlistUnpickler(pickle.Unpickler):
    """Unpickler for DCP metadata that resolves only the allowlisted DCP/torch classes."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load: it references {module}.{name}, which is not a "
                "DCP metadata class (loading it would run arbitrary code)"
            )
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose ``read_metadata`` uses the allowlist unpickler instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            metadata = AllowlistUnpickler(f, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner loads non-tensor items with ``weights_only=False``; check them first."""

    def __init__(self, source: str):
        # ZeRO-1's sharded tensors are flat (never nested, FSDP-style): DCP's nested-shard flattening
        # is not needed, and it drops the plain dicts beside them (seen with "progress" on 2 ranks)
        super().__init__(flatten_sharded_tensors=False)
        self.source = source

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _weights_only_failure(f"{self.source}: item {read_item.dest_index.fqn!r}", e) from e
        value.seek(0)  # proven weights_only-safe: the parent may deserialize the same bytes
        super().load_bytes(read_item, value)


def _weights_only_failure(source: str, e: pickle.UnpicklingError) -> Exception:
    """Tell a refused global/callable (unsafe) from bytes that are simply not a valid pickle
    (corrupt: ValueError, so a resume falls back to the previous checkpoint)."""
    detail = " ".join(str(e).split())
    # torch's weights_only unpickler names what it refused: "Unsupported global: GLOBAL mod.name".
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused is not None:
        return UnsafeCheckpointError(
            f"{source}: refused to load: it needs arbitrary unpickling of {refused.group(1)}, "
            "which could run code"
        )
    return ValueError(f"{source}: not a readable torch file ({detail[:200]})")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU. Raises :class:`UnsafeCheckpointError` naming
    the file when it would need arbitrary unpickling, ValueError when it is not a valid file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _weights_only_failure(str(path), e) from e
