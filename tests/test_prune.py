"""`lmforge prune`: layer dropping by block influence and MLP-width shrinking give smaller models that transformers
loads with lmforge's logits; magnitude and 2:4 pruning zero the right weights and a healing fine-tune keeps them
zero; bad input is one error line and nothing written."""

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import randomize_
from tests.test_cli import assert_one_line_error, run

import lmforge
from lmforge.checkpoints.hf import save_hf_dir
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.prune import (
    METHODS,
    block_influence,
    calibration_ids,
    is_two_four,
    prune,
    read_masks,
)

CALIBRATION = ("The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. "
               "one two three four five six seven. Input: sea otter\nOutput: loutre de mer\n") * 6


@pytest.fixture(scope="module")
def deep_dirs(tiny_lm_dirs, tmp_path_factory):
    """{"llama", "gpt2", "qwen2": 4-layer tiny models of these families} with random weights, as HF folders, and
    the calibration text file."""
    root = tmp_path_factory.mktemp("prune")
    tok = Tokenizer.from_dir(tiny_lm_dirs["plain"])
    out = {}
    for i, name in enumerate(("llama", "gpt2", "qwen2")):
        extra = {"family": "qwen2", "qkv_bias": True} if name == "qwen2" else {}
        config = preset(f"tiny-{'gpt2' if name == 'gpt2' else 'llama'}", n_layer=4, vocab_size=tok.vocab_size,
                        max_seq_len=128, eos_token_id=tok.eos_id, **extra)
        model = randomize_(DecoderLM(config), seed=i, std=0.1)
        out[name] = save_hf_dir(model, root / name, tokenizer=tok)
    (root / "calib.txt").write_text(CALIBRATION)
    out["calibration"] = root / "calib.txt"
    return out


def hf_and_lmforge_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(ids).logits, lmforge.load(folder).model(ids)


def test_cli_methods_match_the_library():
    from lmforge.cli.prune import METHODS as CLI_METHODS

    assert CLI_METHODS == METHODS


def test_block_influence_matches_transformers_hidden_states(deep_dirs, tiny_lm_dirs):
    """BI of each block (but the last, whose output HF returns after the final norm) from HF's hidden states."""
    import transformers

    lm = lmforge.load(deep_dirs["llama"])
    ids = calibration_ids(CALIBRATION, lm.tokenizer, 64, 2)
    ours = block_influence(lm.model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(deep_dirs["llama"]).eval()
    with torch.no_grad():
        hs = [hf(row[None], output_hidden_states=True).hidden_states for row in ids]
    for i in range(3):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).flatten() for h in hs])
        assert ours[i] == pytest.approx(1 - float(cos.mean()), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_layers_gives_a_model_transformers_loads_with_lmforges_logits(deep_dirs, tmp_path, family):
    out = tmp_path / "pruned"
    record = prune(deep_dirs[family], out, "layers", keep_layers=2, calibration=deep_dirs["calibration"],
                   seq_len=32, samples=4)
    bi = record["block_influence"]
    assert record["kept_layers"] == sorted(sorted(range(4), key=lambda i: -bi[i])[:2])  # the 2 of highest BI
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers" if family == "llama" else "n_layer"] == 2
    before, after = lmforge.load(deep_dirs[family]).model, lmforge.load(out).model
    for new, old in enumerate(record["kept_layers"]):  # the kept blocks, renumbered, with their own weights
        for (_, a), (_, b) in zip(after.model.layers[new].state_dict().items(),
                                  before.model.layers[old].state_dict().items()):
            assert torch.equal(a, b)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    theirs, ours = hf_and_lmforge_logits(out, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "prune.json").read_text())["n_layer"] == [4, 2]
    assert not (out / "masks.safetensors").exists()


def test_prune_layers_by_sparsity_rounds_the_kept_count(deep_dirs, tmp_path):
    record = prune(deep_dirs["llama"], tmp_path / "p", "layers", sparsity=0.25,
                   calibration=deep_dirs["calibration"], seq_len=32, samples=2)
    assert record["n_layer"] == [4, 3] and len(record["kept_layers"]) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_width_keeps_the_highest_wanda_channels_and_transformers_loads_it(deep_dirs, tmp_path, family):
    import transformers

    out = tmp_path / "narrow"
    size = 128 if family == "llama" else 256
    record = prune(deep_dirs[family], out, "width", sparsity=0.5, calibration=deep_dirs["calibration"],
                   seq_len=32, samples=2)
    assert record["intermediate_size"] == [size, size // 2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size" if family == "llama" else "n_inner"] == size // 2
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    theirs, ours = hf_and_lmforge_logits(out, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if family != "llama":
        return
    # the reference score, from transformers: |W_down| summed over outputs times the L2 norm of down_proj's input
    hf = transformers.AutoModelForCausalLM.from_pretrained(deep_dirs["llama"]).eval()
    tok = lmforge.load(deep_dirs["llama"]).tokenizer
    calib = calibration_ids(CALIBRATION, tok, 32, 2)
    sq = [torch.zeros(size) for _ in range(4)]

    def accumulate(module, args, i):
        sq[i].add_(args[0].reshape(-1, size).pow(2).sum(0))  # returns None: the input is left as it is

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: accumulate(m, a, i))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for row in calib:
            hf(row[None])
    for h in hooks:
        h.remove()
    narrow = lmforge.load(out).model
    for i, layer in enumerate(hf.model.layers):
        score = (layer.mlp.down_proj.weight.abs() * sq[i].sqrt()[None]).sum(0)
        keep = score.topk(size // 2).indices.sort().values
        assert torch.equal(narrow.model.layers[i].mlp.up_proj.weight, layer.mlp.up_proj.weight[keep])
        assert torch.equal(narrow.model.layers[i].mlp.down_proj.weight, layer.mlp.down_proj.weight[:, keep])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prune_heads_keeps_every_gqa_group_and_transformers_loads_it(deep_dirs, tmp_path, family):
    import transformers

    out = tmp_path / "fewer-heads"
    record = prune(deep_dirs[family], out, "width", sparsity=0.25, head_sparsity=0.5,
                   calibration=deep_dirs["calibration"], seq_len=32, samples=2)
    assert record["n_head"] == [4, 2] and record["intermediate_size"] == [128, 96]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 16)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    theirs, ours = hf_and_lmforge_logits(out, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # reference: per group of 2 query heads sharing a key/value head, the one whose o_proj columns score higher
    hf = transformers.AutoModelForCausalLM.from_pretrained(deep_dirs[family]).eval()
    calib = calibration_ids(CALIBRATION, lmforge.load(deep_dirs[family]).tokenizer, 32, 2)
    sq = [torch.zeros(64) for _ in range(4)]

    def accumulate(module, args, i):
        sq[i].add_(args[0].reshape(-1, 64).pow(2).sum(0))

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: accumulate(m, a, i))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for row in calib:
            hf(row[None])
    for h in hooks:
        h.remove()
    small = lmforge.load(out).model
    for i, layer in enumerate(hf.model.layers):
        score = (layer.self_attn.o_proj.weight.abs() * sq[i].sqrt()[None]).sum(0).view(4, 16).sum(1)  # (heads,)
        keep = [int(score[:2].argmax()), 2 + int(score[2:].argmax())]
        assert record["kept_heads"][i] == keep
        rows = torch.cat([torch.arange(h * 16, h * 16 + 16) for h in keep])
        assert torch.equal(small.model.layers[i].self_attn.q_proj.weight, layer.self_attn.q_proj.weight[rows])
        assert torch.equal(small.model.layers[i].self_attn.k_proj.weight, layer.self_attn.k_proj.weight)


def sft_rows(path: Path) -> Path:
    words = ["one", "two", "three", "fox", "dog"]
    path.write_text("".join(json.dumps({"prompt": f"Repeat: {a} {b}", "completion": f"{a} {b}"}) + "\n"
                            for a in words for b in words))
    return path


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_unstructured_masks_survive_a_healing_finetune(deep_dirs, tmp_path, method):
    from lmforge.training.sft import FinetuneConfig, finetune

    out = tmp_path / "sparse"
    kw = {"sparsity": 0.6} if method == "magnitude" else {}
    record = prune(deep_dirs["llama"], out, method, calibration=deep_dirs["calibration"], seq_len=32, samples=2,
                   **kw)
    masks = read_masks(out)
    assert len(masks) == 4 * 7 and record["masked_tensors"] == 28  # q, k, v, o, gate, up, down in 4 blocks
    pruned = dict(lmforge.load(out).model.named_parameters())
    original = dict(lmforge.load(deep_dirs["llama"]).model.named_parameters())
    for name, mask in masks.items():
        w = pruned[name]
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])) and bool((w[mask] != 0).all())
        assert torch.equal(w[mask], original[name][mask])
        if method == "2:4":
            assert is_two_four(mask)
        else:
            assert (~mask).sum(1).tolist() == [round(0.6 * mask.shape[1])] * mask.shape[0]
    assert torch.equal(pruned["lm_head.weight"], original["lm_head.weight"])  # nothing outside the blocks
    healed = tmp_path / "healed"
    finetune(FinetuneConfig(model=str(out), train=[sft_rows(tmp_path / "t.jsonl")], out_dir=healed, method="full",
                            steps=3, batch_size=4, max_len=32, lr=1e-2, log_every=1))
    after = dict(lmforge.load(healed / "final").model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], torch.zeros_like(after[name][~mask])), name  # exactly zero
        assert not torch.equal(after[name][mask], pruned[name][mask]), name  # the kept weights did train
        if method == "2:4":
            assert is_two_four(after[name] != 0)
    assert {k: torch.equal(v, masks[k]) for k, v in read_masks(healed / "final").items()} == dict.fromkeys(masks, True)


def test_finetune_without_masks_does_not_keep_zeros(deep_dirs, tmp_path):
    """The control for the test above: without masks.safetensors the same run moves the zeroed weights."""
    from lmforge.training.sft import FinetuneConfig, finetune

    out = tmp_path / "sparse"
    prune(deep_dirs["llama"], out, "2:4")
    masks = read_masks(out)
    (out / "masks.safetensors").unlink()
    finetune(FinetuneConfig(model=str(out), train=[sft_rows(tmp_path / "t.jsonl")], out_dir=tmp_path / "h",
                            method="full", steps=3, batch_size=4, max_len=32, lr=1e-2, log_every=1))
    after = dict(lmforge.load(tmp_path / "h" / "final").model.named_parameters())
    assert any(bool((after[n][~m] != 0).any()) for n, m in masks.items())


def test_masks_that_do_not_fit_the_model_are_refused_before_writing(deep_dirs, tmp_path):
    from safetensors.torch import save_file

    from lmforge.training.sft import FinetuneConfig, finetune

    out = tmp_path / "sparse"
    prune(deep_dirs["llama"], out, "2:4")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}, str(out / "masks.safetensors"))
    with pytest.raises(LmforgeError, match=r"masks.safetensors: mask 'model.layers.0.mlp.up_proj.weight' has shape"):
        finetune(FinetuneConfig(model=str(out), train=[sft_rows(tmp_path / "t.jsonl")], out_dir=tmp_path / "h",
                                method="full", steps=1, batch_size=4, max_len=32))
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "magnitude", "--sparsity", "1"], "--sparsity must be a number in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "--sparsity must be a number in [0, 1)"),
    (["--method", "width", "--sparsity", "1.5"], "--sparsity must be a number in [0, 1)"),
    (["--method", "2:4", "--sparsity", "0.3"], "2:4 removes exactly half"),
    (["--method", "layers", "--keep-layers", "5"], "--keep-layers must be an integer from 1 to the model's 4"),
    (["--method", "layers", "--keep-layers", "0"], "--keep-layers must be >= 1"),
    (["--method", "layers", "--sparsity", "0.5"], "give --calibration FILE"),
    (["--method", "magnitude"], "needs --sparsity"),
    (["--method", "width", "--sparsity", "0.5", "--calibration", "nowhere.txt"], "--calibration: corpus nowhere.txt: no such file"),
    (["--method", "prune-everything"], "invalid choice"),
    (["--method", "width", "--sparsity", "0.5", "--head-sparsity", "1"], "--head-sparsity must be a number in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--head-sparsity", "0.5"], "--head-sparsity is for --method width"),
])
def test_bad_input_is_one_line_and_writes_nothing(deep_dirs, tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", out, *args)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_heads_of_a_gpt2_model_are_refused(deep_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "prune", deep_dirs["gpt2"], "-o", tmp_path / "out", "--method", "width", "--sparsity",
                       "0", "--head-sparsity", "0.5", "--calibration", deep_dirs["calibration"])
    assert_one_line_error(code, err, "the gpt2 family's config.json derives the head size", "heads cannot be pruned")
    assert not (tmp_path / "out").exists()


def test_an_encoder_is_refused(tiny_lm_dirs, tmp_path, capsys):
    from lmforge.config import ModelConfig
    from lmforge.models.encoder import EncoderModel
    from lmforge.models.init import init_weights

    tok = Tokenizer.from_dir(tiny_lm_dirs["plain"])
    config = ModelConfig(family="bert", arch="encoder", n_layer=2, n_embd=32, n_head=2, intermediate_size=64,
                         max_seq_len=64, norm="layernorm", norm_eps=1e-12, mlp="gelu_exact", positions="learned",
                         qkv_bias=True, out_bias=True, mlp_bias=True, norm_first=False, type_vocab_size=2,
                         vocab_size=tok.vocab_size, pooler=True, pad_token_id=0)
    enc = save_hf_dir(init_weights(EncoderModel(config), seed=0), tmp_path / "enc", tokenizer=tok)
    code, _, err = run(capsys, "prune", enc, "-o", tmp_path / "out", "--method", "magnitude", "--sparsity", "0.5")
    assert_one_line_error(code, err, "is an encoder model; `lmforge prune` prunes decoder-only models")
    assert not (tmp_path / "out").exists()


def test_cli_prunes_and_reports(deep_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", out, "--method", "layers", "--keep-layers", "3",
                       "--calibration", deep_dirs["calibration"], "--seq-len", "32", "--samples", "2")
    assert code == 0 and "4 -> 3 layers" in err
    assert lmforge.load(out).model.config.n_layer == 3
    code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", out, "--method", "2:4")
    assert_one_line_error(code, err, "pass --force")
    code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", out, "--method", "2:4", "--force")
    assert code == 0 and (out / "masks.safetensors").exists()
    assert lmforge.load(out).model.config.n_layer == 4


def test_output_faults_are_one_line_and_leave_the_input_alone(deep_dirs, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", a_file, "--method", "2:4")
    assert_one_line_error(code, err, "is a file, not a folder")
    assert a_file.read_text() == "mine"
    before = {p.name: p.read_bytes() for p in Path(deep_dirs["llama"]).iterdir()}
    for out in (deep_dirs["llama"], Path(deep_dirs["llama"]) / "inside"):
        code, _, err = run(capsys, "prune", deep_dirs["llama"], "-o", out, "--method", "2:4", "--force")
        assert_one_line_error(code, err, "that `lmforge prune` reads")
    assert {p.name: p.read_bytes() for p in Path(deep_dirs["llama"]).iterdir()} == before


def test_a_lora_run_on_a_pruned_model_says_the_masks_are_not_applied(deep_dirs, tmp_path, capsys):
    from lmforge.training.sft import FinetuneConfig, finetune

    out = tmp_path / "sparse"
    prune(deep_dirs["llama"], out, "2:4")
    capsys.readouterr()
    finetune(FinetuneConfig(model=str(out), train=[sft_rows(tmp_path / "t.jsonl")], out_dir=tmp_path / "h",
                            method="lora", steps=1, batch_size=4, max_len=32))
    assert "masks.safetensors: not applied by --method lora" in capsys.readouterr().err
