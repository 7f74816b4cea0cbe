"""Fine-tuning runs on tiny models: the SFT losses (packed == unpacked), a short run that lowers the held-out
response loss, seq2seq fine-tuning, the parameter-efficient methods, the CLI, and bad arguments."""

import argparse
import itertools
import json
import random

import pytest
import torch

import lmforge
from lmforge.cli.training import add_finetune_parser
from lmforge.data.sft import SFTBatches, load_sft_data, to_record, tokenize_record
from lmforge.errors import LmforgeError
from lmforge.training.sft import FinetuneConfig, finetune
from lmforge.training.sft_eval import evaluate_sft, rouge_l
from lmforge.training.sft_losses import decoder_logits, decoder_sft_loss


def run_finetune(model, train, dev=(), **kw):
    """``finetune`` with the config built from keywords (``resume``/``overwrite``/``force`` go to the run)."""
    run = {k: kw.pop(k) for k in ("resume", "overwrite", "force") if k in kw}
    return finetune(FinetuneConfig(model=model, train=train, dev=dev, **kw), **run)

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "fox", "dog"]


def copy_task(tmp_path):
    """Prompt 'Repeat: a b c' -> response 'a b c'; train and dev use disjoint word triples."""
    triples = list(itertools.permutations(WORDS, 3))
    random.Random(0).shuffle(triples)
    rows = [{"prompt": "Repeat: " + " ".join(t), "completion": " ".join(t)} for t in triples]
    for name, part in (("train", rows[:96]), ("dev", rows[96:112])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path / "train.jsonl", tmp_path / "dev.jsonl"


def copy_task_baseline(model_dir, tmp_path):
    """(train file, dev file, dev batches, the untrained model's dev response loss) for the copy task."""
    train, dev = copy_task(tmp_path)
    base = lmforge.load(model_dir)
    dev_data = load_sft_data(dev, base.tokenizer, max_len=64)
    dev_batches = SFTBatches(dev_data.examples, batch_size=8, pad_id=base.tokenizer.pad_id, shuffle=False)
    return train, dev, dev_batches, evaluate_sft(base.model.eval(), base.tokenizer, dev_batches)["val_loss"]


def test_packed_logits_equal_separate_logits(tiny_lm_dirs):
    lm = lmforge.load(tiny_lm_dirs["chat"])
    tok = lm.tokenizer
    exs = [tokenize_record(to_record({"prompt": p, "completion": c}, "x"), tok, chat=True)
           for p, c in (("one two", "three"), ("What is the capital of France?", "Paris."), ("fox", "dog dog"))]
    packed = SFTBatches(exs, batch_size=1, pad_id=tok.pad_id, pack=True, max_len=128, shuffle=False).next_batch()
    with torch.no_grad():
        logits = decoder_logits(lm.model, packed)[0]
        start = 0
        for ex in exs:
            alone = lm.model(torch.tensor([ex.input_ids]))[0]
            torch.testing.assert_close(logits[start:start + len(ex.input_ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(ex.input_ids)
        single = SFTBatches(exs, batch_size=3, pad_id=tok.pad_id, shuffle=False).next_batch()
        left = SFTBatches(exs, batch_size=3, pad_id=tok.pad_id, shuffle=False, padding_side="left").next_batch()
        # Same labelled tokens, same loss: packed, right-padded and left-padded batches agree.
        torch.testing.assert_close(decoder_sft_loss(lm.model, packed), decoder_sft_loss(lm.model, single))
        torch.testing.assert_close(decoder_sft_loss(lm.model, left), decoder_sft_loss(lm.model, single))


def test_short_finetune_lowers_heldout_response_loss(tiny_lm_dirs, tmp_path):
    train, dev, dev_batches, before = copy_task_baseline(tiny_lm_dirs["chat"], tmp_path)
    result = run_finetune(str(tiny_lm_dirs["chat"]), train, dev, out_dir=tmp_path / "run", max_len=64, batch_size=8,
                      steps=60, lr=3e-3, warmup=5, eval_generate=4, max_new_tokens=8, log_every=20, pack=True)
    assert result["train_examples"] == 96 and result["dropped"] == 0
    assert result["val_loss"] < 0.3 * before, (before, result["val_loss"])  # stated margin: >= 70% lower (seen: 6.96 -> 1.09)
    assert 0.0 <= result["val_rougeL"] <= 1.0
    tuned = lmforge.load(tmp_path / "run" / "final")  # the loop's final HF dir, tokenizer included
    after = evaluate_sft(tuned.model.eval(), tuned.tokenizer, dev_batches)["val_loss"]
    assert after == pytest.approx(result["val_loss"], rel=1e-4)
    assert tuned.tokenizer.chat_template == lmforge.load(tiny_lm_dirs["chat"]).tokenizer.chat_template


def tiny_t5_dir(path):
    """A tiny random T5 v1.1 with a Unigram tokenizer that appends </s>, saved as a Hugging Face directory."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.Unigram())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(["Repeat: " + " ".join(WORDS)] * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = Tokenizer(backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save(path)
    return path


def test_seq2seq_finetune_lowers_heldout_loss(tmp_path):
    train, dev = copy_task(tmp_path)
    path = tiny_t5_dir(tmp_path / "t5")
    base = lmforge.load(path)
    dev_data = load_sft_data(dev, base.tokenizer, max_len=32, seq2seq=True)
    assert dev_data.examples[0].input_ids[-1] == 1  # the source keeps the tokenizer's </s>
    dev_batches = SFTBatches(dev_data.examples, batch_size=8, pad_id=0, seq2seq=True, decoder_start_id=0,
                             shuffle=False)
    before = evaluate_sft(base.model.eval(), base.tokenizer, dev_batches)["val_loss"]
    result = run_finetune(str(path), train, dev, out_dir=tmp_path / "run", max_len=32, batch_size=8, steps=40, lr=1e-2,
                      eval_generate=2, max_new_tokens=6, log_every=20)
    assert result["val_loss"] < 0.2 * before, (before, result["val_loss"])  # stated margin: >= 80% lower (seen: 21.9 -> 0.78)


def test_rouge_l_matches_reference_package():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert rouge_l(["a b"], ["c d"]) == 0.0


def cli(argv):
    parser = argparse.ArgumentParser(prog="lmforge")
    add_finetune_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["finetune", *argv])
    return args.func(args)


def test_cli_runs_and_resumes(tiny_lm_dirs, tmp_path, capsys):
    train, dev = copy_task(tmp_path)
    out = tmp_path / "cli"
    common = ["-m", str(tiny_lm_dirs["plain"]), "--train", str(train), "--dev", str(dev), "-o", str(out),
              "--max-len", "32", "--batch-size", "4", "--lr", "1e-3", "--eval-generate", "2", "--max-new-tokens", "4",
              "--eval-examples", "8", "--limit", "16"]
    assert cli([*common, "--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["step"] == 2 and (out / "final" / "config.json").is_file() and "val_rougeL" in first
    assert cli([*common, "--steps", "4", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_cli_prompt_template_unescapes_newlines(tiny_lm_dirs, tmp_path, capsys):
    rows = [{"dialogue": f"#A#: {w}", "summary": w} for w in WORDS]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["-m", str(tiny_lm_dirs["plain"]), "--train", str(path), "-o", str(tmp_path / "o"), "--epochs", "1",
                "--batch-size", "4", "--prompt-template", "Summarize.\\n\\n{dialogue}\\n\\nSummary: ",
                "--response-field", "summary"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3  # one epoch: ceil(9 examples / 4)
    run = json.loads((tmp_path / "o" / "checkpoint" / "config.json").read_text())
    assert run["prompt_template"] == "Summarize.\n\n{dialogue}\n\nSummary: "


@pytest.mark.parametrize("method,margin", [("lora", 0.5), ("qlora", 0.5), ("prompt-tuning", 0.8)])
def test_peft_methods_learn_and_save_peft_adapters(tiny_lm_dirs, tmp_path, capsys, method, margin):
    """Each method lowers the held-out response loss; the result is a PEFT adapter folder that
    lmforge.load(base, adapter=...) reproduces."""
    train, dev, dev_batches, before = copy_task_baseline(tiny_lm_dirs["chat"], tmp_path)
    result = run_finetune(str(tiny_lm_dirs["chat"]), train, dev, out_dir=tmp_path / "run", max_len=64, batch_size=8,
                      steps=40, warmup=3, eval_generate=0, log_every=20, method=method, lora_r=8,
                      lora_targets="all-linear", lr=3e-3 if method != "prompt-tuning" else 3e-2, lora_dropout=0.0)
    assert "trainable (" in capsys.readouterr().err  # the trainable-parameter report
    assert result["val_loss"] < margin * before, (before, result["val_loss"])
    final = tmp_path / "run" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt-tuning" else "LORA")
    assert not (final / "model.safetensors").exists()  # an adapter, not a copy of the base
    tuned = lmforge.load(tiny_lm_dirs["chat"], adapter=final)
    if method == "qlora":  # the adapter was trained over an NF4 base; on the float base it is close, not equal
        return
    after = evaluate_sft(tuned.model.eval(), tuned.tokenizer, dev_batches)["val_loss"]
    assert after == pytest.approx(result["val_loss"], rel=1e-4)


def test_finetune_continues_an_adapter_or_merges_it_for_full(tiny_lm_dirs, tmp_path):
    """--adapter: LoRA training picks up where the adapter left off (its rank wins); full fine-tuning starts
    from the merged weights; an adapter of another kind is refused."""
    train, dev, _, _ = copy_task_baseline(tiny_lm_dirs["chat"], tmp_path)
    args = dict(max_len=64, batch_size=8, warmup=0, eval_generate=0, log_every=50, lora_targets="all-linear",
                lora_dropout=0.0)
    first = run_finetune(str(tiny_lm_dirs["chat"]), train, dev, out_dir=tmp_path / "a", method="lora", lora_r=8,
                     steps=10, lr=3e-3, **args)
    adapter = tmp_path / "a" / "final"
    more = run_finetune(str(tiny_lm_dirs["chat"]), train, dev, adapter=adapter, out_dir=tmp_path / "b", method="lora",
                    lora_r=4, steps=10, lr=3e-3, **args)
    assert json.loads((tmp_path / "b" / "final" / "adapter_config.json").read_text())["r"] == 8
    assert more["val_loss"] < first["val_loss"] - 0.05, (first["val_loss"], more["val_loss"])
    merged = run_finetune(str(tiny_lm_dirs["chat"]), train, dev, adapter=adapter, out_dir=tmp_path / "c", method="full",
                      steps=1, lr=1e-12, **args)
    assert merged["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)  # the merged model is the adapted one
    with pytest.raises(LmforgeError, match="is a lora adapter; continue it with --method lora"):
        run_finetune(str(tiny_lm_dirs["chat"]), train, adapter=adapter, out_dir=tmp_path / "d", method="prompt-tuning",
                 steps=1, **args)


def test_bad_arguments(tiny_lm_dirs, tmp_path):
    with pytest.raises(LmforgeError, match=r"method \(--method\): expected one of 'full', .*got 'adapter'"):
        run_finetune(None, tmp_path / "x.jsonl", method="adapter")
    with pytest.raises(LmforgeError, match="no training data"):
        run_finetune(None, [])
    with pytest.raises(LmforgeError, match=r"either steps \(--steps\) or epochs"):
        run_finetune(None, tmp_path / "x.jsonl", steps=1, epochs=1)
    with pytest.raises(LmforgeError, match=r"batch_size \(--batch-size\): must be >= 1, got 0"):
        run_finetune(None, tmp_path / "x.jsonl", batch_size=0)
    train, _ = copy_task(tmp_path)
    with pytest.raises(LmforgeError, match=r"max_len=4096 exceeds the context window .*\(128\)"):
        run_finetune(str(tiny_lm_dirs["plain"]), train, max_len=4096)
    with pytest.raises(LmforgeError, match="--method: expected one of 'full', 'lora', 'qlora', 'prompt-tuning'"):
        cli(["--train", str(train), "--method", "adapter"])


def test_errors_through_lmforge_main_are_one_line(tiny_lm_dirs, monkeypatch, tmp_path, capsys):
    from lmforge.cli import main

    train, _ = copy_task(tmp_path)
    assert main(["finetune", "--train", str(train), "-m", str(tiny_lm_dirs["chat"]), "--method", "lora",
                 "--lora-targets", "query,value", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LoRA targets ['query', 'value'] match no linear layer; available names: down_proj")
    assert len(err.splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert main(["finetune", "--train", str(bad), "-m", str(tiny_lm_dirs["chat"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl, line 2: not valid JSON" in err and len(err.splitlines()) == 1
