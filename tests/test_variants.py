"""Encoder-only (BERT) and encoder-decoder (T5): parity with transformers, cached decoding, embeddings."""

import json

import numpy as np
import pytest
import torch
from tests.conftest import randomize_

import lmforge
from lmforge.checkpoints.hf import read_hf_dir, save_hf_dir
from lmforge.checkpoints.hf_config import config_from_hf
from lmforge.checkpoints.resolve import build_model
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generation.generate import generate_tokens


def _t5_config(t, ff: str):
    return t.T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3,
                      num_heads=4, feed_forward_proj=ff, tie_word_embeddings=ff == "relu",
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def hf_variants(tmp_path_factory):
    """name -> (transformers model, saved directory) for BERT (+ classifier) and T5 v1.0 / v1.1."""
    import transformers as t

    bert_cfg = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64)
    models = {
        "bert": t.BertModel(t.BertConfig(**bert_cfg)),
        "bert-classifier": t.BertForSequenceClassification(t.BertConfig(
            **bert_cfg, num_labels=3, id2label={0: "hate", 1: "offensive", 2: "neither"})),
        "t5-v1.0": t.T5ForConditionalGeneration(_t5_config(t, "relu")),
        "t5-v1.1": t.T5ForConditionalGeneration(_t5_config(t, "gated-gelu")),
    }
    out = {}
    for i, (name, model) in enumerate(models.items()):
        randomize_(model.eval(), seed=10 + i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _ours(path):
    config, state, _ = read_hf_dir(path)
    return build_model(config, state)


def _batch(seed=0, B=3, T=20, vocab=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return x, mask


def _outputs(name, model, x, mask, ours: bool):
    with torch.no_grad():
        if name == "bert":
            return model(x, mask) if ours else model(x, attention_mask=mask).last_hidden_state
        if name == "bert-classifier":
            return model(x, mask) if ours else model(x, attention_mask=mask).logits
        y = torch.randint(2, 200, (x.shape[0], 9), generator=torch.Generator().manual_seed(5))
        return model(x, y, mask) if ours else model(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits


@pytest.mark.parametrize("name", ["bert", "bert-classifier", "t5-v1.0", "t5-v1.1"])
def test_parity_with_transformers(hf_variants, name):
    hf, path = hf_variants[name]
    ours = _ours(path)
    x, mask = _batch()
    expected, got = _outputs(name, hf, x, mask, False), _outputs(name, ours, x, mask, True)
    assert expected.abs().max() > 0.5
    if name == "bert":  # hidden states at padding positions are not meaningful
        expected, got = expected[mask.bool()], got[mask.bool()]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["bert", "bert-classifier", "t5-v1.0", "t5-v1.1"])
def test_saved_directory_reloads_in_transformers(hf_variants, name, tmp_path):
    import transformers as t

    hf, path = hf_variants[name]
    ours = _ours(path)
    save_hf_dir(ours, tmp_path)
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    x, mask = _batch(seed=1)
    expected, got = _outputs(name, reloaded, x, mask, False), _outputs(name, ours, x, mask, True)
    if name == "bert":
        expected, got = expected[mask.bool()], got[mask.bool()]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if name == "bert-classifier":
        assert t.AutoConfig.from_pretrained(tmp_path).id2label == {0: "hate", 1: "offensive", 2: "neither"}


@pytest.mark.parametrize("name", ["t5-v1.0", "t5-v1.1"])
def test_seq2seq_greedy_cached_equals_uncached_and_transformers(hf_variants, name):
    hf, path = hf_variants[name]
    ours = _ours(path)
    src = [5, 17, 42, 99, 3, 60, 61]

    def run(**kw):
        return [s[0] for s in generate_tokens(ours, [src], 16, **kw)]

    cached, uncached = run(), run(use_cache=False)
    assert cached == uncached and len(cached) == 16
    with torch.no_grad():
        # use_cache=False: transformers 5.23 sizes its T5 cache by num_layers, not num_decoder_layers
        expected = hf.generate(torch.tensor([src]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                               eos_token_id=None, use_cache=False)[0, 1:].tolist()  # drop the start token
    assert cached == expected


def test_seq2seq_batch_equals_one_by_one(hf_variants):
    ours = _ours(hf_variants["t5-v1.1"][1])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [40, 41, 42, 43]]

    def run(batch):
        rows = [[] for _ in batch]
        for step in generate_tokens(ours, batch, 10, pad_id=0):
            for r, tok in zip(rows, step):
                if tok is not None:
                    r.append(tok)
        return rows

    assert run(prompts) == [run([p])[0] for p in prompts]


def test_three_variants_share_the_blocks():
    """Each variant lives in one short file and builds on the same Attention/Block modules."""
    from pathlib import Path

    import lmforge.models as models
    from lmforge.models.attention import Attention
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.encoder import EncoderModel
    from lmforge.models.seq2seq import Seq2SeqLM

    folder = Path(models.__file__).parent
    for name in ("decoder.py", "encoder.py", "seq2seq.py"):
        assert len((folder / name).read_text().splitlines()) < 200, name
    for cls, cfg in ((DecoderLM, ModelConfig()), (EncoderModel, ModelConfig(arch="encoder", norm_first=False)),
                     (Seq2SeqLM, ModelConfig(arch="encoder-decoder", positions="relative", mlp="relu"))):
        kinds = {type(m) for m in cls(cfg).modules()}
        assert Attention in kinds


def test_bad_variant_configs(hf_variants, tmp_path):
    with pytest.raises(LmforgeError, match="feed_forward_proj='gated-swish'.*supported: relu"):
        config_from_hf({"model_type": "t5", "vocab_size": 10, "num_layers": 1, "d_model": 8,
                                  "num_heads": 2, "d_kv": 4, "d_ff": 16, "feed_forward_proj": "gated-swish"})
    with pytest.raises(LmforgeError, match="mlp='swish'; allowed"):
        ModelConfig(mlp="swish")
    bert = _ours(hf_variants["bert"][1])
    with pytest.raises(LmforgeError, match="encoder-only model cannot generate"):
        next(generate_tokens(bert, [[1, 2, 3]], 4))


# ---- the real MiniLM encoder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return lmforge.load("all-minilm-l6-v2")


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "A monkey is playing drums.", "Quantum chromodynamics describes the strong interaction."]


@pytest.mark.real
def test_minilm_embeddings_equal_transformers_mean_pooling(minilm):
    import transformers as t

    from lmforge.checkpoints.resolve import resolve

    path = resolve("all-minilm-l6-v2").path
    tok, model = t.AutoTokenizer.from_pretrained(path), t.AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(minilm.embed(SENTENCES), expected, atol=1e-5, rtol=0)


@pytest.mark.real
def test_minilm_similarities(minilm):
    assert minilm.similarity(SENTENCES[0], SENTENCES[1]) > 0.7
    assert minilm.similarity(SENTENCES[0], SENTENCES[4]) < 0.2
    assert minilm.similarity(SENTENCES[0], SENTENCES[3]) < 0.2


@pytest.mark.real
def test_long_texts_truncate_with_warning_or_error(minilm, capsys):
    long = "word " * 1000
    vec = minilm.embed([long, "short"])
    assert vec.shape == (2, 384) and "truncated" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="more than the encoder's 512 positions"):
        minilm.embed([long], truncate=False)


@pytest.mark.real
def test_embed_cli(tmp_path, capsys):
    assert main(["embed", SENTENCES[0], SENTENCES[1], "--similarity"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and float(out[0].split("\t")[0]) > 0.7
    (tmp_path / "texts.txt").write_text("\n".join(SENTENCES) + "\n")
    assert main(["embed", "-f", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "v.npy")]) == 0
    vecs = np.load(tmp_path / "v.npy")
    assert vecs.shape == (5, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert main(["embed", "hello", "world", "-o", str(tmp_path / "v.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["hello", "world"] and len(rows[0]["embedding"]) == 384
    capsys.readouterr()
    assert main(["embed", "a", "b", "c", "--similarity"]) == 2
    assert "in pairs, but 3 texts" in capsys.readouterr().err
    assert main(["embed", "x", "-o", str(tmp_path / "v.csv")]) == 2
    assert main(["embed", "word " * 1000, "--no-truncate"]) == 2
    assert "512 positions" in capsys.readouterr().err
    assert main(["generate", "hi", "-m", "all-minilm-l6-v2"]) == 2
    assert "encoder-only model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 v1.1 with a trained Unigram tokenizer (T5's tokenizer.json model), saved as HF."""
    import tokenizers
    import transformers as t
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(["translate English to German: the house is wonderful",
                                 "summarize: the cat sat on the mat and looked at the dog"] * 30, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tok = Tokenizer(backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = _t5_config(t, "gated-gelu")
    cfg.vocab_size = tok.vocab_size
    model = randomize_(t.T5ForConditionalGeneration(cfg).eval(), seed=3)
    path = tmp_path_factory.mktemp("t5-tok")
    model.save_pretrained(path)
    tok.save(path)
    return model, path


def test_seq2seq_through_the_api_and_cli(t5_dir, capsys):
    hf, path = t5_dir
    lm = lmforge.load(path)
    ids = lm.encode("summarize: the cat sat")
    assert ids[-1] == 1  # T5's tokenizer appends </s>
    text = lm.generate("summarize: the cat sat", max_new_tokens=8)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, use_cache=False)[0, 1:]
    assert text == lm.tokenizer.decode([i for i in out.tolist() if i != 1])
    assert main(["generate", "summarize: the cat sat", "-m", str(path), "-n", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    assert main(["generate", "summarize: the cat sat", "-m", str(path), "-n", "8", "--stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"].startswith("encoder-decoder") and info["decoder_layers"] == 3


def test_info_for_an_encoder(hf_variants, capsys):
    assert main(["info", str(hf_variants["bert-classifier"][1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"].startswith("encoder-only") and info["labels"] == ["hate", "offensive", "neither"]
    assert info["kv_cache_mb_per_1k_tokens_bf16"] is None
