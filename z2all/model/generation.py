"""Autoregressive sampling with or without the KV cache.

``use_cache=True``: one prefill forward over the prompt, then one forward per new token over just that
token (keys/values of the past come from ``KVCache``). ``use_cache=False``: every step recomputes the
whole prefix. Both run the same sampling code on the same last-position logits, so greedy decoding
(temperature 0) gives identical tokens.

Batches with prompts of different lengths are LEFT padded and carry an ``attention_mask``
(1 = real); positions are counted from each row's first real token, so a padded row generates what
it would alone. Once a row has produced ``eos_token_id`` it keeps emitting ``eos_token_id``;
generation stops early when every row is finished.
"""

from __future__ import annotations

import torch

from z2all.model.cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; logits (B, V)."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass BEFORE it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 = greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n) with n <= max_new_tokens; prompt included."""
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    B, T = input_ids.shape
    max_len = model.config.max_position_embeddings
    if model.config.rope_scaling is None and T + max_new_tokens > max_len:
        raise ValueError(
            f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings ({max_len}) and the model has no rope_scaling"
        )
    was_training = model.training
    model.eval()
    seq = input_ids
    mask = attention_mask
    if mask is not None and bool(mask.all()):
        mask = None  # unpadded: let attention use its causal fast path
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = KVCache(model.config.num_hidden_layers, capacity=T + max_new_tokens) if use_cache else None
    step_input = input_ids
    try:
        for _ in range(max_new_tokens):
            out = model(step_input, attention_mask=mask, past_key_values=cache, use_cache=use_cache)
            nxt = sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished = finished | (nxt == eos_token_id)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
            step_input = nxt[:, None] if use_cache else seq
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return seq
