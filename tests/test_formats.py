"""Formats other tools load (issue 15): pairwise reward models as ``...ForSequenceClassification`` (transformers),
classifier reward models, adapters with ``base_model_name_or_path`` (``peft.AutoPeftModelForCausalLM``),
``lmforge export --format hf``, and the permissions of written files."""

import json
import os
import stat

import pytest
import torch

from lmforge.alignment.reward import (
    HEAD,
    ClassifierReward,
    PairwiseReward,
    load_reward_model,
    save_reward_model,
)
from lmforge.cli import main
from lmforge.config import preset
from lmforge.errors import LmforgeError
from test_reward import _toy_pairs, tiny_decoder, tiny_encoder, train_pairwise  # noqa: F401 (fixtures)

TEXTS = ["human you are so kind assistant thanks friend", "human the ugly idiot assistant rude",
         "human today assistant", "human you are very really nice assistant great lovely friend thanks"]


def hf_scores(path, texts, ids_of) -> list[float]:
    """transformers' AutoModelForSequenceClassification on ``path``: one score per text, a right-padded batch."""
    import transformers

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    rows = [ids_of(t) for t in texts]
    width = max(map(len, rows))
    pad = model.config.pad_token_id
    idx = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model.eval()(input_ids=idx, attention_mask=mask).logits.squeeze(-1).tolist()


# ----------------------------------------------------------------------------- reward models
def test_trained_pairwise_reward_model_loads_in_transformers_with_the_same_scores(tiny_decoder, tmp_path):  # noqa: F811
    data = _toy_pairs(tmp_path / "pairs.jsonl")
    train_pairwise(data=data, model=tiny_decoder, out_dir=tmp_path / "rm", epochs=2, lr=3e-3, max_len=64,
                   train_layers=1, batch_size=8, precision="fp32")
    out = tmp_path / "rm"
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_cfg["id2label"] == {"0": "LABEL_0"} and hf_cfg["pad_token_id"] is not None
    assert not (out / "head").exists()
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["score.weight"].shape == (1, 32) and "lm_head.weight" not in weights
    reward = load_reward_model(out)
    ours = reward.score(TEXTS)
    theirs = hf_scores(out, TEXTS, lambda t: reward.tokenizer.encode(t))
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-5)
    assert len(set(ours)) == len(TEXTS)
    # and through the tokenizer files saved beside the weights
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [tok(t)["input_ids"] for t in TEXTS] == [reward.tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_families_save_their_sequence_classifier(family, tmp_path):
    """Qwen2ForSequenceClassification, GPT2ForSequenceClassification (its body under ``transformer.``)."""
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.heads import RewardModel
    from test_reward import FILLER, GOOD, _tokenizer

    tok = _tokenizer(GOOD + FILLER + ["ugly", "idiot", "rude"])
    name = {"qwen2": "tiny-llama", "gpt2": "tiny-gpt2"}[family]
    extra = {"family": "qwen2", "qkv_bias": True} if family == "qwen2" else {}
    config = preset(name, vocab_size=tok.vocab_size, **extra)
    rm = RewardModel(DecoderLM(config).init_weights(seed=1, std=0.2))
    reward = PairwiseReward(rm, tok, max_len=64)
    save_reward_model(reward, tmp_path / "rm")
    cls = {"qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}[family]
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == [cls]
    ours = load_reward_model(tmp_path / "rm").score(TEXTS)
    assert ours == reward.score(TEXTS)
    theirs = hf_scores(tmp_path / "rm", TEXTS, tok.encode)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-5)


def test_reward_model_of_the_earlier_layout_still_loads(tiny_decoder, tmp_path):  # noqa: F811
    """A causal-LM folder + head/score.safetensors (what lmforge wrote before) scores as it did."""
    from safetensors.torch import save_file

    from lmforge.alignment.reward import REWARD_CONFIG
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.lm import load
    from lmforge.models.heads import RewardModel

    lm = load(tiny_decoder)
    rm = RewardModel(lm.model)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    old = tmp_path / "old"
    save_hf_dir(lm.model, old, tokenizer=lm.tokenizer)
    (old / "head").mkdir()
    save_file({"score.weight": rm.score.weight.detach().contiguous()}, str(old / HEAD))
    (old / REWARD_CONFIG).write_text(json.dumps({"kind": "pairwise", "max_len": 16, "precision": "fp32"}))
    expected = PairwiseReward(rm, lm.tokenizer, max_len=16).score(TEXTS)
    assert load_reward_model(old).score(TEXTS) == expected
    save_reward_model(load_reward_model(old), old)  # rewritten in the new layout: the old head goes
    assert not (old / "head").exists()
    assert load_reward_model(old).score(TEXTS) == expected


def test_reward_model_is_not_loaded_as_a_language_model_and_a_bad_head_is_refused(tiny_decoder, tmp_path,  # noqa: F811
                                                                                    capsys):
    from safetensors.torch import load_file, save_file

    from lmforge.lm import load
    from lmforge.models.heads import RewardModel

    lm = load(tiny_decoder)
    save_reward_model(PairwiseReward(RewardModel(lm.model), lm.tokenizer, max_len=8), tmp_path / "rm")
    assert main(["generate", "-m", str(tmp_path / "rm"), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LlamaForSequenceClassification" in err and "load_reward_model" in err
    weights = load_file(str(tmp_path / "rm" / "model.safetensors"))
    weights["score.weight"] = torch.zeros(2, 32)
    save_file(weights, str(tmp_path / "rm" / "model.safetensors"))
    with pytest.raises(LmforgeError, match=r"score.weight must have shape \(1, 32\), got shape \(2, 32\)"):
        load_reward_model(tmp_path / "rm")


def test_classifier_reward_model_loads_in_transformers_with_the_same_probabilities(tiny_encoder, tmp_path):  # noqa: F811
    import transformers

    from lmforge.alignment.reward_classifier import build_classifier

    clf, tok = build_classifier(tiny_encoder, ["toxic", "fine"])
    torch.nn.init.normal_(clf.classifier.weight, std=1.0)
    reward = ClassifierReward(clf, tok, [1])
    save_reward_model(reward, tmp_path / "clf")
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf",
                                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.id2label == {0: "toxic", 1: "fine"}
    texts = ["you are so kind", "the human is rude today"]
    ours = load_reward_model(tmp_path / "clf").probs(texts)
    with torch.no_grad():
        theirs = torch.cat([model.eval()(input_ids=torch.tensor([tok.encode(t)])).logits.softmax(-1) for t in texts])
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_finetuned_adapter_opens_with_auto_peft_model_and_gives_the_same_logits(tiny_lm_dirs, tmp_path, monkeypatch,
                                                                               method):
    """`lmforge finetune --method lora|prompt-tuning` records its base (a local folder: its absolute path), so
    ``peft.AutoPeftModelForCausalLM`` loads base + adapter offline from the adapter folder alone."""
    import peft

    import lmforge

    base = tiny_lm_dirs["plain"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} {b}", "answer": f"{b} {a}"}) + "\n"
                            for a in ("one", "two", "fox") for b in ("dog", "lazy", "quick")), encoding="utf-8")
    monkeypatch.chdir(base.parent)  # the base given as a relative path is recorded absolute
    args = ["finetune", "-m", base.name, "--train", str(data), "--method", method, "--steps", "3", "--batch-size",
            "4", "--max-len", "32", "--lr", "5e-2", "--prompt-template", "{text} ->", "--response-field", "answer",
            "-o", str(tmp_path / "run")]
    if method == "lora":
        args += ["--lora-r", "4", "--lora-dropout", "0"]
    else:
        args += ["--virtual-tokens", "3"]
    assert main(args) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    monkeypatch.chdir(tmp_path)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(final).eval()
    ours = lmforge.load(base, adapter=final).model
    plain = lmforge.load(base).model
    x = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        if method == "prompt-tuning":
            expected = expected[:, 3:]  # peft returns the virtual positions too
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
        assert (ours(x) - plain(x)).abs().max() > 1e-3  # the adapter really changes the model


def test_base_model_reference():
    from lmforge.peft.adapters import base_model_reference

    assert base_model_reference(None) == "smollm2-135m-instruct"
    assert base_model_reference("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert base_model_reference("org/some-model") == "org/some-model"
    assert base_model_reference(".") == os.getcwd()


# ----------------------------------------------------------------------------- lmforge export
def hf_logits(path, x: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def test_export_hf_merges_an_adapter_and_loads_in_transformers(tiny_lm_dirs, tmp_path, capsys):
    import lmforge
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora, lora_layers

    base = tiny_lm_dirs["chat"]
    lm = lmforge.load(base)
    add_lora(lm.model, LoraSpec(r=2, alpha=4, targets=["q_proj", "down_proj"]))
    for _, layer in lora_layers(lm.model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    save_adapter(lm.model, tmp_path / "ad")
    assert main(["export", str(base), "--adapter", str(tmp_path / "ad"), "--format", "hf", "-o",
                 str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    x = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = lm.model(x)
    torch.testing.assert_close(hf_logits(out, x), expected, rtol=0, atol=1e-5)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # an earlier export is replaced only with --force
    capsys.readouterr()
    assert main(["export", str(base), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(base), "-o", str(out), "--force"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, x), lmforge.load(base).model(x), rtol=0, atol=1e-5)


def test_export_hf_of_an_encoder_loads_in_transformers(tiny_encoder, tmp_path):  # noqa: F811
    import transformers

    import lmforge

    assert main(["export", str(tiny_encoder), "-o", str(tmp_path / "enc")]) == 0
    model = transformers.AutoModel.from_pretrained(tmp_path / "enc").eval()
    x = torch.randint(2, 20, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, lmforge.load(tiny_encoder).model(x),
                                   rtol=0, atol=1e-5)


def test_export_refuses_bad_input(tiny_lm_dirs, tmp_path, capsys):
    from lmforge.cli.export import FORMATS, export
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.prompt_tuning import PromptTunedLM

    base = tiny_lm_dirs["plain"]
    assert main(["export", str(base), "--format", "onnx", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'onnx'" in err and "hf" in err
    with pytest.raises(LmforgeError, match=r"--format 'onnx' .* allowed: " + ", ".join(FORMATS)):
        export(base, "onnx", tmp_path / "x")
    (tmp_path / "file").write_text("mine")
    assert main(["export", str(base), "-o", str(tmp_path / "file")]) == 2
    assert "error:" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    assert main(["export", str(base), "-o", str(base / "inside")]) == 2  # never into its input
    assert "destroy its input" in capsys.readouterr().err
    import lmforge

    save_adapter(PromptTunedLM(lmforge.load(base).model, 2), tmp_path / "pt")
    assert main(["export", str(base), "--adapter", str(tmp_path / "pt"), "-o", str(tmp_path / "o")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.real
def test_export_the_embedded_gguf_model_to_hf(real_lm, tmp_path):
    """The embedded SmolLM2-135M (Q4_1 GGUF, dequantised) as an HF folder: transformers gives lmforge's logits and
    renders the same chat prompt."""
    import transformers

    assert main(["export", "-o", str(tmp_path / "smollm2")]) == 0
    out = tmp_path / "smollm2"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    x = torch.tensor([real_lm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        expected = real_lm.model(x)
    torch.testing.assert_close(hf_logits(out, x), expected, rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == \
        real_lm.encode(messages)


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_models_adapters_and_reward_models_are_readable_by_others(tiny_decoder, tmp_path, umask):  # noqa: F811
    """Every file written is 0o666 less the umask (0644 under the usual 022), not tempfile's private 0600."""
    import lmforge
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.models.heads import RewardModel
    from lmforge.peft.adapters import save_adapter
    from lmforge.peft.lora import LoraSpec, add_lora

    old = os.umask(umask)
    try:
        lm = lmforge.load(tiny_decoder)
        save_hf_dir(lm.model, tmp_path / "model", tokenizer=lm.tokenizer)
        save_reward_model(PairwiseReward(RewardModel(lm.model), lm.tokenizer, max_len=8), tmp_path / "rm")
        add_lora(lm.model, LoraSpec(r=2, alpha=4, targets=["q_proj"]))
        save_adapter(lm.model, tmp_path / "adapter")
        assert main(["export", str(tiny_decoder), "-o", str(tmp_path / "export")]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lmforge.lock"]
    assert {p.name for p in files} >= {"model.safetensors", "adapter_model.safetensors", "adapter_config.json",
                                       "tokenizer.json", "reward_config.json", "config.json"}
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
