"""Model configuration: one dataclass for every decoder-only model lmforge builds, and named presets.

This module imports no torch, so reading a config (``lmforge info``) is instant. The field
names are lmforge's own; ``from_hf_dict`` / ``to_hf_dict`` translate to and from the
``config.json`` of Hugging Face ``transformers`` for the families we support
(``llama``, ``mistral``, ``qwen2``, ``gpt2``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import LmforgeError

Norm = Literal["rmsnorm", "layernorm"]
MLP = Literal["swiglu", "gelu"]
Positions = Literal["rope", "learned"]


@dataclass
class ModelConfig:
    """Shape and flavour of a decoder-only transformer.

    Llama-family models use ``norm="rmsnorm"``, ``mlp="swiglu"``, ``positions="rope"``;
    GPT-2 uses ``norm="layernorm"``, ``mlp="gelu"``, ``positions="learned"`` and a fused
    qkv projection with biases everywhere.
    """

    name: str = "custom"
    family: str = "llama"  # the transformers model_type we save as: llama | mistral | qwen2 | gpt2
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
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LmforgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise LmforgeError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for fname, allowed in (("norm", Norm), ("mlp", MLP), ("positions", Positions)):
            value = getattr(self, fname)
            if value not in allowed.__args__:
                raise LmforgeError(f"config field {fname}={value!r}; allowed: {', '.join(allowed.__args__)}")
        if self.positions == "rope" and self.head_dim % 2:
            raise LmforgeError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone (tied embeddings counted once)."""
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

    # ---- transformers config.json, both ways -------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Build from a ``transformers`` config.json dict (llama, mistral, qwen2 or gpt2)."""
        model_type = hf.get("model_type")
        common = dict(
            name=name,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        try:
            if model_type in ("llama", "mistral", "qwen2"):
                act = hf.get("hidden_act", "silu")
                if act != "silu":
                    raise LmforgeError(f"config.json: hidden_act={act!r} is not supported; lmforge supports 'silu'")
                rope_params = hf.get("rope_parameters") or {}
                rope_scaling = hf.get("rope_scaling") or None
                if rope_params and rope_params.get("rope_type", "default") != "default":
                    rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
                if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
                    rope_scaling = None
                return cls(
                    family=model_type,
                    vocab_size=hf["vocab_size"],
                    n_layer=hf["num_hidden_layers"],
                    n_embd=hf["hidden_size"],
                    n_head=hf["num_attention_heads"],
                    n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                    intermediate_size=hf["intermediate_size"],
                    max_seq_len=hf.get("max_position_embeddings", 2048),
                    norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6),
                    mlp="swiglu",
                    positions="rope",
                    rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    rope_scaling=rope_scaling,
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                    out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
                    mlp_bias=bool(hf.get("mlp_bias", False)),
                    **common,
                )
            if model_type == "gpt2":
                act = hf.get("activation_function", "gelu_new")
                if act not in ("gelu_new", "gelu_pytorch_tanh"):
                    raise LmforgeError(f"config.json: activation_function={act!r} is not supported; "
                                       "lmforge supports 'gelu_new'")
                n_embd = hf.get("n_embd", 768)
                return cls(
                    family="gpt2",
                    vocab_size=hf.get("vocab_size", 50257),
                    n_layer=hf.get("n_layer", 12),
                    n_embd=n_embd,
                    n_head=hf.get("n_head", 12),
                    intermediate_size=hf.get("n_inner") or 4 * n_embd,
                    max_seq_len=hf.get("n_positions", 1024),
                    norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    mlp="gelu",
                    positions="learned",
                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    qkv_bias=True,
                    out_bias=True,
                    mlp_bias=True,
                    fused_qkv=True,
                    **common,
                )
        except KeyError as e:
            raise LmforgeError(f"config.json: missing field {e.args[0]!r} for model_type {model_type!r}") from None
        raise LmforgeError(
            f"config.json: model_type={model_type!r} is not a decoder-only family lmforge supports; "
            "supported: llama, mistral, qwen2, gpt2"
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``transformers`` config.json dict for this model."""
        tokens = dict(bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        if self.family == "gpt2":
            if not (self.norm == "layernorm" and self.positions == "learned" and self.mlp == "gelu"):
                raise LmforgeError("a gpt2-family config needs layernorm, learned positions and a gelu MLP")
            return dict(
                model_type="gpt2",
                architectures=["GPT2LMHeadModel"],
                vocab_size=self.vocab_size,
                n_layer=self.n_layer,
                n_embd=self.n_embd,
                n_head=self.n_head,
                n_inner=self.intermediate_size,
                n_positions=self.max_seq_len,
                layer_norm_epsilon=self.norm_eps,
                activation_function="gelu_new",
                tie_word_embeddings=self.tie_embeddings,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **tokens,
            )
        if not (self.norm == "rmsnorm" and self.positions == "rope" and self.mlp == "swiglu"):
            raise LmforgeError(f"a {self.family}-family config needs rmsnorm, rope and a swiglu MLP")
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        if self.family not in arch:
            raise LmforgeError(f"cannot save family {self.family!r}; known: {', '.join(arch)}, gpt2")
        out: dict[str, Any] = dict(
            model_type=self.family,
            architectures=[arch[self.family]],
            vocab_size=self.vocab_size,
            num_hidden_layers=self.n_layer,
            hidden_size=self.n_embd,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.norm_eps,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_embeddings,
            **tokens,
        )
        if self.family == "qwen2":
            if self.out_bias or self.mlp_bias or not self.qkv_bias:
                raise LmforgeError("a qwen2-family config has biases on q, k, v only")
        else:
            if self.qkv_bias != self.out_bias:
                raise LmforgeError(f"{self.family} has one attention_bias flag: qkv_bias and out_bias must match")
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return out


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
