"""Export a run to a Hugging Face folder: ``python -m z2all.export_hf --out_dir=DIR --save_dir=HF_DIR``.

Writes ``config.json`` + ``model.safetensors`` (transformers Llama layout, through the model's
``save_pretrained``) from the newest loadable checkpoint of ``out_dir``, and copies the run's
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ...)
next to them, plus a ``generation_config.json`` that stops at EOS or ``<|im_end|>``, so
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`` and
``AutoTokenizer.from_pretrained(HF_DIR)`` both load it. The copied tokenizer files are brought up to
today's (:func:`z2all.tokenizer.upgrade_config_files`): a tokenizer trained before the chat template
marked assistant turns with ``{% generation %}`` is exported with the marked one (same text), so TRL's
``SFTTrainer(assistant_only_loss=True)`` accepts the export. See ``docs/export.md``.

Where it writes (:func:`check_save_dir`, before anything is loaded): never into a z2all run folder
or below one (an export there would overwrite the run's ``config.json`` and make ``--resume``
impossible), and into an existing non-empty folder only with ``--overwrite``, which replaces a
previous export (a folder holding ``config.json`` and weights) and nothing else. The export is built
in a hidden temp folder beside ``HF_DIR`` and renamed onto it at the end, so ``HF_DIR`` is either
absent, the previous export, or complete: a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from z2all.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from z2all.log import setup_logging
from z2all.tokenizer import upgrade_config_files
from z2all.training.checkpoint_format import MANIFEST, list_checkpoints
from z2all.training.model_loading import (
    is_hf_model_folder,
    load_run,
    run_model_tool,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SaveDirError(ValueError):
    """``--save_dir`` names a folder the export must not write to; ``main`` reports it as a usage error."""


def _run_folder_marker(folder: Path) -> str | None:
    """What shows that ``folder`` holds a z2all run (or one of its checkpoints), or None.

    A run folder holds ``config.json`` (the resolved training config, with ``task_type``: a
    transformers ``config.json`` has none), then ``run_info.json``, ``metrics.jsonl`` and
    ``step_<N>/`` checkpoints; a checkpoint folder holds ``manifest.json``. Any one of them is enough:
    a run killed before its first step has only its config.
    """
    try:
        for name in ("metrics.jsonl", "run_info.json", MANIFEST):
            if (folder / name).is_file():
                return name
        ckpts = list_checkpoints(folder, with_manifest=False)
        if ckpts:
            return ckpts[0][1].name + "/"
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no (readable, JSON) config.json; an ancestor we may not list
        return None
    return "config.json with task_type" if isinstance(cfg, dict) and "task_type" in cfg else None


def check_save_dir(save_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`SaveDirError` naming the folder when the export must not go to ``save_dir``."""
    target = Path(save_dir).resolve()
    for folder in (target, *target.parents):
        marker = _run_folder_marker(folder) if folder.is_dir() else None
        if marker:
            raise SaveDirError(
                f"--save_dir={save_dir}: {folder} is a z2all run folder (it holds {marker}); an export "
                "there would overwrite the run's files (config.json: --resume would be impossible); "
                "choose a --save_dir outside any run folder"
            )
    source = Path(out_dir).resolve()
    if source == target or target in source.parents:
        raise SaveDirError(f"--save_dir={save_dir} holds the --out_dir={out_dir} being exported")
    if not target.exists():
        return
    if not target.is_dir():
        raise SaveDirError(f"--save_dir={save_dir} exists and is not a folder")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise SaveDirError(f"--save_dir={save_dir} is not empty: pass --overwrite to replace it")
    if not is_hf_model_folder(target):
        raise SaveDirError(
            f"--save_dir={save_dir} is not empty and is not a Hugging Face model folder (config.json + "
            "weights): --overwrite only replaces a previous export; choose a new or empty folder"
        )


def _new_temp_dir_beside(target: Path, kind: str) -> Path:
    """An empty hidden folder next to ``target`` (same file system, so a rename moves it), with the
    mode a plain mkdir would give (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _move_onto(built: Path, target: Path) -> None:
    """Rename the finished export ``built`` onto ``target``; a previous ``target`` is deleted after.

    Between the two renames ``target`` is briefly absent, never partial.
    """
    old = None
    if target.exists():
        old = _new_temp_dir_beside(target, "old")
        os.replace(target, old)  # onto an empty folder: allowed by rename(2)
    try:
        os.replace(built, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous export back
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def copy_tokenizer_files(tok_dir: str | Path, save_dir: str | Path) -> list[str]:
    """Copy the regular files of ``tok_dir`` into ``save_dir`` (atomically); returns their names."""
    tok_dir, save_dir = Path(tok_dir), Path(save_dir)
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder {tok_dir} does not exist")
    names = []
    for src in sorted(tok_dir.iterdir()):
        # Model files of the tokenizer folder never overwrite the exported model's.
        if (
            src.is_file()
            and not src.name.startswith(".")
            and src.name not in ("config.json", "model.safetensors")
        ):
            atomic_write_bytes(save_dir / src.name, src.read_bytes())
            names.append(src.name)
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json or tokenizer.model to export")
    return names


def export_hf(
    out_dir: str | Path,
    save_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the model (and tokenizer) of ``out_dir`` to ``save_dir`` in the transformers layout
    (see the module docstring for where it may write and how)."""
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"--out_dir {out_dir} is not a folder")
    check_save_dir(save_dir, out_dir, overwrite)
    target = Path(save_dir).resolve()  # a symlinked --save_dir: replace the folder it names
    model, _, tok = load_run(out_dir, tokenizer_dir)
    # The special ids transformers reads from config.json are the tokenizer's, whatever the run set.
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_id, tok.eos_id
    model.config.pad_token_id = tok.pad_id
    target.parent.mkdir(parents=True, exist_ok=True)
    built = _new_temp_dir_beside(target, "tmp")
    try:
        model.to(_DTYPES[dtype]).save_pretrained(built)
        names = copy_tokenizer_files(tok.tok_dir, built)
        upgrade_config_files(built)  # the run's own tokenizer folder keeps its files unchanged
        # transformers' generate() stops at any of these: EOS for plain text, <|im_end|> for chat turns.
        generation = {
            "bos_token_id": tok.bos_id,
            "eos_token_id": [tok.eos_id, tok.im_end_id],
            "pad_token_id": tok.pad_id,
        }
        atomic_write_json(built / "generation_config.json", generation)
        _move_onto(built, target)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    logger.info("exported %s -> %s (model.safetensors, config.json, %s)", out_dir, save_dir, ", ".join(names))
    return Path(save_dir)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m z2all.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="z2all run folder (its newest loadable checkpoint)")
    p.add_argument("--save_dir", required=True, help="destination Hugging Face folder")
    p.add_argument("--tokenizer_dir", default=None, help="override the run's tokenizer_dir")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="weight dtype on disk")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous export in a non-empty --save_dir"
    )
    args = p.parse_args(argv)
    setup_logging()
    try:
        return export_hf(args.out_dir, args.save_dir, args.tokenizer_dir, args.dtype, args.overwrite)
    except SaveDirError as e:
        p.error(str(e))


if __name__ == "__main__":
    run_model_tool(main, "python -m z2all.export_hf")
