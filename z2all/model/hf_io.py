"""Save / load in the transformers Llama layout: ``config.json`` + ``model.safetensors``.

Parameter names are identical on both sides, so this is a name-for-name copy. Tied embeddings:
``lm_head.weight`` is not written (transformers does the same); on load it is taken from the
embedding, and a file that carries a *different* lm_head for a tied config is an error.
Loading never unpickles: safetensors (single file or sharded with ``model.safetensors.index.json``),
or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from z2all.atomic import atomic_write_bytes, atomic_write_json
from z2all.model.config import Z2allConfig

logger = logging.getLogger(__name__)

# Buffers older transformers versions saved that carry no weights.
_IGNORED_KEYS_SUFFIXES = ("rotary_emb.inv_freq",)


def save_pretrained(model, save_dir: str | Path) -> None:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # Write the weights first: a directory whose config.json exists always has its weights.
    atomic_write_bytes(save_dir / "model.safetensors", safetensors_save(tensors, metadata={"format": "pt"}))
    hf = model.config.to_hf_dict()
    hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_json(save_dir / "config.json", hf)


def _read_state_dict(load_dir: Path) -> dict[str, torch.Tensor]:
    single = load_dir / "model.safetensors"
    index = load_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(load_dir / shard)))
        return state
    pt = load_dir / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{load_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_pretrained(cls, load_dir: str | Path, strict: bool = True, dtype=None, **config_overrides):
    load_dir = Path(load_dir)
    cfg_path = load_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (expected a transformers-style Llama directory)")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    cfg = Z2allConfig.from_hf_dict(hf, source=str(cfg_path), **config_overrides)
    state = {k: v for k, v in _read_state_dict(load_dir).items() if not k.endswith(_IGNORED_KEYS_SUFFIXES)}
    model = cls(cfg)

    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        lm = state.pop("lm_head.weight")
        emb = state.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(lm, emb):
            raise ValueError(
                f"{load_dir}: tie_word_embeddings=true but lm_head.weight differs from the embedding"
            )
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    for name in sorted(set(expected) & set(state)):
        if tuple(state[name].shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{load_dir}: {name} has shape {tuple(state[name].shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    if missing or unexpected:
        msg = f"{load_dir}: missing keys {missing}; unexpected keys {unexpected}"
        if strict:
            raise ValueError(msg)
        logger.warning("non-strict load: %s", msg)
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor)
    if dtype is not None:
        model.to(dtype)
    logger.info("loaded %s (%d tensors)", load_dir, len(state))
    return model
