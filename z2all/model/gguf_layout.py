"""The model in llama.cpp's layout: GGUF tensor names, the rotary permutation, the ``llama.*`` numbers.

GGUF stores the same matrices as ``model.safetensors`` with three differences, all made here:

* **Names**: ``model.layers.N.self_attn.q_proj.weight`` -> ``blk.N.attn_q.weight`` and so on
  (:data:`_LAYER_NAMES`); a tied ``lm_head`` is not written (llama.cpp then reuses ``token_embd``).
* **Shapes**: none change. A torch ``Linear`` weight is ``(out, in)`` row-major; GGUF lists dimensions
  innermost first (``ne = [in, out]``) over the same bytes, which is the ``{n_embd, n_out}`` llama.cpp
  expects.
* **Rotary layout**: z2all (like transformers) rotates dimension ``i`` of a head with ``i + D/2``
  ("rotate_half"); llama.cpp's ``llama`` architecture rotates adjacent pairs ``(2i, 2i+1)``, both with
  frequency ``theta^(-2i/D)``. Reordering the output rows of ``q_proj`` and ``k_proj`` inside every head,
  ``[x_0..x_{D/2-1} | y_0..y_{D/2-1}] -> [x_0, y_0, x_1, y_1, ...]`` (:func:`rotary_to_interleaved`),
  makes llama.cpp's q and k the same vectors with their dimensions permuted the same way, so every q.k
  score, hence the attention output, is unchanged. ``v``, ``o`` and the MLP are untouched.

Tested in ``tests/tools/test_export_gguf.py``: the inverse permutation gives back the weights, attention
scores with llama.cpp's pairwise rotary on the permuted weights equal z2all's on the originals, and a
forward pass written from the GGUF file alone gives z2all's logits.
"""

from __future__ import annotations

import torch
from torch import nn

from z2all.model.config import Z2allConfig

GGUF_ARCH = "llama"

# transformers name inside ``model.layers.N.`` -> GGUF name inside ``blk.N.``
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a transformers Llama parameter name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, inner = rest.partition(".")
    if prefix or not layer.isdigit() or inner not in _LAYER_NAMES:
        raise ValueError(f"{hf_name}: no GGUF name (not a Llama parameter)")
    return f"blk.{layer}.{_LAYER_NAMES[inner]}"


def rotary_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from rotate_half to adjacent-pair rotary layout.

    ``weight``: (n_heads * D, in). Inside each head, row ``c * D/2 + i`` (half ``c`` in {0, 1}, pair
    ``i``) moves to row ``2 * i + c``.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    if rows % n_heads or head_dim % 2:
        raise ValueError(f"a ({rows}, {cols}) projection does not split into {n_heads} heads of even size")
    return (
        weight.reshape(n_heads, 2, head_dim // 2, cols)  # (head, half c, pair i, in)
        .transpose(1, 2)  # (head, pair i, half c, in)
        .reshape(rows, cols)
    )


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor in llama.cpp's layout (same dtype as the model), in the model's order."""
    cfg: Z2allConfig = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when there is no output.weight
        tensor = tensor.detach()
        if name.endswith("self_attn.q_proj.weight"):
            tensor = rotary_to_interleaved(tensor, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = rotary_to_interleaved(tensor, cfg.num_key_value_heads)
        out[gguf_name(name)] = tensor.contiguous()
    return out


def check_gguf_compatible(cfg: Z2allConfig) -> None:
    """Raise ValueError when llama.cpp's llama architecture would compute something else."""
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] != "linear":
        raise ValueError(
            f"rope_scaling {cfg.rope_scaling}: llama.cpp has no dynamic-NTK RoPE (only linear and YaRN); "
            "a GGUF of this model would compute different attention past max_position_embeddings"
        )
