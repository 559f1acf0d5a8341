"""What llama.cpp does with a GGUF file, written here from its documented conventions, for the tests.

Each function reads only the GGUF file (through ``gguf.GGUFReader``), never z2all's model or tokenizer,
so agreeing with z2all is evidence that the file says what llama.cpp needs:

* :func:`gguf_forward`: the llama architecture's forward pass (RMSNorm, GQA attention with llama.cpp's
  "normal" rotary that turns adjacent pairs ``(2i, 2i+1)``, SwiGLU, ``output`` or the tied
  ``token_embd``), in float64;
* :func:`rope_pairs`: that rotary, with linear scaling as ``llama.rope.scaling.factor`` states it;
* :func:`spm_encode`: llama.cpp's sentencepiece tokenizer (``tokenizer.ggml.model = "llama"``): spaces
  become ``▁`` (no prefix when ``add_space_prefix`` is false), the adjacent pair whose joined text is a
  normal token of the highest score merges first (leftmost on ties), leftover symbols fall back to
  their UTF-8 ``<0xNN>`` byte tokens;
* :func:`gpt2_pretokenize`: llama.cpp's ``gpt-2`` pre-tokenizer regex.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

# llama.cpp's "gpt-2" pre-tokenizer (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def fields(path: str | Path) -> dict[str, object]:
    """Every metadata key of the file -> its value (arrays as lists)."""
    reader = gguf.GGUFReader(path)
    return {key: f.contents() for key, f in reader.fields.items()}


def tensors(path: str | Path) -> dict[str, tuple[str, list[int], torch.Tensor]]:
    """name -> (GGML type name, ``ne`` as stored (innermost first), the tensor in torch's row-major shape)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # read back as raw bytes
            value = torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
        else:
            value = torch.from_numpy(np.array(t.data).reshape(shape))
        out[t.name] = (t.tensor_type.name, [int(n) for n in t.shape], value)
    return out


def rope_pairs(x: torch.Tensor, positions: torch.Tensor, base: float, factor: float = 1.0) -> torch.Tensor:
    """llama.cpp's normal-mode rotary: ``x`` (T, heads, D); pair ``(2i, 2i+1)`` turns by
    ``pos / factor * base^(-2i/D)``."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    angle = positions.double()[:, None] * theta[None, :] / factor  # (T, D/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (T, 1, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def gguf_forward(path: str | Path, ids: list[int]) -> torch.Tensor:
    """(T, n_vocab) float64 logits of one sequence, from the GGUF file alone."""
    meta = fields(path)
    w = {name: t.double() for name, (_, _, t) in tensors(path).items()}
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    factor = (
        meta.get("llama.rope.scaling.factor", 1.0) if meta.get("llama.rope.scaling.type") == "linear" else 1.0
    )
    d = meta["llama.rope.dimension_count"]
    t = len(ids)
    pos = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["token_embd.weight"][torch.tensor(ids)]  # (T, h)
    for layer in range(meta["llama.block_count"]):
        p = f"blk.{layer}."
        a = _rms(x, w[p + "attn_norm.weight"], eps)
        q = rope_pairs((a @ w[p + "attn_q.weight"].T).view(t, n_head, d), pos, base, factor)
        k = rope_pairs((a @ w[p + "attn_k.weight"].T).view(t, n_kv, d), pos, base, factor)
        v = (a @ w[p + "attn_v.weight"].T).view(t, n_kv, d)
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5  # (H, T, T)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        att = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, n_head * d)
        x = x + att @ w[p + "attn_output.weight"].T
        m = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate, up = m @ w[p + "ffn_gate.weight"].T, m @ w[p + "ffn_up.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T


def spm_encode(text: str, meta: dict[str, object]) -> list[int]:
    """llama.cpp's sentencepiece tokenization of plain ``text`` from the file's ``tokenizer.ggml.*``."""
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    normal = int(gguf.TokenType.NORMAL)
    piece_id = {tok: i for i, tok in enumerate(tokens) if types[i] == normal}
    byte_id = {tok: i for i, tok in enumerate(tokens) if types[i] == int(gguf.TokenType.BYTE)}
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        text = " " + text
    sym = list(text.replace(" ", "\u2581"))
    nxt = [i + 1 if i + 1 < len(sym) else -1 for i in range(len(sym))]
    prev = [i - 1 for i in range(len(sym))]
    heap: list[tuple[float, int, str]] = []

    def push(i: int) -> None:  # the bigram of symbol i and the one after it
        j = nxt[i] if i >= 0 else -1
        if j >= 0 and (joined := sym[i] + sym[j]) in piece_id:
            heapq.heappush(heap, (-scores[piece_id[joined]], i, joined))

    for i in range(len(sym) - 1):
        push(i)
    while heap:
        _, i, joined = heapq.heappop(heap)
        j = nxt[i]
        if not sym[i] or j < 0 or sym[i] + sym[j] != joined:
            continue  # stale: one side merged since this bigram was queued
        sym[i], sym[j] = joined, ""
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prev[nxt[j]] = i
        push(prev[i])
        push(i)
    ids: list[int] = []
    i = 0 if sym else -1
    while i >= 0:
        if sym[i] in piece_id:
            ids.append(piece_id[sym[i]])
        else:
            ids.extend(byte_id[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8"))
        i = nxt[i]
    return ids


def gpt2_pretokenize(text: str) -> list[str]:
    import regex

    return regex.findall(GPT2_REGEX, text)
