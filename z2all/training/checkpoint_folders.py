"""Rank 0's folder moves in a run directory: publish a complete checkpoint, rotate old ones, set
unloadable ones aside. Each ends with an fsync of the run directory, so a rename is durable before
anything depends on it (docs/checkpoint.md, "Save protocol" and "Load protocol")."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from z2all.atomic import fsync_dir
from z2all.training.checkpoint_format import CORRUPT_PREFIX, OLD_PREFIX, TMP_PREFIX, list_checkpoints

logger = logging.getLogger(__name__)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``, replacing an existing checkpoint of the same step."""
    old = None
    if final.exists():
        old = final.with_name(OLD_PREFIX + final.name)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def rotate(out_dir: Path, lineage: list[int], step: int, keep: int) -> list[int]:
    """Keep the ``keep`` newest checkpoints of the run's lineage after saving ``step``; drop abandoned
    timelines and leftovers. Returns the lineage that remains (oldest first).

    The lineage is the step the run resumed from, then every step it saved (a re-saved step moves to
    the end). Time order is: checkpoints older than the lineage's first step (from before a resume),
    by step, then the lineage in save order (``step`` last). A checkpoint newer than the lineage's
    first step that this run neither resumed from nor saved belongs to a timeline the run abandoned
    (it resumed from an older point) and is deleted. So after a resume from R the previous checkpoint
    kept next to the new one is R, even if R's step is larger.
    """
    lineage = [s for s in lineage if s != step] + [step]
    first = lineage[0]
    on_disk = dict(list_checkpoints(out_dir))
    past = sorted(s for s in on_disk if s < first and s not in lineage)
    for s, path in sorted(on_disk.items()):
        if s > first and s not in lineage:
            logger.warning(
                "deleting checkpoint %s: from a timeline this run abandoned (it continues from step %d)",
                path,
                first,
            )
            shutil.rmtree(path)
    order = past + [s for s in lineage if s in on_disk]
    for s in order[:-keep]:
        shutil.rmtree(on_disk[s])
    lineage = [s for s in lineage if s in order[-keep:]]
    for p in out_dir.iterdir():
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
            shutil.rmtree(p)  # never complete: crashed saves
    fsync_dir(out_dir)
    return lineage


def set_aside(out_dir: Path, skipped: list[Path], loaded_step: int) -> None:
    """Rename the ``step_*`` folders skipped in favour of ``loaded_step`` to ``ckpt_corrupt-<step>``
    (replacing an older one of that name): never loaded again, never counted by rotation."""
    for path in skipped:
        dest = out_dir / f"{CORRUPT_PREFIX}{path.name[len('step_') :]}"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(path, dest)
        logger.warning(
            "renamed unloadable checkpoint %s to %s (resumed from step %d)", path, dest, loaded_step
        )
    if skipped:
        fsync_dir(out_dir)
