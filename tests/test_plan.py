"""``lmforge plan``: exact arithmetic on a tiny config, activations equal to what autograd saves, the peak against
measured peak memory on CPU, FSDP vs DDP, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmforge.cli.main import main
from lmforge.config import ModelConfig
from lmforge.training.plan import max_batch_size, parse_memory, plan

TINY = dict(vocab_size=100, n_layer=2, n_embd=8, n_head=2, n_kv_head=1, intermediate_size=16, max_seq_len=64)


def test_exact_arithmetic_tiny_config():
    p = plan(ModelConfig(**TINY), batch_size=1, seq_len=4, device="cuda")
    # parameters: per block q 8x8, k and v 8x4, o 8x8 = 192; MLP 3 x 8x16 = 384; two norms 16 -> 592
    n = 2 * 592 + 100 * 8 + 8 + 100 * 8  # blocks, embeddings, final norm, untied head
    assert p.parameters == p.trainable == n == 2792
    assert (p.weights, p.gradients, p.optimizer, p.optimizer_step) == (4 * n, 4 * n, 8 * n, 4 * n)
    # activations per token, fp32: norm = x + 1/rms + hn (8*4 + 4 + 8*4 = 68); q/k/v input 32; attention
    # q, k rotated + v + SDPA out (2*8 + 2*4)*4 + lse 2*4 = 104; MLP norm 68 + input 32; gate, silu, up 3*16*4
    # and down's input 16*4 = 256
    block = 68 + 32 + 104 + 68 + 32 + 256
    per_token = 2 * block + 2 * 4 * 4 + (8 * 4 + 4 + 2 * 8 * 4) + 8  # blocks, rope cos/sin, final norm+head, ids
    assert p.activations == 4 * per_token == 5040
    assert p.loss == 4 * 100 * 4 * 3  # log-softmax kept, its gradient and the logits' gradient, fp32
    assert p.strategy_buffers == 0  # one rank
    assert p.peak == 4 * n * 5 + 5040 + 4800
    assert p.train_flops_per_token == 6 * (n - 800) + 12 * 2 * 2 * 4 * 4  # 6N (no embedding lookup) + 12 L H Q T
    assert p.inference_flops_per_token == 2 * (n - 800) + 4 * 2 * 2 * 4 * 64
    assert p.kv_cache == 2 * 2 * 1 * 4 * 1 * 64 * 4  # k and v, layers, kv heads, head dim, batch, context, fp32
    lora = plan(ModelConfig(**TINY), method="lora", lora_r=2, lora_targets="q_proj,v_proj", seq_len=4)
    assert lora.trainable == 2 * (2 * (8 + 8) + 2 * (8 + 4))
    fits = max_batch_size(ModelConfig(**TINY), p.peak + 3 * 9840 + 5, seq_len=4)  # 9840 bytes per sequence
    assert fits == 4


@pytest.mark.parametrize("method, precision, dropout, seq, tolerance", [
    ("full", "fp32", 0.0, 8, 0.0),
    ("lora", "fp32", 0.1, 8, 0.0),
    ("lora", "fp32", 0.0, 8, 0.0),
    ("prompt-tuning", "fp32", 0.0, 8, 0.01),
    ("qlora", "fp32", 0.0, 8, 0.06),
    # bf16 beyond 128 keys: shorter bf16 sequences on CPU take attention.grouped_attention, not SDPA
    ("full", "bf16", 0.0, 136, 0.04),
    ("lora", "bf16", 0.1, 136, 0.04),
    ("full", "bf16-pure", 0.0, 136, 0.04),
])
def test_activations_are_what_autograd_saves(method, precision, dropout, seq, tolerance):
    """The plan's activations plus the kept log-softmax equal the bytes autograd saves for backward (counted with
    saved_tensors_hooks, each storage once, parameters and buffers excluded): exactly in fp32 for full and LoRA,
    within a few percent where the plan approximates (autocast casts, the prompt wrapper, dequantised weights)."""
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.quantized import quantize_linears
    from lmforge.peft.lora import LoraSpec, add_lora
    from lmforge.peft.prompt_tuning import PromptTunedLM
    from lmforge.training.objectives import causal_lm_loss

    config = ModelConfig(**{**TINY, "n_embd": 16, "n_head": 4, "n_kv_head": 2, "intermediate_size": 24,
                            "max_seq_len": 256})
    torch.manual_seed(0)
    model = DecoderLM(config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    if method in ("lora", "qlora"):
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "qlora":
            quantize_linears(model, "nf4")
        add_lora(model, LoraSpec(r=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=dropout))
    elif method == "prompt-tuning":
        model = PromptTunedLM(model, 3)
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B = 2
    idx = torch.randint(0, config.vocab_size, (B, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        causal_lm_loss(model(idx), idx)
    p = plan(config, method=method, precision=precision, batch_size=B, seq_len=seq, lora_r=2, lora_dropout=dropout,
             virtual_tokens=3)
    planned = p.activations + B * seq * config.vocab_size * 4 + 4  # + the fp32 log-softmax and the 0-d loss
    assert sum(saved.values()) == pytest.approx(planned, rel=tolerance)


def test_fused_loss_keeps_its_gradients_not_the_logits():
    """Pretraining's linear_cross_entropy keeps the two gradients it computes in the forward pass (counted in the
    plan's loss buffers, next to its peak of 2 x N x V fp32) and not the head's input."""
    from lmforge.models.decoder import DecoderLM
    from lmforge.training.objectives import linear_cross_entropy

    config = ModelConfig(**{**TINY, "n_embd": 16, "n_head": 4, "n_kv_head": 2, "intermediate_size": 24})
    torch.manual_seed(0)
    model = DecoderLM(config)
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, config.vocab_size, (2, 8))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(model.hidden_states(idx), model.lm_head.weight, idx)
    p = plan(config, batch_size=2, seq_len=8, loss="fused")
    logits = 16 * config.vocab_size * 8  # the logits and the log-probabilities, fp32: not kept past the forward
    assert sum(saved.values()) == p.activations + p.loss - logits
    assert p.loss - logits == 16 * 16 * 4 + config.vocab_size * 16 * 4  # grad_h (N, C) and grad_w (V, C)
    assert plan(config, batch_size=2, seq_len=8).loss == 16 * config.vocab_size * 12


MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from lmforge.config import ModelConfig
    from lmforge.models.decoder import DecoderLM
    from lmforge.training.objectives import causal_lm_loss

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    spec = json.loads(sys.argv[1])
    config = ModelConfig(**spec["config"])

    def build():
        torch.manual_seed(0)
        model = DecoderLM(config)  # torch's in-place default init: no init temporaries
        if spec["method"] == "lora":
            from lmforge.peft.lora import LoraSpec, add_lora
            for p in model.parameters():
                p.requires_grad_(False)
            add_lora(model, LoraSpec(r=spec["r"], targets=spec["targets"]))
        return model

    def train(model, steps):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(steps):
            idx = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]))
            causal_lm_loss(model(idx), idx).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    warm = build()  # one step on a throwaway copy: BLAS/attention workspaces, kept by the process, are not the model's
    train(warm, 1)
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    base = status("VmRSS:")
    train(build(), 2)
    print(status("VmHWM:") - base)
""")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_peak_matches_measured_cpu_memory(method):
    """Peak resident memory of building a ~10M-parameter fp32 model and taking 2 AdamW steps, in a fresh process,
    is within 25% of the plan's peak.

    Measured as VmHWM minus VmRSS, after a warm-up step on a throwaway copy (then freed) and a reset of VmHWM
    (/proc/self/clear_refs), so the baseline holds imports and the libraries' workspaces but not the model.
    glibc's mmap threshold is fixed at 64 KiB so that a freed tensor leaves the resident set (with the dynamic
    threshold, freed heap chunks stay resident and later ones add to them)."""
    cfg = dict(vocab_size=8192, n_layer=2, n_embd=384, n_head=6, intermediate_size=1024, max_seq_len=256)
    spec = dict(config=cfg, method=method, batch=2, seq=128, r=8, targets=["q_proj", "v_proj"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True, env=env,
                         check=True)
    measured = int(out.stdout.strip())
    p = plan(ModelConfig(**cfg), method=method, batch_size=2, seq_len=128, lora_r=8,
             lora_targets=["q_proj", "v_proj"], lora_dropout=0.0, device="cpu")
    assert measured > p.weights  # the measurement holds the model
    assert 0.75 <= p.peak / measured <= 1.25, (p.peak, measured)


def test_fsdp_uses_less_per_rank_than_ddp_for_full_finetuning():
    from lmforge.config import preset

    config = preset("smollm2-135m")
    ddp = plan(config, strategy="ddp", world=2, batch_size=4, seq_len=512)
    fsdp = plan(config, strategy="fsdp", world=2, batch_size=4, seq_len=512)
    assert fsdp.weights * 2 == pytest.approx(ddp.weights, abs=2) and fsdp.optimizer * 2 == pytest.approx(
        ddp.optimizer, abs=2)
    assert fsdp.peak < ddp.peak
    assert plan(config, world=2).strategy_buffers == plan(config).gradients  # DDP's buckets


def test_cli_plan_table_json_and_memory(capsys):
    from lmforge.config import preset

    assert main(["plan", "-m", "tiny-llama", "--batch-size", "2", "--seq-len", "16", "--memory", "8MiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = preset("tiny-llama")
    assert out["parameters"] == config.num_parameters() and out["memory"] == 8 * 2**20
    fits = out["max_batch_size"]
    assert fits >= 1
    assert plan(config, batch_size=fits, seq_len=16).peak <= 8 * 2**20 < plan(config, batch_size=fits + 1,
                                                                             seq_len=16).peak
    assert main(["plan", "-m", "smollm2-135m", "--set", "n_layer=2", "--method", "qlora", "--memory", "1KiB"]) == 0
    text = capsys.readouterr().out
    assert "peak per rank" in text and "FLOPs" in text and "none: even one sequence does not fit" in text


@pytest.mark.parametrize("argv, needle", [
    (["--method", "bogus"], "--method: invalid choice"),
    (["--world", "0"], "--world must be >= 1"),
    (["--memory", "abc"], "memory size 'abc'"),
    (["--strategy", "zero3"], "--strategy: invalid choice"),
    (["-m", "bert-nope/x/y"], "unknown model"),
    (["--set", "n_layer"], "expected KEY=VALUE"),
    (["--set", "n_head=abc"], "config field n_head must be an integer >= 1, got 'abc'"),
    (["--set", "arch=encoder"], "lmforge plan covers decoder-only models"),
    (["--seq-len", "300"], "seq_len 300 exceeds the context window of tiny-llama (256 tokens)"),
    (["--method", "prompt-tuning", "--seq-len", "250"], "seq_len 250 + 20 virtual tokens exceeds"),
    (["--method", "lora", "--lora-targets", "nothing"], "LoRA targets ['nothing'] match no linear layer"),
])
def test_cli_plan_bad_input(capsys, argv, needle):
    assert main(["plan", "-m", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30 and parse_memory("80GB") == 80 * 10**9 and parse_memory("512M") == 2**29
    with pytest.raises(Exception, match="memory size"):
        parse_memory("-1G")
