"""The quantised LM head (issue 17): ``Int8Head``/``Int4Head``, the tied embedding that reads the head's rows
(``HeadEmbedding``), ``quantize_model(head=)``, ``load(quantize_head=)``, ``lmforge quantize --head`` and the saved
layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from lmforge.cli.main import main
from lmforge.errors import LmforgeError
from lmforge.models.int4 import Int4Linear
from lmforge.models.quantized import HeadEmbedding, Int4Head, Int8Head, model_bytes, quantize_head, quantize_model


@pytest.fixture(scope="module")
def tied_dir(tiny_lm_dirs, tmp_path_factory):
    """A tiny random Llama with tied embeddings (like SmolLM2), saved as an HF folder."""
    from lmforge.checkpoints.hf import read_hf_dir, save_hf_dir
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    config, _, _ = read_hf_dir(tiny_lm_dirs["plain"])
    model = DecoderLM(dataclasses.replace(config, tie_embeddings=True)).init_weights(seed=1, std=0.2)
    return save_hf_dir(model, tmp_path_factory.mktemp("tied"), tokenizer=Tokenizer.from_dir(tiny_lm_dirs["plain"]))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[1, 5, 9, 200, 3, 7, 42, 11]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_head_equals_the_dequantised_matmul(kind, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 320, bias=False)
    head = Int8Head(lin) if kind == "int8" else Int4Head.from_linear(lin, 32)
    x = torch.randn(1, 64).to(dtype)
    ref = x.double() @ head.weight.double().T  # the dequantised weight, float64
    with torch.no_grad():
        y = head(x)  # a decode row: the packed kernel, in bfloat16 whatever the input dtype
    assert y.dtype == dtype and y.shape == (1, 320)
    # stated tolerance: bfloat16 rounding of the input and of the kernel's output, 1% of the largest logit
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    ids = torch.tensor([0, 7, 319, 7])
    assert torch.equal(head.rows(ids), head.weight[ids])  # the rows a tied embedding reads: exactly the weight's


def test_an_int8_heads_kernel_scale_is_kept_and_dropped_when_the_scale_changes():
    """A float32 model's int8 head decodes in bfloat16: the kernel reads the scale converted once (a conversion inside
    a compiled step fails in inductor's C++ wrapper), and a new scale (load_state_dict, .to()) drops the copy."""
    torch.manual_seed(0)
    head = Int8Head(nn.Linear(64, 320, bias=False))
    assert head.scale.dtype == torch.float32 and head.kernel_scale(torch.float32) is not None
    first = head.kernel_scale(torch.bfloat16)
    assert first.dtype == torch.bfloat16 and head.kernel_scale(torch.bfloat16) is first
    assert torch.equal(first, head.scale.reshape(-1).to(torch.bfloat16))
    state = {k: v * 2 if k == "scale" else v for k, v in head.state_dict().items()}
    head.load_state_dict(state)
    again = head.kernel_scale(torch.bfloat16)  # the new (doubled) scale, not the stale copy
    assert torch.equal(again, head.scale.reshape(-1).to(torch.bfloat16)) and torch.equal(again, 2 * first)
    head.double()
    assert head._kernel_scale is None and head.kernel_scale(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_a_tied_embedding_reads_the_quantised_rows_and_drops_its_float_table(tied_dir, head):
    import lmforge

    fp = lmforge.load(tied_dir, quantize="int4", quantize_head="none", dtype="float32")
    q = lmforge.load(tied_dir, quantize="int4", quantize_head=head, dtype="float32")
    assert isinstance(q.model.lm_head, Int8Head if head == "int8" else Int4Head)
    emb = q.model.model.embed_tokens
    assert isinstance(emb, HeadEmbedding) and emb.head is q.model.lm_head
    assert not any(k.startswith("model.embed_tokens") for k in q.model.state_dict())  # no float table
    vocab, dim = q.model.config.vocab_size, q.model.config.n_embd
    head_bytes = sum(b.numel() * b.element_size() for b in q.model.lm_head.buffers())
    assert model_bytes(fp.model) - model_bytes(q.model) == vocab * dim * 4 - head_bytes  # the float32 table is gone
    with torch.no_grad():
        assert torch.equal(emb(IDS), q.model.lm_head.weight[IDS])


def test_an_int8_head_keeps_logits_and_greedy_tokens_of_the_float_head(tied_dir):
    import lmforge

    ref = lmforge.load(tied_dir, quantize="int4", quantize_head="none")  # int4 blocks, float head and table
    q = lmforge.load(tied_dir, quantize="int4")  # the default: an int8 head
    assert isinstance(q.model.lm_head, Int8Head)
    lf, lq = _logits(ref.model, IDS), _logits(q.model, IDS)
    # stated tolerance: the int8 head (and the embedding read from it) moves these random width-64 logits by < 3% of
    # their range (seen: ~1%; on SmolLM2-135M 0.73 of a ~33 range, KL 0.0012: models/quantized.py's docstring)
    assert (lf - lq).abs().max() < 0.03 * (lf.max() - lf.min())
    # greedy choices agree wherever the float head's top-2 margin exceeds twice the largest logit change. A random
    # tiny model has near-ties elsewhere, where any rounding may flip a choice: 8 greedy tokens after "one two three"
    # part ways after a few (SmolLM2-135M: 1 of 3 short chat answers identical, top-1 agreement 98.4%)
    top2 = lf.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * (lf - lq).abs().amax(dim=-1)
    assert decided.sum() >= 4
    assert torch.equal(lf.argmax(-1)[decided], lq.argmax(-1)[decided])
    # against the float model itself (int4 blocks move these random logits by ~20% of their range; the head alone:)
    fp, h = lmforge.load(tied_dir), lmforge.load(tied_dir)
    quantize_head(h.model, "int8")
    lf, lh = _logits(fp.model, IDS), _logits(h.model, IDS)
    assert (lf - lh).abs().max() < 0.03 * (lf.max() - lf.min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["int8", "int4"])
def test_cached_greedy_equals_uncached_with_a_quantised_head(tied_dir, head, dtype):
    from lmforge.checkpoints.hf import read_hf_dir
    from lmforge.checkpoints.resolve import build_model
    from lmforge.generation.generate import generate_tokens

    config, state, _ = read_hf_dir(tied_dir)
    model = quantize_model(build_model(config, state), "int8", head=head).to(dtype).eval()
    for prompt in ([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]):
        cached = [s[0] for s in generate_tokens(model, [prompt], 12)]
        uncached = [s[0] for s in generate_tokens(model, [prompt], 12, use_cache=False)]
        assert cached == uncached


@pytest.mark.parametrize("head,extra", [("int8", []), ("int4", ["--head", "int4"]), ("none", ["--head", "none"])])
def test_quantize_head_saves_and_reloads_bit_exactly(tied_dir, tmp_path, capsys, head, extra):
    from safetensors import safe_open

    import lmforge

    out = tmp_path / "q"
    assert main(["quantize", str(tied_dir), "-o", str(out), "--method", "int4", "--group-size", "32",
                 "--algorithm", "rtn"] + extra) == 0
    assert f"{head} head" in capsys.readouterr().err
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["head"] == head and (block.get("head_group_size") == 32) == (head == "int4")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.qweight" in keys) == (head != "none")
    assert ("model.embed_tokens.weight" in keys) == (head == "none")  # tied: the head's codes are the one copy
    a, b = lmforge.load(out, dtype="float32"), lmforge.load(out, dtype="float32")  # (auto: bfloat16)
    assert torch.equal(_logits(a.model, IDS), _logits(b.model, IDS))
    mem = lmforge.load(tied_dir)  # quantising in memory gives the very same model: saving changes nothing
    quantize_model(mem.model, "int4", 32, algorithm="rtn", head=head)
    assert torch.equal(_logits(mem.model, IDS), _logits(a.model, IDS))
    for name, t in mem.model.state_dict().items():
        assert torch.equal(t, a.model.state_dict()[name]), name


def test_a_gptq_int4_head_is_calibrated(tied_dir, tmp_path):
    out = tmp_path / "g"
    calib = tmp_path / "c.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. one two three four five. " * 20, encoding="utf-8")
    assert main(["quantize", str(tied_dir), "-o", str(out), "--method", "int4", "--group-size", "32",
                 "--head", "int4", "--calibration", str(calib)]) == 0
    import lmforge

    g, r = lmforge.load(out), lmforge.load(tied_dir)
    quantize_model(r.model, "int4", 32, algorithm="rtn", head="int4")
    assert isinstance(g.model.lm_head, Int4Head)
    assert not torch.equal(g.model.lm_head.qweight, r.model.lm_head.qweight)  # GPTQ moved codes off nearest


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "{m}", "-o", "{o}", "--method", "int4", "--head", "int3"],
     "--head 'int3' is not a head quantisation; choose one of: int8, int4, none"),
    (["quantize", "{m}", "-o", "{o}", "--method", "int8", "--head", "int4"], None),  # fine: group 64 divides 64
    (["generate", "one", "-m", "{m}", "--quantize-head", "int8"], "--quantize-head goes with --quantize"),
    (["generate", "one", "-m", "{m}", "--quantize", "int8", "--quantize-head", "int3"],
     "--quantize-head 'int3' is not a head quantisation"),
])
def test_bad_head_is_one_line(tied_dir, tmp_path, capsys, argv, needle):
    out = tmp_path / "q"
    code = main([a.format(m=tied_dir, o=out) for a in argv])
    if needle is None:
        assert code == 0
        return
    assert code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not out.exists()


def test_quantize_head_refuses_a_group_that_does_not_divide_the_width():
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(preset("tiny-llama", vocab_size=64, n_embd=48, tie_embeddings=True))
    with pytest.raises(LmforgeError, match="does not divide the input width 48 of lm_head"):
        quantize_head(model, "int4")


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_export_of_a_head_quantised_folder_refuses_in_one_line(tied_dir, tmp_path, capsys, fmt):
    out = tmp_path / "q"
    assert main(["quantize", str(tied_dir), "-o", str(out), "--method", "int8"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", fmt, "-o", str(tmp_path / "x")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "quantised" in lines[0], lines


def test_serve_and_eval_pass_quantize_head_to_load(tied_dir, tmp_path):
    from lmforge.cli.serve import load_for_serving
    from lmforge.evaluation.harness import EvalConfig, load_model

    lm = load_for_serving(str(tied_dir), quantize="int8", quantize_head="int4")
    assert isinstance(lm.model.lm_head, Int4Head)
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "one", "output": "two"}\n', encoding="utf-8")
    cfg = EvalConfig(data=data, model=str(tied_dir), quantize="int8", quantize_head="none")
    assert type(load_model(cfg).model.lm_head) is nn.Linear
    assert isinstance(load_model(EvalConfig(data=data, model=str(tied_dir), quantize="int8")).model.lm_head, Int8Head)
    int4 = load_model(EvalConfig(data=data, model=str(tied_dir), quantize="int4")).model
    assert isinstance(int4.lm_head, Int8Head) and any(isinstance(m, Int4Linear) for m in int4.modules())
    assert main(["eval", "--data", str(data), "-m", str(tied_dir), "--quantize", "int3"]) == 2
