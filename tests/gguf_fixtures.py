"""Tiny GGUF files written by hand for tests/test_gguf.py: a byte-level vocabulary, random weights in
Hugging Face naming and layout, and a writer that does what llama.cpp's converter does (rename,
permute Llama's q/k rows, quantise), plus independent numpy decoders of the block formats written
from the GGML spec, so the loader is checked against something other than itself.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "ff": 128, "ctx": 256, "theta": 10000.0, "eps": 1e-5}

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order (written out from the GPT-2 spec)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Control tokens first (ids 0..2), then the 256 bytes, the merge results and one user-defined token."""
    tokens = CONTROL + byte_alphabet() + [m.replace(" ", "") for m in MERGES] + USER_DEFINED
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL) - len(USER_DEFINED)) + [4] * len(USER_DEFINED)
    return tokens, types


def tiny_weights(
    seed: int = 0, *, tied: bool = False, qkv_bias: bool = False, vocab: int | None = None
) -> dict[str, np.ndarray]:
    """Random float32 weights in transformers' Llama naming and (out, in) layout."""
    rng = np.random.default_rng(seed)
    d, ff, v = TINY["n_embd"], TINY["ff"], vocab or len(tiny_vocab()[0])
    hd = d // TINY["n_head"]
    q, kv = TINY["n_head"] * hd, TINY["n_kv_head"] * hd

    def w(*s):
        return rng.normal(0, 0.2, s).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d)}
    if not tied:
        sd["lm_head.weight"] = w(v, d)
    for i in range(TINY["n_layer"]):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + w(d),
            p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(q, d),
            p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d),
            p + "self_attn.o_proj.weight": w(d, q),
            p + "mlp.gate_proj.weight": w(ff, d),
            p + "mlp.up_proj.weight": w(ff, d),
            p + "mlp.down_proj.weight": w(d, ff),
        }
        if qkv_bias:
            sd |= {
                p + "self_attn.q_proj.bias": w(q),
                p + "self_attn.k_proj.bias": w(kv),
                p + "self_attn.v_proj.bias": w(kv),
            }
    return sd


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{leaf}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rows (n_head, 2, hd/2) -> (n_head, hd/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    qtypes: dict[str, QT] | QT = QT.F32,
    permute: bool = True,
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    add_bos: bool = False,
    bos_id: int = 1,
    meta: dict | None = None,
    skip_keys: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``weights`` (HF names/layout) as llama.cpp would. ``qtypes``: one type for every matrix or
    {gguf name: type}; vectors stay F32 like llama.cpp's norms."""
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        f"{arch}.block_count": TINY["n_layer"],
        f"{arch}.context_length": TINY["ctx"],
        f"{arch}.embedding_length": TINY["n_embd"],
        f"{arch}.feed_forward_length": TINY["ff"],
        f"{arch}.attention.head_count": TINY["n_head"],
        f"{arch}.attention.head_count_kv": TINY["n_kv_head"],
        f"{arch}.vocab_size": weights["model.embed_tokens.weight"].shape[0],
    }
    for k, v in kv.items():
        if k not in skip_keys:
            w.add_uint32(k, v)
    w.add_float32(f"{arch}.rope.freq_base", TINY["theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", TINY["eps"])
    for k, v in (meta or {}).items():
        (w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for hf, t in weights.items():
        name = gguf_name(hf)
        if permute and arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = llamacpp_permute(t, TINY["n_head"] if "attn_q" in name else TINY["n_kv_head"])
        qt = QT.F32 if t.ndim == 1 else (qtypes.get(name, QT.F32) if isinstance(qtypes, dict) else qtypes)
        add_quantized(w, name, t, qt)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_quantized(w: gguf.GGUFWriter, name: str, t: np.ndarray, qt: QT) -> None:
    if qt in (QT.F32, QT.F16):
        w.add_tensor(name, t.astype(np.float32 if qt == QT.F32 else np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)


# ---- independent decoders, from the block layouts in ggml-common.h --------------------------------


def decode(raw: np.ndarray, qt: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the bytes of one tensor; ``shape`` in (out, in) order."""
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qt == QT.F32:
        return b.view("<f4").reshape(shape)
    if qt == QT.F16:
        return b.view("<f2").astype(np.float32).reshape(shape)
    if qt == QT.BF16:  # the top 16 bits of a float32
        return (b.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qt == QT.Q8_0:  # per 32 values: f16 d, 32 x int8; x = d * q
        blk = b.reshape(-1, 34)
        d = blk[:, :2].copy().view("<f2").astype(np.float32)
        return (d * blk[:, 2:].view(np.int8)).reshape(shape)
    if qt in (
        QT.Q4_0,
        QT.Q4_1,
    ):  # f16 d (, f16 m), 16 bytes: value j < 16 in low nibble of byte j, j >= 16 in high nibble of byte j-16
        head = 2 if qt == QT.Q4_0 else 4
        blk = b.reshape(-1, head + 16)
        d = blk[:, :2].copy().view("<f2").astype(np.float32)
        q = np.concatenate([blk[:, head:] & 0x0F, blk[:, head:] >> 4], axis=1).astype(np.float32)
        if qt == QT.Q4_0:
            return (d * (q - 8)).reshape(shape)
        m = blk[:, 2:4].copy().view("<f2").astype(np.float32)
        return (d * q + m).reshape(shape)
    raise AssertionError(f"no test decoder for {qt}")
