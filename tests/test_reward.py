"""Reward models: classification metrics by hand and against scikit-learn, a tiny classifier and a
tiny pairwise model that learn toy tasks, save/load round trips, the CLI, and bad input."""

import json
import random

import pytest
import torch

from lmforge.alignment import reward_classifier, reward_pairwise
from lmforge.alignment.reward import check_tokenizer_match, load_reward_model
from lmforge.alignment.reward_recipe import RewardConfig
from lmforge.cli import main
from lmforge.config import ModelConfig, preset
from lmforge.data.reward_data import load_labelled, load_pairs, stratified_split
from lmforge.errors import LmforgeError
from lmforge.evaluation.classification import (
    accuracy,
    balanced_accuracy,
    expected_calibration_error,
    reliability_table,
    roc_auc,
)
from lmforge.evaluation.metrics import resolve_toxicity_scorer

GOOD = ["kind", "lovely", "great", "thanks", "friend", "nice"]
BAD = ["stupid", "idiot", "hate", "ugly", "dumb", "rude"]
FILLER = ["the", "you", "are", "a", "so", "very", "really", "today", "human", "assistant"]


def _recipe(kind: str, fields: dict) -> RewardConfig:
    """A ``RewardConfig`` of these fields (the fixtures' model folders are Paths; the field is a name or path)."""
    return RewardConfig(kind=kind, **{k: str(v) if k == "model" else v for k, v in fields.items()})


def train_classifier(*, resume: bool = False, **fields) -> dict:
    """The classifier recipe on a ``RewardConfig`` with these fields."""
    return reward_classifier.train_classifier(_recipe("classifier", fields), resume=resume)


def train_pairwise(*, resume: bool = False, **fields) -> dict:
    """The pairwise recipe on a ``RewardConfig`` with these fields."""
    return reward_pairwise.train_pairwise(_recipe("pairwise", fields), resume=resume)


def _tokenizer(words):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT encoder (2 layers, width 32) with a word-level tokenizer, as an HF directory."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models import init_weights
    from lmforge.models.encoder import EncoderModel

    tok = _tokenizer(GOOD + BAD + FILLER)
    config = ModelConfig(family="bert", arch="encoder", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4,
                         intermediate_size=64, max_seq_len=64, norm="layernorm", norm_eps=1e-12, mlp="gelu_exact",
                         positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False,
                         type_vocab_size=2, pooler=True, pad_token_id=0)
    model = init_weights(EncoderModel(config), std=0.02, seed=0)
    return save_hf_dir(model, tmp_path_factory.mktemp("tiny-bert"), tokenizer=tok)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A tiny random Llama decoder with the same word-level tokenizer, as an HF directory."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models.decoder import DecoderLM

    tok = _tokenizer(GOOD + BAD + FILLER)
    model = DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size, n_embd=32, intermediate_size=64)).init_weights(
        seed=0, std=0.1)
    return save_hf_dir(model, tmp_path_factory.mktemp("tiny-llama"), tokenizer=tok)


def _sentence(rng, words, n=5):
    return " ".join(rng.choice(FILLER) for _ in range(n)) + " " + rng.choice(words)


def _toy_csv(path, n=120, seed=0):
    """label 1 = a kind word somewhere in the text, 0 = a rude one (about 3 in 4 rude)."""
    rng = random.Random(seed)
    lines = ["id,text,label"]
    for i in range(n):
        y = int(rng.random() < 0.25)
        lines.append(f'{i},"{_sentence(rng, GOOD if y else BAD)}",{y}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _toy_pairs(path, n=80, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prefix = "human " + " ".join(rng.choice(FILLER) for _ in range(4)) + " assistant"
            f.write(json.dumps({"chosen": f"{prefix} {_sentence(rng, GOOD, 2)}",
                                "rejected": f"{prefix} {_sentence(rng, BAD, 2)}"}) + "\n")
    return path


# ----------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    y = [1, 0, 1, 1, 0]
    assert accuracy(y, [1, 0, 0, 1, 1]) == pytest.approx(3 / 5)
    assert balanced_accuracy(y, [1, 0, 0, 1, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # positives 0.9, 0.4, 0.4 vs negatives 0.4, 0.1: 0.9 wins both pairs, each positive 0.4 ties one (1/2)
    # and wins one: (2 + 1.5 + 1.5) / 6
    assert roc_auc(y, [0.9, 0.4, 0.4, 0.4, 0.1]) == pytest.approx((2 + 1.5 + 1.5) / 6)
    probs = [0.05, 0.15, 0.95, 0.85, 0.45]
    table = reliability_table(y, probs, bins=10)
    assert [(r["lo"], r["count"], r["frequency"]) for r in table] == [(0.0, 1, 1.0), (0.1, 1, 0.0), (0.4, 1, 0.0),
                                                                      (0.8, 1, 1.0), (0.9, 1, 1.0)]
    # one example per bin, so the gaps are |y - p|: 0.95, 0.15, 0.05, 0.15, 0.45 -> mean 0.35
    assert expected_calibration_error(y, probs) == pytest.approx(0.35)
    # two in one bin: frequency 1/2, mean probability 0.65 -> gap 0.15
    assert expected_calibration_error([1, 0], [0.61, 0.69]) == pytest.approx(0.15)
    assert expected_calibration_error([1, 0], [0.5, 0.5], bins=1) == pytest.approx(0.0)
    with pytest.raises(LmforgeError, match="both positive and negative"):
        roc_auc([1, 1], [0.2, 0.3])


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    from sklearn.calibration import calibration_curve

    rng = random.Random(3)
    y = [int(rng.random() < 0.3) for _ in range(400)]
    p = [min(max(0.3 * t + rng.random() * 0.7, 0.0), 1.0) for t in y]
    p[:20] = [0.5] * 20  # ties
    assert roc_auc(y, p) == pytest.approx(metrics.roc_auc_score(y, p))
    y3 = [rng.randrange(3) for _ in range(200)]
    pred = [t if rng.random() < 0.6 else rng.randrange(3) for t in y3]
    assert balanced_accuracy(y3, pred) == pytest.approx(metrics.balanced_accuracy_score(y3, pred))
    true_freq, mean_prob = calibration_curve(y, p, n_bins=10, strategy="uniform")
    table = reliability_table(y, p, 10)
    assert [r["frequency"] for r in table] == pytest.approx(list(true_freq))
    assert [r["mean_prob"] for r in table] == pytest.approx(list(mean_prob))


def test_stratified_split_is_seeded_and_keeps_class_shares():
    labels = [0] * 80 + [1] * 20
    train, held = stratified_split(labels, 0.25, seed=1)
    assert stratified_split(labels, 0.25, seed=1) == (train, held)
    assert stratified_split(labels, 0.25, seed=2) != (train, held)
    assert sorted(train + held) == list(range(100))
    assert sum(labels[i] for i in held) == 5 and len(held) == 25


# ----------------------------------------------------------------------------- classifier
def test_tiny_classifier_learns_and_round_trips(tiny_encoder, tmp_path):
    data = _toy_csv(tmp_path / "toy.csv")
    out = tmp_path / "rm"
    kwargs = dict(data=data, model=tiny_encoder, text_field="text", label_field="label",
                  label_map="0=toxic,1=fine", good_labels=["fine"], eval_fraction=0.25, batch_size=8,
                  lr=3e-3, max_len=16, precision="fp32")
    untrained = train_classifier(out_dir=tmp_path / "untrained", epochs=1, **{**kwargs, "lr": 1e-9})
    metrics = train_classifier(out_dir=out, epochs=10, **kwargs)
    assert metrics["balanced_accuracy"] >= 0.9 and metrics["auc"] >= 0.95, metrics
    assert metrics["balanced_accuracy"] > untrained["balanced_accuracy"] + 0.3
    reward = load_reward_model(out)
    texts = ["you are so kind", "you are so stupid", "thanks friend"]
    scores = reward.score(texts)
    assert scores[0] > 0.5 > scores[1]
    assert reward.toxicity(texts) == pytest.approx([1 - s for s in scores])
    again = load_reward_model(out)
    assert again.score(texts) == scores  # save -> load gives identical scores
    assert resolve_toxicity_scorer(f"reward:{out}")(texts) == pytest.approx(reward.toxicity(texts))
    import lmforge

    assert lmforge.load(out).config.labels == ["toxic", "fine"]  # a plain HF classifier directory too


def test_binary_merges_classes(tmp_path):
    from lmforge.data.reward_data import to_binary

    path = tmp_path / "three.csv"
    path.write_text("tweet,class\na,0\nb,1\nc,2\nd,2\n")
    data = load_labelled(path, "tweet", "class", {"0": "hate", "1": "offensive", "2": "neither"})
    assert data.names == ["hate", "offensive", "neither"] and data.labels == [0, 1, 2, 2]
    binary = to_binary(data, ["neither"])
    assert binary.names == ["toxic", "non_toxic"] and binary.labels == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- pairwise
@pytest.mark.parametrize("train_layers", [0, 1])
def test_tiny_pairwise_model_learns_to_rank(tiny_decoder, tmp_path, train_layers):
    data = _toy_pairs(tmp_path / "pairs.jsonl")
    kwargs = dict(data=data, model=tiny_decoder, eval_fraction=0.25, max_len=12, train_layers=train_layers,
                  batch_size=8, precision="fp32")
    before = train_pairwise(out_dir=tmp_path / "before", epochs=1, lr=1e-9, **kwargs)
    metrics = train_pairwise(out_dir=tmp_path / "rm", epochs=30 if train_layers == 0 else 6, lr=3e-2 if train_layers == 0 else 3e-3, **kwargs)
    assert metrics["accuracy"] >= 0.9 and metrics["mean_margin"] > 0, metrics
    assert metrics["accuracy"] > before["accuracy"] + 0.2
    reward = load_reward_model(tmp_path / "rm")
    held = load_pairs(data)[-20:]
    scores = reward.score([t for pair in held for t in pair])
    assert reward.score([t for pair in held for t in pair]) == scores
    # the saved model, scored end to end, agrees with the metrics of the cached training path
    from lmforge.data.reward_data import random_split

    _, held_idx = random_split(80, 0.25, 0)
    pairs = load_pairs(data)
    s = reward.score([t for i in held_idx for t in pairs[i]])
    assert sum(c > r for c, r in zip(s[0::2], s[1::2])) / len(held_idx) == pytest.approx(metrics["accuracy"])


def test_save_load_round_trip_gives_identical_scores(tiny_encoder, tiny_decoder, tmp_path):
    from lmforge.alignment.reward import ClassifierReward, PairwiseReward, save_reward_model
    from lmforge.alignment.reward_classifier import build_classifier
    from lmforge.lm import load
    from lmforge.models.heads import RewardModel

    texts = ["you are so kind", "the human is rude today", "thanks"]
    clf, tok = build_classifier(tiny_encoder, ["toxic", "fine"])
    classifier = ClassifierReward(clf, tok, [1])
    save_reward_model(classifier, tmp_path / "clf")
    assert load_reward_model(tmp_path / "clf").score(texts) == classifier.score(texts)
    lm = load(tiny_decoder)
    pairwise = PairwiseReward(RewardModel(lm.model), lm.tokenizer, max_len=4)
    save_reward_model(pairwise, tmp_path / "pw")
    save_reward_model(pairwise, tmp_path / "pw")  # replacing an existing model leaves no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "pw"]
    loaded = load_reward_model(tmp_path / "pw")
    assert loaded.score(texts) == pairwise.score(texts)
    assert len(set(loaded.score(texts))) == 3


# ----------------------------------------------------------------------------- CLI
def test_cli_train_and_eval(tiny_encoder, tmp_path, capsys):
    data = _toy_csv(tmp_path / "toy.csv")
    out = tmp_path / "rm"
    code = main(["reward", "train", str(data), "-o", str(out), "--model", str(tiny_encoder), "--text-field", "text",
                 "--label-field", "label", "--label-map", "0=toxic,1=fine", "--good-labels", "fine", "--epochs", "10",
                 "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--metrics-out",
                 str(tmp_path / "m.json")])
    assert code == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["accuracy"] >= 0.9 and "reliability" in json.loads((tmp_path / "m.json").read_text())
    assert (out / "reward_config.json").is_file() and not list(tmp_path.glob(".rm.tmp-*"))
    assert main(["reward", "eval", str(out), str(data)]) == 0  # fields and label map as trained
    evaluated = json.loads(capsys.readouterr().out.strip())
    assert evaluated["n"] == 120 and evaluated["accuracy"] >= 0.9


def test_cli_pairwise_train_and_eval(tiny_decoder, tmp_path, capsys):
    data = _toy_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "pw"
    assert main(["reward", "train", str(data), "--kind", "pairwise", "-o", str(out), "--model", str(tiny_decoder),
                 "--max-len", "12", "--epochs", "30", "--batch-size", "8", "--lr", "3e-2", "--eval-fraction", "0.25",
                 "--precision", "fp32"]) == 0
    trained = json.loads(capsys.readouterr().out.strip())
    assert trained["accuracy"] >= 0.9 and trained["train_layers"] == 0
    assert main(["reward", "eval", str(out), str(data), "--max-eval", "40"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip())
    assert evaluated["n"] == 40 and evaluated["accuracy"] >= 0.9 and evaluated["mean_margin"] > 0


# ----------------------------------------------------------------------------- bad input
def test_preference_file_without_rejected(tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "c"}\n')
    with pytest.raises(LmforgeError, match=r"prefs.jsonl, line 2: no field 'rejected' \(--rejected-field\)"):
        load_pairs(path)
    assert main(["reward", "train", str(path), "--kind", "pairwise", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and len(err.strip().splitlines()) == 1


def test_label_outside_the_allowed_set(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("tweet,class\nfine,0\nodd,3\n")
    with pytest.raises(LmforgeError, match=r"labels.csv, line 3: label '3' in field 'class' is not in the allowed set"):
        load_labelled(path, "tweet", "class", {"0": "hate", "1": "offensive", "2": "neither"})
    with pytest.raises(LmforgeError, match="label 'neither' in field 'class' is not in the allowed set"):
        load_labelled(path, "tweet", "class", {"0": "neither", "3": "neither"}, names=["hate", "offensive"])


def test_csv_without_the_text_column(tmp_path, tiny_encoder, capsys):
    path = tmp_path / "notext.csv"
    path.write_text("body,class\nhello,0\n")
    with pytest.raises(LmforgeError, match=r"notext.csv, line 2: no field 'tweet' \(--text-field\)"):
        load_labelled(path, "tweet", "class")
    assert main(["reward", "train", str(path), "-o", str(tmp_path / "o"), "--model", str(tiny_encoder)]) == 2
    assert "no field 'tweet'" in capsys.readouterr().err


def test_tokenizer_that_does_not_match_the_model(tiny_decoder, tmp_path):
    other = _tokenizer(list(reversed(GOOD + BAD + FILLER)))  # same size, other ids
    other.save(tmp_path / "other")
    data = _toy_pairs(tmp_path / "pairs.jsonl", n=8)
    with pytest.raises(LmforgeError, match=r"--tokenizer .* does not match the reward model's tokenizer: \d+ token"):
        train_pairwise(data=data, out_dir=tmp_path / "rm", model=tiny_decoder, tokenizer=str(tmp_path / "other"))
    bigger = _tokenizer(GOOD + BAD + FILLER + [f"w{i}" for i in range(300)])
    bigger.save(tmp_path / "bigger")
    with pytest.raises(LmforgeError, match=r"has 324 tokens, more than the reward model.s vocabulary \(24\)"):
        train_pairwise(data=data, out_dir=tmp_path / "rm", model=tiny_decoder, tokenizer=str(tmp_path / "bigger"))
    assert not (tmp_path / "rm").exists()
    same = _tokenizer(GOOD + BAD + FILLER)
    reward = train_pairwise(data=data, out_dir=tmp_path / "ok", model=tiny_decoder, eval_fraction=0.25,
                            train_layers=0, max_len=8, precision="fp32")
    assert reward["n"] == 2
    check_tokenizer_match(load_reward_model(tmp_path / "ok"), same)  # the same vocabulary passes


def test_pairwise_reward_model_starts_from_a_merged_adapter(tiny_decoder, tmp_path):
    """--adapter: the decoder under the head is the base with the LoRA adapter folded in."""
    import torch

    import lmforge
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora, lora_layers

    lm = lmforge.load(tiny_decoder)
    add_lora(lm.model, LoraSpec(r=2, alpha=4, targets=["q_proj"]))
    for _, layer in lora_layers(lm.model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    save_adapter(lm.model, tmp_path / "ad")
    layer = dict(lora_layers(lm.model))["model.layers.0.self_attn.q_proj"]
    expected = layer.base.weight + layer.delta_weight()
    data = _toy_pairs(tmp_path / "pairs.jsonl")
    train_pairwise(data=data, model=tiny_decoder, adapter=tmp_path / "ad", out_dir=tmp_path / "rm", epochs=1,
                   lr=1e-12, max_len=12, batch_size=8, precision="fp32")
    saved = load_reward_model(tmp_path / "rm").model.decoder.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(saved, expected.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(saved, layer.base.weight)  # the adapter really changed the weights
    code = main(["reward", "train", str(data), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "c")])
    assert code == 2


# ----------------------------------------------------------------------------- nothing non-finite is saved
@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_cli_reward_train_refuses_non_finite_hyper_parameters(tiny_decoder, tmp_path, capsys, flag):
    """With one optimiser step a NaN --lr / --weight-decay used to save an all-NaN head and exit 0."""
    data = _toy_pairs(tmp_path / "pairs.jsonl", n=20)
    out = tmp_path / "rm"
    code = main(["reward", "train", str(data), "--kind", "pairwise", "-o", str(out), "--model", str(tiny_decoder),
                 "--max-len", "12", "--epochs", "1", "--batch-size", "64", "--precision", "fp32", flag, "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and f"({flag}): must be a finite number" in err[-1], err
    assert not out.exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "warmup"])
def test_reward_fit_refuses_non_finite_values(tiny_decoder, tmp_path, field):
    """The same through the Python API."""
    kwargs = dict(lr=1e-3, weight_decay=0.01, warmup=0.1)
    with pytest.raises(LmforgeError, match=rf"\(--{field.replace('_', '-')}\): must be a finite number, got nan"):
        train_pairwise(data=_toy_pairs(tmp_path / "pairs.jsonl", n=20), out_dir=tmp_path / "rm", model=tiny_decoder,
                       max_len=12, precision="fp32", **{**kwargs, field: float("nan")})
    assert not (tmp_path / "rm").exists()


def test_reward_train_stops_on_a_nan_loss(tiny_decoder, tmp_path, monkeypatch):
    from lmforge.alignment import reward_pairwise

    real = reward_pairwise.bradley_terry_loss
    monkeypatch.setattr(reward_pairwise, "bradley_terry_loss", lambda c, r: real(c, r) * float("nan"))
    with pytest.raises(LmforgeError, match="the loss became nan at step 1"):
        train_pairwise(data=_toy_pairs(tmp_path / "pairs.jsonl", n=20), out_dir=tmp_path / "rm", model=tiny_decoder,
                       max_len=12, batch_size=8, precision="fp32")
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"config.yaml", ".lmforge-run.json"}  # no model, no log


def test_reward_train_stops_on_a_nan_gradient(tiny_decoder, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient on the only step used to save an all-NaN head (no later loss to
    notice it); now the step stops before the update and nothing is saved."""
    from lmforge.alignment import reward_pairwise

    real = reward_pairwise.bradley_terry_loss
    monkeypatch.setattr(reward_pairwise, "bradley_terry_loss",
                        lambda c, r: real(c, r) + 0.0 * torch.sqrt(c.sum() * 0.0 - 0.0))  # grad: nan
    with pytest.raises(LmforgeError, match="gradient norm became nan at step 1"):
        train_pairwise(data=_toy_pairs(tmp_path / "pairs.jsonl", n=20), out_dir=tmp_path / "rm", model=tiny_decoder,
                       max_len=12, batch_size=64, precision="fp32")
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"config.yaml", ".lmforge-run.json"}  # no model, no log
