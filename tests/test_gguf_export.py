"""lmforge export --format gguf (lmforge.checkpoints.gguf_writer): lmforge decoders as llama.cpp GGUF files.

Oracles: the ``gguf`` package's own reader (GGUFReader) and independent numpy decoders of the GGML blocks
(tests/gguf_fixtures.py, written from ggml-common.h), llama.cpp's q/k permutation as its converter writes it
(``gguf_fixtures.llamacpp_permute``), reference Q8_0 / Q4_0 arithmetic written here from ggml's
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``, lmforge's reader (the same model back), and llama.cpp
itself when a build is at hand (``LLAMA_CPP_BIN`` or a ``llama-simple`` / ``llama-completion`` on PATH).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import Regex, pre_tokenizers

import gguf_fixtures as F
import lmforge
from lmforge.checkpoints.gguf import _QWEN2_SPLIT, read_gguf
from lmforge.checkpoints.hf import save_hf_dir
from lmforge.cli import main
from lmforge.cli.export import export
from lmforge.config import preset
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 12345 + 678?", "  spaces\tand\nnewlines ",
         "<|im_start|>user\nHi<|im_end|>", "café déjà vu 東京"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
FLOAT_TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}


def gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def gguf_fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def as_float(t: torch.Tensor, qt: QT) -> np.ndarray:
    """What a float GGUF type keeps of a float32 tensor (round to nearest even, as torch and ggml do)."""
    dtype = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qt]
    return t.to(dtype).to(torch.float32).numpy()


def ref_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml quantize_row_q8_0_ref then dequantise: per 32 values d = max|x| / 127, q = roundf(x / d) (half away
    from zero), stored d as f16; returns (x_hat, d per value)."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    v = b * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    d16 = d.astype(np.float16).astype(np.float32)
    return (q * d16).reshape(x.shape), np.broadcast_to(d, b.shape).reshape(x.shape)


def ref_q4_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml quantize_row_q4_0_ref then dequantise: per 32 values, m = the value of largest magnitude, d = m / -8,
    q = min(15, (int)(x / d + 8.5)), x_hat = (q - 8) * f16(d)."""
    b = x.reshape(-1, 32).astype(np.float32)
    m = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = m / np.float32(-8)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.minimum(15, np.trunc(b * inv + np.float32(8.5)))
    d16 = d.astype(np.float16).astype(np.float32)
    return ((q - 8) * d16).reshape(x.shape), np.broadcast_to(np.abs(d), b.shape).reshape(x.shape)


def expected_gguf_layout(name: str, w: np.ndarray, config) -> np.ndarray:
    """An HF-layout weight as llama.cpp's converter stores it (Llama q/k rows permuted)."""
    if config.family in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        return F.llamacpp_permute(w, config.n_head if "q_proj" in name else config.n_kv_head)
    return w


def gguf_name(ours: str) -> str:
    from lmforge.models.families import llama, qwen2

    if not ours.startswith("model.layers."):
        return {v: k for k, v in llama.GGUF_TENSORS.items()}[ours]
    _, _, i, leaf = ours.split(".", 3)
    return f"blk.{i}." + {v: k for k, v in (llama.GGUF_BLOCK_TENSORS | qwen2.GGUF_QKV_BIASES).items()}[leaf]


@pytest.fixture(scope="module")
def qwen2_dir(tiny_lm_dirs, tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied embeddings, 5 embedding rows past the vocabulary) with a Qwen2
    pre-tokenizer and the ChatML template."""
    tok = Tokenizer.from_dir(tiny_lm_dirs["chat"])
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok = Tokenizer(backend, eos_token=tok.eos_token, pad_token=tok.pad_token, chat_template=tok.chat_template)
    config = preset("tiny-llama", family="qwen2", qkv_bias=True, tie_embeddings=True, vocab_size=tok.vocab_size + 5,
                    max_seq_len=128, eos_token_id=tok.eos_id, rope_theta=1e6)
    model = DecoderLM(config).init_weights(seed=3, std=0.2)
    return save_hf_dir(model, tmp_path_factory.mktemp("tiny-qwen2"), tokenizer=tok)


def check_roundtrip(src: Path, out: Path, qt: QT) -> None:
    """``out`` (exported from ``src`` at ``qt``) holds exactly the source tensors in llama.cpp's layout, lmforge
    reads them back unchanged, and the tokenizer and chat template come back the same."""
    source = lmforge.load(src)
    config = source.model.config
    tensors = gguf_tensors(out)
    state = {k: v for k, v in source.model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_embeddings)}
    assert set(tensors) == {gguf_name(k) for k in state}
    back = read_gguf(out)
    for ours, t in state.items():
        rt = tensors[gguf_name(ours)]
        want_type = QT.F32 if t.ndim == 1 else qt
        assert rt.tensor_type == want_type, ours
        raw = F.decode(rt.data, want_type, tuple(t.shape))  # the gguf package's bytes, decoded independently
        np.testing.assert_array_equal(raw, expected_gguf_layout(ours, as_float(t, want_type), config))
        np.testing.assert_array_equal(back.state_dict[ours].numpy(), as_float(t, want_type))
    assert back.config.family == ("llama" if config.family == "mistral" else config.family)
    for field in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                  "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings", "qkv_bias"):
        assert getattr(back.config, field) == getattr(config, field), field
    assert back.config.norm_eps == pytest.approx(config.norm_eps, rel=1e-6)  # GGUF stores it as float32
    tok = lmforge.load(out).tokenizer
    for text in TEXTS:
        assert tok.encode(text) == source.tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == source.tokenizer.decode(source.tokenizer.encode(text))
    assert tok.chat_template == source.tokenizer.chat_template
    if tok.chat_template:
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
            source.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_token) == \
        (source.tokenizer.bos_id, source.tokenizer.eos_id, source.tokenizer.pad_id, source.tokenizer.add_bos_token)


@pytest.mark.parametrize("type", FLOAT_TYPES)
def test_float_types_hold_the_exact_tensors_and_tokenizer(tiny_lm_dirs, tmp_path, type):
    src = tiny_lm_dirs["chat"]
    out = export(src, "gguf", tmp_path / "m.gguf", type=type)
    check_roundtrip(src, out, FLOAT_TYPES[type])
    meta = gguf_fields(out)
    c = lmforge.load(src).model.config
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.chat_template"] == lmforge.load(src).tokenizer.chat_template
    assert {k: meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                            "feed_forward_length", "attention.head_count",
                                            "attention.head_count_kv", "rope.dimension_count")} == \
        {"context_length": c.max_seq_len, "embedding_length": c.n_embd, "block_count": c.n_layer,
         "feed_forward_length": c.intermediate_size, "attention.head_count": c.n_head,
         "attention.head_count_kv": c.n_kv_head, "rope.dimension_count": c.head_dim}
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[type]
    if type == "f32":  # the same model, to the last bit
        x = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(lmforge.load(out).model(x), lmforge.load(src).model(x), rtol=0, atol=0)


def test_qwen2_with_biases_tied_embeddings_padding_rows_and_its_pre_tokenizer(qwen2_dir, tmp_path):
    out = export(qwen2_dir, "gguf", tmp_path / "q.gguf", type="f32")
    check_roundtrip(qwen2_dir, out, QT.F32)  # q/k not permuted for qwen2; no output.weight when tied
    meta = gguf_fields(out)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    vocab = len(lmforge.load(qwen2_dir).tokenizer.backend.get_vocab())
    assert meta["tokenizer.ggml.tokens"][vocab:] == [f"[PAD{i}]" for i in range(vocab, vocab + 5)]
    assert meta["tokenizer.ggml.token_type"][vocab:] == [5] * 5  # unused, as llama.cpp's converter pads
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the special added tokens are control tokens
    x = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(out).model(x), lmforge.load(qwen2_dir).model(x), rtol=0, atol=0)


def test_mistral_is_written_as_llama_and_llama3_rope_scaling_survives(tiny_lm_dirs, tmp_path):
    tok = Tokenizer.from_dir(tiny_lm_dirs["plain"])
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    for family, rope_scaling in (("mistral", None), ("llama", scaling)):
        config = preset("tiny-llama", family=family, vocab_size=tok.vocab_size, max_seq_len=128, rope_theta=500000.0,
                        rope_scaling=rope_scaling)
        src = save_hf_dir(DecoderLM(config).init_weights(seed=4, std=0.2), tmp_path / family, tokenizer=tok)
        out = export(src, "gguf", tmp_path / f"{family}.gguf", type="f32")
        assert gguf_fields(out)["general.architecture"] == "llama"
        if rope_scaling:  # llama.cpp's per-frequency divisors, recovered by the reader as the same dict
            assert "rope_freqs.weight" in gguf_tensors(out)
            assert read_gguf(out).config.rope_scaling == scaling
        x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            torch.testing.assert_close(lmforge.load(out).model(x), lmforge.load(src).model(x), rtol=0, atol=0)


# the worst error in steps d: Q8_0 rounds to nearest (half a step); Q4_0's 4-bit range -8..7 reaches -8 d on the
# side of the block's largest magnitude but only +7 d on the other, so there one value can be a whole step off
@pytest.mark.parametrize("type,qt,ref,steps", [("q8_0", QT.Q8_0, ref_q8_0, 0.5), ("q4_0", QT.Q4_0, ref_q4_0, 1.0)])
def test_quantised_types_follow_ggml_block_arithmetic(tiny_lm_dirs, tmp_path, type, qt, ref, steps):
    src = tiny_lm_dirs["chat"]
    out = main(["export", str(src), "--format", "gguf", "--type", type, "-o", str(tmp_path / "m.gguf")])
    assert out == 0
    out = tmp_path / "m.gguf"
    source = lmforge.load(src)
    tensors, back = gguf_tensors(out), read_gguf(out)
    assert gguf_fields(out)["general.file_type"] == {"q8_0": 7, "q4_0": 2}[type]
    reference = {}
    for ours, t in source.model.state_dict().items():
        rt = tensors[gguf_name(ours)]
        w = t.numpy()
        reference[ours] = t.clone()
        if t.ndim == 1:
            assert rt.tensor_type == QT.F32
            np.testing.assert_array_equal(back.state_dict[ours].numpy(), w)
            continue
        # q4_0 keeps the output matrix (the tied embedding, or lm_head) at Q8_0, as llama-quantize does
        tied = source.model.config.tie_embeddings
        head = ours == "lm_head.weight" or (tied and ours == "model.embed_tokens.weight")
        want, want_ref, want_steps = (QT.Q8_0, ref_q8_0, 0.5) if qt == QT.Q4_0 and head else (qt, ref, steps)
        assert rt.tensor_type == want, ours
        x_hat, step = want_ref(w)
        reference[ours] = torch.from_numpy(x_hat.copy())
        got = back.state_dict[ours].numpy()
        # lmforge's reader (gguf.quants) = the blocks decoded independently = the reference arithmetic
        decoded = F.decode(rt.data, want, w.shape)
        np.testing.assert_array_equal(decoded, expected_gguf_layout(ours, got, source.model.config))
        np.testing.assert_allclose(got, x_hat, rtol=0, atol=1e-6)
        # within the format's error (plus the f16 rounding of the scale), never more
        assert np.all(np.abs(got - w) <= step * want_steps + np.abs(w) * 2e-3 + 1e-7), ours
    # the loaded model is the source model with the reference-quantised weights
    source.model.load_state_dict(reference)
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(out).model(x), source.model(x), rtol=0, atol=1e-5)


def test_export_gguf_merges_a_lora_adapter(tiny_lm_dirs, tmp_path):
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora, lora_layers, merge_lora

    base = tiny_lm_dirs["chat"]
    lm = lmforge.load(base)
    add_lora(lm.model, LoraSpec(r=2, alpha=4, targets=["q_proj", "k_proj", "down_proj"]))
    for _, layer in lora_layers(lm.model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    save_adapter(lm.model, tmp_path / "ad")
    assert main(["export", str(base), "--adapter", str(tmp_path / "ad"), "--format", "gguf", "--type", "f32",
                 "-o", str(tmp_path / "m.gguf")]) == 0
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    merged = merge_lora(lm.model)
    with torch.no_grad():
        got, want, plain = lmforge.load(tmp_path / "m.gguf").model(x), merged(x), lmforge.load(base).model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter is in the weights


def test_export_gguf_refuses_bad_input(tiny_lm_dirs, tmp_path, capsys):
    base = tiny_lm_dirs["plain"]
    out = tmp_path / "m.gguf"
    assert main(["export", str(base), "--format", "gguf", "--type", "q5_k", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--type 'q5_k'" in err and "f32, f16, bf16, q8_0, q4_0" in err
    assert main(["export", str(base), "--type", "q8_0", "-o", str(tmp_path / "hf")]) == 2  # --type is gguf's
    assert "applies to --format gguf only" in capsys.readouterr().err
    # an architecture the writer does not support: one line, nothing written
    gpt2 = preset("tiny-gpt2", vocab_size=lmforge.load(base).tokenizer.vocab_size)
    src = save_hf_dir(DecoderLM(gpt2).init_weights(seed=0), tmp_path / "gpt2",
                      tokenizer=Tokenizer.from_dir(base))
    assert main(["export", str(src), "--format", "gguf", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not support the gpt2 family" in err and "llama, mistral, qwen2" in err
    # a tokenizer that is not byte-level BPE
    wp = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    config = preset("tiny-llama", vocab_size=2)
    src = save_hf_dir(DecoderLM(config).init_weights(seed=0), tmp_path / "wl", tokenizer=Tokenizer(wp))
    assert main(["export", str(src), "--format", "gguf", "-o", str(out)]) == 2
    assert "byte-level BPE" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]
    # an existing file is replaced only with --force
    out.write_text("mine")
    assert main(["export", str(base), "--format", "gguf", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export", str(base), "--format", "gguf", "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert main(["export", str(out), "--format", "gguf", "-o", str(out), "--force"]) == 2  # never over its input
    assert "destroy its input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the embedded model, llama.cpp
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


@pytest.mark.real
def test_embedded_smollm2_round_trips_through_gguf_f16(real_lm, tmp_path):
    assert main(["export", "--format", "gguf", "--type", "f16", "-o", str(tmp_path / "s.gguf")]) == 0
    meta = gguf_fields(tmp_path / "s.gguf")
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["general.architecture"] == "llama"
    back = lmforge.load(tmp_path / "s.gguf")
    for text in TEXTS:
        assert back.tokenizer.encode(text) == real_lm.tokenizer.encode(text)
    assert back.encode(MESSAGES) == real_lm.encode(MESSAGES)
    assert back.tokenizer.chat_template == real_lm.tokenizer.chat_template
    for prompt in PROMPTS[:2]:
        assert back.generate(prompt, max_new_tokens=16) == real_lm.generate(prompt, max_new_tokens=16)
    assert back.chat(MESSAGES, max_new_tokens=16) == real_lm.chat(MESSAGES, max_new_tokens=16)


def llama_cpp_runner() -> Path | None:
    """A llama.cpp program that decodes a raw prompt greedily (``llama-completion``, ``llama-simple``, or
    ``llama-server``'s /completion), from LLAMA_CPP_BIN (a build's bin folder) or PATH."""
    return llama_cpp_tool("llama-completion", "llama-simple", "llama-server")


def llama_cpp_tool(*names: str) -> Path | None:
    """The first of ``names`` that is an executable in LLAMA_CPP_BIN (a build's bin folder) or, without it, on PATH."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    for name in names:
        found = (Path(folder) / name) if folder else shutil.which(name)
        if found and Path(found).is_file() and os.access(found, os.X_OK):
            return Path(found)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def llama_cpp_greedy(binary: Path, model: Path, prompts: list[str], n: int,
                     texts: list[str] = ()) -> tuple[list[str], list[list[int]] | None, list[dict[int, float]] | None]:
    """(the text llama.cpp generates after each prompt, greedy: temperature 0, top-k 1, ``n`` tokens at most;
    with llama-server also llama.cpp's token ids of each of ``texts`` and, per prompt, the log-probabilities of its
    5 likeliest first tokens {id: logprob}; else None, None). LLAMA_CPP_ARGS: extra options
    (e.g. ``--no-repack`` where the CPU advertises AMX but the machine faults on its tile instructions)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    extra = shlex.split(os.environ.get("LLAMA_CPP_ARGS", ""))
    if binary.name == "llama-server":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = model.with_suffix(".server.log")
        with open(log, "wb") as err:
            server = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                       "-t", "2", "-c", "512", "-np", "1", "--no-webui", *extra], env=env,
                                      stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            for _ in range(600):  # up to 5 minutes to load
                assert server.poll() is None, log.read_text(errors="replace")[-2000:]
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            answers = [post(f"{url}/completion", {"prompt": p, "n_predict": n, "temperature": 0.0, "top_k": 1,
                                                  "n_probs": 5, "cache_prompt": False}) for p in prompts]
            ids = [post(f"{url}/tokenize", {"content": t, "add_special": False, "parse_special": True})["tokens"]
                   for t in texts]
            first = [{c["id"]: c["logprob"] for c in a["completion_probabilities"][0]["top_logprobs"]}
                     for a in answers]
            return [a["content"] for a in answers], ids, first
        finally:
            server.terminate()
            server.wait(timeout=30)
    out = []
    for prompt in prompts:
        if binary.name == "llama-simple":  # greedy; prints the prompt's pieces, then the generated ones
            cmd = [str(binary), "-m", str(model), "-n", str(n), *extra, prompt]
        else:
            cmd = [str(binary), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1",
                   "-no-cnv", "--no-display-prompt", "-t", "2", "--no-warmup", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        text = run.stdout
        if binary.name == "llama-simple":
            assert text.startswith(prompt), text
            text = text[len(prompt):]
        out.append(text.rstrip("\n"))
    return out, None, None


@pytest.mark.real
@pytest.mark.skipif(llama_cpp_runner() is None, reason="no llama.cpp build: set LLAMA_CPP_BIN to a build's bin folder "
                                                       "(llama-completion, llama-simple or llama-server) or put one "
                                                       "on PATH")
@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_llama_cpp_runs_the_exported_gguf_with_lmforge_greedy_text(type, tmp_path):
    """llama.cpp runs the exported embedded SmolLM2 and agrees with lmforge on the same file.

    f32: the same greedy text for every prompt and first-token log-probabilities within 0.01. q8_0: llama.cpp's
    CPU matmuls quantise the activations to Q8_0 blocks as well (lmforge multiplies by the dequantised weights in
    float32), which moves log-probabilities by tenths of a nat on this model and can flip a near tie, so there
    llama.cpp's likeliest first token must be among lmforge's three likeliest and the greedy texts are printed
    (bench/README.md records them).
    """
    binary = llama_cpp_runner()
    out = tmp_path / f"smollm2-{type}.gguf"
    assert main(["export", "--format", "gguf", "--type", type, "-o", str(out)]) == 0
    lm = lmforge.load(out)  # the same weights, dequantised
    n = 16
    # raw prompts, and a chat prompt rendered by the chat template (its special tokens parsed by both)
    prompts = [*PROMPTS, lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)]
    got, ids, first = llama_cpp_greedy(binary, out, prompts, n, texts=TEXTS)
    if ids is not None:  # llama.cpp's tokenizer, built from the exported metadata, gives lmforge's ids
        assert ids == [lm.tokenizer.encode(t) for t in TEXTS]
    for k, (prompt, text) in enumerate(zip(prompts, got)):
        want = lm.generate(prompt, chat=False, max_new_tokens=n)
        print(f"{type} {binary.name} {prompt[-30:]!r}: {text!r} | lmforge: {want!r}")
        if first is not None:
            with torch.no_grad():
                logp = lm.model(torch.tensor([lm.tokenizer.encode(prompt)]))[0, -1].log_softmax(-1)
            if type == "f32":
                for tid, lp in first[k].items():
                    assert abs(logp[tid].item() - lp) < 0.01, (prompt, tid, lp)
            else:  # llama.cpp's likeliest first token is one of lmforge's three likeliest
                best = max(first[k], key=first[k].get)
                assert best in logp.topk(3).indices.tolist(), (prompt, first[k])
        if type == "f32":
            assert want and text == want, (prompt, text, want)


@pytest.mark.real
@pytest.mark.skipif(llama_cpp_tool("llama-quantize") is None, reason="no llama-quantize: set LLAMA_CPP_BIN to a llama.cpp build's bin "
                                                     "folder or put it on PATH")
@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_lmforge_quantises_tensors_byte_for_byte_as_llama_quantize(type, tmp_path):
    """llama.cpp's own quantiser, given lmforge's f32 export, writes the very tensors lmforge writes at ``type``."""
    assert main(["export", "--format", "gguf", "--type", "f32", "-o", str(tmp_path / "f32.gguf")]) == 0
    assert main(["export", "--format", "gguf", "--type", type, "-o", str(tmp_path / "ours.gguf")]) == 0
    binary = llama_cpp_tool("llama-quantize")
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    run = subprocess.run([str(binary), str(tmp_path / "f32.gguf"), str(tmp_path / "theirs.gguf"), type],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert ours.keys() == theirs.keys()
    differ = [name for name, t in ours.items()
              if t.tensor_type != theirs[name].tensor_type
              or np.asarray(t.data).tobytes() != np.asarray(theirs[name].data).tobytes()]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ, e.g. {differ[:3]}"
