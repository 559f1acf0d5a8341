"""The on-disk format of a z2all checkpoint folder: names, the manifest, and its verification.

See ``docs/checkpoint.md``. A checkpoint is complete exactly when its folder is named ``step_<N>``
and holds a ``manifest.json`` that lists every other file with its size and sha256; the manifest is
written last (``z2all.training.checkpoint.CheckpointManager.save``), so checking it is enough to
tell a complete checkpoint from a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

FORMAT_NAME = "z2all-checkpoint"
# 2: one DCP entry per shared component (model, optim, progress, scaler) and per-rank files of
#    {component: state} (rng, comm); per-rank sha256 in the manifest; run facts under "run".
# 1: DCP {"model", "optim"}, per-rank {"rng", "extra": the loop's dict}; still loaded
#    (z2all.training.checkpoint_v1).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DCP_DIR = "state"
TMP_PREFIX = "ckpt_tmp-"
OLD_PREFIX = "ckpt_old-"
# A step_* folder the loader skipped (failed verification or load) in favour of an older one is
# renamed to this, so rotation never counts it as a checkpoint; kept for inspection, never loaded.
CORRUPT_PREFIX = "ckpt_corrupt-"
STEP_DIR_RE = re.compile(r"^step_(\d+)$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


WRITTEN_BY = re.compile(rf"^(?:rank_(\d+)\.pt|{DCP_DIR}/__(\d+)_\d+\.distcp)$")


def writer_of(name: str, world: int) -> int:
    """The rank that wrote checkpoint file ``name`` (its hasher); 0 for any file no rank's name fits."""
    m = WRITTEN_BY.match(name)
    rank = int(m.group(1) or m.group(2)) if m else 0
    return rank if rank < world else 0


class CorruptCheckpointError(RuntimeError):
    """Checkpoints exist but none of them is complete and readable."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint is intact but does not fit the model (missing/unexpected keys, shapes, or a
    model config that differs from the one it was saved with)."""


class CheckpointVersionError(CheckpointMismatchError):
    """The checkpoint is in a format version this z2all cannot read (written by a newer one)."""


def describe_files(root: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of the files ``root/name``: a manifest's ``files`` entries."""
    return {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in names}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root``, sorted (the manifest's order)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def list_checkpoints(out_dir: str | os.PathLike, with_manifest: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_*`` folders (only those with a manifest unless
    ``with_manifest=False``), newest first; nothing is verified here."""
    out_dir = Path(out_dir)
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = STEP_DIR_RE.match(p.name)
            if m and p.is_dir() and (not with_manifest or (p / MANIFEST).is_file()):
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise CheckpointVersionError(
            f"{path}: checkpoint format version {version!r}; this z2all reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. "
            + (
                "It was written by a newer z2all: upgrade z2all to resume it."
                if newer
                else "It was not written by a released z2all: start a new run (or --init_from an export)."
            )
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in files.values()
    ):
        raise CorruptCheckpointError(f"{path}: 'files' must map names to {{'bytes': int, 'sha256': str}}")
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("world_size"), int):
        raise CorruptCheckpointError(f"{path}: 'step' and 'world_size' must be integers")
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike, checksums: bool = True) -> str | None:
    """Why ``ckpt_dir`` is not a complete checkpoint, or None if it is (sizes, then sha256)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)  # CheckpointVersionError propagates: a refusal, not damage
    except CorruptCheckpointError as e:
        return str(e)
    return verify_files(ckpt_dir, manifest, sorted(manifest["files"]), checksums)


def verify_files(ckpt_dir: Path, manifest: dict, names: list[str], checksums: bool = True) -> str | None:
    """Why one of ``names`` (files of the manifest) is missing, truncated or altered, or None."""
    for rel in names:
        info = manifest["files"][rel]
        path = ckpt_dir / rel
        try:
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != info["bytes"]:
                return f"{path}: {size} bytes, manifest says {info['bytes']} (truncated?)"
            if checksums and sha256_file(path) != info["sha256"]:
                return f"{path}: sha256 mismatch with {ckpt_dir / MANIFEST}"
        except OSError as e:  # vanished or unreadable while we looked
            return f"{path}: {e}"
    return None
