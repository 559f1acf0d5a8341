"""Checkpoints that survive crashes, change of world size and untrusted files.

Design page: ``docs/checkpoint.md``; names and manifest checks live in
:mod:`z2all.training.checkpoint_format`. One checkpoint is a folder ``<out_dir>/step_<000123>/``::

    state/            torch.distributed.checkpoint (DCP) of {"model": ..., "optim": ...}
    rank_00000.pt     per rank: {"rng": every RNG stream of that rank, "extra": the loop's dict}
    rank_00001.pt     ...
    manifest.json     written LAST: step, world size, seed, model config, size + sha256 of every file

Invariants:
- A folder named ``step_*`` was complete when it got that name: every rank wrote into
  ``ckpt_tmp-<step>/``, all ranks passed a barrier, rank 0 wrote the manifest (atomically, fsynced)
  and only then renamed the folder. A crash at any point leaves at most a ``ckpt_tmp-*`` folder,
  which is never loaded and is deleted by the next save.
- Older checkpoints are deleted only after the new one has its final name, so the newest and the
  previous complete checkpoint of this run's lineage always exist (``keep=2``): the lineage is the
  checkpoint the run resumed from followed by the ones it saved, in save order; rotation counts
  only those (and older ones from before the resume), never a checkpoint of an abandoned timeline.
- A newer checkpoint the loader skipped (corrupt, torn) is renamed ``ckpt_corrupt-<step>`` by rank
  0 after the fallback load succeeded, so it can neither be loaded nor count for rotation.
- Nothing is ever unpickled freely: per-rank files load with ``torch.load(weights_only=True)``, DCP's
  ``.metadata`` pickle goes through an allowlist unpickler and DCP's non-tensor items are checked by
  ``weights_only`` before DCP sees them (:mod:`z2all.training.checkpoint_safety`). A file that
  needs anything else raises :class:`UnsafeCheckpointError` naming it.
- Model and optimizer state are saved through DCP with the model's own parameter names (no
  ``module.``/``_orig_mod.`` prefixes), replicated state deduplicated across ranks, so any world
  size can load them, and a ZeRO-1 optimizer can later save its shards into the same ``state/``.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from z2all.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from z2all.training.checkpoint_format import (
    CORRUPT_PREFIX,
    DCP_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    OLD_PREFIX,
    TMP_PREFIX,
    CorruptCheckpointError,
    files_under,
    list_checkpoints,
    read_manifest,
    sha256_file,
    verify_checkpoint,
)
from z2all.training.checkpoint_safety import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    safe_torch_load,
)

# Re-exported for compatibility: model-only loading lives in z2all.training.model_loading.
from z2all.training.model_loading import _run_model_config as _run_model_config
from z2all.training.model_loading import find_tokenizer_dir, load_model_from_dir
from z2all.training.rng_state import get_rng_state, rank_seed, seed_all, set_rng_state

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteStateError",
    "UnsafeCheckpointError",
    "find_tokenizer_dir",
    "list_checkpoints",
    "load_model_from_dir",
    "read_manifest",
    "safe_torch_load",
    "unwrap_model",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint is intact but does not fit the model (missing/unexpected keys, shapes, or a
    model config that differs from the one it was saved with)."""


class NonFiniteStateError(RuntimeError):
    """The model or optimizer state holds NaN/Inf: :meth:`CheckpointManager.save` refuses it."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed for lack of space (ENOSPC/EDQUOT); the partial folder was removed
    and the checkpoints already on disk are intact."""


# Error codes of a save phase, agreed on by all ranks (the maximum wins).
_FAILED, _NO_SPACE = 1, 2
# What torch's zip writer (PyTorchStreamWriter) says when the file under it stops accepting bytes:
# it swallows the OSError of the short write, so ENOSPC arrives only as this text.
_SHORT_WRITE_TEXTS = ("unexpected pos", "failed writing file")
# Model config fields a resumed run may change: they pick how an op is computed, not what it computes
# (kernels), or only how fresh weights are drawn, which a resumed run loads instead (init fields).
_RESUME_MAY_CHANGE = ("kernels", "initializer_range", "scale_output_init")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP (``.module``) wrappers, however nested."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if type(model).__name__ == "DistributedDataParallel" and isinstance(inner, nn.Module):
            model = inner
            continue
        return model


def _model_config_dict(model: nn.Module) -> dict | None:
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


def _float_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` of every floating-point tensor in a nested state dict."""
    if torch.is_tensor(tree):
        return [(prefix, tree)] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    out = []
    for k, v in items:
        out += _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _nonfinite_names(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or Inf (one host read per device).

    A tensor is finite iff its min and max are (both propagate NaN): one read of the tensor and no
    temporary of its size, far cheaper than ``isfinite(t).all()``, so a save barely notices it."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    bad = []
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all() for _, t in items])
        bad += [name for (name, _), ok in zip(items, finite.tolist()) if not ok]
    return bad


def _is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it, or a rank's failure inside DCP's CheckpointException) is a
    full disk or an exhausted quota."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(x, RuntimeError) and any(text in str(x) for text in _SHORT_WRITE_TEXTS):
            return True
        if isinstance(x, CheckpointException):
            todo += [failure[0] for failure in x.failures.values()]  # (exception, traceback) per rank
        todo += [x.__cause__, x.__context__]
    return False


def _config_changes(saved: dict, live: dict) -> list[str]:
    """``field: checkpoint X, model Y`` for each model config field that differs (JSON-normalised).
    A field the checkpoint does not record (saved by a z2all that did not have it yet) is not compared."""
    live = json.loads(json.dumps(live))
    return [
        f"{k}: checkpoint {saved.get(k)!r}, model {live.get(k)!r}"
        for k in sorted(saved)
        if k not in _RESUME_MAY_CHANGE and saved.get(k) != live.get(k)
    ]


def _who(rank: int, world: int) -> str:
    """``"rank R: "`` to start a message with, when there are several ranks."""
    return f"rank {rank}: " if world > 1 else ""


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def _coll_tensor(value: int) -> torch.Tensor:
    # NCCL only moves CUDA tensors; gloo (and no process group) uses CPU.
    on_cuda = _dist_on() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return torch.tensor([value], dtype=torch.int64, device=device)


def _broadcast_int(value: int) -> int:
    if not _dist_on():
        return value
    t = _coll_tensor(value)
    dist.broadcast(t, src=0)
    return int(t.item())


def _all_reduce_max(value: int) -> int:
    if not _dist_on():
        return value
    t = _coll_tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def _single_process_ok(no_dist: bool) -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process; that is intended
    here, so silence exactly that warning for the duration of the call."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _check_model_fits(meta: Metadata, model_sd: dict[str, Any], source: Path) -> None:
    """Strict key/shape check of the saved model against ``model_sd``; names every difference."""
    # Non-tensor entries (BytesStorageMetadata) have no size (None): never a fit for a tensor.
    saved = {
        k[len("model.") :]: getattr(md, "size", None)
        for k, md in meta.state_dict_metadata.items()
        if k.startswith("model.")
    }
    missing = sorted(set(model_sd) - set(saved))
    unexpected = sorted(set(saved) - set(model_sd))
    shapes = [
        f"{k}: checkpoint {'non-tensor' if saved[k] is None else tuple(saved[k])} vs model {tuple(v.shape)}"
        for k, v in model_sd.items()
        if k in saved
        and isinstance(v, torch.Tensor)
        and (saved[k] is None or tuple(saved[k]) != tuple(v.shape))
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not fit the model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {shapes[:10]}"
        )


def _load_dcp(ckpt_dir: Path, model: nn.Module, optimizer, no_dist: bool) -> None:
    """Load model (and optimizer) state from ``ckpt_dir/state`` into the live objects, strictly."""
    reader = SafeFileSystemReader(ckpt_dir / DCP_DIR)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    _check_model_fits(reader.read_metadata(), state["model"], ckpt_dir)
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with _single_process_ok(no_dist):
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(str(ckpt_dir)), no_dist=no_dist)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save / resume model, optimizer, per-rank RNG and the loop's ``extra`` dict under ``out_dir``.

    All ranks construct it and call :meth:`save` / :meth:`load_latest` together (collective when
    torch.distributed is initialised). ``out_dir`` must be one shared folder for all nodes.
    """

    def __init__(
        self, out_dir: str | os.PathLike, keep: int = 2, seed: int | None = None, verify: bool = True
    ):
        """
        Args:
            out_dir: the run folder; checkpoints are ``out_dir/step_<N>``.
            keep: complete checkpoints to keep (>= 1); older ones go after a new one is complete.
            seed: base seed of the run; a resume on more ranks than were saved seeds the new ranks'
                RNG with ``rank_seed(seed, rank)``. None: the checkpoint's recorded seed, else
                ``seed`` of the run's ``out_dir/config.json``, else 0.
            verify: check every file's sha256 against the manifest before loading (sizes always).
        """
        if keep < 1:
            raise ValueError(f"CheckpointManager: keep must be >= 1, got {keep}")
        self.out_dir = Path(out_dir)
        self.keep = keep
        self.seed = seed
        self.verify = verify
        # Steps of this run's lineage, oldest first: the one load_latest resumed from, then every
        # step this manager saved (a re-saved step moves to the end). Rank 0 rotates by it.
        self._lineage: list[int] = []

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

    def save(self, step: int, model: nn.Module, optimizer, extra: dict | None = None) -> Path:
        """Write checkpoint ``step`` (all ranks call); returns its final folder.

        Every failure is agreed on by all ranks before anyone raises (no rank is left waiting in a
        collective): an ``extra`` that would not load with ``weights_only`` (ValueError) and NaN/Inf
        in the model or optimizer state (:class:`NonFiniteStateError`) before a byte is written; no
        space left on device (:class:`CheckpointWriteError`) or any other error while writing, after
        which rank 0 removes the partial ``ckpt_tmp-*`` folder. The checkpoints already on disk are
        never touched by a save that fails.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        rank, world = _rank_world()
        extra = {} if extra is None else extra
        # Serialize this rank's small file first and prove it loads with weights_only, so an
        # un-loadable ``extra`` fails on every rank before any file is touched.
        buf = io.BytesIO()
        error = ""
        try:
            torch.save({"rng": get_rng_state(), "extra": extra}, buf)
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported below on every rank
            error = f"rank {rank}: checkpoint `extra` must hold only dict/list/tuple/str/number/tensor ({e})"
        if _all_reduce_max(int(bool(error))):
            raise ValueError(error or "another rank's checkpoint `extra` is not weights_only-loadable")

        model = unwrap_model(model)
        t0 = time.perf_counter()
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        # An optimizer that never stepped has no state, and get_optimizer_state_dict would create
        # it by a zero-lr step (bumping AdamW's step count): record "fresh" instead.
        optim_fresh = optimizer is not None and not optimizer.state
        if optimizer is not None and not optim_fresh:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        # A diverged run must not replace good checkpoints by NaN ones (rotation would delete the
        # good ones next): refuse, on every rank, before anything is written.
        tensors = _float_tensors(state)
        bad = _nonfinite_names(tensors)
        if _all_reduce_max(int(bool(bad))):
            where = (
                f"{', '.join(bad[:5])}{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}"
                if bad
                else "another rank's state"
            )
            raise NonFiniteStateError(
                f"{_who(rank, world)}refusing to save checkpoint step {step}: NaN/Inf in {where}; the "
                f"checkpoints in {self.out_dir} are kept as they are"
            )
        need = sum(t.numel() * t.element_size() for _, t in tensors)

        final = self.out_dir / f"step_{step:06d}"
        tmp = self.out_dir / f"{TMP_PREFIX}{step:06d}"
        # Three phases, each closed by an all-reduce of the worst error code instead of a barrier.
        failure: BaseException | None = None
        if rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # left over from a crashed save of the same step
                (tmp / DCP_DIR).mkdir(parents=True)
            except OSError as e:
                failure = e
        self._agree(failure, step, tmp, need)

        try:
            # Collective when a process group exists: replicated tensors are written by one rank only.
            # A write error on any rank reaches every rank as DCP's CheckpointException.
            writer = FileSystemWriter(tmp / DCP_DIR, sync_files=True)
            with _single_process_ok(not _dist_on()):
                dcp.save(state, storage_writer=writer, no_dist=not _dist_on())
            atomic_write_bytes(tmp / f"rank_{rank:05d}.pt", buf.getvalue())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below, then re-raised
            failure = e
        self._agree(failure, step, tmp, need)  # every rank's files are on disk and fsynced

        size = 0
        if rank == 0:
            try:
                size = self._finish(tmp, final, step, world, optimizer is not None, optim_fresh, model)
            except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
                failure = e
        # nobody returns (and maybe crashes) before the checkpoint has its final name
        self._agree(failure, step, tmp, need)
        if rank == 0:
            logger.info("saved checkpoint %s (%.1f MB, %.2fs)", final, size / 1e6, time.perf_counter() - t0)
        return final

    def _finish(
        self, tmp: Path, final: Path, step: int, world: int, has_optim: bool, optim_fresh: bool, model
    ) -> int:
        """Rank 0, once every rank's files are in ``tmp``: manifest, rename to ``final``, rotate.
        Returns the checkpoint's size in bytes."""
        fsync_dir(tmp / DCP_DIR)
        files = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files_under(tmp)
        }
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "seed": self._seed(),
            "has_optimizer": has_optim,
            "optimizer_fresh": optim_fresh,
            "model_config": _model_config_dict(model),
            "torch_version": torch.__version__,
            "created_unix": time.time(),
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST, manifest)  # the completion mark: written last
        fsync_dir(tmp)
        self._publish(tmp, final)
        self._rotate(step)
        return sum(f["bytes"] for f in files.values())

    def _agree(self, failure: BaseException | None, step: int, tmp: Path, need: int) -> None:
        """Collective: return if no rank failed; else rank 0 removes ``tmp`` and every rank raises.

        The rank that failed re-raises its own error, turned into :class:`CheckpointWriteError` when it
        is "no space left on device"; the others raise one that points at it."""
        code = 0 if failure is None else (_NO_SPACE if _is_no_space(failure) else _FAILED)
        code = _all_reduce_max(code)
        if code == 0:
            return
        rank, world = _rank_world()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()  # the partial folder is gone before any rank reports
        if failure is not None and not _is_no_space(failure):
            raise failure
        if code == _NO_SPACE:
            kept = ", ".join(p.name for _, p in list_checkpoints(self.out_dir)) or "none"
            free = shutil.disk_usage(self.out_dir).free
            who = "" if failure is not None else " (on another rank)"
            raise CheckpointWriteError(
                f"{_who(rank, world)}no space left on device{who} while writing checkpoint step {step} into "
                f"{tmp}: {free / 1e6:.1f} MB free there now, about {need / 1e6:.1f} MB needed; the partial "
                f"folder was removed and the checkpoints on disk are intact ({kept}). Free space and "
                "--resume"
            ) from failure
        raise RuntimeError(
            f"rank {rank}: checkpoint step {step} was not saved: another rank failed (see its error)"
        )

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete ``tmp`` to ``final``, replacing an existing checkpoint of the same step."""
        old = None
        if final.exists():
            old = final.with_name(OLD_PREFIX + final.name)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def _rotate(self, step: int) -> None:
        """Keep the ``keep`` newest checkpoints of this run's lineage; drop abandoned timelines and
        leftovers.

        Time order is: checkpoints older than the lineage's first step (from before a resume), by
        step, then the lineage in save order (``step`` last). A checkpoint newer than the lineage's
        first step that this run neither resumed from nor saved belongs to a timeline the run
        abandoned (it resumed from an older point) and is deleted. So after a resume from R the
        previous checkpoint kept next to the new one is R, even if R's step is larger.
        """
        self._lineage = [s for s in self._lineage if s != step] + [step]
        first = self._lineage[0]
        on_disk = dict(list_checkpoints(self.out_dir))
        past = sorted(s for s in on_disk if s < first and s not in self._lineage)
        for s, path in sorted(on_disk.items()):
            if s > first and s not in self._lineage:
                logger.warning(
                    "deleting checkpoint %s: from a timeline this run abandoned (it continues from step %d)",
                    path,
                    first,
                )
                shutil.rmtree(path)
        order = past + [s for s in self._lineage if s in on_disk]
        for s in order[: -self.keep]:
            shutil.rmtree(on_disk[s])
        self._lineage = [s for s in self._lineage if s in order[-self.keep :]]
        for p in self.out_dir.iterdir():
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
                shutil.rmtree(p)  # never complete: crashed saves
        fsync_dir(self.out_dir)

    def _set_aside(self, skipped: list[Path], loaded_step: int) -> None:
        """Rank 0: rename the ``step_*`` folders skipped in favour of ``loaded_step`` to
        ``ckpt_corrupt-<step>`` (replacing an older one of that name)."""
        for path in skipped:
            dest = self.out_dir / f"{CORRUPT_PREFIX}{path.name[len('step_') :]}"
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(path, dest)
            logger.warning(
                "renamed unloadable checkpoint %s to %s (resumed from step %d)", path, dest, loaded_step
            )
        if skipped:
            fsync_dir(self.out_dir)

    # -- load ----------------------------------------------------------------------------------

    def load_latest(self, model: nn.Module, optimizer=None) -> dict | None:
        """Restore model, optimizer and this rank's RNG from the newest loadable checkpoint.

        All ranks call. Returns the saved ``extra`` dict, or None when ``out_dir`` has no
        checkpoint. A newest checkpoint that is incomplete, truncated or fails to load is skipped
        with a warning for the previous one. Raises :class:`UnsafeCheckpointError` for a file that
        needs arbitrary unpickling, :class:`CheckpointMismatchError` when the model does not fit,
        and :class:`CorruptCheckpointError` when checkpoints exist but none loads.
        """
        rank, world = _rank_world()
        model = unwrap_model(model)
        # Rank 0 decides which candidate to try (verification reads every byte once); the others
        # follow its broadcasts, so all ranks always load the same step.
        # Folders without a manifest are listed too, so that their skipping is reported.
        candidates = list_checkpoints(self.out_dir, with_manifest=False) if rank == 0 else []
        n_found = _broadcast_int(len(candidates))
        problems: list[str] = []
        skipped: list[Path] = []  # rank 0: step_* folders passed over for an older one
        while True:
            step = -1
            while rank == 0 and candidates:
                s, path = candidates.pop(0)
                why = verify_checkpoint(path, checksums=self.verify)
                if why is None:
                    step = s
                    break
                problems.append(why)
                skipped.append(path)
                logger.warning("skipping checkpoint %s: %s; trying the previous one", path, why)
            step = _broadcast_int(step)
            if step < 0:
                break
            path = self.out_dir / f"step_{step:06d}"
            code, error = 0, None
            try:
                extra = self._load_one(path, model, optimizer, rank, world)
            except UnsafeCheckpointError as e:
                code, error = 3, e
            except CheckpointMismatchError as e:
                code, error = 2, e
            except CheckpointException as e:  # DCP's (a BaseException): its str() is every rank's traceback
                code, error = (
                    1,
                    "; ".join(
                        f"rank {r}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                        for r, (exc, _) in e.failures.items()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any read/decode failure means "corrupt"
                code, error = 1, e
            code = _all_reduce_max(code)
            if code == 0:
                logger.info("resumed from checkpoint %s", path)
                self._lineage = [step]
                if rank == 0:
                    self._set_aside(skipped, step)
                _barrier()  # no rank saves (and rotates) before the skipped ones are set aside
                return extra
            if code == 3:
                raise (
                    error
                    if isinstance(error, UnsafeCheckpointError)
                    else UnsafeCheckpointError(f"rank {rank}: another rank refused an unsafe file in {path}")
                )
            if code == 2:
                raise (
                    error
                    if isinstance(error, CheckpointMismatchError)
                    else CheckpointMismatchError(
                        f"rank {rank}: another rank found that {path} does not fit the model"
                    )
                )
            problems.append(f"{path}: {error or 'failed to load on another rank'}")
            skipped.append(path)
            logger.warning("checkpoint %s failed to load (%s); trying the previous one", path, error)
        if n_found:
            raise CorruptCheckpointError(f"{self.out_dir}: no loadable checkpoint: " + "; ".join(problems))
        return None

    def _load_one(self, path: Path, model: nn.Module, optimizer, rank: int, world: int) -> dict:
        manifest = read_manifest(path)
        saved_cfg, live_cfg = manifest.get("model_config"), _model_config_dict(model)
        changes = _config_changes(saved_cfg, live_cfg) if saved_cfg is not None and live_cfg else []
        if changes:
            # Same shapes or not: a key/shape mismatch is the more precise report, so it goes first.
            reader = SafeFileSystemReader(path / DCP_DIR)
            _check_model_fits(reader.read_metadata(), get_model_state_dict(model), path)
            raise CheckpointMismatchError(
                f"{path}: the model config differs from the one this checkpoint was saved with: "
                f"{'; '.join(changes)}. A resumed run must build the same model (was its --model_config "
                "file edited?)"
            )
        if optimizer is not None and not manifest.get("has_optimizer", True):
            raise CheckpointMismatchError(
                f"{path}: saved without optimizer state, cannot resume the optimizer"
            )
        if optimizer is not None and manifest.get("optimizer_fresh"):
            _load_dcp(path, model, None, no_dist=not _dist_on())
            optimizer.state.clear()  # saved before its first step: it had no state
        else:
            _load_dcp(path, model, optimizer, no_dist=not _dist_on())
        own = path / f"rank_{rank:05d}.pt"
        if own.is_file():
            payload = safe_torch_load(own)
            set_rng_state(payload["rng"])
        else:
            # This rank did not exist when the checkpoint was written: take the shared loop state
            # from rank 0 and seed this rank's RNG deterministically.
            payload = safe_torch_load(path / "rank_00000.pt")
            seed = self.seed if self.seed is not None else manifest.get("seed")
            seed = self._seed() if seed is None else seed
            seed = seed if isinstance(seed, int) else 0
            logger.warning(
                "rank %d: %s was saved by %d ranks; seeding this rank's RNG from (seed=%d, rank=%d)",
                rank,
                path,
                manifest["world_size"],
                seed,
                rank,
            )
            seed_all(rank_seed(seed, rank))
        if world < manifest["world_size"] and rank == 0:
            logger.warning("%s was saved by %d ranks, resuming on %d", path, manifest["world_size"], world)
        return payload["extra"]
