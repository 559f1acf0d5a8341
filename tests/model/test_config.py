"""Config validation, presets, parameter names, init and FLOPs accounting."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.helpers import tiny_config, tiny_model
from z2all.model import (
    Z2allConfig,
    Z2allForCausalLM,
    estimate_mfu,
    flops_per_token,
    get_preset,
    list_presets,
    peak_flops_for,
)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(hidden_size=130), "hidden_size"),  # not divisible by 4 heads
        (dict(num_key_value_heads=3), "num_attention_heads"),  # 4 heads % 3 kv heads
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(intermediate_size=1.5), "intermediate_size"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "rope_scaling.factor"),
        (dict(kernels={"attention": 3}), "kernels"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"Z2allConfig\.{field}"):
        tiny_config(**kwargs)


def test_derived_fields():
    cfg = tiny_config()
    assert cfg.head_dim == 32
    assert Z2allConfig(num_attention_heads=8, hidden_size=64).num_key_value_heads == 8


def test_dict_and_json_round_trip(tmp_path):
    cfg = tiny_config(rope_scaling={"type": "linear", "factor": 2}, kernels={"attention": "eager"})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert Z2allConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "m.json")
    assert Z2allConfig.from_json(tmp_path / "m.json") == cfg


def test_unknown_key_is_rejected_with_source(tmp_path):
    d = tiny_config().to_dict()
    d["hiden_size"] = 3
    with pytest.raises(ValueError, match=r"unknown Z2allConfig key\(s\) \['hiden_size'\]"):
        Z2allConfig.from_dict(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bad.json"):
        Z2allConfig.from_json(path)
    path.write_text('{"vocab_size": 3,\n oops}')
    with pytest.raises(ValueError, match="bad.json: invalid JSON at line 2"):
        Z2allConfig.from_json(path)
    d = tiny_config().to_dict()
    d["head_dim"] = 16
    with pytest.raises(ValueError, match="head_dim=16"):
        Z2allConfig.from_dict(d)


def test_presets():
    assert list_presets()[0] == "tiny" and {"1b", "1.7b"} <= set(list_presets())
    tiny = get_preset("tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads) == (128, 2, 4)
    assert (tiny.num_key_value_heads, tiny.intermediate_size) == (2, 352)
    assert (tiny.max_position_embeddings, tiny.vocab_size) == (512, 512)
    assert get_preset("tiny", vocab_size=1000).vocab_size == 1000
    assert 0.9e9 < get_preset("1b").num_parameters < 1.1e9
    assert 1.6e9 < get_preset("1.7b").num_parameters < 1.8e9
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_preset("huge")


@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_and_hf_names(tied):
    model = tiny_model(tie_word_embeddings=tied)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters
    names = {n for n, _ in model.named_parameters()}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) is not tied  # tied: one Parameter, listed once
    for i in range(2):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{n}.weight" in names
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{n}.weight" in names
        assert f"model.layers.{i}.input_layernorm.weight" in names
        assert f"model.layers.{i}.post_attention_layernorm.weight" in names


def test_init_is_deterministic_and_scaled():
    torch.manual_seed(5)
    a = Z2allForCausalLM(tiny_config())
    torch.manual_seed(5)
    b = Z2allForCausalLM(tiny_config())
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    big = Z2allForCausalLM(tiny_config(hidden_size=256, intermediate_size=1024, scale_output_init=True))
    std_q = big.model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = big.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 1e-3
    assert abs(std_o - 0.02 / 2.0) < 1e-3  # 0.02 / sqrt(2 * 2 layers)
    assert torch.equal(big.model.norm.weight, torch.ones(256))


def test_dropout_only_in_training():
    model = tiny_model(hidden_dropout=0.5, attention_dropout=0.5)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # eval: deterministic
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_flops_per_token_counts_by_hand():
    cfg = tiny_config()  # h 128, L 2, kv 2 x 32, inter 352, vocab 256, untied
    h, L, i, V, kv = 128, 2, 352, 256, 64
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    n_matmul = L * per_layer + h + V * h  # embedding lookup excluded, lm_head included
    assert flops_per_token(cfg, 64) == 6 * n_matmul + 12 * L * h * 64
    tied = tiny_config(tie_word_embeddings=True)
    assert flops_per_token(tied, 64) == flops_per_token(cfg, 64)  # shared matrix counted once
    # 1000 tokens/s on a device doing exactly flops_per_token * 1000 FLOP/s is 100% MFU
    assert estimate_mfu(cfg, 64, 1000.0, flops_per_token(cfg, 64) * 1000.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="peak_flops"):
        estimate_mfu(cfg, 64, 1.0, 0.0)


def test_peak_flops_lookup():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA A10G") == 70e12
    assert peak_flops_for("Some CPU") is None


def test_model_pickles_and_deepcopies():
    """Spawned ranks receive models by pickle; kernels re-resolve by name on the other side."""
    import copy
    import pickle

    model = tiny_model(kernels={"rms_norm": "eager"})
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert clone.kernel_backends == model.kernel_backends
            assert torch.equal(clone(ids).logits, ref)
