"""Defects found in review (issue 13), one test each: MLM head init and continued MLM pretraining,
left padding refused for encoder-decoder SFT, plain ValueErrors turned into one-line errors, GGUF
yarn RoPE refused by the reader, the causal mask of a chunk fed through the KV cache, and
validation of the training flags."""

import json
import math

import numpy as np
import pytest
import torch

import gguf_fixtures as GF
from lmforge.cli import main
from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
BERT = dict(family="bert", arch="encoder", n_layer=1, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64,
            norm="layernorm", norm_eps=1e-12, mlp="gelu_exact", positions="learned", qkv_bias=True, out_bias=True,
            mlp_bias=True, norm_first=False, type_vocab_size=2)
T5 = dict(family="t5", arch="encoder-decoder", n_layer=1, n_embd=32, n_head=2, intermediate_size=64, norm="rmsnorm",
          norm_eps=1e-6, mlp="relu", positions="relative", rel_buckets=8, rel_max_distance=32, attention_scale=1.0,
          tie_embeddings=True, scale_decoder_outputs=True, pad_token_id=0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- init: mixed-case LayerNorm
def test_fresh_mlm_model_has_unit_layernorm_weights_and_zero_biases(tmp_path):
    from lmforge.models import init_weights
    from lmforge.models.layers import RMSNorm
    from lmforge.models.mlm import MaskedLM
    from lmforge.training.pretrain import build_pretrain_model
    from lmforge.training.tokenizer_train import char_tokenizer

    model = init_weights(MaskedLM(ModelConfig(vocab_size=50, **BERT)), std=0.02, seed=0)
    head_norm = model.predictions.transform.LayerNorm
    assert torch.equal(head_norm.weight, torch.ones(32)) and torch.equal(head_norm.bias, torch.zeros(32))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4  # embeddings, two in the block, the head
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    # what pretraining builds from a config file goes through the same init
    cfg = tmp_path / "bert.json"
    cfg.write_text(json.dumps(BERT))
    tok = char_tokenizer(TEXT)
    tok.backend.add_special_tokens(["[MASK]"])
    net, _ = build_pretrain_model(str(cfg), tok, {}, seed=0)
    assert torch.equal(net.predictions.transform.LayerNorm.weight, torch.ones(32))
    llama, _ = build_pretrain_model("tiny-llama", tok, {}, seed=0)
    assert all(bool((m.weight == 1).all()) for m in llama.modules() if isinstance(m, RMSNorm))


# ----------------------------------------------------------------------------- continued MLM pretraining
def test_continued_mlm_pretraining_starts_from_the_saved_head(tmp_path, capsys):
    """A saved BertForMaskedLM (pretrain's final/) continues with its trained head: the head equals the
    saved tensors, its logits equal transformers' BertForMaskedLM, and a continued run scores the same."""
    import transformers
    from safetensors.torch import load_file

    from lmforge.tokenizer import Tokenizer
    from lmforge.training.pretrain import PretrainConfig, build_pretrain_model, pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    cfg = tmp_path / "bert.json"
    cfg.write_text(json.dumps(BERT))
    common = dict(corpus=str(corpus), seq_len=32, batch_size=8, warmup=0, eval_every=0, save_every=0,
                  log_every=1, eval_batches=2, cache_dir=tmp_path / "cache")
    first = pretrain(PretrainConfig(str(cfg), out_dir=tmp_path / "a", steps=150, lr=1e-2, **common))
    saved_dir = tmp_path / "a" / "final"
    tok = Tokenizer.from_dir(saved_dir)
    assert first["val_loss"] < math.log(tok.vocab_size) - 0.5, first  # the head has learned something

    saved = load_file(str(saved_dir / "model.safetensors"))
    net, _ = build_pretrain_model(str(saved_dir), tok, {}, seed=123)  # a different init seed: the head must come from disk
    head = dict(net.predictions.named_parameters())
    assert sorted(head) == ["bias", "decoder.weight", "transform.LayerNorm.bias", "transform.LayerNorm.weight",
                            "transform.dense.bias", "transform.dense.weight"]
    for name, p in head.items():
        expected = saved["bert.embeddings.word_embeddings.weight" if name == "decoder.weight"
                         else "cls.predictions." + name]
        assert torch.equal(p.detach(), expected), name

    hf = transformers.BertForMaskedLM.from_pretrained(saved_dir).eval()
    idx = torch.tensor([tok.encode("Speak, speak. [MASK] we proceed")])
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)

    # the CLI: a continued run with a vanishing learning rate evaluates exactly as the saved model did
    assert main(["pretrain", "--model", str(saved_dir), "--corpus", str(corpus), "--out-dir", str(tmp_path / "b"),
                 "--steps", "1", "--lr", "1e-12", "--warmup", "0", "--seq-len", "32", "--batch-size", "8",
                 "--eval-batches", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-4), (again, first)


def test_plain_bert_encoder_gets_a_fresh_head(tmp_path):
    """A BertModel directory (no MLM head) still continues: the encoder is loaded, the head initialised."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models import init_weights
    from lmforge.models.encoder import EncoderModel
    from lmforge.training.pretrain import build_pretrain_model
    from lmforge.training.tokenizer_train import char_tokenizer

    tok = char_tokenizer(TEXT)
    tok.backend.add_special_tokens(["[MASK]"])
    encoder = init_weights(EncoderModel(ModelConfig(vocab_size=tok.vocab_size, pooler=True, **BERT)), seed=1)
    save_hf_dir(encoder, tmp_path / "enc", tokenizer=tok)
    net, _ = build_pretrain_model(str(tmp_path / "enc"), tok, {}, seed=0)
    assert torch.equal(net.encoder.embed_tokens.weight, encoder.embed_tokens.weight)
    assert torch.equal(net.predictions.transform.LayerNorm.weight, torch.ones(32))


# ----------------------------------------------------------------------------- SFT: left padding, seq2seq
def test_encoder_decoder_batches_refuse_left_padding():
    from lmforge.data.sft import SFTBatches, SFTExample

    examples = [SFTExample([5, 6, 7], [8, 9, 1], [5, 6, 7], "r"), SFTExample([5], [8, 1], [5], "r")]
    with pytest.raises(LmforgeError, match="padding_side='left' is for decoder-only models"):
        SFTBatches(examples, batch_size=2, pad_id=0, seq2seq=True, decoder_start_id=0, padding_side="left")
    batch = SFTBatches(examples, batch_size=2, pad_id=0, seq2seq=True, decoder_start_id=0, shuffle=False).next_batch()
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 9], [0, 8, 0]]  # right-padded: pads after the target


# ----------------------------------------------------------------------------- ValueError -> LmforgeError
def test_encoder_input_beyond_its_positions_is_a_one_line_error(tmp_path, capsys):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models import init_weights
    from lmforge.models.encoder import EncoderModel
    from lmforge.tokenizer import Tokenizer

    words = ["[PAD]", "[UNK]", "kind", "rude", "the", "very"]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    config = ModelConfig(vocab_size=len(words), pooler=True, pad_token_id=0, **BERT)  # 64 positions
    encoder = init_weights(EncoderModel(config), seed=0)
    with pytest.raises(LmforgeError, match="65 tokens exceeds the encoder's 64 positions"):
        encoder(torch.zeros(1, 65, dtype=torch.long))
    save_hf_dir(encoder, tmp_path / "enc", tokenizer=tok)
    rows = ["text,label"] + [f'"{" ".join(["the very"] * 40)} {w}",{int(w == "kind")}' for w in ["kind", "rude"] * 10]
    (tmp_path / "long.csv").write_text("\n".join(rows) + "\n")
    code = main(["reward", "train", str(tmp_path / "long.csv"), "-o", str(tmp_path / "rm"), "--model",
                 str(tmp_path / "enc"), "--label-map", "0=bad,1=good", "--good-labels", "good", "--max-len", "100",
                 "--text-field", "text", "--label-field", "label", "--epochs", "1"])
    assert code == 2
    _one_error_line(capsys, "--max-len 100 is longer than the encoder's 64 positions", "--max-len 64 or less")


def test_span_corruption_needing_too_many_sentinels_is_a_one_line_error(tmp_path, capsys):
    from lmforge.training import objectives as obj

    rng = np.random.default_rng(0)
    with pytest.raises(LmforgeError, match=r"needs 105 sentinel tokens, but only 100 exist .*--seq-len 2009 or less"):
        obj.span_corrupt(np.arange(2100), rng, list(range(100)), None)
    obj.span_corrupt(np.arange(2009), rng, list(range(100)), None)  # the longest that fits
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 12, encoding="utf-8")
    cfg = tmp_path / "t5.json"
    cfg.write_text(json.dumps(T5))
    assert main(["pretrain", "--model", str(cfg), "--corpus", str(corpus), "--out-dir", str(tmp_path / "r"),
                 "--seq-len", "2100", "--batch-size", "1", "--steps", "1", "--val-fraction", "0.2",
                 "--eval-batches", "1", "--cache-dir", str(tmp_path / "cache")]) == 2
    _one_error_line(capsys, "sentinel tokens", "--seq-len 2009 or less")


# ----------------------------------------------------------------------------- GGUF: yarn RoPE scaling
def test_gguf_with_yarn_rope_scaling_is_refused_by_the_reader(tmp_path):
    from lmforge.checkpoints.gguf import read_gguf, read_gguf_info

    path = GF.write_tiny_gguf(tmp_path / "yarn.gguf", GF.tiny_weights(3), meta={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 64})
    for read in (read_gguf, read_gguf_info):
        with pytest.raises(LmforgeError, match="unsupported rope scaling type 'yarn'") as e:
            read(path)
        assert str(path) in str(e.value) and "llama3" not in str(e.value)


# ----------------------------------------------------------------------------- attention: cached chunks
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("chunk", [4, 12])
def test_chunk_fed_through_the_cache_equals_the_uncached_forward(family, chunk):
    """Prefill 5 tokens, then feed ``chunk`` more with the cache and no mask (mask None = causal): the
    logits equal the uncached forward's, for short chunks (grouped attention) and long ones (SDPA)."""
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(preset(family, vocab_size=64)).init_weights(std=0.2, seed=0).eval()
    idx = torch.randint(0, 64, (2, 5 + chunk), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5 + chunk).expand(2, -1)
    with torch.no_grad():
        full = model.lm_head(model.model(idx, positions, None))  # (B, 5+chunk, V)
        caches = model.make_caches(2, 32)
        model.model(idx[:, :5], positions[:, :5], None, caches, 0)
        cached = model.lm_head(model.model(idx[:, 5:], positions[:, 5:], None, caches, 5))
        torch.testing.assert_close(cached, full[:, 5:], rtol=1e-5, atol=1e-5)
        assert torch.equal(cached.argmax(-1), full[:, 5:].argmax(-1))
        caches = model.make_caches(2, 32)  # the model's own entry point agrees too
        model(idx[:, :5], caches=caches)
        torch.testing.assert_close(model(idx[:, 5:], caches=caches, start=5), full[:, 5:], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training flags
FINETUNE = ["finetune", "--train", "x.jsonl"]
DPO = ["rlhf", "dpo", "--data", "x.jsonl", "-o", "out"]
PPO = ["rlhf", "ppo", "--prompts", "x.txt", "-o", "out"]


@pytest.mark.parametrize("command, flag, value", [
    *[(FINETUNE, f, "-1") for f in ("--eval-generate", "--save-every", "--warmup", "--eval-every", "--log-every",
                                    "--seed", "--weight-decay", "--clip", "--lora-dropout")],
    (FINETUNE, "--limit", "0"), (FINETUNE, "--min-lr-ratio", "2"),
    *[(DPO, f, "-1") for f in ("--save-every", "--warmup", "--eval-every", "--seed")],
    (DPO, "--limit", "0"),
    *[(PPO, f, "-1") for f in ("--save-every", "--seed")],
    (["pretrain"], "--seed", "-1"),
])
def test_training_flags_out_of_range_are_one_line_errors(capsys, command, flag, value):
    assert main([*command, flag, value]) == 2
    err = _one_error_line(capsys)
    assert f"argument {flag}: {flag} must be" in err or f"({flag}): must be" in err, err  # argparse or a recipe config
