"""Pretraining: the corpus (sources, cache, errors), a short run that learns, the three objectives end to end, the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.corpus import RandomWindows, corpus_files, eval_windows, tokenize_corpus
from lmforge.errors import LmforgeError
from lmforge.training.pretrain import PretrainConfig, pretrain
from lmforge.training.tokenizer_train import char_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine one thread is steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_short_run_on_embedded_corpus_learns(tmp_path):
    """80 steps of a tiny Llama on the embedded Shakespeare: validation loss far below ln(vocab)."""
    metrics = pretrain(PretrainConfig("tiny-llama", corpus="shakespeare", out_dir=tmp_path / "run", steps=80, seq_len=64,
                       batch_size=16, lr=3e-3, warmup=10, eval_every=0, save_every=0, log_every=20, eval_batches=4,
                       cache_dir=tmp_path / "cache"))
    tok_dir = tmp_path / "run" / "final"
    from lmforge.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(tok_dir).vocab_size
    assert vocab > 60  # characters of the plays
    assert metrics["val_loss"] < 0.7 * math.log(vocab), metrics  # measured 2.51 vs ln(85) = 4.44
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    from lmforge.lm import load

    lm = load(str(tok_dir))  # the final folder is a loadable HF model with its tokenizer
    assert isinstance(lm.generate("ROMEO:", max_new_tokens=5), str)


def test_corpus_cache_is_reused_and_invalidated(tmp_path, text_file):
    tok = char_tokenizer(TEXT)
    first = tokenize_corpus(text_file, tok, tmp_path / "cache")
    assert len(first.tokens) == len(TEXT) and first.tokens.dtype == np.uint16
    assert tok.decode(first.tokens[:14].tolist()) == "First Citizen:"
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    again = tokenize_corpus(text_file, tok, tmp_path / "cache")
    assert again.meta == first.meta and len(list((tmp_path / "cache").glob("*.bin"))) == 1
    text_file.write_text(TEXT + "More.\n", encoding="utf-8")  # changed corpus -> new entry
    assert len(tokenize_corpus(text_file, tok, tmp_path / "cache").tokens) == len(TEXT) + 6
    other = char_tokenizer(TEXT + "XYZ")  # changed tokenizer -> new entry
    tokenize_corpus(text_file, other, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha ", encoding="utf-8")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta", encoding="utf-8")
    (tmp_path / "d" / "skip.py").write_text("ignored", encoding="utf-8")
    assert [p.name for p in corpus_files(tmp_path / "d")] == ["a.txt", "b.md"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "one"}\n\n{"body": "two"}\n', encoding="utf-8")
    tok = char_tokenizer("onetw")
    corpus = tokenize_corpus(rows, tok, tmp_path / "cache", text_field="body")
    assert tok.decode(corpus.tokens.tolist()) == "onetwo"


@pytest.mark.parametrize("content, field, message", [
    (b'{"text": "ok"}\n{"text": "broken"\n', "text", r"rows\.jsonl, line 2: not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x", "id": 3}\n', "text", r"rows\.jsonl, line 2: no field 'text' \(--text-field\); the record has: body, id"),
    (b'["a list"]\n', "text", r"rows\.jsonl, line 1: expected a JSON object"),
    (b'{"text": 5}\n', "text", r"rows\.jsonl, line 1: field 'text' \(--text-field\) must be a string"),
])
def test_bad_jsonl(tmp_path, content, field, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(LmforgeError, match=message):
        tokenize_corpus(path, char_tokenizer("abc"), tmp_path / "cache", text_field=field)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + b"\xe9 au lait")
    with pytest.raises(LmforgeError, match=r"latin1\.txt is not UTF-8 text \(byte 3\)"):
        tokenize_corpus(path, char_tokenizer("abc"), tmp_path / "cache")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(LmforgeError, match="the corpus is empty"):
        tokenize_corpus(tmp_path / "empty.txt", char_tokenizer("abc"), tmp_path / "cache")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LmforgeError, match=r"holds no \.txt or \.md files"):
        corpus_files(tmp_path / "nothing")
    with pytest.raises(LmforgeError, match="no such file or folder"):
        corpus_files(tmp_path / "missing.txt")
    assert not list((tmp_path / "cache").glob("*"))


def test_seq_len_above_context(tmp_path, text_file):
    with pytest.raises(LmforgeError, match=r"--seq-len 300 is longer than the model's context of 256 tokens"):
        pretrain(PretrainConfig("tiny-llama", corpus=str(text_file), out_dir=tmp_path / "run", steps=1, seq_len=300,
                 cache_dir=tmp_path / "cache"))


def test_windows_resume_and_eval_batches(text_file, tmp_path):
    tokens = tokenize_corpus(text_file, char_tokenizer(TEXT), tmp_path / "cache").tokens
    a = RandomWindows(tokens, 16, 4, seed=3)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    expected = a.next_batch()
    b = RandomWindows(tokens, 16, 4, seed=99)
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["input_ids"][:, 1:], got["labels"][:, :-1]) and got["input_ids"].shape == (4, 16)
    with pytest.raises(LmforgeError, match="seq_len=16, this run 8"):
        RandomWindows(tokens, 8, 4).load_state_dict(state)
    batches = eval_windows(tokens[:100], 16, 4, 10)
    assert [w.shape for w in batches] == [(4, 17), (2, 17)]
    with pytest.raises(LmforgeError, match="too few"):
        RandomWindows(tokens[:10], 16, 4)


BERT = dict(family="bert", arch="encoder", n_layer=1, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64,
            norm="layernorm", norm_eps=1e-12, mlp="gelu_exact", positions="learned", qkv_bias=True, out_bias=True,
            mlp_bias=True, norm_first=False, type_vocab_size=2)
T5 = dict(family="t5", arch="encoder-decoder", n_layer=1, n_embd=32, n_head=2, intermediate_size=64, norm="rmsnorm",
          norm_eps=1e-6, mlp="relu", positions="relative", rel_buckets=8, rel_max_distance=32, attention_scale=1.0,
          tie_embeddings=True, scale_decoder_outputs=True, pad_token_id=0)


@pytest.mark.parametrize("name, fields, steps", [("bert", BERT, 150), ("t5", T5, 60)])
def test_mlm_and_span_corruption_pretraining(tmp_path, text_file, name, fields, steps):
    """An encoder (masked LM) and an encoder-decoder (span corruption) pretrain through the same entry point."""
    from lmforge.tokenizer import Tokenizer

    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(fields))
    out = tmp_path / name
    m = pretrain(PretrainConfig(str(cfg), corpus=str(text_file), out_dir=out, steps=steps, seq_len=32, batch_size=8, lr=1e-2,
                 warmup=3, eval_every=0, save_every=0, log_every=10, eval_batches=2, cache_dir=tmp_path / "cache"))
    tok = Tokenizer.from_dir(out / "final")
    assert m["val_loss"] < math.log(tok.vocab_size) - 0.5, (name, m, tok.vocab_size)
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == name
    if name == "bert":
        assert tok.token_to_id("[MASK]") is not None
    else:
        assert tok.token_to_id("<extra_id_0>") == tok.vocab_size - 1


def test_cli_pretrain_help_and_errors(tmp_path, capsys, text_file):
    with pytest.raises(SystemExit):
        from lmforge.cli.main import build_parser

        build_parser().parse_args(["pretrain", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--set", "--corpus", "--text-field", "--tokenizer", "--out-dir", "--seq-len",
                 "--batch-size", "--grad-accum", "--steps", "--lr", "--warmup", "--min-lr-ratio", "--weight-decay",
                 "--clip", "--precision", "--compile", "--eval-every", "--eval-batches", "--val-fraction",
                 "--save-every", "--log-every", "--cache-dir", "--resume", "--seed", "--device"):
        assert flag in out
    assert "default: 128" in out
    assert main(["pretrain", "--corpus", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus ") and "no such file" in err and err.count("\n") == 1
    assert main(["pretrain", "--steps", "0"]) == 2
    assert "steps (--steps): must be >= 1, got 0" in capsys.readouterr().err
    assert main(["pretrain", "--set", "n_layer", "--corpus", str(text_file)]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["pretrain", "--model", "no-such-preset", "--corpus", str(text_file),
                 "--cache-dir", str(tmp_path / "c")]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_cli_pretrain_runs_and_resumes(tmp_path, capsys, text_file):
    args = ["pretrain", "--corpus", str(text_file), "--out-dir", str(tmp_path / "r"), "--steps", "4",
            "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--cache-dir", str(tmp_path / "c"),
            "--set", "n_layer=1", "--precision", "bf16"]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 4
    assert main([*args[:6], "6", *args[7:], "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
    assert main([*args[:6], "6", *args[7:-4], "--set", "n_layer=2", "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_continue_pretraining_from_saved_model(tmp_path, text_file):
    """A finished run's final/ folder (weights + its tokenizer) is a --model to continue pretraining."""
    common = dict(corpus=str(text_file), steps=30, seq_len=16, batch_size=4, lr=1e-2, warmup=2, eval_every=0,
                  save_every=0, log_every=1, eval_batches=1, cache_dir=tmp_path / "c", overrides={})
    first = pretrain(PretrainConfig("tiny-llama", out_dir=tmp_path / "a", **{**common, "overrides": {"n_layer": 1}}))
    again = pretrain(PretrainConfig(str(tmp_path / "a" / "final"), out_dir=tmp_path / "b", **{**common, "steps": 1}))
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    from lmforge.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(tmp_path / "a" / "final").vocab_size
    assert first["loss"] < math.log(vocab) - 0.5
    assert rows[0]["loss"] < first["loss"] + 0.3  # starts where the first run ended, not from ln(vocab)
    assert json.loads((tmp_path / "b" / "checkpoint" / "config.json").read_text())["model_config"]["n_layer"] == 1
    assert again["step"] == 1
