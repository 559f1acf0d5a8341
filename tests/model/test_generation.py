"""KV cache, padding and generation invariants (fp32, tiny model).

Tolerances: cached vs full-forward logits and padded vs unpadded logits agree to atol 1e-5
(same maths, different reduction order).
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_model
from z2all.model import KVCache
from z2all.model.generation import filter_logits

ATOL = 1e-5


def _ids(B=2, T=12, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward():
    model = tiny_model()
    ids = _ids(T=20)
    full = model(ids).logits  # (B, 20, V)
    cache = KVCache(model.config.num_hidden_layers)
    pieces = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]  # prefill 8
    pieces.append(model(ids[:, 8:11], past_key_values=cache, use_cache=True).logits)  # 3 at once
    for t in range(11, 20):  # then one at a time
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        pieces.append(out.logits)
    assert len(cache) == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= ATOL


@torch.no_grad()
def test_cache_grows_past_initial_capacity():
    model = tiny_model()
    ids = _ids(T=10)
    cache = KVCache(model.config.num_hidden_layers, capacity=4)
    a = model(ids[:, :3], past_key_values=cache, use_cache=True).logits
    b = model(ids[:, 3:], past_key_values=cache, use_cache=True).logits
    assert cache.capacity >= 10
    assert (torch.cat([a, b], 1) - model(ids).logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_matches_unpadded(side):
    model = tiny_model()
    a, b = _ids(B=1, T=12, seed=2), _ids(B=1, T=7, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    if side == "right":
        batch = torch.cat([a, torch.cat([b, pad], 1)])
        mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
        real_b = slice(0, 7)
    else:
        batch = torch.cat([a, torch.cat([pad, b], 1)])
        mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
        real_b = slice(5, 12)
    out = model(batch, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert (out[0] - model(a).logits[0]).abs().max().item() <= ATOL
    assert (out[1, real_b] - model(b).logits[0]).abs().max().item() <= ATOL


@torch.no_grad()
def test_padding_is_actually_masked():
    """Changing a padding token must not change any real token's logits (and it would, unmasked)."""
    model = tiny_model()
    ids = _ids(B=1, T=10)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    other = ids.clone()
    other[0, :3] = (ids[0, :3] + 1) % 256
    a = model(ids, attention_mask=mask).logits[0, 3:]
    b = model(other, attention_mask=mask).logits[0, 3:]
    assert (a - b).abs().max().item() <= ATOL
    unmasked = model(other).logits[0, 3:]
    assert (a - unmasked).abs().max().item() > 1e-3


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_greedy_cache_and_no_cache_identical(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    prompt = _ids(B=2, T=6)
    with_cache = model.generate(prompt, 24, temperature=0.0, use_cache=True)
    without = model.generate(prompt, 24, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 30)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :6], prompt)


def test_batch_generate_left_padding_equals_single():
    model = tiny_model()
    a, b = _ids(B=1, T=9, seed=4), _ids(B=1, T=5, seed=5)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    out = model.generate(batch, 10, temperature=0.0, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, 10, temperature=0.0)[0])
    assert torch.equal(out[1, 4:], model.generate(b, 10, temperature=0.0)[0])


def test_eos_stops_and_pads():
    model = tiny_model()
    prompt = _ids(B=2, T=4)
    free = model.generate(prompt, 12, temperature=0.0)
    eos = int(free[0, 6])  # the 3rd token row 0 generates
    out = model.generate(prompt, 12, temperature=0.0, eos_token_id=eos)
    gen = out[:, 4:]
    first = (gen[0] == eos).nonzero()[0].item()
    assert torch.equal(gen[0, : first + 1], free[0, 4 : 5 + first])
    assert (gen[0, first:] == eos).all()  # finished rows keep emitting eos
    if not (gen[1] == eos).any():
        assert out.shape[1] == 16  # row 1 never finished, so no early stop


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model()
    prompt = _ids(B=2, T=4)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g1)
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(a, b)
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(
        model.generate(prompt, 8, temperature=2.0, top_k=1), model.generate(prompt, 8, temperature=0.0)
    )


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [True, False, False, False]


def test_generate_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(_ids(B=1, T=10), 600)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(_ids(B=1, T=3), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(_ids(B=1, T=3), attention_mask=torch.ones(1, 4))
