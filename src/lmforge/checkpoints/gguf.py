"""Reading llama.cpp GGUF files into lmforge's structures.

This module owns the GGUF -> lmforge translation: the metadata becomes a ``ModelConfig``, the
(possibly quantised) tensors become a float state dict under lmforge's parameter names, and the
tokenizer metadata becomes a ``tokenizers.Tokenizer``. Parsing the container itself is left to
``gguf`` (llama.cpp's own reader) and dequantisation to ``gguf.quants``; what lives here are the
facts of llama.cpp's conversion that have to be undone:

- tensor names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on,
  and the metadata keys of the shape, as each family's ``GGUFSpec`` lists them
  (``lmforge.models.families``; the family is found by ``general.architecture``);
- llama.cpp's converter permutes the rows of Llama's q and k projections (each head's two RoPE
  halves are interleaved), so ``_unpermute_rope_rows`` puts them back (``GGUFSpec.permuted_qk``;
  Qwen2 is not permuted);
- Llama 3's RoPE scaling is stored as a ``rope_freqs.weight`` tensor of per-frequency divisors
  rather than as metadata; ``_llama3_rope_scaling`` recovers the config dict from it;
- the byte-level BPE tokenizer is rebuilt from ``tokenizer.ggml.*`` with the pre-tokenizer that
  ``tokenizer.ggml.pre`` names (llama.cpp's regex list, e.g. ``smollm``: digits one by one, then
  the GPT-2 byte-level split).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import build_empty, families
from lmforge.models.families import Family, GGUFSpec

SUPPORTED_TENSOR_TYPES = tuple(GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp's pre-tokenizer flavours (``tokenizer.ggml.pre``), as the regex list llama-vocab.cpp
# applies one after another. GPT-2's split is the one ``pre_tokenizers.ByteLevel(use_regex=True)``
# already applies, so it is not spelled out.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_FLAVOURS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}


@dataclass
class GGUFCheckpoint:
    """Everything lmforge needs from one GGUF file."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # lmforge names; no lm_head.weight when tie_embeddings
    tokenizer_backend: Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool
    chat_template: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar keys (and short arrays) only


def dequantize_tensor(reader_tensor: gguf.ReaderTensor) -> np.ndarray:
    """One tensor of a ``gguf.GGUFReader`` as a float32 array in PyTorch order.

    GGUF lists dimensions innermost first (``ne = [in_features, out_features]``); the result has
    shape ``(out_features, in_features)`` for a matrix, ``(n,)`` for a vector. Raises
    ``LmforgeError`` naming the tensor for a type outside ``SUPPORTED_TENSOR_TYPES`` or for data
    shorter than the header promises.
    """
    name, qtype = reader_tensor.name, reader_tensor.tensor_type
    if qtype not in SUPPORTED_TENSOR_TYPES:
        type_name = getattr(qtype, "name", str(qtype))
        allowed = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise LmforgeError(f"GGUF tensor {name!r} has type {type_name}, which lmforge cannot dequantise; "
                           f"supported: {allowed}")
    if reader_tensor.data.nbytes != int(reader_tensor.n_bytes):
        raise LmforgeError(f"GGUF tensor {name!r} holds {reader_tensor.data.nbytes} bytes, "
                           f"its header says {int(reader_tensor.n_bytes)}: the file is truncated")
    values = gguf.quants.dequantize(reader_tensor.data, qtype)
    if np.may_share_memory(values, reader_tensor.data):  # F32 comes back as a view of the read-only mmap
        values = values.copy()
    shape = tuple(int(n) for n in reversed(reader_tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _dequantize_in(path: Path, reader_tensor: gguf.ReaderTensor) -> np.ndarray:
    try:
        return dequantize_tensor(reader_tensor)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. Its converter views each head's rows as (2, hd // 2)
    (the two RoPE halves) and stores them transposed, (hd // 2, 2), i.e. interleaved; this views
    them as (hd // 2, 2) and transposes back. ``w``: (n_heads * hd, in_features) or (n_heads * hd,)."""
    rows = w.shape[0]
    assert rows % (2 * n_heads) == 0, (rows, n_heads)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_scaling(path: Path, freqs: np.ndarray, head_dim: int, theta: float, orig_ctx: int) -> dict[str, Any]:
    """The ``rope_type="llama3"`` dict whose per-frequency divisors equal ``freqs`` (head_dim // 2,).

    llama.cpp stores, for each RoPE frequency, 1 (short wavelengths), ``factor`` (long ones) or the
    smooth blend in between; the standard low/high frequency factors 1 and 4 are assumed and checked.
    """
    factor, low, high = float(freqs.max()), 1.0, 4.0
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((orig_ctx * inv_freq / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth) / factor + smooth)
    if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-3):
        raise LmforgeError(
            f"{path}: rope_freqs.weight is not Llama 3 RoPE scaling with low/high frequency factors 1 and 4 "
            f"and original context {orig_ctx}; lmforge cannot express these RoPE factors"
        )
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig_ctx}


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such GGUF file" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LmforgeError(f"{path}: not a GGUF file (starts with {magic!r}, a GGUF starts with b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader's errors say nothing about the file; all of them mean "malformed"
        raise LmforgeError(f"{path}: cannot parse GGUF, the file is truncated or corrupt "
                           f"({type(e).__name__}: {e})") from e


def _read_metadata(path: Path, reader: gguf.GGUFReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """(all values, the scalar/short ones for display); arrays longer than 64 stay out of the second."""
    values: dict[str, Any] = {}
    try:
        for key, fld in reader.fields.items():
            values[key] = fld.contents()
    except Exception as e:
        raise LmforgeError(f"{path}: cannot decode GGUF metadata key {key!r} ({type(e).__name__}: {e})") from e
    is_array = {k: bool(f.types) and f.types[0] == GGUFValueType.ARRAY for k, f in reader.fields.items()}
    scalars = {k: v for k, v in values.items() if not (is_array[k] and len(v) > 64)}
    return values, scalars


def _build_config(path: Path, meta: dict[str, Any], family: Family, tensors: dict[str, gguf.ReaderTensor]
                  ) -> ModelConfig:
    spec: GGUFSpec = family.gguf
    arch = spec.architecture

    def key(what: str) -> str:  # the metadata key of a config field (or RoPE detail) for this architecture
        return f"{arch}.{spec.metadata[what]}"

    def need(what: str) -> Any:
        if key(what) not in meta:
            raise LmforgeError(f"{path}: GGUF metadata lacks {key(what)}, which lmforge needs for the model shape")
        return meta[key(what)]

    def get(what: str, default: Any) -> Any:
        return meta.get(key(what), default)

    n_embd, n_head = int(need("n_embd")), int(need("n_head"))
    if n_embd <= 0 or n_head <= 0 or (key("head_dim") not in meta and n_embd % n_head):
        raise LmforgeError(f"{path}: {key('n_embd')}={n_embd} is not a positive multiple of "
                           f"{key('n_head')}={n_head}")
    head_dim = int(get("head_dim", n_embd // n_head))
    rot = get("rope_dimensions", head_dim)
    if int(rot) != head_dim:
        raise LmforgeError(f"{path}: {key('rope_dimensions')}={rot} but head_dim={head_dim}; "
                           "lmforge rotates whole heads")
    theta = float(get("rope_theta", 10000.0))
    rope_scaling: dict[str, Any] | None = None
    kind = get("rope_scaling_type", "none")
    factor = get("rope_scaling_factor", None)
    orig_ctx = get("rope_original_context", None)
    if kind == "linear" and factor is not None:
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in ("none", "linear"):  # e.g. 'yarn': lmforge's RoPE has no such scaling
        raise LmforgeError(f"{path}: unsupported rope scaling type {kind!r} ({key('rope_scaling_type')}); "
                           "lmforge supports none and linear (and Llama 3's, stored as rope_freqs.weight)")
    if "rope_freqs.weight" in tensors:
        freqs = _dequantize_in(path, tensors["rope_freqs.weight"]).astype(np.float64)
        if not np.allclose(freqs, 1.0):
            rope_scaling = _llama3_rope_scaling(path, freqs, head_dim, theta, int(orig_ctx or 8192))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    vocab_size = int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or [])))
    head = next(g for g, ours in spec.tensors.items() if ours == "lm_head.weight")
    try:
        return ModelConfig(
            name=str(meta.get("general.name", path.stem)), family=family.name, arch=family.arch,
            vocab_size=vocab_size, n_layer=int(need("n_layer")), n_embd=n_embd, n_head=n_head,
            n_kv_head=int(get("n_kv_head", n_head)), head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            max_seq_len=int(get("max_seq_len", 2048)),
            norm_eps=float(get("norm_eps", 1e-5)),
            rope_theta=theta, rope_scaling=rope_scaling,
            tie_embeddings=head not in tensors,  # llama.cpp writes output.weight only when untied
            **spec.config,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=int(eos) if eos is not None else None,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    except LmforgeError as e:  # e.g. n_embd not divisible by n_head: say which file
        raise LmforgeError(f"{path}: GGUF metadata gives an invalid model shape: {e}") from None


def _build_state_dict(path: Path, config: ModelConfig, tensors: dict[str, gguf.ReaderTensor]) -> dict[str, np.ndarray]:
    spec: GGUFSpec = families.get(config.family).gguf
    block_names = spec.block_tensors
    out: dict[str, np.ndarray] = {}
    unknown = []
    for gguf_name, tensor in tensors.items():
        parts = gguf_name.split(".", 2)  # blk, N, leaf
        if gguf_name in spec.tensors:
            name = spec.tensors[gguf_name]
        elif parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() and parts[2] in block_names:
            if int(parts[1]) >= config.n_layer:
                raise LmforgeError(f"{path}: tensor {gguf_name!r} is past block_count={config.n_layer}")
            name = f"model.layers.{parts[1]}.{block_names[parts[2]]}"
        elif gguf_name == "rope_freqs.weight":  # turned into config.rope_scaling
            continue
        else:
            unknown.append(gguf_name)
            continue
        w = _dequantize_in(path, tensor)
        if spec.permuted_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            w = _unpermute_rope_rows(w, config.n_head if name.endswith("q_proj.weight") else config.n_kv_head)
        out[name] = w
    if unknown:
        raise LmforgeError(f"{path}: tensors lmforge does not know in a {config.family} model: {sorted(unknown)[:8]}")
    _check_shapes(path, config, out)
    return out


def _check_shapes(path: Path, config: ModelConfig, sd: dict[str, np.ndarray]) -> None:
    """Every parameter the config implies is present with the shape the config implies (read off a
    shape-only model, so any family's layout is checked)."""
    want = {k: tuple(p.shape) for k, p in build_empty(config).named_parameters()}  # tied tensors once
    missing = sorted(set(want) - set(sd))
    if missing:
        raise LmforgeError(f"{path}: GGUF lacks tensors for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise LmforgeError(f"{path}: {name} has shape {tuple(sd[name].shape)}, the metadata implies {shape}")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _build_tokenizer(path: Path, meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from ``tokenizer.ggml.{tokens,merges,token_type,pre}``."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise LmforgeError(f"{path}: tokenizer.ggml.model={kind!r} is not supported; "
                           f"supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_FLAVOURS:
        raise LmforgeError(f"{path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer lmforge knows; "
                           f"known: {', '.join(sorted(_PRE_FLAVOURS))}")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise LmforgeError(f"{path}: tokenizer.ggml.tokens is missing or differs in length from "
                           "tokenizer.ggml.token_type")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        if not 0 <= meta.get(f"tokenizer.ggml.{key}", 0) < len(tokens):
            raise LmforgeError(f"{path}: tokenizer.ggml.{key}={meta[f'tokenizer.ggml.{key}']} is outside the "
                               f"vocabulary of {len(tokens)} tokens")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        # control (3) / user-defined (4) tokens keep their text; a normal token outside the byte
        # alphabet is respelled byte by byte, as llama.cpp's converter sometimes stores them raw
        if ttype not in (3, 4) and not set(text) <= spelled:
            text = "".join(alphabet[b] for b in text.encode("utf-8"))
        vocab.setdefault(text, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    flavour = _PRE_FLAVOURS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=flavour in ("gpt2", "digits"))
    if flavour == "gpt2":
        tok.pre_tokenizer = byte_level
    elif flavour == "digits":  # llama.cpp: "\p{N}" first, then GPT-2's split inside each piece
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        split = _LLAMA3_SPLIT if flavour == "llama3" else _QWEN2_SPLIT
        split_first = pre_tokenizers.Split(Regex(split), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split_first, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, y in zip(tokens, types) if y == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, y in zip(tokens, types) if y == 4])
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos, eos = ([tokens[bos_id]] if add_bos else []), ([tokens[eos_id]] if add_eos else [])
        single = bos + ["$A"] + eos
        pair = single + bos + ["$B:1"] + eos
        specials = [(tokens[i], i) for i, on in ((bos_id, add_bos), (eos_id, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def _open_checked(path: Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any], dict[str, gguf.ReaderTensor]]:
    """Open the file and build its config: (config, all metadata, scalar metadata, tensors by name).
    The tensors are the reader's lazy views; nothing is dequantised here."""
    reader = _open(path)
    meta, scalars = _read_metadata(path, reader)
    arch = meta.get("general.architecture")
    family = families.family_for_gguf(arch)
    if family is None:
        raise LmforgeError(f"{path}: GGUF architecture {arch!r} is not supported; "
                           f"supported: {', '.join(families.gguf_architectures())}")
    tensors = {t.name: t for t in reader.tensors}
    return _build_config(path, meta, family, tensors), meta, scalars, tensors


def read_gguf_info(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any], bool]:
    """(config, scalar metadata, has a chat template) without dequantising any tensor: for ``lmforge info``."""
    config, meta, scalars, _ = _open_checked(Path(path))
    return config, scalars, bool(meta.get("tokenizer.chat_template"))


def read_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Load a llama.cpp GGUF file (an architecture a family's ``GGUFSpec`` names: ``llama``, ``qwen2``)
    as a ``GGUFCheckpoint``.

    Tensors are dequantised to float32 (then cast to ``dtype``); Llama's q/k rows are put back in
    Hugging Face order, so ``state_dict`` loads into lmforge's decoder (and equals what
    ``transformers`` loads from the same file). Every problem with the file raises ``LmforgeError``
    naming the file.
    """
    path = Path(path)
    config, meta, scalars, tensors = _open_checked(path)
    tokenizer = _build_tokenizer(path, meta)
    arrays = _build_state_dict(path, config, tensors)
    state_dict = {k: torch.from_numpy(v).to(dtype) for k, v in arrays.items()}

    def token(key: str) -> str | None:  # ids were range-checked in _build_tokenizer
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else meta["tokenizer.ggml.tokens"][i]

    return GGUFCheckpoint(
        config=config,
        state_dict=state_dict,
        tokenizer_backend=tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=scalars,
    )
