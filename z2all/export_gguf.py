"""Export a run to one GGUF file: ``python -m z2all.export_gguf --out_dir=RUN --save_path=model.gguf``.

Writes the newest loadable checkpoint of ``RUN`` with its tokenizer straight to GGUF (the ``gguf``
package, ``pip install z2all[gguf]``), which ``llama-cli -m model.gguf`` and Ollama's ``FROM
./model.gguf`` load as they are: no Hugging Face folder, no llama.cpp converter (which refuses every
tokenizer z2all trains). See ``docs/export.md``. The file holds:

* ``general.*`` and ``llama.*``: architecture ``llama`` and the model's numbers (context length,
  widths, heads, RoPE base and linear scaling, RMSNorm epsilon, vocabulary size);
* the tensors in llama.cpp's layout (:mod:`z2all.model.gguf_layout`: names, rotary row order), 2-D
  ones in ``--dtype``, norms always float32 (llama.cpp's convention);
* the tokenizer (:mod:`z2all.tokenizer.gguf_vocab`): ``gpt2`` + pre-tokenizer ``gpt-2`` for hf_bbpe,
  sentencepiece ``llama`` without the dummy prefix for sp_bbpe, the special ids, no BOS/EOS added;
* ``tokenizer.chat_template``: the tokenizer's ChatML, without the training-only ``{% generation %}``
  markers (:data:`z2all.tokenizer.INFERENCE_CHAT_TEMPLATE`, the same text).

Where it writes (:func:`check_save_path`, before anything is loaded): a new file, or with
``--overwrite`` a previous GGUF file (nothing else), never inside a checkpoint folder. The file is
written beside ``save_path`` under a temp name, fsynced and renamed onto it
(:func:`z2all.atomic.atomic_open`), so ``save_path`` is absent, the previous export, or complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from z2all.atomic import atomic_open
from z2all.log import setup_logging
from z2all.model.gguf_layout import GGUF_ARCH, check_gguf_compatible, gguf_tensors
from z2all.tokenizer import CHAT_TEMPLATE, INFERENCE_CHAT_TEMPLATE
from z2all.tokenizer.gguf_vocab import GGUFVocab, gguf_vocab
from z2all.training.checkpoint_format import MANIFEST, STEP_DIR_RE
from z2all.training.model_loading import load_run, run_model_tool

logger = logging.getLogger(__name__)

PROG = "python -m z2all.export_gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_MAGIC = b"GGUF"


class SavePathError(ValueError):
    """``--save_path`` names a file the export must not write; ``main`` reports it as a usage error."""


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"the gguf package is missing ({e}): install with pip install z2all[gguf]") from e
    return gguf


def check_save_path(save_path: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`SavePathError` naming the path when the export must not write ``save_path``."""
    target = Path(save_path).resolve()
    for folder in target.parents:
        if (folder / MANIFEST).is_file() or STEP_DIR_RE.match(folder.name):
            raise SavePathError(
                f"--save_path={save_path}: {folder} is a checkpoint folder (its files are checksummed "
                "and rotated away); write the GGUF file elsewhere, e.g. beside the run's step_* folders"
            )
    if target.is_dir():
        raise SavePathError(f"--save_path={save_path} is a folder: name the file to write, e.g. model.gguf")
    if not target.exists():
        return
    if not overwrite:
        raise SavePathError(f"--save_path={save_path} exists: pass --overwrite to replace it")
    with open(target, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise SavePathError(
                f"--save_path={save_path} exists and is not a GGUF file: --overwrite only replaces a "
                "previous export; choose a new path"
            )


def gguf_chat_template(template: str) -> str:
    """The chat template an inference engine gets: z2all's shipped ChatML loses its ``{% generation %}``
    markers (same text); any other template is kept as it is."""
    return INFERENCE_CHAT_TEMPLATE if template == CHAT_TEMPLATE else template


def _add_model_metadata(writer, gguf, cfg, name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None:  # linear (check_gguf_compatible refused the rest)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def _add_tokenizer_metadata(writer, vocab: GGUFVocab, chat_template: str) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.token_types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def _add_tensors(writer, gguf, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """2-D tensors in ``dtype``, 1-D (the norms) in float32. numpy has no bfloat16: its bits go in as
    int16 with the GGML type stated."""
    for name, t in tensors.items():
        t = t.to(torch.float32 if t.dim() == 1 else dtype)
        if t.dtype == torch.bfloat16:
            writer.add_tensor(name, t.view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, t.numpy())


def export_gguf(
    out_dir: str | Path,
    save_path: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the model and tokenizer of ``out_dir`` to the GGUF file ``save_path`` (see the module
    docstring for its content and where it may write)."""
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"--out_dir {out_dir} is not a folder")
    check_save_path(save_path, overwrite)
    gguf = _import_gguf()
    target = Path(save_path).resolve()  # a symlinked --save_path: replace the file it names
    model, cfg, tok = load_run(out_dir, tokenizer_dir)
    check_gguf_compatible(cfg)
    vocab = gguf_vocab(tok, cfg.vocab_size)
    file_type = {
        "float32": gguf.LlamaFileType.ALL_F32,
        "float16": gguf.LlamaFileType.MOSTLY_F16,
        "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]

    tensors = gguf_tensors(model)
    writer = gguf.GGUFWriter(None, GGUF_ARCH)
    _add_model_metadata(writer, gguf, cfg, Path(out_dir).resolve().name, int(file_type))
    _add_tokenizer_metadata(writer, vocab, gguf_chat_template(tok.chat_template))
    _add_tensors(writer, gguf, tensors, _DTYPES[dtype])
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target, "wb") as f:
        # GGUFWriter opens the path it is given: it fills the temp file atomic_open made, and
        # atomic_open's fsync of that same file flushes it before the rename onto ``target``.
        try:
            writer.write_header_to_file(Path(f.name))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    logger.info(
        "exported %s -> %s (%d tensors, %s, tokenizer %s)",
        out_dir,
        save_path,
        len(tensors),
        dtype,
        vocab.model,
    )
    return Path(save_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="z2all run folder (its newest loadable checkpoint)")
    p.add_argument("--save_path", required=True, help="the GGUF file to write, e.g. model.gguf")
    p.add_argument("--tokenizer_dir", default=None, help="override the run's tokenizer_dir")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="2-D weight dtype on disk")
    p.add_argument("--overwrite", action="store_true", help="replace a previous GGUF export at --save_path")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging()
    try:
        return export_gguf(args.out_dir, args.save_path, args.tokenizer_dir, args.dtype, args.overwrite)
    except (SavePathError, ImportError) as e:
        if args.debug:
            raise
        p.error(str(e))


if __name__ == "__main__":
    if "--debug" in sys.argv[1:]:
        main()  # errors propagate with their traceback
    else:
        run_model_tool(main, PROG)
