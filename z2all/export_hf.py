"""Export a run to a Hugging Face folder: ``python -m z2all.export_hf --out_dir=DIR --save_dir=HF_DIR``.

Writes ``config.json`` + ``model.safetensors`` (transformers Llama layout, through the model's
``save_pretrained``) from the newest loadable checkpoint of ``out_dir``, and copies the run's
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ...)
next to them, plus a ``generation_config.json`` that stops at EOS or ``<|im_end|>``, so
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`` and
``AutoTokenizer.from_pretrained(HF_DIR)`` both load it. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from z2all.atomic import atomic_write_bytes, atomic_write_json
from z2all.training.model_loading import find_tokenizer_dir, load_model_from_dir, run_model_tool

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
) -> Path:
    """Write the model (and tokenizer) of ``out_dir`` to ``save_dir`` in the transformers layout."""
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"--out_dir {out_dir} is not a folder")
    save_dir = Path(save_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else find_tokenizer_dir(out_dir)
    if tok_dir is None:
        raise FileNotFoundError(
            f"{out_dir}: no tokenizer: its config.json has no tokenizer_dir; pass --tokenizer_dir"
        )
    from z2all.tokenizer import Z2allTokenizer

    tok = Z2allTokenizer.from_pretrained(tok_dir)
    model, _ = load_model_from_dir(out_dir)
    # The special ids transformers reads from config.json are the tokenizer's, whatever the run set.
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_id, tok.eos_id
    model.config.pad_token_id = tok.pad_id
    model.to(_DTYPES[dtype]).save_pretrained(save_dir)
    names = copy_tokenizer_files(tok_dir, save_dir)
    # transformers' generate() stops at any of these: EOS for plain text, <|im_end|> for chat turns.
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.eos_id, tok.im_end_id],
        "pad_token_id": tok.pad_id,
    }
    atomic_write_json(save_dir / "generation_config.json", generation)
    logger.info("exported %s -> %s (model.safetensors, config.json, %s)", out_dir, save_dir, ", ".join(names))
    return save_dir


def main(argv: Sequence[str] | None = None) -> Path:
    from z2all.log import setup_logging

    p = argparse.ArgumentParser(prog="python -m z2all.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="z2all run folder (its newest loadable checkpoint)")
    p.add_argument("--save_dir", required=True, help="destination Hugging Face folder")
    p.add_argument("--tokenizer_dir", default=None, help="override the run's tokenizer_dir")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="weight dtype on disk")
    args = p.parse_args(argv)
    setup_logging()
    return export_hf(args.out_dir, args.save_dir, args.tokenizer_dir, args.dtype)


if __name__ == "__main__":
    run_model_tool(main, "python -m z2all.export_hf")
