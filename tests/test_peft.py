"""LoRA, quantised-base LoRA and prompt tuning: interop with peft both ways, merging, bad input."""

import peft  # noqa: E402  (a dev requirement: a missing install fails, never skips)
import pytest
import torch
from tests.conftest import randomize_

from lmforge.checkpoints.hf import read_hf_dir
from lmforge.checkpoints.resolve import build_model
from lmforge.errors import LmforgeError
from lmforge.models.quantized import model_bytes, quantize_linears
from lmforge.peft.adapters import load_adapter, save_adapter
from lmforge.peft.lora import LoraSpec, add_lora, lora_layers, merge_lora, set_lora_enabled, trainable_report
from lmforge.peft.prompt_tuning import PromptTunedLM


@pytest.fixture(scope="module")
def t5_tiny(tmp_path_factory):
    import transformers as t

    cfg = t.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, decoder_start_token_id=0)
    model = randomize_(t.T5ForConditionalGeneration(cfg).eval(), seed=4)
    path = tmp_path_factory.mktemp("t5-peft")
    model.save_pretrained(path)
    return model, path


def _ours(path):
    config, state, _ = read_hf_dir(path)
    return build_model(config, state)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def _logits(model, kind, ours):
    x = torch.randint(1, 120, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        if kind == "t5":
            y = torch.randint(1, 120, (2, 6), generator=torch.Generator().manual_seed(8))
            return model(x, y) if ours else model(input_ids=x, decoder_input_ids=y).logits
        return model(x) if ours else model(x).logits


CASES = [("llama", ["q_proj", "v_proj"], ["q_proj", "v_proj"]), ("gpt2", "all-linear", ["c_attn", "c_proj", "c_fc"]),
         ("t5", ["q_proj", "v_proj", "down_proj"], ["q", "v", "wo"])]


def _hf_and_dir(name, hf_tiny, t5_tiny):
    return t5_tiny if name == "t5" else hf_tiny[name]


@pytest.mark.parametrize("name,ours_targets,_", CASES)
def test_our_adapter_loads_in_peft(hf_tiny, t5_tiny, tmp_path, name, ours_targets, _):
    hf, path = _hf_and_dir(name, hf_tiny, t5_tiny)
    kind = "t5" if name == "t5" else "lm"
    ours = _ours(path)
    add_lora(ours, LoraSpec(r=4, alpha=8, targets=ours_targets, rslora=name == "gpt2"))
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    expected = _logits(theirs, kind, False)
    torch.testing.assert_close(_logits(ours, kind, True), expected, atol=1e-5, rtol=0)
    assert (expected - _logits(hf.__class__.from_pretrained(path).eval(), kind, False)).abs().max() > 1e-3
    theirs.unload()


@pytest.mark.parametrize("name,_,hf_targets", CASES)
def test_peft_adapter_loads_in_lmforge(hf_tiny, t5_tiny, tmp_path, name, _, hf_targets):
    import transformers as t

    hf_path = _hf_and_dir(name, hf_tiny, t5_tiny)[1]
    kind = "t5" if name == "t5" else "lm"
    base = (t.T5ForConditionalGeneration if name == "t5" else t.AutoModelForCausalLM).from_pretrained(hf_path)
    lcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=hf_targets, init_lora_weights=False,
                           fan_in_fan_out=name == "gpt2")
    theirs = peft.get_peft_model(base.eval(), lcfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(_ours(hf_path), tmp_path / "adapter")
    torch.testing.assert_close(_logits(ours, kind, True), _logits(theirs, kind, False), atol=1e-5, rtol=0)


def test_merge_equals_base_plus_adapter_and_disable_gives_base(hf_tiny):
    _, path = hf_tiny["llama"]
    base = _logits(_ours(path), "lm", True)
    model = _ours(path)
    add_lora(model, LoraSpec(r=8, alpha=16, targets="all-linear"))
    _randomize_lora(model, seed=3)
    adapted = _logits(model, "lm", True)
    set_lora_enabled(model, False)
    torch.testing.assert_close(_logits(model, "lm", True), base, atol=0, rtol=0)
    set_lora_enabled(model, True)
    merged = merge_lora(model)
    assert not list(lora_layers(merged))
    torch.testing.assert_close(_logits(merged, "lm", True), adapted, atol=1e-4, rtol=0)  # fp32 summation order


def test_prompt_tuning_interop_both_ways(hf_tiny, tmp_path):
    import transformers as t

    hf, path = hf_tiny["llama"]
    ours = PromptTunedLM(_ours(path), 5)
    with torch.no_grad():
        ours.prompt_embeddings.normal_(0, 0.5)
    save_adapter(ours, tmp_path / "pt")
    theirs = peft.PeftModel.from_pretrained(t.AutoModelForCausalLM.from_pretrained(path).eval(), tmp_path / "pt")
    x = torch.randint(1, 256, (2, 12))
    with torch.no_grad():
        expected = theirs(input_ids=x).logits[:, 5:]  # peft returns the virtual positions too
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    made = peft.get_peft_model(t.AutoModelForCausalLM.from_pretrained(path).eval(), pcfg)
    made.save_pretrained(tmp_path / "pt2")
    loaded = load_adapter(_ours(path), tmp_path / "pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), made(input_ids=x).logits[:, 3:], atol=1e-5, rtol=0)


def test_prompt_tuned_generation_cached_equals_uncached(hf_tiny):
    from lmforge.generation.generate import generate_tokens

    model = PromptTunedLM(_ours(hf_tiny["llama"][1]), 4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    runs = [[s for s in generate_tokens(model, prompts, 10, use_cache=c)] for c in (True, False)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantised_base_lora_learns_and_saves_memory(hf_tiny, scheme):
    _, path = hf_tiny["llama"]
    full = _ours(path)
    model = quantize_linears(_ours(path), scheme)
    assert model_bytes(model) < 0.75 * model_bytes(full)
    x = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the quantised model stays close to the float one
        cos = torch.nn.functional.cosine_similarity(model(x).flatten(), full(x).flatten(), dim=0)
    assert cos > (0.999 if scheme == "int8" else 0.85), float(cos)  # 4 bits on a tiny random net: ~0.9
    add_lora(model, LoraSpec(r=8, alpha=16, targets="all-linear"))
    assert "trainable" in trainable_report(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_trainable_report_counts():
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(preset("tiny-llama"))
    add_lora(model, LoraSpec(r=4, targets=["q_proj"]))
    # q_proj is 64 -> 64 in two layers: (64*4 + 4*64) * 2 = 1024 adapter weights
    assert trainable_report(model).startswith("1,024 of 107,840 parameters trainable (0.95%)")


def test_bad_input(hf_tiny, tmp_path):
    _, path = hf_tiny["llama"]
    with pytest.raises(LmforgeError, match=r"match no linear layer; available names: down_proj, gate_proj, k_proj"):
        add_lora(_ours(path), LoraSpec(targets=["query", "value"]))
    for bad in (0, -2, 1.5):
        with pytest.raises(LmforgeError, match="rank r must be a positive integer"):
            LoraSpec(r=bad)
    other = _ours(hf_tiny["qwen2"][1])  # same names, but a model with other shapes
    small = build_model(*read_hf_dir(path)[:2])
    add_lora(small, LoraSpec(r=4, targets=["q_proj"]))
    save_adapter(small, tmp_path / "a")
    import json

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"] and cfg["peft_type"] == "LORA"
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    wide = DecoderLM(preset("tiny-llama", n_embd=96, n_head=4, n_kv_head=2))
    with pytest.raises(LmforgeError, match=r"model.layers.0.self_attn.q_proj.lora_A.weight has shape \(4, 64\), "
                                           r"but this base model needs \(4, 96\)"):
        load_adapter(wide, tmp_path / "a")
    with pytest.raises(LmforgeError, match="not an adapter folder"):
        load_adapter(other, tmp_path)


def test_adapter_flag_and_merge_command(tiny_lm_dirs, tmp_path, capsys):
    import lmforge
    from lmforge.cli import main

    base_dir = tiny_lm_dirs["chat"]
    lm = lmforge.load(base_dir)
    add_lora(lm.model, LoraSpec(r=4, alpha=8, targets="all-linear"))
    _randomize_lora(lm.model, seed=5)
    save_adapter(lm.model, tmp_path / "lora")
    pt_dir = tmp_path / "pt"
    save_adapter(PromptTunedLM(lmforge.load(base_dir).model, 3), pt_dir)

    args = ["generate", "hello there", "-m", str(base_dir), "-n", "10"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--adapter", str(tmp_path / "lora")]) == 0
    adapted = capsys.readouterr().out
    assert adapted != plain
    assert adapted.rstrip("\n") == lmforge.load(base_dir, adapter=tmp_path / "lora").generate("hello there",
                                                                                              max_new_tokens=10)
    assert main(["merge", str(tmp_path / "lora"), "-m", str(base_dir), "-o", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["generate", "hello there", "-m", str(tmp_path / "merged"), "-n", "10"]) == 0
    assert capsys.readouterr().out == adapted
    assert main(["merge", str(tmp_path / "lora"), "-m", str(base_dir), "-o", str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(pt_dir), "-m", str(base_dir), "-o", str(tmp_path / "m2")]) == 2
    assert "only LoRA adapters can be merged" in capsys.readouterr().err
    assert main([*args, "--adapter", str(pt_dir)]) == 0  # a soft prompt generates too
    capsys.readouterr()
    assert main([*args, "--adapter", str(tmp_path)]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
