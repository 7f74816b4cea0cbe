"""FSDP2 and activation checkpointing (issue 14), beyond the 2-rank equality tests in test_distributed.py: prompt
tuning under FSDP (a frozen, sharded base around one trained tensor), bf16 with FSDP's mixed-precision policy and
activation checkpointing together, activation checkpointing changing nothing but memory in one process, and
what FSDP refuses."""

from __future__ import annotations

import torch

from lmforge.cli.main import main
from lmforge.training.parallel import blocks_of, checkpoint_blocks
from test_distributed import assert_same_rows, assert_same_weights, losses, sft_file, torchrun  # noqa: F401


def _sft(model, data, *extra: str) -> list[str]:
    return ["finetune", "-m", str(model), "--train", str(data), "--steps", "3", "--batch-size", "4", "--max-len",
            "32", "--lr", "3e-3", "--log-every", "1", "--seed", "5", "--prompt-template", "{text} ->",
            "--response-field", "answer", *extra]


def test_prompt_tuning_under_fsdp_equals_one_process(tiny_lm_dirs, sft_file, tmp_path, capsys):  # noqa: F811
    args = _sft(tiny_lm_dirs["plain"], sft_file, "--method", "prompt-tuning", "--virtual-tokens", "3")
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    done = torchrun([*args, "--strategy", "fsdp", "-o", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "two" / "final", tmp_path / "one" / "final", name="adapter_model.safetensors")


def test_fsdp_bf16_with_activation_checkpointing_learns(tiny_lm_dirs, sft_file, tmp_path):  # noqa: F811
    """bf16 under FSDP (bf16 all-gathers and compute, fp32 shards and reduction) with every block checkpointed:
    the run completes, writes a full-precision final model, and the loss falls over 8 steps."""
    args = _sft(tiny_lm_dirs["plain"], sft_file, "--method", "full", "--precision", "bf16", "--steps", "8",
                "--strategy", "fsdp", "--activation-checkpointing", "-o", str(tmp_path / "bf16"))
    done = torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in losses(tmp_path / "bf16") if "loss" in r]
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.1
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_activation_checkpointing_changes_nothing_but_memory(tiny_lm_dirs, sft_file, tmp_path, capsys):  # noqa: F811
    args = _sft(tiny_lm_dirs["plain"], sft_file, "--method", "full")
    assert main([*args, "-o", str(tmp_path / "plain")]) == 0
    assert main([*args, "--activation-checkpointing", "-o", str(tmp_path / "ckpt")]) == 0
    assert_same_rows(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), tol=0)
    assert_same_weights(tmp_path / "ckpt" / "final", tmp_path / "plain" / "final", tol=0)


def test_checkpoint_blocks_recomputes_in_backward(tiny_lm_dirs):
    """The wrapped blocks run their forward a second time during backward (that is what saves the memory) and
    produce the same gradients; parameter names are unchanged."""
    import lmforge

    model = lmforge.load(tiny_lm_dirs["plain"]).model
    names = [n for n, _ in model.named_parameters()]
    calls = []
    for block in blocks_of(model):  # a module inside each block: called again when the block is recomputed
        next(block.children()).register_forward_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    model(idx).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == model.config.n_layer
    model.zero_grad()
    n_blocks = checkpoint_blocks(model)
    calls.clear()
    model(idx).sum().backward()
    assert n_blocks == model.config.n_layer and [n for n, _ in model.named_parameters()] == names
    assert len(calls) == 2 * n_blocks  # forward, then the recompute in backward
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_what_fsdp_refuses(tiny_lm_dirs, sft_file, tmp_path, capsys):  # noqa: F811
    assert main([*_sft(tiny_lm_dirs["plain"], sft_file, "--method", "qlora", "--strategy", "fsdp",
                       "-o", str(tmp_path / "q"))]) == 2
    assert "--strategy fsdp cannot shard a quantised" in capsys.readouterr().err
    assert main([*_sft(tiny_lm_dirs["plain"], sft_file, "--method", "full", "--cpu-offload",
                       "-o", str(tmp_path / "off"))]) == 2
    assert "--cpu-offload keeps FSDP's shards in host memory: it needs --strategy fsdp" in capsys.readouterr().err
    assert main([*_sft(tiny_lm_dirs["plain"], sft_file, "--strategy", "zero3", "-o", str(tmp_path / "z"))]) == 2
    assert "ddp" in capsys.readouterr().err
