"""Model-only loading for the tools (sample, export_hf) and ``--init_from``.

Process-local (no collectives): any subset of ranks may call these. Checkpoints are read through the
same verification and safe loader as :class:`z2all.training.checkpoint.CheckpointManager`; a corrupt
newest checkpoint falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint import CheckpointException  # a BaseException: DCP's read failures

from z2all.training.checkpoint_format import (
    MANIFEST,
    CorruptCheckpointError,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
)
from z2all.training.checkpoint_safety import UnsafeCheckpointError

__all__ = ["find_tokenizer_dir", "load_model_from_dir", "run_model_tool"]

logger = logging.getLogger(__name__)


def _run_model_config(run_dir: Path) -> dict | None:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    return cfg.get("model") if isinstance(cfg.get("model"), dict) else None


def find_tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The tokenizer of a run folder (``tokenizer_dir`` in its config.json) or of a Hugging Face
    folder that carries its own tokenizer files; None when there is none."""
    path = Path(path)
    if (path / MANIFEST).is_file():  # one checkpoint folder: the run is its parent
        path = path.parent
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        try:
            tok_dir = json.loads(cfg_path.read_text(encoding="utf-8")).get("tokenizer_dir")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{cfg_path}: not a JSON object ({e})") from e
        if tok_dir:
            return Path(tok_dir)
    if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        return path
    return None


def is_hf_model_folder(folder: Path) -> bool:
    """Holds what a Hugging Face model folder (or a z2all export) holds: config.json and weights."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "config.json").is_file() and has_weights


def load_model_from_dir(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, model_config)`` on CPU in eval mode, from a z2all run folder (its newest
    loadable checkpoint), one checkpoint folder, or a Hugging Face Llama folder.

    Process-local (no collectives): any subset of ranks may call it.
    """
    from z2all.model import Z2allConfig, Z2allForCausalLM  # ground floor; imported on use
    from z2all.training.checkpoint import CheckpointMismatchError, _load_dcp

    path = Path(path)
    if (path / MANIFEST).is_file():
        candidates = [(0, path)]
    else:
        candidates = list_checkpoints(path, with_manifest=False)
    if not candidates:
        if is_hf_model_folder(path):
            model = Z2allForCausalLM.from_pretrained(path)
            return model.eval(), model.config
        raise FileNotFoundError(
            f"{path}: neither a z2all run folder (step_*/{MANIFEST}) nor a Hugging Face model folder "
            "(config.json + *.safetensors)"
        )
    problems = []
    for _, ckpt in candidates:
        why = verify_checkpoint(ckpt)
        if why is not None:
            problems.append(why)
            logger.warning("skipping checkpoint %s: %s", ckpt, why)
            continue
        cfg_dict, source = read_manifest(ckpt).get("model_config"), ckpt / MANIFEST
        if cfg_dict is None:
            cfg_dict, source = _run_model_config(ckpt.parent), ckpt.parent / "config.json"
        if cfg_dict is None:
            raise FileNotFoundError(
                f"{ckpt}: no model config in {MANIFEST} nor under key 'model' of "
                f"{ckpt.parent / 'config.json'}"
            )
        config = Z2allConfig.from_dict(cfg_dict, source=str(source))
        model = Z2allForCausalLM(config)
        try:
            _load_dcp(ckpt, model, None, no_dist=True)
        except (UnsafeCheckpointError, CheckpointMismatchError):
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - corrupt: fall back to the previous one
            problems.append(f"{ckpt}: {e}")
            logger.warning("checkpoint %s failed to load (%s); trying the previous one", ckpt, e)
            continue
        logger.info("loaded model from %s", ckpt)
        return model.eval(), config
    raise CorruptCheckpointError(f"{path}: no loadable checkpoint: " + "; ".join(problems))


def run_model_tool(main: Callable[[], object], prog: str) -> None:
    """Run a tool's ``main()`` (sample, export_hf); a missing, malformed or unloadable model exits the
    process with ``<prog>: error: <why>`` instead of a traceback."""
    from z2all.training.checkpoint import CheckpointMismatchError  # checkpoint imports this module

    try:
        main()
    except (
        FileNotFoundError,
        ValueError,
        CorruptCheckpointError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
    ) as e:
        sys.exit(f"{prog}: error: {e}")
