"""`Z2allConfig`: the hyper-parameters of a Llama2-style decoder, with Hugging Face names.

One typed dataclass; every field is validated in ``__post_init__`` and a bad value raises a
``ValueError`` that names the field. ``head_dim`` is derived (``hidden_size // num_attention_heads``).

Two dict formats:
- ``to_dict`` / ``from_dict``: z2all's own format (every field below, unknown keys rejected).
- ``to_hf_dict`` / ``from_hf_dict``: the ``config.json`` of ``transformers.LlamaForCausalLM``
  (``model_type: "llama"``); HF-only keys that do not change the maths are accepted, keys that would
  (``attention_bias: true``, ``hidden_act != "silu"``, a ``head_dim`` that disagrees) are rejected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from z2all.atomic import atomic_write_json

# Names of the hot ops whose backend may be forced through ``Z2allConfig.kernels``.
KERNEL_OPS = ("attention", "rms_norm", "rotary", "swiglu", "cross_entropy")

_ROPE_TYPES = ("linear", "dynamic")

# Keys transformers writes into a Llama config.json that carry no information z2all needs.
_HF_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "pretraining_tp",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "head_dim",
        "rope_parameters",
        "rope_type",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tie_encoder_decoder",
        "is_encoder_decoder",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "task_specific_params",
    }
)


# Keys that change what a checkpoint computes, read by transformers outside LlamaConfig's own fields
# (or by Llama variants sharing model_type "llama"): present with a non-neutral value -> refused.
_HF_REFUSED_KEYS = {
    "quantization_config": "quantized weights (dequantize the checkpoint first)",
    "sliding_window": "sliding-window attention",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "logits_scaling": "scaled logits",
    "embedding_multiplier": "a scaled embedding",
    "residual_multiplier": "scaled residual branches",
    "attention_multiplier": "a non-standard attention scale",
}

logger = logging.getLogger(__name__)


@dataclass
class Z2allConfig:
    """Hyper-parameters of a Llama2 decoder. Names follow ``transformers.LlamaConfig``."""

    vocab_size: int = 32000
    """Number of token ids; rows of the embedding and of the LM head."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of the SwiGLU MLP (gate/up output features)."""
    num_hidden_layers: int = 32
    """Number of decoder layers."""
    num_attention_heads: int = 32
    """Query heads per layer; must divide ``hidden_size``."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); None means ``num_attention_heads`` (plain MHA)."""
    max_position_embeddings: int = 2048
    """Context length the model is trained for; dynamic-NTK RoPE scaling starts beyond it."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: dict | None = None
    """None, or ``{"rope_type": "linear" | "dynamic", "factor": float >= 1}`` (HF spelling)."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    tie_word_embeddings: bool = False
    """Share one matrix between the token embedding and the LM head."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (training only)."""
    hidden_dropout: float = 0.0
    """Dropout on each residual branch output (attention and MLP) before it is added (training only)."""
    initializer_range: float = 0.02
    """Std of the normal init of every Linear and Embedding weight."""
    scale_output_init: bool = False
    """Init ``o_proj``/``down_proj`` with std ``initializer_range / sqrt(2 * num_hidden_layers)``."""
    bos_token_id: int | None = 1
    """Begin-of-sequence id (only exported to HF; the model itself never inserts it)."""
    eos_token_id: int | None = 2
    """End-of-sequence id (exported to HF; ``generate`` takes its own ``eos_token_id``)."""
    pad_token_id: int | None = None
    """Padding id (exported to HF)."""
    kernels: dict[str, str] = field(default_factory=dict)
    """Force a backend per op, e.g. ``{"attention": "eager"}``; ops: attention, rms_norm, rotary,
    swiglu, cross_entropy. Missing ops use "auto". Not exported to HF config.json."""
    head_dim: int = field(init=False)
    """Derived: ``hidden_size // num_attention_heads``."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Z2allConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"Z2allConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"Z2allConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"Z2allConfig.head_dim ({self.head_dim}) must be even for RoPE")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Z2allConfig.{name} must be a positive number, got {value!r}")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"Z2allConfig.{name} must be in [0, 1), got {value!r}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if not isinstance(self.kernels, dict):
            raise ValueError(f"Z2allConfig.kernels must be a dict op -> backend, got {self.kernels!r}")
        for op, backend in self.kernels.items():
            if op not in KERNEL_OPS:
                raise ValueError(
                    f"Z2allConfig.kernels: unknown op {op!r}; known ops: {', '.join(KERNEL_OPS)}"
                )
            if not isinstance(backend, str):
                raise ValueError(f"Z2allConfig.kernels[{op!r}] must be a backend name, got {backend!r}")

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return V * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h

    # ---- z2all's own dict/JSON format -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["kernels"] = dict(self.kernels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "dict") -> Z2allConfig:
        """Build from ``to_dict`` output; an unknown key raises naming it and ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        d = dict(d)
        head_dim = d.pop("head_dim", None)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown Z2allConfig key(s) {unknown}; known keys: {sorted(known)}")
        cfg = cls(**d)
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ValueError(f"{source}: head_dim={head_dim} disagrees with hidden_size/num_attention_heads")
        return cfg

    def to_json(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> Z2allConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        return cls.from_dict(d, source=str(path))

    # ---- Hugging Face config.json ----------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers writes for ``LlamaForCausalLM`` (4.x and 5.x readable)."""
        rope_parameters = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": float(self.rope_theta)}
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            # transformers 5.x reads rope_parameters; 4.x reads rope_theta / rope_scaling.
            "rope_parameters": rope_parameters,
            "rope_theta": float(self.rope_theta),
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {**self.rope_scaling, "type": self.rope_scaling["rope_type"]}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> Z2allConfig:
        """Read a transformers Llama ``config.json`` (4.x or 5.x spelling).

        Keys are sorted into three kinds. Maths-changing ones are checked: an unsupported value
        (``hidden_act`` != silu, ``attention_bias``/``mlp_bias`` true, ``pretraining_tp`` != 1, a rope
        type other than default/linear/dynamic, a decoupled ``head_dim``, any key of
        :data:`_HF_REFUSED_KEYS` such as ``quantization_config``) raises ``ValueError`` naming ``source``.
        Bookkeeping keys transformers writes itself (:data:`_HF_IGNORED_KEYS`) are dropped silently.
        Any other key (``auto_map``, ``model_max_length``, generation defaults, ...) is dropped with a
        warning: transformers' ``LlamaForCausalLM`` stores such keys on its config and never reads
        them, so ignoring them keeps the model equal to what transformers would compute.
        """
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'llama'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{source}: {key}=true is not supported by the z2all Llama")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"{source}: pretraining_tp={d['pretraining_tp']} is not supported")
        for key, what in _HF_REFUSED_KEYS.items():
            if d.get(key) not in (None, False):
                raise ValueError(f"{source}: {key}={d[key]!r} ({what}) is not supported by the z2all Llama")
        known = {f.name for f in dataclasses.fields(cls) if f.init} - {"kernels", "rope_scaling"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = sorted(set(d) - known - _HF_IGNORED_KEYS - set(_HF_REFUSED_KEYS) - {"rope_scaling"})
        if extra:
            logger.warning(
                "%s: ignoring config key(s) %s (transformers' Llama does not read them either)", source, extra
            )
        # 5.x writes rope_parameters, 4.x rope_scaling; a file may carry both (one of them "default"):
        # a scaling in either one counts, and two different scalings are refused.
        scalings = []
        for key in ("rope_scaling", "rope_parameters"):  # rope_parameters' rope_theta wins (5.x)
            rope = d.get(key)
            if not isinstance(rope, dict):
                continue
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                scalings.append({"rope_type": rope_type, "factor": rope.get("factor")})
        if len(scalings) == 2 and scalings[0] != scalings[1]:
            raise ValueError(
                f"{source}: rope_parameters and rope_scaling disagree ({scalings[0]} vs {scalings[1]})"
            )
        if scalings:
            kwargs["rope_scaling"] = scalings[0]
        if isinstance(d.get("eos_token_id"), list):
            kwargs["eos_token_id"] = d["eos_token_id"][0]
        kwargs.update(overrides)
        try:
            cfg = cls(**kwargs)
        except ValueError as e:  # e.g. an unsupported rope type: name the file it came from
            raise ValueError(f"{source}: {e}") from e
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ValueError(
                f"{source}: head_dim={head_dim} != hidden_size/num_attention_heads={cfg.head_dim}; "
                "a decoupled head_dim is not supported"
            )
        return cfg


def _normalize_rope_scaling(rs: dict | None) -> dict | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"Z2allConfig.rope_scaling must be a dict or None, got {rs!r}")
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"Z2allConfig.rope_scaling: rope_type {rope_type!r} not in {_ROPE_TYPES}")
    extra = sorted(set(rs) - {"rope_type", "type", "factor"})
    if extra:
        raise ValueError(f"Z2allConfig.rope_scaling: unknown key(s) {extra}")
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1.0:
        raise ValueError(f"Z2allConfig.rope_scaling.factor must be a number >= 1, got {factor!r}")
    if math.isinf(factor):
        raise ValueError("Z2allConfig.rope_scaling.factor must be finite")
    return {"rope_type": rope_type, "factor": float(factor)}
