"""Quantised model folders (``lmforge quantize``): saving, recognising and rebuilding them.

A quantised folder is a Hugging Face folder (config.json, model.safetensors, generation_config.json, tokenizer
files) whose config.json carries a ``quantization`` block::

    "quantization": {"format": "lmforge-weight-only", "version": 1, "method": "int4", "group_size": 64,
                     "algorithm": "gptq", "head": "int8", "layout": "..."}

``head`` says how ``lm_head`` is stored: "int8" or "int4" (then ``head_group_size`` is its group) as the layers
below, or "none" (a float ``lm_head``; folders without the key, written before it existed, read as "none").
With a quantised head and tied embeddings (``tie_word_embeddings``) the float embedding table is not saved: the
input embedding reads the dequantised rows of the head (``models.quantized.HeadEmbedding``), so
``lm_head.qweight`` etc. are the one copy of the tied matrix.

model.safetensors holds the float tensors (embeddings, norms, a float ``lm_head``, biases) under transformers'
names, and for each quantised linear layer, under its weight's transformers name with ``weight`` replaced:

- int8: ``*.qweight`` int8 (out, in) and ``*.scale`` float (out, 1); w = qweight * scale;
- int4: ``*.qweight`` uint8 (out, in / 2), two 4-bit codes per byte along the input dimension (column 2j in the
  low nibble, 2j + 1 in the high nibble), ``*.scales`` and ``*.zeros`` float32 (out, in / group_size);
  w[r, c] = (code[r, c] - 8) * scales[r, c // g] + zeros[r, c // g].

Codes are always (out, in), also for families whose checkpoints store weights transposed (GPT-2). The kernel
packing (``torch._convert_weight_to_int4pack_for_cpu``) is machine-specific and done at load time, never saved.
``transformers`` does not load these folders; ``lmforge.load`` does (``generate``, ``eval``, ``serve``).

``gguf_int4_state`` takes a GGUF's Q4_1 linear weights over as int4 group-32 layers without requantising (a Q4_1
block is exactly one group: scale = d, zero = m + 8 d): ``lmforge.load(gguf, quantize="int4")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.checkpoints.hf_config import config_to_hf
from lmforge.checkpoints.names import rename, templates, to_hf
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import atomic_path, write_json_atomic
from lmforge.models.int4 import Int4Linear
from lmforge.models.quantized import (
    HEAD_GROUP_SIZE,
    HEADS,
    HeadEmbedding,
    Int4Head,
    Int8Head,
    Int8Linear,
    set_head,
    tied_embeddings,
)

FORMAT = "lmforge-weight-only"
SUFFIXES = {"int8": ("qweight", "scale"), "int4": ("qweight", "scales", "zeros")}
LAYOUT = {
    "int8": "w = qweight (int8, out x in) * scale (out x 1), one absmax scale per output row",
    "int4": "w[r,c] = (code[r,c] - 8) * scales[r,c//g] + zeros[r,c//g]; qweight uint8 (out x in/2): column 2j "
            "in the low nibble, 2j+1 in the high nibble; scales, zeros float32 (out x in/g)",
}


def _hf_name(config: ModelConfig, name: str) -> str:
    pairs = templates(config)
    hf = name if pairs is None else rename(name, pairs, to_lmforge=False)
    if hf is None:
        raise LmforgeError(f"no {config.family} checkpoint name for lmforge tensor {name!r}")
    return hf


def _our_name(config: ModelConfig, hf: str) -> str:
    pairs = templates(config)
    ours = hf if pairs is None else rename(hf, pairs, to_lmforge=True)
    if ours is None:
        raise LmforgeError(f"unexpected quantised tensor {hf!r} in a {config.family} checkpoint")
    return ours


def quantization_block(method: str, group_size: int | None, algorithm: str, head: str = "none") -> dict[str, Any]:
    """The config.json block; ``head`` is the ``lm_head``'s quantisation (an int4 head takes ``group_size``, or
    ``HEAD_GROUP_SIZE`` with int8 layers)."""
    block: dict[str, Any] = {"format": FORMAT, "version": 1, "method": method}
    if method == "int4":
        block |= {"group_size": group_size, "algorithm": algorithm}
    block["head"] = head
    if head == "int4":
        block["head_group_size"] = group_size if method == "int4" and group_size else HEAD_GROUP_SIZE
    return block | {"layout": _layout(method, head)}


def _layout(method: str, head: str) -> str:
    return LAYOUT[method] if head in ("none", method) else f"{LAYOUT[method]}; lm_head: {LAYOUT[head]}"


def _suffixes(layer: torch.nn.Module) -> tuple[str, ...]:
    return SUFFIXES["int8" if isinstance(layer, Int8Linear) else "int4"]


def _head_of(block: dict[str, Any]) -> str:
    return block.get("head", "none")


def save_quantized_dir(model: torch.nn.Module, path: str | Path, block: dict[str, Any], tokenizer=None,
                       generation_config: dict[str, Any] | None = None) -> Path:
    """Save a model quantised by ``quantize_model`` with the ``quantization`` ``block``; each file atomically.
    The block's ``head`` entries are taken from the model's ``lm_head`` (whatever ``block`` says)."""
    path = Path(path)
    config: ModelConfig = model.config
    lm_head = getattr(model, "lm_head", None)
    head = "int8" if isinstance(lm_head, Int8Head) else "int4" if isinstance(lm_head, Int4Head) else "none"
    block = {k: v for k, v in block.items() if k not in ("head", "head_group_size", "layout")} | {"head": head}
    if head == "int4":
        block["head_group_size"] = lm_head.group_size
    block["layout"] = _layout(block["method"], head)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    floats = {k: v for k, v in model.named_parameters()}

    def quantised(key: str) -> bool:  # a code/scale/zero tensor of a quantised layer, saved below
        owner, _, leaf = key.rpartition(".")
        return owner in layers and leaf in _suffixes(layers[owner])

    floats |= {k: v for k, v in model.named_buffers() if k in model.state_dict() and not quantised(k)}
    state = to_hf(config, {k: v.detach().contiguous() for k, v in floats.items()})
    for name, layer in layers.items():
        hf = _hf_name(config, f"{name}.weight").removesuffix("weight")
        for s in _suffixes(layer):
            state[hf + s] = getattr(layer, s).detach().contiguous()
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    hf_cfg = config_to_hf(config)
    hf_cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_cfg["quantization"] = block
    write_json_atomic(path / "config.json", hf_cfg)
    gen = dict(generation_config or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key) is not None:
            gen.setdefault(key, getattr(config, key))
    write_json_atomic(path / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def check_block(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("format") != FORMAT or block.get("method") not in SUFFIXES:
        raise LmforgeError(f"{where}: 'quantization' is not an lmforge weight-only block (format {FORMAT!r}, "
                           f"method one of {', '.join(SUFFIXES)})")
    if block["method"] == "int4" and block.get("group_size") not in (32, 64, 128):
        raise LmforgeError(f"{where}: quantization.group_size must be 32, 64 or 128, not {block.get('group_size')!r}")
    if _head_of(block) not in HEADS:
        raise LmforgeError(f"{where}: quantization.head must be one of {', '.join(HEADS)}, not {block['head']!r}")
    if _head_of(block) == "int4" and block.get("head_group_size") not in (32, 64, 128):
        raise LmforgeError(f"{where}: quantization.head_group_size must be 32, 64 or 128, "
                           f"not {block.get('head_group_size')!r}")
    return block


def split_quantized(config: ModelConfig, tensors: dict[str, torch.Tensor], block: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the float tensors, still under transformers' names; the quantised ones under lmforge's ``M.qweight``...)"""
    suffixes = SUFFIXES[block["method"]] + SUFFIXES.get(_head_of(block), ())
    floats, quant = {}, {}
    for hf, t in tensors.items():
        prefix, _, last = hf.rpartition(".")
        if last in suffixes:
            quant[_our_name(config, f"{prefix}.weight").removesuffix("weight") + last] = t
        else:
            floats[hf] = t
    return floats, quant


def build_quantized_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], block: dict[str, Any],
                          dtype: torch.dtype | None = None, device: str = "cpu", source: str = "checkpoint"):
    """The model for ``config`` with the linear layers that ``state_dict`` holds codes for (``M.qweight``) made
    ``Int8Linear``/``Int4Linear`` (``lm_head``: ``Int8Head``/``Int4Head`` as ``block["head"]`` says, a tied input
    embedding reading its rows); every tensor must match (names and shapes), as in ``build_model``."""
    from lmforge.models import TiesWeights, build_empty

    model = build_empty(config)
    head = _head_of(block)
    for key in [k for k in state_dict if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LmforgeError(f"{source}: quantised tensor {key} names no layer of the model") from None
        if not isinstance(old, torch.nn.Linear):
            raise LmforgeError(f"{source}: quantised tensor {key} names {type(old).__name__}, not a linear layer")
        has_bias = old.bias is not None
        if name == "lm_head" and head != "none":
            tied = tied_embeddings(model, old.weight)
            layer = (Int8Head(in_features=old.in_features, out_features=old.out_features, bias=has_bias, device="meta")
                     if head == "int8" else Int4Head(old.in_features, old.out_features, block["head_group_size"],
                                                     bias=has_bias, device="meta"))
            set_head(model, layer, tied, old.weight.dtype)
            continue
        if block["method"] == "int8":
            layer = Int8Linear(in_features=old.in_features, out_features=old.out_features, bias=has_bias,
                               device="meta")
        else:
            layer = Int4Linear(old.in_features, old.out_features, block["group_size"], bias=has_bias, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    expected = {k: p.shape for k, p in model.named_parameters()}
    expected |= {k: b.shape for k, b in model.named_buffers() if k in model.state_dict()}
    aliases = set(model.state_dict()) - set(expected)
    state_dict = {k: v for k, v in state_dict.items() if k not in aliases}
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise LmforgeError(f"{source}: weights do not match the config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise LmforgeError(f"{source}: tensor {k} has shape {tuple(state_dict[k].shape)}, "
                               f"the config expects {tuple(shape)}")
    model = model.to_empty(device=device)
    if isinstance(model, TiesWeights) and not any(isinstance(m, HeadEmbedding) for m in model.modules()):
        model.tie_weights()  # (a quantised head is tied through HeadEmbedding: nothing to re-tie)
    model.load_state_dict(state_dict, strict=False)
    model.requires_grad_(False)
    if dtype is not None and dtype != torch.float32:  # float tensors in dtype; codes, scales and zeros as saved
        for m in model.modules():
            if not isinstance(m, (Int8Linear, Int4Linear)):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
                for n, b in m.named_buffers(recurse=False):
                    if b is not None and b.is_floating_point():
                        setattr(m, n, b.to(dtype))
    return model.eval()


def _q4_1_int4(data, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks (32 weights: f16 d, f16 m, 16 bytes; byte j holds weight j in its low nibble and weight
    j + 16 in its high one; w = q * d + m) as int4 codes (rows, cols) and group-32 scales/zeros (rows, cols / 32):
    scale = d, zero = m + 8 d, so (q - 8) * scale + zero = q * d + m."""
    import numpy as np

    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, cols)
    scales = torch.from_numpy(d)
    return torch.from_numpy(codes.astype(np.int64)), scales, torch.from_numpy(m) + 8 * scales


def gguf_int4_state(path: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of a GGUF model (``state_dict`` as ``read_gguf`` gives it) with every linear layer stored as Q4_1
    (but ``lm_head``) taken over as int4 group-32 codes, bit for bit from the file's blocks instead of requantised,
    for ``build_quantized_model`` with the returned block. Raises when no linear layer is Q4_1."""
    import gguf

    from lmforge.checkpoints.gguf import _unpermute_rope_rows
    from lmforge.models import build_empty, families
    from lmforge.models.int4 import pack_codes

    spec = families.get(config.family).gguf
    linears = {n for n, m in build_empty(config).named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith("lm_head")}
    out = dict(state_dict)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        parts = tensor.name.split(".", 2)
        if tensor.name in spec.tensors:
            name = spec.tensors[tensor.name]
        elif parts[0] == "blk" and len(parts) == 3 and parts[2] in spec.block_tensors:
            name = f"model.layers.{parts[1]}.{spec.block_tensors[parts[2]]}"
        else:
            continue
        module = name.removesuffix(".weight")
        if module not in linears:
            continue
        cols, rows = (int(n) for n in tensor.shape)
        codes, scales, zeros = _q4_1_int4(tensor.data, rows, cols)
        if spec.permuted_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.n_head if name.endswith("q_proj.weight") else config.n_kv_head
            codes, scales, zeros = (torch.from_numpy(_unpermute_rope_rows(t.numpy(), heads).copy())
                                    for t in (codes, scales, zeros))
        del out[name]
        out |= {f"{module}.qweight": pack_codes(codes), f"{module}.scales": scales, f"{module}.zeros": zeros}
    if not any(k.endswith(".qweight") for k in out):
        raise LmforgeError(f"{path}: no linear layer is stored as Q4_1, so there are no int4 blocks to take over; "
                           "use `lmforge quantize --method int4` on it instead")
    return out, quantization_block("int4", 32, "gguf-q4_1")
