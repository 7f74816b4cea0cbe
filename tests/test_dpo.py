"""DPO / IPO training: reading preference files (both layouts, errors with file and line), the response
log-probs, a tiny run through the trainer that widens the margin, and `lmforge rlhf dpo` end to end."""

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.alignment.dpo import (
    DPOTrainer,
    TokenPair,
    collate,
    load_preference_pairs,
    precompute_reference,
    response_logprobs,
)
from lmforge.cli import main
from lmforge.config import preset
from lmforge.data.tokens import token_logprobs
from lmforge.errors import LmforgeError
from lmforge.models.decoder import DecoderLM
from lmforge.peft.lora import LoraSpec, add_lora


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_both_layouts_and_the_hh_split(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: fine, thanks",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"},
    ])
    a, b = load_preference_pairs(p)
    assert (a.prompt, a.chosen, a.rejected) == ("Q: 1+1?", " 2", " 3")
    assert b.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"  # up to the LAST turn
    assert (b.chosen, b.rejected) == (" fine, thanks", " go away")


def test_the_real_hh_file_splits():
    pairs = load_preference_pairs(Path(__file__).parents[2] / "shared/data/hh_rlhf/harmless-base.test.jsonl.gz", limit=50)
    assert len(pairs) == 50 and all(p.prompt.endswith("\n\nAssistant:") for p in pairs)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     r"p.jsonl, line 2: no 'rejected' field"),
    ([{"chosen": "no dialogue here", "rejected": "x"}], r"line 1: no 'prompt' field and no 'Assistant:' turn"),
    ([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}],
     "do not share the dialogue"),
    ([{"prompt": 3, "chosen": "b", "rejected": "c"}], "'prompt' must be a string, got int"),
    ([], r"p.jsonl is empty"),
])
def test_bad_preference_files_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(LmforgeError, match=message):
        load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))


def tiny_policy(seed=0):
    model = DecoderLM(preset("tiny-llama", vocab_size=64, max_seq_len=64)).init_weights(seed=seed, std=0.1)
    add_lora(model, LoraSpec(r=4, alpha=8, targets="all-linear"))
    return model


def random_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    ints = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    return [TokenPair(ints(4 + i % 3), ints(5), ints(3 + i % 4)) for i in range(n)]


def test_response_logprobs_match_the_summed_token_logprobs():
    model = tiny_policy()
    idx, labels = collate(random_pairs(3, seed=0), pad_id=0)  # (6, T) right-padded, ragged lengths
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(model, idx, labels),
                                   token_logprobs(model(idx)[:, :-1], labels[:, 1:]).sum(-1))


def test_tiny_dpo_run_raises_margin_and_accuracy():
    torch.manual_seed(0)
    model = tiny_policy()
    items = random_pairs(16, seed=1)
    table = precompute_reference(model, None, items, pad_id=0, batch_size=5)  # (16, 2), adapters off
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainer = DPOTrainer(model, opt, beta=0.1, ref_table=table)
    everything = list(range(16))
    with torch.no_grad():
        _, before = trainer.loss_and_metrics(items, everything)
        on_the_fly = DPOTrainer(model, opt, beta=0.1)  # reference computed per batch with LoRA off
        torch.testing.assert_close(on_the_fly.loss_and_metrics(items, everything)[0],
                                   trainer.loss_and_metrics(items, everything)[0])
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # LoRA B = 0: policy == reference
    for step in range(30):
        rows = [(4 * step + i) % 16 for i in range(4)]
        trainer.step([items[i] for i in rows], rows)
    with torch.no_grad():
        _, after = trainer.loss_and_metrics(items, everything)
    # stated margins: accuracy >= 0.9 (seen 1.0) and the implicit-reward margin > 0.5 (seen 2.7; beta 0.1)
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.5, after
    assert after["loss"] < before["loss"] - 0.2, (before, after)


def test_ipo_and_bad_settings():
    model = tiny_policy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    items = random_pairs(4, seed=2)
    loss, _ = DPOTrainer(model, opt, loss="ipo", beta=0.5).loss_and_metrics(items, [0, 1, 2, 3])
    assert loss.item() == pytest.approx(1.0, abs=1e-4)  # margin 0 at the start: (0 - 1 / (2 * 0.5))^2
    with pytest.raises(LmforgeError, match="unknown preference loss 'kto'"):
        DPOTrainer(model, opt, loss="kto")
    with pytest.raises(LmforgeError, match="label smoothing applies to the DPO loss only"):
        DPOTrainer(model, opt, loss="ipo", label_smoothing=0.1)


# ----------------------------------------------------------------------------- the command line
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "fox", "dog"]


def pairs_file(tmp_path):
    rows = [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {WORDS[(i + 3) % len(WORDS)]} dog"}
            for i, w in enumerate(WORDS)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra", [[], ["--method", "full", "--precompute-ref", "--loss", "ipo", "--beta", "0.5"]])
def test_cli_dpo_end_to_end(tiny_lm_dirs, tmp_path, capsys, extra):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                            "-o", out, "--steps", "4", "--batch-size", "3", "--lr", "1e-3", "--threads", "1", *extra)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["step"] == 4 and result["pairs"] == 9
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "reward_margin", "reward_accuracy"} <= set(r) for r in rows)
    if not extra:  # LoRA: a PEFT adapter that loads on the base, and that --adapter trains further
        assert (out / "final" / "adapter_config.json").is_file()
        first = lmforge.load(tiny_lm_dirs["plain"], adapter=out / "final").model
        code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                           "-o", tmp_path / "more", "--steps", "2", "--adapter", out / "final", "--lr", "1e-3")
        assert code == 0, err
        second = lmforge.load(tiny_lm_dirs["plain"], adapter=tmp_path / "more" / "final").model
        a, b = (dict(m.named_parameters()) for m in (first, second))
        changed = [k for k in a if "lora_B" in k and not torch.equal(a[k], b[k])]
        assert changed and set(a) == set(b)  # the same adapter layout, trained further
    else:  # full: a Hugging Face directory that differs from the base
        tuned, base = lmforge.load(out / "final").model, lmforge.load(tiny_lm_dirs["plain"]).model
        assert not torch.equal(tuned.lm_head.weight, base.lm_head.weight)


def test_cli_dpo_held_out_pairs_are_scored_before_and_after(tiny_lm_dirs, tmp_path, capsys):
    """--eval-fraction holds pairs out of training; their implicit-reward margin starts at 0 (policy =
    reference) and grows as the policy learns the pattern (rejected answers end in ' dog')."""
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                            "-o", out, "--steps", "8", "--batch-size", "3", "--lr", "3e-3", "--threads", "1",
                            "--eval-fraction", "0.34", "--eval-every", "4")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["pairs"] == 6 and result["held_out"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward_margin" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    margins = [r["eval_reward_margin"] for r in evals]  # seen: 0, 0.051, 0.068
    assert 0 < margins[1] < margins[2] and margins[2] > 0.03 and evals[-1]["eval_reward_accuracy"] >= 0.6, evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_cli_dpo_resume_continues_step_for_step(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    """A DPO run that dies during step 3 (after its step-2 checkpoint) and is resumed logs exactly the steps of
    an uninterrupted run: LoRA weights, AdamW moments, the schedule's position and the pair order restored."""
    from lmforge.alignment.dpo import DPOTrainer

    args = ["rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path), "--batch-size", "2",
            "--lr", "1e-3", "--warmup", "1", "--threads", "1", "--save-every", "2", "--steps", "5"]
    assert run(capsys, *args, "-o", tmp_path / "straight")[0] == 0
    real_step, calls = DPOTrainer.loss_and_metrics, []  # the training loop's step function

    def dies_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(DPOTrainer, "loss_and_metrics", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run(capsys, *args, "-o", tmp_path / "stopped")
    monkeypatch.setattr(DPOTrainer, "loss_and_metrics", real_step)
    assert run(capsys, *args, "-o", tmp_path / "stopped", "--resume")[0] == 0

    def rows(name):  # without the timing field
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows("stopped")] == [1, 2, 3, 4, 5]
    assert rows("stopped") == rows("straight")
    code, _, err = run(capsys, *args, "-o", tmp_path / "none", "--resume")
    assert code == 2 and "no checkpoint" in err


def assert_one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_dpo_bad_input(tiny_lm_dirs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b", "reject": "c"}])
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", bad, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "bad.jsonl, line 2: no 'rejected' field")
    # a separate reference of another architecture: the differing field is named
    other = DecoderLM(preset("tiny-llama", vocab_size=lmforge.load(tiny_lm_dirs["plain"]).config.vocab_size,
                             max_seq_len=128, n_layer=3)).init_weights(seed=0)
    from lmforge.checkpoints.hf import save_hf_dir

    ref = save_hf_dir(other, tmp_path / "ref", tokenizer=lmforge.load(tiny_lm_dirs["plain"]).tokenizer)
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                       "--ref", ref, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "different architecture", "n_layer: policy 2 vs reference 3")
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path),
                       "--method", "full", "--adapter", tmp_path, "-o", tmp_path / "o")
    assert_one_line_error(code, err, "--adapter continues training a LoRA adapter")


# ----------------------------------------------------------------------------- nothing non-finite is saved
@pytest.mark.parametrize("flag,value", [("--beta", "nan"), ("--lr", "inf"), ("--label-smoothing", "nan")])
def test_cli_dpo_refuses_non_finite_hyper_parameters(tiny_lm_dirs, tmp_path, capsys, flag, value):
    """A NaN/inf hyper-parameter is refused up front (it used to train to an all-NaN adapter and exit 0)."""
    out = tmp_path / "o"
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path), "-o", out,
                       "--steps", "1", "--batch-size", "3", "--threads", "1", flag, value)
    assert_one_line_error(code, err, f"({flag}): must be a finite number", value)
    assert not (out / "final").exists()


@pytest.mark.parametrize("field,flag", [("beta", "--beta"), ("lr", "--lr"), ("label_smoothing", "--label-smoothing")])
def test_dpo_recipe_refuses_non_finite_values(tiny_lm_dirs, tmp_path, field, flag):
    """The same through the Python API, before anything is loaded."""
    from lmforge.alignment.rlhf import DPOConfig, dpo

    with pytest.raises(LmforgeError, match=rf"\({flag}\): must be a finite number, got nan"):
        dpo(DPOConfig(model=str(tiny_lm_dirs["plain"]), data=pairs_file(tmp_path), out_dir=tmp_path / "o",
                      **{field: float("nan")}))
    assert not (tmp_path / "o").exists()


def test_cli_dpo_stops_on_a_nan_loss_and_keeps_the_last_checkpoint(tiny_lm_dirs, tmp_path, capsys, monkeypatch):
    from lmforge.alignment.dpo import DPOTrainer
    from lmforge.training.checkpoint import read_state

    real, calls = DPOTrainer.loss_and_metrics, []

    def nan_at_step_2(self, items, indices):
        calls.append(1)
        loss, metrics = real(self, items, indices)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(DPOTrainer, "loss_and_metrics", nan_at_step_2)
    out = tmp_path / "o"
    code, _, err = run(capsys, "rlhf", "dpo", "-m", tiny_lm_dirs["plain"], "--data", pairs_file(tmp_path), "-o", out,
                       "--steps", "3", "--batch-size", "3", "--threads", "1", "--save-every", "1")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: the DPO loss became nan at step 2"), err
    assert read_state(out / "checkpoint")["step"] == 1 and not (out / "final").exists()
