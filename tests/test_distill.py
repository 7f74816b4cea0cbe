"""``lmforge distill`` (training/distill.py, cli/distill.py): the divergences against references written here, the
top-k coarsening, ``--student-layers`` blocks, a short run that lowers the held-out KL to the teacher, the on-disk
teacher cache against on-the-fly top-k, resume, and one error line for a foreign vocabulary and bad values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge.cli.main import main
from lmforge.training.distill import (
    DistillConfig,
    build_student,
    distill,
    distill_loss,
    divergence_from_logits,
    heldout_kl,
    kept_blocks,
    make_batches,
    teacher_topk,
)

WORDS = ("the quick brown fox jumps over the lazy dog one two three four five six seven what is the capital of "
         "France Paris sea otter").split()


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def reference(p: list[float], q: list[float], kind: str, beta: float) -> float:
    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


TEACHER = [[2.0, 0.5, -1.0, 0.0, 1.5], [-0.3, 3.0, 0.2, 0.1, -2.0]]
STUDENT = [[1.0, 1.0, 0.0, -0.5, 0.3], [0.0, 1.0, 1.5, -1.0, 0.4]]


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_divergences_equal_a_reference(kind, t):
    beta = 0.3
    got = divergence_from_logits(torch.tensor(TEACHER), torch.tensor(STUDENT), kind, t, beta)
    want = [reference(softmax(a, t), softmax(b, t), kind, beta) for a, b in zip(TEACHER, STUDENT)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # the loss: T^2 * mean divergence, mixed with the label cross-entropy by alpha
    labels = torch.tensor([0, 2])
    loss, parts = distill_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), labels, kind=kind, temperature=t,
                               beta=beta, alpha=0.25)
    ce = -sum(math.log(softmax(row, 1.0)[y]) for row, y in zip(STUDENT, [0, 2])) / 2
    assert float(loss) == pytest.approx(0.25 * ce + 0.75 * t * t * sum(want) / 2, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_top_k_compares_k_tokens_and_the_rest(kind):
    """Top-k: the teacher's exact softened probabilities of its k best tokens plus one 'any other token' outcome,
    the student's probabilities of the same k tokens plus its rest; k = V is the full divergence."""
    t, k, beta = 2.0, 2, 0.5
    top = teacher_topk(torch.tensor(TEACHER), k, t)
    got = divergence_from_logits(top, torch.tensor(STUDENT), kind, t, beta)
    want = []
    for a, b in zip(TEACHER, STUDENT):
        p, q = softmax(a, t), softmax(b, t)
        best = sorted(range(5), key=lambda i: -a[i])[:k]
        pk, qk = [p[i] for i in best], [q[i] for i in best]
        want.append(reference(pk + [1 - sum(pk)], qk + [1 - sum(qk)], kind, beta))
    assert got.tolist() == pytest.approx(want, rel=1e-4)
    full = divergence_from_logits(teacher_topk(torch.tensor(TEACHER), 5, t), torch.tensor(STUDENT), kind, t, beta)
    exact = divergence_from_logits(torch.tensor(TEACHER), torch.tensor(STUDENT), kind, t, beta)
    assert full.tolist() == pytest.approx(exact.tolist(), rel=1e-5)


def test_student_layers_keeps_evenly_spaced_blocks(tiny_lm_dirs, tmp_path):
    assert kept_blocks(2, 1) == [0] and kept_blocks(2, 2) == [0, 1]
    assert kept_blocks(4, 2) == [0, 3] and kept_blocks(4, 3) == [0, 2, 3] and kept_blocks(12, 4) == [0, 4, 7, 11]
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import preset
    from lmforge.lm import read_checkpoint
    from lmforge.models.decoder import DecoderLM

    tok = lmforge.load(tiny_lm_dirs["plain"]).tokenizer
    four = save_hf_dir(DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size, n_layer=4)).init_weights(seed=1),
                       tmp_path / "four", tokenizer=tok)
    ckpt = read_checkpoint(four)
    cfg = DistillConfig(teacher=str(four), student_layers=3, train=(tmp_path / "x.txt",))
    student, keep = build_student(cfg, ckpt)
    assert keep == [0, 2, 3] and student.config.n_layer == 3 and len(student.model.layers) == 3
    teacher = lmforge.load(four).model
    for new, old in enumerate(keep):
        for (name, a), (_, b) in zip(student.model.layers[new].state_dict().items(),
                                     teacher.model.layers[old].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    with pytest.raises(lmforge.LmforgeError, match="allowed: 1..4"):
        build_student(DistillConfig(teacher=str(four), student_layers=5, train=(tmp_path / "x.txt",)), ckpt)


def corpus(tmp_path: Path, n: int = 600, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist()]
    path = tmp_path / f"corpus{seed}.txt"
    path.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, n, 12)) + "\n", encoding="utf-8")
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_distillation_lowers_the_heldout_kl_to_the_teacher(tiny_lm_dirs, tmp_path, capsys):
    """A 1-block student cut from the 2-block teacher, 20 steps on a text corpus: the KL to the teacher on the
    held-out 5% falls at each evaluation, by over 15% in all (0.76 -> 0.59 when written); OUT/final is the trained
    student (its held-out KL, recomputed, is the logged one)."""
    teacher = str(tiny_lm_dirs["plain"])
    out = tmp_path / "run"
    assert main(["distill", "--teacher", teacher, "--student-layers", "1", "--train", str(corpus(tmp_path, 2000)),
                 "--max-len", "24", "--batch-size", "8", "--steps", "20", "--lr", "3e-3", "--temperature", "1",
                 "--log-every", "5", "--eval-every", "10", "--cache-dir", str(tmp_path / "tokens"), "-o", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    evals = [r for r in rows(out) if "val_kl" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    kls = [r["val_kl"] for r in evals]
    before, after = kls[0], kls[-1]
    assert kls == sorted(kls, reverse=True) and after < 0.85 * before, kls
    assert result["val_kl"] == after
    student = lmforge.load(out / "final")
    assert student.config.n_layer == 1
    # recompute on the same held-out windows
    from lmforge.data.corpus import tokenize_corpus
    from lmforge.training.distill import _windows

    data = tokenize_corpus(corpus(tmp_path, 2000), student.tokenizer, cache_dir=tmp_path / "tokens")
    held = make_batches(_windows(data.val, 24, None), batch_size=8, pad_id=0, shuffle=False)
    again = heldout_kl(lmforge.load(teacher).model.eval(), student.model.eval(), held.iter_once())
    assert again["val_kl"] == pytest.approx(after, rel=1e-4)


def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} {b} ->", "completion": f" {b} {a}"}) + "\n"
                            for a in WORDS[:6] for b in WORDS[6:12]), encoding="utf-8")
    return path


def test_cached_top_k_equals_on_the_fly_and_is_reused(tiny_lm_dirs, tmp_path, capsys):
    """SFT data, --top-k 8: a run reading the teacher from --cache-teacher logs the losses of the on-the-fly run;
    the cache holds k logits per response position, no more, and a second run reuses it; another temperature is
    refused in one line."""
    base = ["distill", "--teacher", str(tiny_lm_dirs["plain"]), "--student", "tiny-llama", "--train",
            str(sft_file(tmp_path)), "--top-k", "8", "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
            "--log-every", "1", "--loss", "jsd"]
    assert main([*base, "-o", str(tmp_path / "fly")]) == 0
    cache = tmp_path / "cache"
    assert main([*base, "--cache-teacher", str(cache), "-o", str(tmp_path / "cached")]) == 0
    err = capsys.readouterr().err
    assert "cached the teacher's top-8 logits of 36 examples" in err
    assert "teacher top-8: 100%" in err and "36/36" in err  # the progress bar of the caching pass

    def losses(name: str) -> list[float]:
        return [r["loss"] for r in rows(tmp_path / name) if "loss" in r]

    assert len(losses("fly")) == 4 and losses("cached") == pytest.approx(losses("fly"), rel=1e-5)
    index = json.loads((cache / "index.json").read_text())
    assert index["top_k"] == 8 and index["items"] == 36
    from safetensors.torch import load_file

    shard = load_file(cache / index["shards"][0]["file"])
    assert shard["values"].shape[1] == 8 and shard["indices"].shape == shard["values"].shape
    assert shard["lse"].shape[0] == shard["values"].shape[0] == int(shard["offsets"][-1])

    assert main([*base, "--cache-teacher", str(cache), "-o", str(tmp_path / "again")]) == 0
    assert "cached the teacher" not in capsys.readouterr().err  # reused, not rebuilt
    assert losses("again") == losses("cached")
    assert main([*base, "--cache-teacher", str(cache), "--temperature", "3", "-o", str(tmp_path / "t3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the top-k logits of another run (its temperature differs)" in err[0]


def test_resume_continues_the_run(tiny_lm_dirs, tmp_path, monkeypatch):
    """A run stopped after its step-3 checkpoint and resumed logs the uninterrupted run's losses."""
    import lmforge.training.distill as d

    def cfg(out: str) -> DistillConfig:
        return DistillConfig(teacher=str(tiny_lm_dirs["plain"]), student_layers=1, train=(sft_file(tmp_path),),
                             steps=6, batch_size=4, lr=1e-3, save_every=3, log_every=1, out_dir=tmp_path / out)

    distill(cfg("whole"))
    calls, real = {"n": 0}, d.distill_loss

    def stopping(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(d, "distill_loss", stopping)
    with pytest.raises(RuntimeError, match="stopped"):
        distill(cfg("split"))
    monkeypatch.setattr(d, "distill_loss", real)
    distill(cfg("split"), resume=True)

    def losses(name: str) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in rows(tmp_path / name) if "loss" in r]

    whole, split = losses("whole"), losses("split")
    assert [s for s, _ in split] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in split] == pytest.approx([v for _, v in whole], rel=1e-5)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_student_with_another_vocabulary_is_one_line_before_training(tiny_lm_dirs, tmp_path, capsys):
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.config import preset
    from lmforge.models.decoder import DecoderLM

    tok = lmforge.load(tiny_lm_dirs["plain"]).tokenizer
    wide = save_hf_dir(DecoderLM(preset("tiny-llama", vocab_size=tok.vocab_size + 8)), tmp_path / "wide",
                       tokenizer=tok)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_lm_dirs["plain"]), "--student", str(wide), "--train",
                 str(sft_file(tmp_path)), "--steps", "2", "-o", str(out)]) == 2
    line = one_error(capsys)
    assert line.startswith("error: the student") and f"vocabulary of {tok.vocab_size + 8} tokens" in line
    assert f"teacher {tiny_lm_dirs['plain']} {tok.vocab_size}" in line
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags,words", [
    (["--temperature", "0"], "temperature (--temperature): must be > 0"),
    (["--temperature", "-1"], "temperature (--temperature): must be > 0"),
    (["--alpha", "1.5"], "alpha (--alpha): must be >= 0.0 and <= 1.0"),
    (["--alpha", "-0.1"], "alpha (--alpha): must be >= 0.0 and <= 1.0"),
    (["--beta", "1"], "beta (--beta)"),
    (["--loss", "kl"], "--loss"),
    (["--cache-teacher", "c"], "give --top-k K"),
    (["--student", "tiny-llama"], "exactly one of --student"),
])
def test_bad_values_are_one_line(flags, words, tiny_lm_dirs, tmp_path, capsys):
    assert main(["distill", "--teacher", str(tiny_lm_dirs["plain"]), "--student-layers", "1", "--train",
                 str(sft_file(tmp_path)), "-o", str(tmp_path / "run"), *flags]) == 2
    line = one_error(capsys)
    assert line.startswith("error: ") and words in line
    assert not (tmp_path / "run").exists()


def test_print_config_then_config_reproduces_the_run(tiny_lm_dirs, tmp_path, capsys):
    argv = ["distill", "--teacher", str(tiny_lm_dirs["plain"]), "--student-layers", "1", "--train",
            str(sft_file(tmp_path)), "--steps", "2", "--batch-size", "4", "--log-every", "1", "--loss", "reverse",
            "--alpha", "0.5", "--prompt-template", "Q:\\n{prompt}\\nA:", "--response-field", "completion",
            "-o", str(tmp_path / "a")]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# lmforge distill config\n")
    assert yaml.safe_load(printed)["prompt_template"] == "Q:\n{prompt}\nA:"  # the flag's \\n: a newline
    assert not (tmp_path / "a").exists()
    (tmp_path / "a.yaml").write_text(printed, encoding="utf-8")
    assert main(argv) == 0
    assert (tmp_path / "a" / "config.yaml").read_text(encoding="utf-8") == printed
    assert main(["distill", "--config", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "b")]) == 0

    def losses(name: str) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("kd"), r.get("ce"), r.get("val_kl"))
                for r in rows(tmp_path / name)]

    assert len(losses("a")) == 2 and losses("a") == losses("b")


def test_a_student_with_other_tokens_of_the_same_count_is_one_line(tiny_lm_dirs, tmp_path, capsys):
    """Same vocabulary size, two token ids swapped: the distributions are over other tokens, refused."""
    import shutil

    other = tmp_path / "swapped"
    shutil.copytree(tiny_lm_dirs["plain"], other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert main(["distill", "--teacher", str(tiny_lm_dirs["plain"]), "--student", str(other), "--train",
                 str(sft_file(tmp_path)), "--steps", "2", "-o", str(tmp_path / "run")]) == 2
    line = one_error(capsys)
    assert "have different tokenizers" in line and "same size" in line
    assert not (tmp_path / "run" / "final").exists()
