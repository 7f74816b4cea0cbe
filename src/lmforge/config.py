"""Model configuration: one dataclass for every transformer lmforge builds, and named presets.

One ``ModelConfig`` describes all three variants (``arch``): decoder-only (Llama, Qwen2, Mistral,
GPT-2), encoder-only (BERT) and encoder-decoder (T5). This module imports no torch, so reading a
config is instant. The field names are lmforge's own; ``checkpoints/hf_config.py`` translates
to and from the ``config.json`` of Hugging Face ``transformers``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import LmforgeError

Arch = Literal["decoder", "encoder", "encoder-decoder"]
Norm = Literal["rmsnorm", "layernorm"]
# swiglu: gated silu (Llama); geglu: gated tanh-gelu (T5 v1.1); gelu: tanh-gelu (GPT-2);
# gelu_exact: erf-gelu (BERT); relu (T5 v1.0)
MLP = Literal["swiglu", "geglu", "gelu", "gelu_exact", "relu"]
# rope (Llama); learned absolute (GPT-2, BERT); relative: T5's bucketed attention bias
Positions = Literal["rope", "learned", "relative"]


@dataclass
class ModelConfig:
    """Shape and flavour of a transformer.

    Llama-family models use ``norm="rmsnorm"``, ``mlp="swiglu"``, ``positions="rope"``;
    GPT-2 uses ``norm="layernorm"``, ``mlp="gelu"``, ``positions="learned"`` and a fused
    qkv projection with biases everywhere; BERT is an ``arch="encoder"`` with post-norm blocks
    (``norm_first=False``) and token-type embeddings; T5 is ``arch="encoder-decoder"`` with
    relative position buckets, unscaled attention and no biases.
    """

    name: str = "custom"
    family: str = "llama"  # a registered family (lmforge.models.families): llama, mistral, qwen2, gpt2, bert, t5
    arch: Arch = "decoder"
    vocab_size: int = 32000
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (no grouped-query attention)
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int = 256
    max_seq_len: int = 2048  # context window (max_position_embeddings)
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: MLP = "swiglu"
    positions: Positions = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v only
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    fused_qkv: bool = False  # one (n_embd -> q+k+v) projection, as GPT-2's c_attn
    norm_first: bool = True  # pre-norm blocks; BERT normalises after each residual add instead
    type_vocab_size: int = 0  # BERT's token-type (segment) embeddings
    pooler: bool = False  # BERT's dense+tanh over the first token
    n_decoder_layer: int | None = None  # encoder-decoder: decoder depth (None: n_layer)
    rel_buckets: int = 32  # T5 relative position buckets ...
    rel_max_distance: int = 128  # ... and the distance where the last bucket starts
    attention_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    scale_decoder_outputs: bool = False  # T5 v1.0: hidden * n_embd**-0.5 before the (tied) lm_head
    decoder_start_token_id: int | None = None
    labels: list[str] | None = None  # classification head: one name per class
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LmforgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise LmforgeError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        for fname, allowed in (("arch", Arch), ("norm", Norm), ("mlp", MLP), ("positions", Positions)):
            value = getattr(self, fname)
            if value not in allowed.__args__:
                raise LmforgeError(f"config field {fname}={value!r}; allowed: {', '.join(allowed.__args__)}")
        if self.positions == "rope" and self.head_dim % 2:
            raise LmforgeError(f"RoPE needs an even head_dim, got {self.head_dim}")

    def _check_types(self) -> None:
        """Refuse values of the wrong type (a ``config.json`` with ``"hidden_size": "64"``) and sizes below their
        minimum, naming the field, before anything computes with them."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _FIELD_KINDS.get(str(f.type))
            if kinds is None:
                continue  # str / Literal fields: the allowed values are checked below
            ok = any(_is_kind(value, kind) for kind in kinds)
            if not ok:
                words = " or ".join(_KIND_WORDS[k] for k in kinds)
                raise LmforgeError(f"config field {f.name} must be {words}, got {value!r} "
                                   f"({type(value).__name__})")
            low = _MIN_SIZE.get(f.name)
            if low is not None and isinstance(value, int) and value < low:
                raise LmforgeError(f"config field {f.name} must be >= {low}, got {value}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_parameters(self) -> int:
        """Parameter count of a decoder-only model (tied embeddings counted once), by formula; for the other
        variants ``lmforge.models.count_parameters`` counts a shape-only model."""
        if self.arch != "decoder" or self.mlp not in ("swiglu", "gelu"):
            raise LmforgeError(f"num_parameters() is a formula for decoder-only models; {self.name} is "
                               f"{self.arch}: use lmforge.models.count_parameters(config)")
        d, hd = self.n_embd, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) if self.qkv_bias else 0
        attn += d if self.out_bias else 0
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.intermediate_size
        if self.mlp_bias:
            mlp += (n_mats - 1) * self.intermediate_size + d
        norm = d if self.norm == "rmsnorm" else 2 * d
        block = attn + mlp + 2 * norm
        emb = self.vocab_size * d
        pos = self.max_seq_len * d if self.positions == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layer * block + emb + pos + norm + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LmforgeError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


_FIELD_KINDS: dict[str, tuple[str, ...]] = {  # a field's annotation -> the kinds of value it accepts
    "int": ("int",), "int | None": ("int", "none"), "float": ("float",), "float | None": ("float", "none"),
    "bool": ("bool",), "dict[str, Any] | None": ("dict", "none"), "list[str] | None": ("strs", "none"),
    "int | list[int] | None": ("int", "ints", "none"),
}
_KIND_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "none": "null",
               "dict": "a mapping", "strs": "a list of strings", "ints": "a list of integers"}
_MIN_SIZE = {"vocab_size": 1, "n_embd": 1, "n_head": 1, "n_kv_head": 1, "head_dim": 1, "intermediate_size": 1,
             "max_seq_len": 1, "n_layer": 0, "n_decoder_layer": 0, "type_vocab_size": 0, "rel_buckets": 0,
             "rel_max_distance": 0}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "ints":
        return isinstance(value, list) and all(_is_kind(v, "int") for v in value)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return {"bool": isinstance(value, bool), "none": value is None, "dict": isinstance(value, dict)}[kind]


PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2 shapes: HuggingFaceTB/SmolLM2-135M and -360M config.json.
    "smollm2-135m": dict(
        family="llama", vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3,
        intermediate_size=1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "smollm2-360m": dict(
        family="llama", vocab_size=49152, n_layer=32, n_embd=960, n_head=15, n_kv_head=5,
        intermediate_size=2560, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    # GPT-2 small (124M).
    "gpt2": dict(
        family="gpt2", vocab_size=50257, n_layer=12, n_embd=768, n_head=12, intermediate_size=3072,
        max_seq_len=1024, norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True,
        qkv_bias=True, out_bias=True, mlp_bias=True, fused_qkv=True, bos_token_id=50256, eos_token_id=50256,
    ),
    # Llama 3.2 1B: 128k context through llama3 RoPE scaling.
    "llama-3.2-1b": dict(
        family="llama", vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, head_dim=64,
        intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001,
    ),
    # Tiny shapes for tests and from-scratch experiments.
    "tiny-llama": dict(family="llama", vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                       intermediate_size=128, max_seq_len=256),
    "tiny-gpt2": dict(family="gpt2", vocab_size=256, n_layer=2, n_embd=64, n_head=4, intermediate_size=256,
                      max_seq_len=256, norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True,
                      qkv_bias=True, out_bias=True, mlp_bias=True, fused_qkv=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden: ``preset("gpt2", n_layer=2)``."""
    if name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict({"name": name, **PRESETS[name], **overrides})
