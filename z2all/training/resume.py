"""Every rule of ``--resume`` in one place: what a resumed run may not change.

A checkpoint records the facts these rules compare (:func:`run_facts`, in its manifest under ``run``);
the run folder's ``config.json`` records the settings. :class:`ResumeRules` checks them twice with the
same code: once before anything is built, against the newest checkpoint (a refusal costs no data
loading and no model building), and again by the checkpoint manager against the checkpoint it actually
loads (an older one after a fallback). ``config.json`` is rewritten only after that load succeeded.

The rules:

- frozen settings (:data:`FROZEN_ON_RESUME`): the weights and the data position only mean something
  for the same task, model shape and tokenizer;
- the tokenizer's fingerprint: the same files, not just the same folder name;
- ``--params_dtype`` may change (the checkpoint's weights are fp32 either way, logged), except under
  ``--overlap_optim_step``, whose per-bucket optimizer state differs between fp32 and 16-bit buckets;
- the optimizer's home: AdamW moments live in the main optimizer (DCP state, any world size) or, with
  ``--overlap_optim_step``, in per-bucket optimizers inside each rank's comm-hook state, which fit only
  the same world size and the same buckets; moving between the two would silently restart them.

The model config is checked by the manager with the weights (a model that does not fit is a
:class:`~z2all.training.checkpoint_format.CheckpointMismatchError`), and PowerSGD's per-bucket memories
restart with a warning when the buckets changed (z2all.training.parallelize): neither refuses a resume.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from z2all.training.checkpoint_format import CheckpointVersionError, list_checkpoints, read_manifest
from z2all.training.checkpoint_safety import UnsafeCheckpointError
from z2all.training.checkpoint_v1 import v1_view
from z2all.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

# Settings a resumed run may not change.
FROZEN_ON_RESUME = ("task_type", "model_config", "tokenizer_dir")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--resume: {path}: expected a JSON object")
    return data


def _same_folder(a: str, b: str) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


def check_fresh_out_dir(cfg: TrainConfig) -> None:
    """A fresh run in a folder that holds another run's history would interleave two runs' metrics
    and checkpoints; require --resume (continue it) or another --out_dir."""
    out = Path(cfg.out_dir)
    if cfg.resume or not out.is_dir():
        return
    has_metrics = (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0
    has_ckpt = any(p.name.startswith("step_") for p in out.iterdir())
    if has_metrics or has_ckpt:
        raise ConfigError(
            f"--out_dir={cfg.out_dir} already holds a run (metrics.jsonl / checkpoints): pass --resume to "
            f"continue it, or choose another --out_dir"
        )


def overlap_active(cfg: TrainConfig, world: int) -> bool:
    """Whether the per-bucket optimizers of --overlap_optim_step hold the optimizer state: they exist
    only where a data-parallel wrapper does (world size > 1)."""
    return cfg.overlap_optim_step and world > 1


def run_facts(cfg: TrainConfig, world: int, tokenizer_fingerprint: str | None) -> dict[str, Any]:
    """The facts a checkpoint records for the resume rules (JSON)."""
    return {
        "world_size": world,
        "overlap_optim_step": overlap_active(cfg, world),
        "bucket_size": cfg.bucket_size,
        "comm_hook": cfg.comm_hook,
        "ddp_impl": cfg.ddp_impl,
        "task_type": cfg.task_type,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "params_dtype": cfg.params_dtype,
    }


@dataclass(frozen=True)
class ResumeRules:
    """The live run, to be compared with what a checkpoint and the run folder recorded."""

    cfg: TrainConfig
    world: int
    tokenizer_fingerprint: str | None
    tokenizer_dir: str
    """The tokenizer folder actually used (``--tokenizer_dir`` or the one found through --init_from)."""

    def check_settings(self) -> None:
        """Frozen settings against the run's saved ``config.json``, and the tokenizer against its
        ``run_info.json`` (runs whose checkpoints predate the fingerprint in the manifest)."""
        out = Path(self.cfg.out_dir)
        info_path = out / "run_info.json"
        info = _read_json(info_path) if info_path.is_file() else {}
        saved_path = out / "config.json"
        if saved_path.is_file():
            saved = _read_json(saved_path)
            for name in FROZEN_ON_RESUME:
                if name not in saved:
                    continue
                now, then = getattr(self.cfg, name), saved[name]
                flag = f"--{name}={now!r}"
                if name == "tokenizer_dir" and now != then:
                    # the folders actually used: either run may have found it through --init_from
                    now, then = self.tokenizer_dir, then or info.get("tokenizer_dir", "")
                    if _same_folder(now, then):
                        continue
                    if not self.cfg.tokenizer_dir:
                        flag = f"the tokenizer folder found through --init_from ({now!r})"
                if then != now:
                    raise ConfigError(
                        f"{flag} differs from the resumed run's {then!r} ({saved_path}); it cannot "
                        "change on resume"
                    )
        self._check_tokenizer(info.get("tokenizer_fingerprint"), str(info_path))

    def _check_tokenizer(self, recorded: str | None, where: str) -> None:
        fp = self.tokenizer_fingerprint
        if recorded and fp and recorded != fp:
            raise ConfigError(
                f"--resume: tokenizer {self.tokenizer_dir} (fingerprint {fp[:12]}) is not the one the "
                f"run in {self.cfg.out_dir} was trained with ({recorded[:12]}, {where})"
            )

    def __call__(self, ckpt_dir: Path, run: dict[str, Any]) -> None:
        """Refuse to resume from ``ckpt_dir`` whose recorded run facts are ``run`` (ConfigError)."""
        self._check_tokenizer(run.get("tokenizer_fingerprint"), str(ckpt_dir))
        saved_world = run.get("world_size")
        saved_overlap = bool(run.get("overlap_optim_step", False))
        now_overlap = overlap_active(self.cfg, self.world)
        if saved_overlap != now_overlap or (saved_overlap and saved_world != self.world):
            raise ConfigError(
                f"cannot resume: the checkpoint's optimizer state was kept with overlap_optim_step="
                f"{saved_overlap} on world size {saved_world}, this run has overlap_optim_step={now_overlap} "
                f"on world size {self.world}; resume with the saved setting and world size ({ckpt_dir})"
            )
        saved_dtype = run.get("params_dtype", "float32")  # checkpoints before --params_dtype: fp32
        if saved_dtype != self.cfg.params_dtype:
            if now_overlap:
                raise ConfigError(
                    f"cannot resume --overlap_optim_step with --params_dtype={self.cfg.params_dtype}: its "
                    f"per-bucket optimizer state was saved with --params_dtype={saved_dtype} (fp32 buckets "
                    f"hold plain AdamW state, 16-bit ones main-param wrappers); resume with the saved "
                    f"--params_dtype ({ckpt_dir})"
                )
            logger.info(
                "resuming a --params_dtype=%s checkpoint with --params_dtype=%s: its fp32 weights (main "
                "params) are the truth, the %s weights become their rounding (%s)",
                saved_dtype,
                self.cfg.params_dtype,
                self.cfg.params_dtype,
                ckpt_dir,
            )
        saved_bucket = run.get("bucket_size")
        if now_overlap and saved_bucket is not None and saved_bucket != self.cfg.bucket_size:
            raise ConfigError(
                "cannot resume --overlap_optim_step: its per-bucket AdamW state was saved for other buckets "
                f"(--bucket_size={saved_bucket} when saved, --bucket_size={self.cfg.bucket_size} now); "
                f"resume with the saved --bucket_size ({ckpt_dir})"
            )

    def check_newest(self) -> None:
        """Every rule, before anything is built, against the newest complete checkpoint (if any)."""
        self.check_settings()
        saved = list_checkpoints(self.cfg.out_dir)
        if not saved:
            return
        path = saved[0][1]
        try:
            manifest = read_manifest(path)
            run = v1_view(path, manifest, 0).run if manifest["version"] == 1 else manifest["run"]
        except (CheckpointVersionError, UnsafeCheckpointError):
            raise  # refusals, not damage: the loader would refuse it too
        except Exception as e:  # noqa: BLE001 - damaged: the loader falls back and says why
            logger.debug("resume rules: cannot read %s yet (%s)", path, e)
            return
        self(path, run)
