"""Writing lmforge decoders as llama.cpp GGUF files: the inverse of ``lmforge.checkpoints.gguf``.

This module owns the lmforge -> GGUF translation, done the way llama.cpp's ``convert_hf_to_gguf.py`` does it, so
that llama.cpp (and Ollama, which runs llama.cpp) loads the file and lmforge's own reader gets the same model back:

- the architecture: the family's ``GGUFSpec`` (Llama and Mistral -> ``llama``, Qwen2 -> ``qwen2``) names the
  metadata keys (context length, embedding length, block count, feed-forward length, head counts, key/value
  length, RoPE base and dimension count, RMS epsilon, vocabulary size) and the tensor names; RoPE scaling is
  ``linear`` (metadata) or Llama 3's (a ``rope_freqs.weight`` tensor of per-frequency divisors, as llama.cpp);
- the Llama q/k row permutation llama.cpp's converter applies for its RoPE layout (each head's two halves
  interleaved; ``permute_rope_rows``, the inverse of the reader's ``_unpermute_rope_rows``); Qwen2 is not permuted;
- the tokenizer: a byte-level BPE ``tokenizers`` model becomes ``tokenizer.ggml.model = gpt2`` with the tokens in
  id order, their types (normal, control for special added tokens, user-defined for other added tokens, unused
  for padding rows), the merges, ``tokenizer.ggml.pre`` (the pre-tokenizer flavour: ``gpt-2``, ``smollm``,
  ``llama-bpe`` or ``qwen2``, recognised from the pre-tokenizer itself), the bos/eos/pad/unk ids, ``add_bos`` and
  the chat template (``tokenizer.chat_template``). SentencePiece tokenizers (``tokenizer.ggml.model = llama``)
  are not written yet: refused with one line;
- the tensor types (``TYPES``): f32, f16, bf16, q8_0 and q4_0 for the matrices (``gguf.quants``, llama.cpp's own
  block arithmetic: Q8_0 = 32 values per block, one f16 scale d = max|x| / 127 and int8 q = round(x / d);
  Q4_0 = one f16 scale d = max / -8 over the value of largest magnitude and 4-bit q = min(15, trunc(x / d + 8.5)),
  x = d * (q - 8)); vectors (norms, biases, rope factors) stay f32 and a matrix whose rows are not a multiple of
  the block size falls back to f16, as llama.cpp's converter does. At q4_0 the output matrix (``output.weight``,
  or ``token_embd.weight`` when the head is tied to it) is written as Q8_0: llama-quantize keeps it above the
  file's type too (Q6_K where the width is a multiple of 256, else Q8_0), since the head is where 4 bits cost
  the most; so a q4_0 file of SmolLM2 (width 576) holds the very bytes llama-quantize writes from the f32 one.

The file is written to a temporary name beside the target and renamed when complete (``lmforge.io.atomic_path``).
An architecture llama.cpp has no GGUF name for here (GPT-2, BERT, T5) or a layout the ``llama``/``qwen2`` GGUF
cannot express is one ``LmforgeError`` line before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType, TokenType

from lmforge.checkpoints.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import atomic_path
from lmforge.models import families
from lmforge.models.families import GGUFSpec

# --type NAME -> (tensor type of the matrices, general.file_type)
TYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
def gguf_spec(config: ModelConfig) -> GGUFSpec:
    """The ``GGUFSpec`` a model is written with; ``LmforgeError`` for an architecture the writer does not support."""
    own = families.get(config.family)
    fam = families.get(own.gguf_written_as) if own.gguf_written_as else own
    if config.arch != "decoder" or fam.gguf is None:
        supported = sorted(n for n in families.names() if families.get(n).gguf is not None
                           or families.get(n).gguf_written_as)
        raise LmforgeError(f"GGUF export does not support the {config.family} family ({config.arch}); "
                           f"supported: {', '.join(supported)} decoders")
    return fam.gguf


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for its RoPE layout: each head's rows, seen as (2, head_dim // 2) (the two
    RoPE halves), are stored transposed, (head_dim // 2, 2). ``w``: (n_heads * head_dim, ...)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise LmforgeError(f"cannot permute {rows} q/k rows into {n_heads} RoPE heads")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The ``rope_freqs.weight`` tensor llama.cpp stores for ``rope_type="llama3"``: per RoPE frequency, 1 for short
    wavelengths, ``factor`` for long ones and the smooth blend in between (the divisor of each frequency)."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    blend = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, blend))
    return out.astype(np.float32)


def _check_layout(config: ModelConfig, spec: GGUFSpec) -> None:
    arch = spec.architecture
    if not (config.norm == "rmsnorm" and config.positions == "rope" and config.mlp == "swiglu"
            and config.norm_first and not config.fused_qkv):
        raise LmforgeError(f"GGUF export: a {config.family} model needs rmsnorm, rope, a swiglu MLP and separate "
                           "q/k/v projections to be written as GGUF architecture " + repr(arch))
    biases = {"qkv_bias": config.qkv_bias, "out_bias": config.out_bias, "mlp_bias": config.mlp_bias}
    wanted = {k: bool(spec.config.get(k, False)) for k in biases}  # the biases the architecture fixes
    if biases != wanted:
        layout = " and ".join(k.removesuffix("_bias") for k, on in wanted.items() if on)
        raise LmforgeError(f"GGUF export: GGUF architecture {arch!r} as lmforge writes it has "
                           f"{f'biases on {layout} only' if layout else 'no biases'}; this model has "
                           f"{', '.join(k for k, on in biases.items() if on) or 'none'}")


# ---------------------------------------------------------------------------------------------- tokenizer
def _pre_flavour(pre: dict | None) -> str | None:
    """The ``tokenizer.ggml.pre`` name of a byte-level pre-tokenizer (tokenizer.json form), or None."""
    if not pre:
        return None

    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex \
            and not p.get("add_prefix_space", False)

    if byte_level(pre, True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); it refuses "gpt2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return "smollm"
    if first.get("type") == "Split" and byte_level(second, False) and first.get("behavior") == "Isolated" \
            and not first.get("invert", False):
        regex = (first.get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def tokenizer_metadata(tok: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of an lmforge ``Tokenizer`` (a byte-level BPE), for a model with
    ``vocab_size`` embedding rows: rows past the tokenizer's vocabulary become ``[PADn]`` tokens of type unused,
    as llama.cpp's converter writes them."""
    spec = json.loads(tok.backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    decoder = spec.get("decoder") or {}
    flavour = _pre_flavour(pre)
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel" \
            or flavour is None or (spec.get("normalizer") or {}).get("type", "NFC") != "NFC":
        raise LmforgeError("GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model = gpt2) with a GPT-2, "
                           "SmolLM, Llama 3 or Qwen2 pre-tokenizer; this tokenizer is "
                           f"{model.get('type')} with pre-tokenizer {(pre or {}).get('type')} and decoder "
                           f"{decoder.get('type')} (SentencePiece export is not supported yet)")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    n = max(vocab_size, max(by_id) + 1)
    if n > vocab_size:
        raise LmforgeError(f"GGUF export: the tokenizer has ids up to {n - 1} but the model has {vocab_size} "
                           "embedding rows")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
                         else int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": flavour}


# ---------------------------------------------------------------------------------------------- tensors
def _gguf_names(spec: GGUFSpec, n_layer: int) -> dict[str, str]:
    """lmforge parameter name -> GGUF tensor name."""
    out = {ours: g for g, ours in spec.tensors.items()}
    for i in range(n_layer):
        out.update({f"model.layers.{i}.{ours}": f"blk.{i}.{leaf}" for leaf, ours in spec.block_tensors.items()})
    return out


def _encode(w: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT]:
    """(bytes or float array, its type) of one tensor: vectors stay F32; a matrix whose rows do not fill whole
    blocks falls back to F16."""
    if w.ndim == 1:
        return w.astype(np.float32), QT.F32
    if qtype in (QT.Q8_0, QT.Q4_0) and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = QT.F16
    if qtype == QT.F32:
        return w.astype(np.float32), qtype
    if qtype == QT.F16:
        return w.astype(np.float16), qtype
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, *, type: str = "f16",
               name: str | None = None) -> Path:
    """Write an lmforge decoder (``model.config``) and its ``Tokenizer`` as a llama.cpp GGUF file at ``path``
    with the matrices as ``type`` (a key of ``TYPES``). The file appears only when complete."""
    if type not in TYPES:
        raise LmforgeError(f"--type {type!r} is not a GGUF type lmforge writes; allowed: {', '.join(TYPES)}")
    config: ModelConfig = model.config
    spec = gguf_spec(config)
    arch = spec.architecture
    _check_layout(config, spec)
    head_dim = config.head_dim or config.n_embd // config.n_head
    n_kv = config.n_kv_head or config.n_head
    scaling = config.rope_scaling
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind not in (None, "default", "linear", "llama3"):
        raise LmforgeError(f"GGUF export: RoPE scaling {kind!r} is not written; supported: none, linear, llama3")
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size)
    qtype, file_type = TYPES[type]
    names = _gguf_names(spec, config.n_layer)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_embeddings)}  # llama.cpp: output.weight only when untied
    unknown = sorted(k for k in state if k not in names)
    if unknown:
        raise LmforgeError(f"GGUF export: parameters with no GGUF name in a {config.family} model: {unknown[:6]} "
                           "(GGUF export takes a float model: merge adapters, export before lmforge quantize)")
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or config.name)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(config.max_seq_len)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.n_head)
        w.add_head_count_kv(n_kv)
        if head_dim != config.n_embd // config.n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(config.rope_theta))
        w.add_layer_norm_rms_eps(float(config.norm_eps))
        w.add_vocab_size(config.vocab_size)
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok_meta["pre"])
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["types"])
        w.add_token_merges(tok_meta["merges"])
        for tid, add in ((tokenizer.bos_id, w.add_bos_token_id), (tokenizer.eos_id, w.add_eos_token_id),
                         (tokenizer.pad_id, w.add_pad_token_id), (tokenizer.unk_id, w.add_unk_token_id)):
            if tid is not None:
                add(int(tid))
        w.add_add_bos_token(bool(tokenizer.add_bos_token))
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        if kind == "llama3":  # the divisors are a tensor; the original context is what lmforge's reader needs
            w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", 8192)))
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(scaling, head_dim, float(config.rope_theta)))
        head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
        for ours, t in state.items():
            arr = t.detach().to(torch.float32).cpu().numpy()
            if spec.permuted_qk and ours.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                arr = permute_rope_rows(arr, config.n_head if ours.endswith("q_proj.weight") else n_kv)
            data, qt = _encode(arr, QT.Q8_0 if qtype == QT.Q4_0 and ours == head else qtype)
            w.add_tensor(names[ours], data, raw_dtype=None if qt in (QT.F32, QT.F16) else qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
