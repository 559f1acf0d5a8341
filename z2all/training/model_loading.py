"""Model-only loading for the tools (sample, export_hf) and ``--init_from``.

Process-local (no collectives): any subset of ranks may call these. Checkpoints are read through the
same verification and safe reader (:mod:`z2all.training.checkpoint_io`) as the checkpoint manager, which
this module does not import; a corrupt newest checkpoint falls back to the previous one with a warning.
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

from z2all.model import Z2allConfig, Z2allForCausalLM
from z2all.tokenizer import Z2allTokenizer
from z2all.training.checkpoint_format import (
    MANIFEST,
    CheckpointMismatchError,
    CorruptCheckpointError,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
)
from z2all.training.checkpoint_io import load_model_weights
from z2all.training.checkpoint_safety import UnsafeCheckpointError

__all__ = ["find_tokenizer_dir", "load_model_from_dir", "run_model_tool"]

logger = logging.getLogger(__name__)

# A run started --init_from another run that names its tokenizer the same way, and so on: followed this
# deep at most (a folder naming itself would otherwise loop).
_MAX_INIT_CHAIN = 16


def find_tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """The tokenizer of a run folder (``tokenizer_dir`` in its config.json, else that of the run or
    folder it was ``--init_from``), or of a Hugging Face folder that carries its own tokenizer files;
    None when there is none."""
    path = Path(path)
    for _ in range(_MAX_INIT_CHAIN):
        if (path / MANIFEST).is_file():  # one checkpoint folder: the run is its parent
            path = path.parent
        cfg_path = path / "config.json"
        init_from = ""
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                tok_dir, init_from = cfg.get("tokenizer_dir"), cfg.get("init_from") or ""
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{cfg_path}: not a JSON object ({e})") from e
            if tok_dir:
                return Path(tok_dir)
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            return path
        if not init_from:
            return None
        path = Path(init_from)  # the run's tokenizer came from there (TrainConfig is never rewritten)
    return None


def load_run(
    out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, Any, Z2allTokenizer]:
    """``(model, model config, tokenizer)`` of a run folder, checkpoint folder or HF Llama folder
    (:func:`load_model_from_dir`): the tokenizer is ``tokenizer_dir``, else the run's own
    (:func:`find_tokenizer_dir`). What the model tools (sample, export_hf, export_gguf) load."""
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"--out_dir {out_dir} is not a folder")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(out_dir)
    if tok_dir is None:
        raise FileNotFoundError(
            f"{out_dir}: no tokenizer: its config.json has no tokenizer_dir and it holds no "
            "tokenizer.json; pass --tokenizer_dir"
        )
    tok = Z2allTokenizer.from_pretrained(tok_dir)
    model, cfg = load_model_from_dir(out_dir)
    return model, cfg, tok


def is_hf_model_folder(folder: Path) -> bool:
    """Holds what a Hugging Face model folder (or a z2all export) holds: config.json and weights."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "config.json").is_file() and has_weights


def load_model_from_dir(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, model_config)`` on CPU in eval mode, from a z2all run folder (its newest
    loadable checkpoint), one checkpoint folder, or a Hugging Face Llama folder.

    Process-local (no collectives): any subset of ranks may call it.
    """
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
        cfg_dict = read_manifest(ckpt).get("model_config")
        if cfg_dict is None:
            raise FileNotFoundError(f"{ckpt}: no model_config in {MANIFEST}: not a z2all model checkpoint")
        config = Z2allConfig.from_dict(cfg_dict, source=str(ckpt / MANIFEST))
        model = Z2allForCausalLM(config)
        try:
            load_model_weights(ckpt, model)
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
