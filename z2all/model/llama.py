"""The Llama2 decoder, written from scratch: single device, no parallelism, transformers' names.

    input_ids (B, T)
      -> model.embed_tokens                                   (B, T, h)
      -> N x [ x + o_proj(attn(rope(q, k), v)) on input_layernorm(x)      (GQA, causal)
               x + down(silu(gate(x)) * up(x)) on post_attention_layernorm(x) ]
      -> model.norm -> lm_head                                (B, T, vocab)

Parameter names are exactly transformers' LlamaForCausalLM's, so HF export/import is a name-for-name
copy (see ``hf_io.py``). The hot ops run through ``z2all.model.kernels`` (backend chosen once at
construction; see ``kernel_backends``). Every parameter stays its own nn.Parameter: optimizers,
DDP buckets and ZeRO shards see exactly the HF tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from z2all.labels import IGNORE_INDEX
from z2all.model.cache import KVCache
from z2all.model.config import KERNEL_OPS, Z2allConfig
from z2all.model.generation import generate as _generate
from z2all.model.hf_io import load_pretrained, save_pretrained
from z2all.model.kernels import ResolvedKernel, resolve
from z2all.model.rope import RotaryTables

logger = logging.getLogger(__name__)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    """fp32 scalar: mean cross entropy over the scored positions, those whose target is not
    ``IGNORE_INDEX`` (None without ``labels`` or ``targets``)."""
    logits: torch.Tensor | None
    """(B, T, vocab) in the model's dtype; None only when ``return_logits=False`` let a fused
    linear-cross-entropy backend skip them."""
    past_key_values: KVCache | None
    """The cache to pass back for the next step (None unless ``use_cache``)."""


class Z2allRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kernel: ResolvedKernel):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.weight, self.eps)


class Z2allAttention(nn.Module):
    def __init__(self, cfg: Z2allConfig, layer_idx: int, kern: dict[str, ResolvedKernel]):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self._attn = kern["attention"]
        self._rotary = kern["rotary"]

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        # Separate q/k/v matmuls: one matmul over torch.cat of the three weights measured no faster
        # on CPU (docs/model.md, "Performance notes") and would copy the weights every step.
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = self._rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past + T, D)
        out = self._attn(q, k, v, mask, True, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Z2allMLP(nn.Module):
    def __init__(self, cfg: Z2allConfig, kern: dict[str, ResolvedKernel]):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._swiglu = kern["swiglu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Z2allDecoderLayer(nn.Module):
    def __init__(self, cfg: Z2allConfig, layer_idx: int, kern: dict[str, ResolvedKernel]):
        super().__init__()
        self.self_attn = Z2allAttention(cfg, layer_idx, kern)
        self.mlp = Z2allMLP(cfg, kern)
        self.input_layernorm = Z2allRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kern["rms_norm"])
        self.post_attention_layernorm = Z2allRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kern["rms_norm"])
        self.hidden_dropout = cfg.hidden_dropout

    def forward(self, x, cos, sin, mask, cache):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.hidden_dropout > 0.0:
            a = F.dropout(a, self.hidden_dropout, self.training)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if self.hidden_dropout > 0.0:
            m = F.dropout(m, self.hidden_dropout, self.training)
        return x + m


class Z2allModel(nn.Module):
    """Embedding + decoder layers + final norm (transformers' ``LlamaModel``)."""

    def __init__(self, cfg: Z2allConfig, kern: dict[str, ResolvedKernel]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Z2allDecoderLayer(cfg, i, kern) for i in range(cfg.num_hidden_layers))
        self.norm = Z2allRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kern["rms_norm"])


def _build_mask(attention_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """Bool (B, 1, T, past + T): causal AND key is not padding, with the diagonal always open.

    The diagonal keeps every query row non-empty: a padding query (left padding) would otherwise
    attend to nothing and softmax would give NaN; its output is never used.
    """
    tk = past + T
    causal = torch.ones(T, tk, dtype=torch.bool, device=attention_mask.device).tril(diagonal=past)
    mask = causal[None] & attention_mask[:, None, :].bool()  # (B, T, Tk)
    diag = torch.zeros(T, tk, dtype=torch.bool, device=attention_mask.device)
    diag[torch.arange(T), torch.arange(past, tk)] = True
    return (mask | diag[None])[:, None]


class Z2allForCausalLM(nn.Module):
    def __init__(self, config: Z2allConfig):
        super().__init__()
        self.config = config
        kern = {op: resolve(op, config.kernels) for op in KERNEL_OPS}
        self._kernels = kern
        self.model = Z2allModel(config, kern)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope = RotaryTables(config)
        self.reset_parameters()
        logger.info(
            "z2all model: %.1fM params; kernels: %s",
            config.num_parameters / 1e6,
            ", ".join(f"{op}={k.name}" for op, k in kern.items()),
        )

    @property
    def kernel_backends(self) -> dict[str, str]:
        """``{op: backend}`` this model runs with (``run_info.json`` material)."""
        return {op: k.name for op, k in self._kernels.items()}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, initializer_range) for every Linear/Embedding; RMSNorm weights 1.

        With ``scale_output_init`` the two projections that write into the residual stream
        (o_proj, down_proj) get std / sqrt(2 * layers), so the residual variance does not grow
        with depth. Deterministic given the torch seed (modules are visited in a fixed order).
        """
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers) if cfg.scale_output_init else std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                if name == "lm_head" and cfg.tie_word_embeddings:
                    continue  # shares the embedding, which is already initialised
                module.weight.normal_(0.0, s)
            elif isinstance(module, Z2allRMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        targets: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, past + T), 1 = real token, 0 = padding.

        Positions come from ``attention_mask`` when given (cumsum - 1, so left padding does not shift
        the real tokens), else count up from the cache length.

        The loss takes one of two (B, T) tensors, never both (``ValueError``):

        - ``targets``, aligned with the positions: position t is scored on ``targets[:, t]``, no
          shift. Training's own form: a pretraining window of L + 1 tokens is ``input_ids = w[:-1]``,
          ``targets = w[1:]``, so every one of the T = L positions is scored.
        - ``labels``, Hugging Face's form (for interop): shifted inside, position t is scored on
          ``labels[:, t + 1]`` and the last position on nothing: ``labels=l`` is exactly ``targets=``
          ``l`` shifted left by one with ``IGNORE_INDEX`` appended.

        ``IGNORE_INDEX`` (-100, ``z2all.labels``) marks a position no loss counts. ``return_logits=False``
        lets a fused linear-cross-entropy backend skip the (B, T, vocab) logits (then ``logits`` is None).
        """
        if labels is not None and targets is not None:
            raise ValueError(
                "pass labels (Hugging Face, shifted inside) or targets (aligned with positions), not both"
            )
        B, T = input_ids.shape
        if labels is not None:
            # targets[t] = labels[t + 1]; the last position has no target
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        if targets is not None and tuple(targets.shape) != (B, T):
            name = "labels" if labels is not None else "targets"
            raise ValueError(f"{name} must be (batch, new) = ({B}, {T}), got {tuple(targets.shape)}")
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache(self.config.num_hidden_layers)
        past = cache.seq_len if cache is not None else 0

        mask = None
        max_pos = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be (batch, past + new) = ({B}, {past + T}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask.all()):
                mask = _build_mask(attention_mask, past, T)
                if position_ids is None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]  # (1, T)
            max_pos = past + T - 1
        cos, sin = self._rope(position_ids, max_pos)  # (B|1, T, D)

        x = self.model.embed_tokens(input_ids)  # (B, T, h)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)

        loss = None
        if targets is None:
            logits = self.lm_head(x)
        else:
            loss, logits = self._kernels["cross_entropy"](
                x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), return_logits
            )
            if logits is not None:
                logits = logits.view(B, T, -1)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    # ---- generation and Hugging Face interop live in their own modules -----------------------
    # model.generate(input_ids, ...) is generation.generate(model, input_ids, ...): same signature
    generate = _generate

    def save_pretrained(self, save_dir: str | Path) -> None:
        """Write config.json + model.safetensors in the transformers Llama layout (atomic)."""
        save_pretrained(self, save_dir)

    @classmethod
    def from_pretrained(
        cls, load_dir: str | Path, strict: bool = True, dtype: torch.dtype | None = None, **config_overrides
    ) -> Z2allForCausalLM:
        """Load a z2all or transformers Llama directory; ``config_overrides`` e.g. ``kernels={...}``."""
        return load_pretrained(cls, load_dir, strict=strict, dtype=dtype, **config_overrides)
