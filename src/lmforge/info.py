"""``lmforge info``: what a model is, how big it is, and how much memory it needs, without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.checkpoints.hf_config import config_from_hf
from lmforge.checkpoints.resolve import DEFAULT_MODEL, resolve
from lmforge.config import ModelConfig
from lmforge.models import count_parameters

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def _read_config(name: str) -> tuple[ModelConfig, dict[str, Any]]:
    source = resolve(name)
    extra: dict[str, Any] = {"format": "gguf" if source.kind == "gguf" else "huggingface", "path": str(source.path)}
    if source.kind == "hf":
        from lmforge.io import read_json_object

        config = config_from_hf(read_json_object(source.path / "config.json"), source.path.name,
                                source=str(source.path / "config.json"))
        files = list(source.path.glob("*.safetensors"))
        extra["file_size_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        tok_cfg = source.path / "tokenizer_config.json"
        extra["chat_template"] = (source.path / "chat_template.jinja").exists() or (
            tok_cfg.exists() and "chat_template" in read_json_object(tok_cfg))
    else:
        from lmforge.checkpoints.gguf import read_gguf_info

        config, metadata, has_template = read_gguf_info(source.path)
        extra["file_size_mb"] = round(Path(source.path).stat().st_size / 2**20, 1)
        extra["chat_template"] = has_template
        file_type = metadata.get("general.file_type")
        if file_type is not None:
            import gguf

            try:
                extra["quantization"] = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
            except ValueError:
                extra["quantization"] = f"file_type {file_type}"
    return config, extra


def describe(name: str | None = None) -> dict[str, Any]:
    """A dict describing the model: architecture, parameter count, memory per dtype, context length."""
    config, extra = _read_config(name or DEFAULT_MODEL)
    n = count_parameters(config)
    c = config
    variant = {"decoder": "decoder-only", "encoder": "encoder-only", "encoder-decoder": "encoder-decoder"}[c.arch]
    kv_layers = 0 if c.arch == "encoder" else (c.n_decoder_layer if c.arch == "encoder-decoder" else c.n_layer)
    kv_per_token = 2 * kv_layers * c.n_kv_head * c.head_dim  # keys and values, all (decoder) layers
    return {
        "model": str(name or DEFAULT_MODEL),
        **extra,
        "family": c.family,
        "architecture": f"{variant}, {c.norm} ({'pre' if c.norm_first else 'post'}-norm), {c.mlp} MLP, "
                        f"{c.positions} positions" + (", fused qkv" if c.fused_qkv else ""),
        "parameters": n,
        "layers": c.n_layer,
        "decoder_layers": c.n_decoder_layer if c.arch == "encoder-decoder" else None,
        "labels": c.labels,
        "hidden_size": c.n_embd,
        "heads": c.n_head,
        "kv_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "context_length": c.max_seq_len,
        "rope_theta": c.rope_theta if c.positions == "rope" else None,
        "rope_scaling": c.rope_scaling,
        "tied_embeddings": c.tie_embeddings,
        "weights_memory_mb": {k: round(n * b / 2**20, 1) for k, b in BYTES.items()},
        "kv_cache_mb_per_1k_tokens_bf16": round(kv_per_token * 2 * 1024 / 2**20, 2) if kv_layers else None,
    }


def describe_adapter(path: str | Path, base_parameters: int) -> dict[str, Any]:
    """What a PEFT adapter folder holds: its kind, rank / virtual tokens, targets and parameter count."""
    from lmforge.peft.adapters import read_adapter

    config, tensors = read_adapter(path)
    n = sum(t.numel() for t in tensors.values())
    out: dict[str, Any] = {"path": str(path), "peft_type": config.get("peft_type"), "parameters": n,
                           "share_of_base": f"{100 * n / max(base_parameters, 1):.2f}%"}
    if config.get("peft_type") == "LORA":
        targets = config.get("target_modules")
        out.update(r=config.get("r"), lora_alpha=config.get("lora_alpha"), rslora=config.get("use_rslora", False),
                   target_modules=sorted(targets) if isinstance(targets, list) else targets,
                   adapted_layers=len({k.split(".lora_")[0] for k in tensors}))
    else:
        out["num_virtual_tokens"] = config.get("num_virtual_tokens")
    return out


def format_info(info: dict[str, Any]) -> str:
    lines = []
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif key == "weights_memory_mb":
            value = ", ".join(f"{k} {v:,.1f} MB" for k, v in value.items())
        elif key == "adapter":
            value = ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                              else f"{k.replace('_', ' ')} {v}" for k, v in value.items() if v is not None)
        elif value is None:
            continue
        lines.append(f"{key.replace('_', ' '):>32}: {value}")
    return "\n".join(lines)
