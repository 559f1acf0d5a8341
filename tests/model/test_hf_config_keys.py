"""Z2allConfig.from_hf_dict on real transformers configs: harmless extras warn, maths-changing keys refuse."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig

from z2all.model import Z2allConfig


def hf_dict(**extra) -> dict:
    """A config.json as transformers writes it for a small Llama (plus ``extra`` keys)."""
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    d = cfg.to_dict()
    d.update(extra)
    return d


EXPECTED = dict(
    vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
)  # fmt: skip


def test_plain_transformers_config_loads_silently(z2all_log):
    cfg = Z2allConfig.from_hf_dict(hf_dict(), source="plain/config.json")
    assert {k: getattr(cfg, k) for k in EXPECTED} == EXPECTED
    assert "ignoring" not in z2all_log.text


def test_hub_extras_are_ignored_with_a_warning(z2all_log):
    extras = {
        "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"},
        "model_max_length": 4096,
        "max_length": 4096,
        "temperature": 0.6,
        "transformers_version": "4.31.0.dev0",
        "use_cache": False,
        "torch_dtype": "float16",
        "pretraining_tp": 1,
        "rope_scaling": None,
        "sliding_window": None,
        "quantization_config": None,
    }
    cfg = Z2allConfig.from_hf_dict(hf_dict(**extras), source="hub/config.json")
    assert cfg == Z2allConfig.from_hf_dict(hf_dict(), source="plain/config.json")
    # a record may reach caplog twice (its handler on "z2all" and on the root): count distinct records
    warnings = {id(r): r.getMessage() for r in z2all_log.records if r.levelno == logging.WARNING}
    assert list(warnings.values()) == [
        "hub/config.json: ignoring config key(s) "
        "['auto_map', 'max_length', 'model_max_length', 'temperature'] "
        "(transformers' Llama does not read them either)"
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3' not in"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type 'yarn' not in",
        ),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config=.*not supported"),
        ({"sliding_window": 4096}, "sliding_window=4096 .*not supported"),
        ({"head_dim": 32}, "head_dim=32 != hidden_size/num_attention_heads=16"),
        ({"model_type": "mistral"}, "model_type is 'mistral'"),
        (
            {
                "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
            },
            "rope_parameters and rope_scaling disagree",
        ),
    ],
)
def test_maths_changing_keys_are_refused_naming_the_file(extra, message):
    with pytest.raises(ValueError, match=rf"^bad/config\.json: .*{message}"):
        Z2allConfig.from_hf_dict(hf_dict(**extra), source="bad/config.json")


def test_a_4x_rope_scaling_next_to_a_5x_default_rope_parameters_is_not_lost():
    d = hf_dict(rope_scaling={"type": "linear", "factor": 4.0})
    assert d["rope_parameters"]["rope_type"] == "default"  # what transformers 5 writes for this config
    cfg = Z2allConfig.from_hf_dict(d, source="x/config.json")
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.rope_theta == d["rope_parameters"]["rope_theta"]
