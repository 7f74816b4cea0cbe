"""Training tokenizers: byte-level BPE and character vocabularies, through the API and `lmforge tokenizer train`."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.training.tokenizer_train import char_tokenizer, train_bpe

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def test_char_tokenizer_round_trip(tmp_path):
    tok = char_tokenizer(TEXT)
    assert tok.vocab_size == len(set(TEXT)) + 1  # + <unk>
    ids = tok.encode("To be\n")
    assert len(ids) == 6 and tok.decode(ids) == "To be\n"
    assert tok.encode("Z") == [tok.unk_id]
    tok.save(tmp_path / "char")
    again = Tokenizer.from_dir(tmp_path / "char")
    assert again.encode("the question") == tok.encode("the question")
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "char")
    assert hf("not to be")["input_ids"] == tok.encode("not to be")
    with pytest.raises(LmforgeError, match="empty"):
        char_tokenizer("")


def test_bpe_training_merges_and_reloads(tmp_path):
    tok = train_bpe([TEXT], vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"])
    assert tok.vocab_size == 300
    assert tok.eos_token == "<|endoftext|>" and tok.token_to_id("<|endoftext|>") == 0
    ids = tok.encode("the question")
    assert len(ids) < len("the question")  # merges learned
    assert tok.decode(ids) == "the question"
    assert tok.decode(tok.encode("ünïcode ✓")) == "ünïcode ✓"  # byte-level: no unknowns
    with pytest.raises(LmforgeError, match="too small"):
        train_bpe([TEXT], vocab_size=100)


def test_cli_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "280", "-o", str(out)]) == 0
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 280 and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--kind", "char", "-o", str(tmp_path / "ch")]) == 0
    assert Tokenizer.from_dir(tmp_path / "ch").vocab_size == len(set(TEXT)) + 1
    capsys.readouterr()
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "10", "-o", str(out)]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
