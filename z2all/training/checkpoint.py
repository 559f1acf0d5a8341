"""Checkpoints that survive crashes, change of world size and untrusted files.

Design page: ``docs/checkpoint.md``. The manager saves and restores a
:class:`~z2all.training.state.TrainState`, a dict of components, each with its own ``state_dict`` /
``load_state_dict``; it knows no component's fields. One checkpoint is a folder ``<out_dir>/step_<000123>/``::

    state/            torch.distributed.checkpoint (DCP) of {name: state} of the shared components
    rank_00000.pt     per rank: {name: state} of that rank's own components (RNG, comm hooks)
    rank_00001.pt     ...
    manifest.json     written LAST: format version, step, world size, seed, components, model config,
                      the run's resume facts, size + sha256 of every file

Invariants:
- A folder named ``step_*`` was complete when it got that name: every rank wrote into
  ``ckpt_tmp-<step>/``, all ranks agreed, each rank hashed its share of the files, rank 0 wrote the
  manifest (atomically, fsynced) and only then renamed the folder. A crash at any point leaves at most
  a ``ckpt_tmp-*`` folder, which is never loaded and is deleted by the next save.
- Older checkpoints are deleted only after the new one has its final name, so the newest and the
  previous complete checkpoint of this run's lineage always exist (``keep=2``): the lineage is the
  checkpoint the run resumed from followed by the ones it saved, in save order; rotation counts
  only those (and older ones from before the resume), never a checkpoint of an abandoned timeline.
- A newer checkpoint the loader skipped (corrupt, torn) is renamed ``ckpt_corrupt-<step>`` by rank
  0 after the fallback load succeeded, so it can neither be loaded nor count for rotation.
- Nothing is ever unpickled freely (:mod:`z2all.training.checkpoint_safety`); a file that needs
  anything else raises :class:`UnsafeCheckpointError` naming it.
- Shared state is saved through DCP under the model's own parameter names, replicated entries
  deduplicated across ranks, so any world size can load it, and a ZeRO-1 optimizer saves its shards
  into the same ``state/``.
- An asynchronous save (``blocking=False``, the trainer's ``--async_save``) keeps every invariant
  above: the checks and a host snapshot happen while the loop waits, the same write then runs in
  one background thread (:mod:`z2all.training.checkpoint_async`), and only a complete checkpoint is
  ever renamed to ``step_*``. A save is split in :meth:`CheckpointManager.begin_save` (what the loop
  waits for) and :meth:`CheckpointManager.commit_save` (publication), so the loop records the step
  in metrics.jsonl before any checkpoint of it can exist.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from z2all.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from z2all.training.checkpoint_async import AsyncWriter, SaveJob, agreed_on_every_rank
from z2all.training.checkpoint_folders import publish, rotate, set_aside
from z2all.training.checkpoint_format import (
    DCP_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    TMP_PREFIX,
    CheckpointMismatchError,
    CheckpointVersionError,
    CorruptCheckpointError,
    describe_files,
    files_under,
    list_checkpoints,
    rank_file,
    writer_of,
)
from z2all.training.checkpoint_guard import (
    NO_SPACE,
    CheckpointWriteError,
    NonFiniteStateError,
    error_code,
    float_tensors,
    is_no_space,
    nonfinite_names,
)
from z2all.training.checkpoint_io import save_dcp
from z2all.training.checkpoint_load import REFUSALS, ResumeCheck, agreed, prepare, restore, verified_manifest
from z2all.training.checkpoint_safety import UnsafeCheckpointError
from z2all.training.collectives import (
    all_gather_objects,
    all_reduce_max,
    barrier,
    broadcast_int,
    broadcast_object,
    dist_on,
    rank_world,
    who,
)
from z2all.training.state import TrainState

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteStateError",
    "UnsafeCheckpointError",
]

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Save / resume a :class:`TrainState` under ``out_dir``.

    All ranks construct it and call :meth:`save` / :meth:`load_latest` together (collective when
    torch.distributed is initialised). ``out_dir`` must be one shared folder for all nodes.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        keep: int = 2,
        seed: int | None = None,
        verify: bool = True,
        timeout_s: float | None = None,
    ):
        """
        Args:
            out_dir: the run folder; checkpoints are ``out_dir/step_<N>``.
            keep: complete checkpoints to keep (>= 1); older ones go after a new one is complete.
            seed: base seed of the run; a resume on more ranks than were saved seeds the new ranks'
                RNG with ``rank_seed(seed, rank)``. None: the checkpoint's recorded seed, else
                ``seed`` of the run's ``out_dir/config.json``, else 0.
            verify: check every file's sha256 against the manifest before loading (sizes always).
            timeout_s: how long a collective of the asynchronous writer may wait for the other ranks
                (None: torch's default for gloo, 30 minutes).
        """
        if keep < 1:
            raise ValueError(f"CheckpointManager: keep must be >= 1, got {keep}")
        self.out_dir = Path(out_dir)
        self.keep = keep
        self.seed = seed
        self.verify = verify
        self.timeout_s = timeout_s
        # Steps of this run's lineage, oldest first: the one load_latest resumed from, then every
        # step this manager saved (a re-saved step moves to the end). Rank 0 rotates by it.
        self._lineage: list[int] = []
        self._writer: AsyncWriter | None = None  # asynchronous saves: created by the first one

    def _seed(self) -> int | None:
        """The run's base seed: the constructor's, else the run config's (``out_dir/config.json``)."""
        if self.seed is not None:
            return self.seed
        try:
            seed = json.loads((self.out_dir / "config.json").read_text(encoding="utf-8")).get("seed")
        except (OSError, ValueError, AttributeError):
            return None
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, run: dict | None = None, blocking: bool = True) -> Path:
        """Write checkpoint ``step`` (all ranks call); returns its final folder: :meth:`begin_save`
        then :meth:`commit_save`.

        ``run``: JSON facts about the run that the resume rules compare (z2all.training.resume),
        recorded in the manifest. Every failure is agreed on by all ranks before anyone raises (no
        rank is left waiting in a collective): per-rank state that would not load with
        ``weights_only`` (ValueError) and NaN/Inf in any state (:class:`NonFiniteStateError`) before
        a byte is written; no space left on device (:class:`CheckpointWriteError`) or any other
        error while writing, after which rank 0 removes the partial ``ckpt_tmp-*`` folder. The
        checkpoints already on disk are never touched by a save that fails.

        ``blocking=False`` (asynchronous save): the checks above and a snapshot of the state in host
        memory happen now; the write, the manifest and the rename happen in a background thread
        (z2all.training.checkpoint_async), and the folder gets its final name only when complete.
        The next save and :meth:`wait` wait for it; a write error is raised by :meth:`wait` (and by
        the next save).
        """
        job = self.begin_save(step, state, run, blocking)
        self.commit_save(job)
        return job.final

    def begin_save(
        self, step: int, state: TrainState, run: dict | None = None, blocking: bool = True
    ) -> SaveJob:
        """The part of a save the training loop waits for (all ranks call): the checks, then the whole
        write into ``ckpt_tmp-<step>`` (``blocking``) or the host snapshot (asynchronous). Nothing is
        published yet: :meth:`commit_save` does that, so a loop can record the save in its metrics
        first (a checkpoint never holds a step metrics.jsonl does not have)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        self.wait()  # one write in flight at most, published in step order; its error surfaces here
        job = self._check(step, state)
        job.run, job.blocking = copy.deepcopy(run or {}), blocking
        if blocking:
            self._write_files(job, group=None)
        else:
            writer = self._async_writer(job.shared)
            # the loop may change the live state from here on
            job.shared = agreed_on_every_rank(lambda: writer.snapshot(job.shared), f"checkpoint step {step}")
            writer.group()  # created now, by every rank's loop thread (a collective)
        return job

    def commit_save(self, job: SaveJob) -> None:
        """Publish a begun save (all ranks call): the manifest, the rename to ``step_<N>``, rotation;
        for an asynchronous save, the write too, all in the writer thread."""
        if job.blocking:
            self._publish(job, group=None)
            return
        writer = self._writer
        group = writer.group()

        def write_and_publish() -> Path:  # in the writer thread
            self._write_files(job, group)
            return self._publish(job, group)

        writer.submit(write_and_publish)

    def warm_up_async(self, state: TrainState) -> None:
        """Allocate the host buffers asynchronous saves snapshot into, now (at start-up), so the first
        save does not pay for the allocation. All ranks call."""
        dcp_state = {name: sd for name, comp in state.shared.items() if (sd := comp.state_dict())}
        writer = self._async_writer(dcp_state)
        agreed_on_every_rank(lambda: writer.snapshot(dcp_state), "the asynchronous saves' host buffers")
        writer.group()

    def _async_writer(self, shared: dict[str, Any]) -> AsyncWriter:
        """The writer (created on first use, pinning host memory when ``shared`` lives on CUDA)."""
        if self._writer is None:
            device = next((t.device for _, t in float_tensors(shared)), None)
            timeout = timedelta(seconds=self.timeout_s) if self.timeout_s is not None else None
            self._writer = AsyncWriter(device, timeout)
        return self._writer

    def saving(self) -> bool:
        """Whether an asynchronous save is still being written by this rank."""
        return self._writer is not None and self._writer.in_flight()

    def save_failed(self) -> bool:
        """Whether this rank's asynchronous save has failed (raised by the next :meth:`wait`)."""
        return self._writer is not None and self._writer.failed()

    def wait(self) -> None:
        """Block until this rank's asynchronous save (if any) is complete; raise its error. Every rank
        calls it at the same point (the write's collectives finish only when all ranks' do)."""
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        """:meth:`wait`, then release the writer thread and its host buffers."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def _check(self, step: int, state: TrainState) -> SaveJob:
        """The save's blocking checks, agreed by every rank before a byte is written; returns what
        is to be written."""
        t0 = time.perf_counter()
        rank, world = rank_world()
        # This rank's own file is serialized first and proven to load with weights_only, so an
        # un-loadable component fails on every rank before any file is touched.
        own = {name: comp.state_dict() for name, comp in state.per_rank.items()}
        buf, error = io.BytesIO(), ""
        try:
            torch.save(own, buf)
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported below on every rank
            error = (
                f"rank {rank}: per-rank checkpoint state ({', '.join(own)}) must hold only "
                f"dict/list/tuple/str/number/tensor ({e})"
            )
        if all_reduce_max(int(bool(error))):
            raise ValueError(error or "another rank's per-rank checkpoint state is not weights_only-loadable")

        shared = {name: comp.state_dict() for name, comp in state.shared.items()}
        empty = sorted(name for name, sd in shared.items() if not sd)  # "as freshly built": not written
        dcp_state = {name: sd for name, sd in shared.items() if sd}
        # A diverged run must not replace good checkpoints by NaN ones (rotation would delete the
        # good ones next): refuse, on every rank, before anything is written.
        # Named as the component's own keys ("model.head.bias", "optim.state.<param>.exp_avg_sq").
        (bad, need), (bad_own, need_own) = nonfinite_names(dcp_state), nonfinite_names(own)
        bad, need = bad + bad_own, need + need_own
        if all_reduce_max(int(bool(bad))):
            where = (
                f"{', '.join(bad[:5])}{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}"
                if bad
                else "another rank's state"
            )
            raise NonFiniteStateError(
                f"{who(rank, world)}refusing to save checkpoint step {step}: NaN/Inf in {where}; the "
                f"checkpoints in {self.out_dir} are kept as they are"
            )
        return SaveJob(
            step=step,
            own=buf.getvalue(),
            per_rank=sorted(own),
            shared=dcp_state,
            empty=empty,
            need=need,
            model_config=state.model.config_dict() if state.model is not None else None,
            t0=t0,
            final=self.out_dir / f"step_{step:06d}",
            tmp=self.out_dir / f"{TMP_PREFIX}{step:06d}",
        )

    def _write_files(self, job: SaveJob, group: Any) -> None:
        """Write and hash ``job`` into ``ckpt_tmp-<step>`` (every collective on ``group``, None: the
        default one); ``job.files`` is then every file's size and sha256."""
        rank, world = rank_world()
        step, need, tmp = job.step, job.need, job.tmp
        # Four phases (the last in _publish), each closed by an all-reduce of the worst error code
        # instead of a barrier.
        failure: BaseException | None = None
        if rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # left over from a crashed save of the same step
                (tmp / DCP_DIR).mkdir(parents=True)
            except OSError as e:
                failure = e
        self._agree(failure, step, tmp, need, group)

        try:
            save_dcp(job.shared, tmp / DCP_DIR, no_dist=not dist_on(), group=group)
            atomic_write_bytes(tmp / rank_file(rank), job.own)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below, then re-raised
            failure = e
        self._agree(failure, step, tmp, need, group)  # every rank's files are on disk and fsynced

        # Each rank hashes what it wrote, all ranks at once: its rank file and the DCP data files DCP
        # named for it (``__<rank>_<i>.distcp``); rank 0 also everything else (DCP's ``.metadata``).
        # A save then costs every rank about 1/W of the checkpoint's bytes, read back from its own
        # writes, instead of rank 0 reading all of them while the others wait. Rank 0's listing is
        # the one every rank uses, so no file is left out by a node that sees the folder differently.
        listing: list[str] | None = None
        if rank == 0:
            try:
                listing = [str(p.relative_to(tmp)) for p in files_under(tmp)]
            except OSError as e:
                failure, listing = e, []
        names = broadcast_object(listing, group)
        files: dict[str, dict] = {}
        try:
            files = describe_files(tmp, [n for n in names if writer_of(n, world) == rank])
        except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
            failure = e
        self._agree(failure, step, tmp, need, group)
        job.files = {k: v for part in all_gather_objects(files, group) for k, v in sorted(part.items())}

    def _publish(self, job: SaveJob, group: Any) -> Path:
        """Rank 0 writes the manifest and renames ``ckpt_tmp-<step>`` to ``step_<N>``; agreed by all."""
        rank, world = rank_world()
        step, tmp, final = job.step, job.tmp, job.final
        failure: BaseException | None = None
        size = 0
        if rank == 0:
            try:
                manifest = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "step": step,
                    "world_size": world,
                    "seed": self._seed(),
                    "components": {
                        "shared": sorted(job.shared),
                        "empty": job.empty,
                        "per_rank": job.per_rank,
                    },
                    "model_config": job.model_config,
                    "run": job.run,
                    "torch_version": torch.__version__,
                    "created_unix": time.time(),
                    "files": job.files,
                }
                size = self._finish(tmp, final, step, manifest)
            except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
                failure = e
        # nobody returns (and maybe crashes) before the checkpoint has its final name
        self._agree(failure, step, tmp, job.need, group)
        if rank == 0:
            took = time.perf_counter() - job.t0
            logger.info("saved checkpoint %s (%.1f MB, %.2fs)", final, size / 1e6, took)
        return final

    def _finish(self, tmp: Path, final: Path, step: int, manifest: dict) -> int:
        """Rank 0, once every rank's files are in ``tmp`` and hashed: manifest, rename to ``final``,
        rotate. Returns the checkpoint's size in bytes."""
        fsync_dir(tmp / DCP_DIR)
        atomic_write_json(tmp / MANIFEST, manifest)  # the completion mark: written last
        fsync_dir(tmp)
        publish(tmp, final)
        self._lineage = rotate(self.out_dir, self._lineage, step, self.keep)
        return sum(f["bytes"] for f in manifest["files"].values())

    def _agree(
        self, failure: BaseException | None, step: int, tmp: Path, need: int, group: Any = None
    ) -> None:
        """Collective: return if no rank failed; else rank 0 removes ``tmp`` and every rank raises.

        The rank that failed re-raises its own error, turned into :class:`CheckpointWriteError` when it
        is "no space left on device"; the others raise one that points at it."""
        code = all_reduce_max(error_code(failure), group)
        if code == 0:
            return
        rank, world = rank_world()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(group)  # the partial folder is gone before any rank reports
        if failure is not None and not is_no_space(failure):
            raise failure
        if code == NO_SPACE:
            kept = ", ".join(p.name for _, p in list_checkpoints(self.out_dir)) or "none"
            free = shutil.disk_usage(self.out_dir).free
            elsewhere = "" if failure is not None else " (on another rank)"
            raise CheckpointWriteError(
                f"{who(rank, world)}no space left on device{elsewhere} while writing checkpoint step {step} "
                f"into {tmp}: {free / 1e6:.1f} MB free there now, about {need / 1e6:.1f} MB needed; the "
                f"partial folder was removed and the checkpoints on disk are intact ({kept}). Free space "
                "and --resume"
            ) from failure
        raise RuntimeError(
            f"rank {rank}: checkpoint step {step} was not saved: another rank failed (see its error)"
        )

    # -- load ----------------------------------------------------------------------------------

    def load_latest(self, state: TrainState, check: ResumeCheck | None = None) -> dict | None:
        """Restore every component of ``state`` from the newest loadable checkpoint.

        All ranks call. Returns that checkpoint's manifest (``step``, ``world_size``, ``run``...), or
        None when ``out_dir`` has no checkpoint. A newest checkpoint that is incomplete, truncated or
        fails to load is skipped with a warning for the previous one. ``check(path, run facts)`` runs
        on every rank before a checkpoint's state is read and may refuse it (its error propagates).
        Raises :class:`UnsafeCheckpointError` for a file that needs arbitrary unpickling,
        :class:`CheckpointMismatchError` when the model does not fit (:class:`CheckpointVersionError`
        for a format this z2all cannot read), and :class:`CorruptCheckpointError` when checkpoints
        exist but none loads.
        """
        rank, world = rank_world()
        # Rank 0 lists the candidates and the others follow its broadcasts, so all ranks always try
        # the same step. Folders without a manifest are listed too, so that their skipping is reported.
        candidates = list_checkpoints(self.out_dir, with_manifest=False) if rank == 0 else []
        n_found = broadcast_int(len(candidates))
        problems: list[str] = []
        skipped: list[Path] = []  # rank 0: step_* folders passed over for an older one
        while True:
            step = broadcast_int(candidates.pop(0)[0] if candidates else -1)
            if step < 0:
                break
            path = self.out_dir / f"step_{step:06d}"
            code, error, manifest = agreed(verified_manifest, path, rank, world, self.verify)
            if code == 0:
                code, error, plan = agreed(prepare, path, manifest, state, rank, check)
            if code == 0:
                # the seed a rank without its own file in the checkpoint seeds its RNG streams with
                seed = self.seed if self.seed is not None else manifest.get("seed")
                seed = seed if isinstance(seed, int) else (self._seed() or 0)
                code, error, _ = agreed(restore, path, manifest, plan, state, rank, seed)
            if code == 0:
                logger.info("resumed from checkpoint %s", path)
                if world < manifest["world_size"] and rank == 0:
                    logger.warning(
                        "%s was saved by %d ranks, resuming on %d", path, manifest["world_size"], world
                    )
                self._lineage = [step]
                if rank == 0:
                    try:
                        set_aside(self.out_dir, skipped, step)
                    except OSError as e:  # the load succeeded: a folder left in place is only untidy
                        logger.warning("could not set aside the skipped checkpoints %s: %s", skipped, e)
                barrier()  # no rank saves (and rotates) before the skipped ones are set aside
                return manifest
            refusal = REFUSALS.get(code)
            if refusal is not None:  # a refusal, not damage: never a reason to fall back
                raise (
                    error
                    if isinstance(error, refusal)
                    else refusal(f"rank {rank}: another rank refused {path} (see its error)")
                )
            problems.append(f"{path}: {error or 'failed to load on another rank'}")
            skipped.append(path)
            logger.warning("checkpoint %s could not be loaded (%s); trying the previous one", path, error)
        if n_found:
            raise CorruptCheckpointError(f"{self.out_dir}: no loadable checkpoint: " + "; ".join(problems))
        return None
