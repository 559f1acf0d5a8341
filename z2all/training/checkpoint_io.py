"""Reading and writing the DCP part of a checkpoint: the floor under the manager and the model loader.

Both :mod:`z2all.training.checkpoint` (save/resume of a whole run, collective) and
:mod:`z2all.training.model_loading` (weights only, process-local) import down from here; this module
imports neither. It knows nothing about components, ranks or rotation: it reads a folder's ``state/``
into a state-dict template through the safe reader and planner (:mod:`.checkpoint_safety`), writes one,
and checks strictly that what is saved fits the template before a byte is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from z2all.training.checkpoint_format import DCP_DIR, CheckpointMismatchError
from z2all.training.checkpoint_safety import SafeFileSystemReader, SafeLoadPlanner


def model_config_dict(model: nn.Module) -> dict | None:
    """The model's config as a JSON-able dict (dataclass or ``to_dict()``), or None."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        d = dataclasses.asdict(cfg)
    else:
        return None
    try:
        json.dumps(d)
    except TypeError:
        return None
    return d


@contextmanager
def _single_process_ok(no_dist: bool) -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process; that is intended
    here, so silence exactly that warning for the duration of the call."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextmanager
def _no_sharded_tensor_notice() -> Iterator[None]:
    """ZeRO-1's checkpoints use ShardedTensor (parallel/distributed_optimizer/sharded_state.py says
    why); torch warns on every use of one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        yield


def read_metadata(ckpt_dir: Path) -> Metadata:
    """The DCP metadata of ``ckpt_dir/state`` (allowlist unpickler: never runs code)."""
    return SafeFileSystemReader(ckpt_dir / DCP_DIR).read_metadata()


def check_fits(meta: Metadata, name: str, template: dict[str, Any], source: Path) -> None:
    """Strict check of the flat state dict saved under ``name`` against ``template`` (the live one):
    every key present on both sides, every tensor the same shape; names every difference."""
    # Non-tensor entries (BytesStorageMetadata) have no size (None): never a fit for a tensor.
    prefix = f"{name}."
    saved = {
        k[len(prefix) :]: getattr(md, "size", None)
        for k, md in meta.state_dict_metadata.items()
        if k.startswith(prefix)
    }
    missing = sorted(set(template) - set(saved))
    unexpected = sorted(set(saved) - set(template))
    with _no_sharded_tensor_notice():
        shapes = [
            f"{k}: checkpoint {'non-tensor' if saved[k] is None else tuple(saved[k])} vs {name} "
            f"{tuple(v.shape)}"
            for k, v in template.items()
            if k in saved
            and isinstance(v, torch.Tensor)
            and (saved[k] is None or tuple(saved[k]) != tuple(v.shape))
        ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not fit the {name}: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {shapes[:10]}"
        )


def load_dcp(ckpt_dir: Path, template: dict[str, Any], no_dist: bool) -> None:
    """Fill ``template`` (nested dicts of tensors and plain values) in place from ``ckpt_dir/state``.
    Collective when ``no_dist`` is False (every rank of the process group calls)."""
    reader = SafeFileSystemReader(ckpt_dir / DCP_DIR)
    with _single_process_ok(no_dist), _no_sharded_tensor_notice():
        dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(str(ckpt_dir)), no_dist=no_dist)


def save_dcp(state: dict[str, Any], dcp_dir: Path, no_dist: bool, group: Any = None) -> None:
    """Write ``state`` into ``dcp_dir`` (fsynced). Collective over ``group`` (None: the default one)
    when ``no_dist`` is False: replicated entries are written by one rank only, and a write error on
    any rank reaches every rank as DCP's ``CheckpointException``."""
    writer = FileSystemWriter(dcp_dir, sync_files=True)
    with _single_process_ok(no_dist), _no_sharded_tensor_notice():
        dcp.save(state, storage_writer=writer, no_dist=no_dist, process_group=group)


def load_model_weights(ckpt_dir: Path, model: nn.Module) -> None:
    """Process-local: the weights of checkpoint ``ckpt_dir`` into the bare ``model``, strictly."""
    template = {"model": get_model_state_dict(model)}
    check_fits(read_metadata(ckpt_dir), "model", template["model"], ckpt_dir)
    load_dcp(ckpt_dir, template, no_dist=True)
    set_model_state_dict(model, template["model"])
