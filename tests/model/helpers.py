"""Shared helpers for the model tests: tiny configs and a transformers twin of a z2all model."""

from __future__ import annotations

import torch

from z2all.model import Z2allConfig, Z2allForCausalLM, get_preset


def tiny_config(**overrides) -> Z2allConfig:
    """The "tiny" preset with a small vocabulary (fast), fields overridable."""
    return get_preset("tiny", **{"vocab_size": 256, **overrides})


def tiny_model(**overrides) -> Z2allForCausalLM:
    torch.manual_seed(0)
    return Z2allForCausalLM(tiny_config(**overrides)).eval()


def hf_twin(model: Z2allForCausalLM, attn_implementation: str = "eager"):
    """transformers.LlamaForCausalLM with the same config and weights (a name-for-name copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dict = model.config.to_hf_dict()
    for k in ("architectures", "model_type", "rope_scaling"):
        hf_dict.pop(k, None)
    hf_cfg = LlamaConfig(**hf_dict)
    hf_cfg._attn_implementation = attn_implementation
    hf = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert missing in ([], ["lm_head.weight"]), missing  # lm_head is tied in the HF model then
    return hf
