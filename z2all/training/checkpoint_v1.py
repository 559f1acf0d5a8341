"""Reading checkpoints of format version 1 (z2all before the component redesign) as version 2.

Version 1 kept the loop's own dict in every rank file: ``rank_<R>.pt = {"rng": ..., "extra": {step,
tokens, world_size, overlap_optim_step, scaler?, comm_state?}}`` and DCP held ``{"model", "optim"}``
(no ``optim`` when the optimizer had never stepped: manifest ``optimizer_fresh``). Version 2 gives
each component its own entry. This module translates the first into the second, so a run saved by
the previous z2all resumes bit-exactly; nothing ever writes version 1 again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from z2all.training.checkpoint_safety import safe_torch_load


@dataclass(frozen=True)
class V1View:
    in_dcp: set[str]
    """Shared components whose state is in ``state/`` under their v2 name."""
    empty: set[str]
    """Shared components saved as freshly built."""
    shared: dict[str, dict]
    """Shared component states that v1 kept in the rank files (progress, scaler)."""
    per_rank: dict[str, Any]
    """This rank's per-rank component states (rng, comm), if its file exists."""
    run: dict[str, Any]
    """The resume facts v1 recorded (world size, where the optimizer state lived, bucket size)."""


def _extra(payload: Any, path: Path) -> dict:
    if not isinstance(payload, dict) or not isinstance(payload.get("extra"), dict) or "rng" not in payload:
        raise ValueError(f"{path}: not a version 1 rank file (expected {{'rng', 'extra'}})")
    return payload["extra"]


def v1_view(ckpt_dir: Path, manifest: dict, rank: int) -> V1View:
    """The version 2 reading of the version 1 checkpoint ``ckpt_dir`` for ``rank``."""
    first = ckpt_dir / "rank_00000.pt"
    extra0 = _extra(safe_torch_load(first), first)
    own_path = ckpt_dir / f"rank_{rank:05d}.pt"
    per_rank: dict[str, Any] = {}
    if own_path.is_file():
        own = safe_torch_load(own_path)
        extra = _extra(own, own_path)
        per_rank["rng"] = own["rng"]
        comm = extra.get("comm_state")
        if comm:
            per_rank["comm"] = {**comm, "world_size": int(extra.get("world_size", manifest["world_size"]))}
    in_dcp, empty = {"model"}, set()
    if manifest.get("has_optimizer", True):
        (empty if manifest.get("optimizer_fresh") else in_dcp).add("optim")
    shared = {
        "progress": {
            "step": int(extra0.get("step", manifest["step"])),
            "tokens": int(extra0.get("tokens", 0)),
        },
        "scaler": extra0.get("scaler") or {},
    }
    comm0 = extra0.get("comm_state") or {}
    run = {
        "world_size": int(extra0.get("world_size", manifest["world_size"])),
        "overlap_optim_step": bool(extra0.get("overlap_optim_step", False)),
    }
    if "bucket_size" in comm0:
        run["bucket_size"] = comm0["bucket_size"]
    return V1View(in_dcp=in_dcp, empty=empty, shared=shared, per_rank=per_rank, run=run)
