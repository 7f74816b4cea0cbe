"""Hugging Face checkpoint directories, both ways: config.json + (sharded) safetensors.

Tensor names are translated by ``names.py``, config.json by ``hf_config.py``. Only safetensors
are read: pickled ``pytorch_model.bin`` files are refused, since unpickling runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.checkpoints.hf_config import config_from_hf, config_to_hf
from lmforge.checkpoints.names import mlm_head, to_hf, to_lmforge
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import atomic_path, read_json_object, write_json_atomic


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmforgeError(f"{index}: missing the 'weight_map' object")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise LmforgeError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise LmforgeError(
            f"{path} holds only pickled PyTorch weights (.bin/.pt); lmforge loads safetensors only, because "
            "unpickling can run arbitrary code. Convert them once with a trusted tool to model.safetensors."
        )
    raise LmforgeError(f"{path}: no model.safetensors (or sharded *.safetensors + index) found")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise LmforgeError(f"{f}: cannot read safetensors file, it is truncated or corrupt ({e})") from None
    return tensors


def read_hf_dir(path: str | Path, *, with_mlm_head: bool = False
                ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read config.json (+ generation_config.json) and the safetensors of an HF model directory.

    Returns (config, state dict in lmforge names, generation_config dict or {}). A
    ``BertForMaskedLM``'s head is left out (the encoder alone), unless ``with_mlm_head``: then its
    tensors are added under ``MaskedLM``'s names ``predictions.*`` (continued MLM pretraining).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LmforgeError(f"{path}: no config.json, so this is not a Hugging Face model directory")
    hf_cfg = read_json_object(cfg_file)
    config = config_from_hf(hf_cfg, path.name, source=str(cfg_file))
    arch = str((hf_cfg.get("architectures") or [""])[0])
    if config.arch == "decoder" and arch.endswith("ForSequenceClassification"):
        raise LmforgeError(f"{path} is a {arch} (a reward model?): a decoder without a language-model head, so it "
                           "does not generate; score texts with it through `lmforge reward eval` or "
                           "lmforge.alignment.reward.load_reward_model")
    gen_cfg = read_json_object(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    if gen_cfg.get("eos_token_id") is not None:
        config.eos_token_id = gen_cfg["eos_token_id"]
    tensors = read_safetensors(_safetensors_files(path))
    quantized: dict[str, torch.Tensor] = {}
    if "quantization" in hf_cfg:  # `lmforge quantize` output: codes and scales apart (checkpoints/quantized.py)
        from lmforge.checkpoints.quantized import check_block, split_quantized

        tensors, quantized = split_quantized(config, tensors, check_block(hf_cfg["quantization"], str(cfg_file)))
    state = to_lmforge(config, tensors) | quantized
    if with_mlm_head:  # a family without a masked-LM head (names.mlm_head) adds nothing
        decoder, embeddings = tensors.get("cls.predictions.decoder.weight"), state.get("embed_tokens.weight")
        if decoder is not None and (embeddings is None or not torch.equal(decoder, embeddings)):
            raise LmforgeError(f"{path}: the MLM head's decoder is not tied to the word embeddings; lmforge's "
                               "MaskedLM decodes with the (tied) word embeddings")
        state |= mlm_head(config, tensors)
    return config, state, gen_cfg


def save_hf_dir(model: torch.nn.Module, path: str | Path, tokenizer=None,
                generation_config: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (a DecoderLM, EncoderModel, Seq2SeqLM or MaskedLM) as a transformers-loadable directory;
    each file written atomically."""
    from lmforge.models.mlm import MaskedLM

    if isinstance(model, MaskedLM):
        return save_masked_lm_dir(model, path, tokenizer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    # one entry per tensor: tied aliases (lm_head of a tied model, T5's embed_tokens) are left out
    state = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    state |= {k: v.detach().contiguous() for k, v in model.named_buffers() if k in model.state_dict()}
    hf_state = to_hf(config, state)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(hf_state, str(tmp), metadata={"format": "pt"})
    hf_cfg = config_to_hf(config)
    hf_cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json_atomic(path / "config.json", hf_cfg)
    gen = {k: v for k, v in (generation_config or {}).items()}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            gen.setdefault(key, getattr(config, key))
    write_json_atomic(path / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def save_masked_lm_dir(model, path: str | Path, tokenizer=None) -> Path:
    """A ``MaskedLM`` as a ``BertForMaskedLM`` directory that ``transformers`` and lmforge both load: the
    encoder under ``bert.*`` and the head under ``cls.predictions.*`` (its decoder tied to the embeddings)."""
    path = Path(save_hf_dir(model.encoder, path, tokenizer=tokenizer))
    weights = path / "model.safetensors"
    state = {"bert." + k: v for k, v in load_file(str(weights)).items()}
    for name, t in model.predictions.named_parameters():
        if name != "decoder.weight":  # tied to bert.embeddings.word_embeddings.weight
            state["cls.predictions." + name] = t.detach().contiguous()
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    hf_cfg = read_json_object(path / "config.json")
    hf_cfg["architectures"] = ["BertForMaskedLM"]
    hf_cfg["tie_word_embeddings"] = True
    write_json_atomic(path / "config.json", hf_cfg)
    return path
