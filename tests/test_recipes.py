"""The recipe configs of the verbs (pretrain, finetune, eval, compare, serve): ``--print-config`` YAML that
reruns the same run through ``--config``, flags over the file, file:line errors, docstrings as ``--help``,
``OUT/config.yaml`` written by every run, and the YAML files in ``recipes/`` (parsed and validated only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli.main import build_parser, main
from lmforge.recipe_config import load_config

RECIPES = Path(__file__).parent.parent / "recipes"
TIMING = ("tokens_per_s", "seconds", "elapsed", "time")  # differ between two identical runs


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without its timing fields."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)} for line in lines]


def print_config(argv: list[str], capsys) -> str:
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def help_text(verb: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([verb, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def sft_data(tmp_path) -> Path:
    words = ["one", "two", "three", "four", "fox", "dog"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"{a} {b}", "answer": f"{b} {a}"}) + "\n"
                            for a in words for b in words), encoding="utf-8")
    return path


def test_finetune_print_config_then_config_reproduces_the_run(tiny_lm_dirs, sft_data, tmp_path, capsys):
    argv = ["finetune", "-m", str(tiny_lm_dirs["plain"]), "--train", str(sft_data), "--steps", "3",
            "--batch-size", "4", "--max-len", "32", "--lr", "3e-3", "--log-every", "1", "--method", "lora",
            "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--seed", "7",
            "--prompt-template", "Swap:\\n{text}\\nAnswer: ", "--response-field", "answer", "-o", str(tmp_path / "a")]
    printed = print_config(argv, capsys)
    assert not (tmp_path / "a").exists()  # --print-config runs nothing
    assert printed.startswith("# lmforge finetune config\n")
    assert yaml.safe_load(printed)["prompt_template"] == "Swap:\n{text}\nAnswer: "  # the flag's \\n: a newline
    (tmp_path / "a.yaml").write_text(printed, encoding="utf-8")

    assert main(argv) == 0
    capsys.readouterr()
    assert (tmp_path / "a" / "config.yaml").read_text(encoding="utf-8") == printed  # the run wrote the same YAML
    assert main(["finetune", "--config", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "b")]) == 0
    first, again = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(first) == 3 and first == again
    assert (tmp_path / "b" / "config.yaml").read_text(encoding="utf-8") == printed.replace(
        f"out_dir: {tmp_path / 'a'}", f"out_dir: {tmp_path / 'b'}")


def test_pretrain_print_config_then_config_reproduces_the_run(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    argv = ["pretrain", "--corpus", str(corpus), "--steps", "4", "--seq-len", "16", "--batch-size", "2",
            "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--cache-dir", str(tmp_path / "c"),
            "--set", "n_layer=1", "--set", "n_embd=32", "--lr", "1e-2", "-o", str(tmp_path / "a")]
    printed = print_config(argv, capsys)
    assert "overrides:\n  n_layer: 1\n  n_embd: 32\n" in printed and "steps: 4\n" in printed
    (tmp_path / "a.yaml").write_text(printed, encoding="utf-8")
    assert main(argv) == 0
    assert main(["pretrain", "--config", str(tmp_path / "a.yaml"), "--out-dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    first, again = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert any("val_loss" in r for r in first) and first == again
    assert load_config(type(_pretrain_config()), tmp_path / "b" / "config.yaml").out_dir == tmp_path / "b"


def _pretrain_config():
    from lmforge.training.pretrain import PretrainConfig

    return PretrainConfig()


def test_flags_override_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 50\nlr: 0.01\noverrides: {n_layer: 2, n_embd: 64}\ncompile: true\n", encoding="utf-8")
    printed = print_config(["pretrain", "--config", str(path), "--steps", "7", "--set", "n_layer=1",
                            "--no-compile"], capsys)
    assert "steps: 7\n" in printed and "lr: 0.01\n" in printed and "compile: false\n" in printed
    assert "overrides:\n  n_layer: 1\n  n_embd: 64\n" in printed  # --set merges over the file's overrides
    path.write_text("method: lora\nlora_r: 4\ntrain: [a.jsonl]\n", encoding="utf-8")
    printed = print_config(["finetune", "--config", str(path), "--lora-r", "8", "--dev", "d.jsonl"], capsys)
    assert "method: lora\n" in printed and "lora_r: 8\n" in printed and "train:\n- a.jsonl\n" in printed
    assert "dev:\n- d.jsonl\n" in printed


def test_a_bad_yaml_key_or_value_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("# my run\nsteps: 5\nwarmpu: 10\n", encoding="utf-8")
    assert main(["pretrain", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3: unknown key 'warmpu'; did you mean 'warmup'?" in err
    path.write_text("train: [a.jsonl]\nlora_dropout: 1.5\n", encoding="utf-8")
    assert main(["finetune", "--config", str(path)]) == 2
    assert f"{path}:2: lora_dropout: must be >= 0.0 and <= 0.99, got 1.5" in capsys.readouterr().err
    assert main(["finetune", "--lr", "-1", "--train", "a.jsonl"]) == 2
    assert "lr (--lr): must be > 0, got -1.0" in capsys.readouterr().err


def test_help_shows_the_field_docstrings(capsys):
    text = help_text("pretrain", capsys)
    assert "--warmup WARMUP Linear warmup steps before the cosine decay. (default: 50)" in text
    assert "-m MODEL, --model MODEL A preset name (random init)" in text and "--print-config" in text
    text = help_text("finetune", capsys)
    assert "--eval-generate EVAL_GENERATE Dev examples for greedy generation + ROUGE-L, 0 = none. (default: 20)" \
        in text
    assert "parameter-efficient methods:" in text and "--config FILE.yaml" in text


def test_eval_print_config_then_config_reproduces_the_run(tiny_lm_dirs, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"one two {i}", "summary": f"two {i}"}) + "\n" for i in range(4)),
                    encoding="utf-8")
    argv = ["eval", str(data), "-o", str(tmp_path / "a"), "-m", str(tiny_lm_dirs["plain"]), "--prompt-template",
            "Say:\\n{text}", "--reference-field", "summary", "-n", "3", "--shots", "1", "--stop", ".", "--stop", "!",
            "--no-chat", "--metrics", "rouge1,chrf", "--temperature", "0.7", "--seed", "3", "--no-progress"]
    printed = print_config(argv, capsys)
    values = yaml.safe_load(printed)
    assert values["stop"] == [".", "!"] and values["chat"] is False and values["prompt_template"] == "Say:\n{text}"
    assert values["metrics"] == ["rouge1", "chrf"] and not (tmp_path / "a").exists()
    (tmp_path / "a.yaml").write_text(printed, encoding="utf-8")
    assert main(argv) == 0
    assert main(["eval", "--config", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    capsys.readouterr()
    assert (tmp_path / "a" / "config.yaml").read_text(encoding="utf-8") == printed
    first, again = ((tmp_path / d / "predictions.jsonl").read_text(encoding="utf-8") for d in "ab")
    assert first == again and len(first.splitlines()) == 4
    assert main(["eval", "--config", str(tmp_path / "a.yaml"), "--shots", "-1"]) == 2
    assert "shots (--shots): must be >= 0, got -1" in capsys.readouterr().err


def test_recipe_files_parse_and_validate():
    """Every YAML file in recipes/ is one recipe's config and validates (nothing runs)."""
    from lmforge.evaluation.compare import CompareConfig
    from lmforge.evaluation.harness import EvalConfig
    from lmforge.training.pretrain import PretrainConfig
    from lmforge.training.sft import FinetuneConfig

    kinds = {"pretrain_shakespeare_1m.yaml": PretrainConfig, "finetune_dialogsum_lora.yaml": FinetuneConfig,
             "eval_dialogsum.yaml": EvalConfig, "dialogsum_lab.yaml": CompareConfig, "detox_ppo.yaml": CompareConfig}
    on_disk = {p.name for p in RECIPES.glob("*.yaml")}
    assert set(kinds) <= on_disk, on_disk
    configs = {name: load_config(cls, RECIPES / name) for name, cls in kinds.items()}
    pre, ft, ev = (configs[n] for n in ("pretrain_shakespeare_1m.yaml", "finetune_dialogsum_lora.yaml",
                                        "eval_dialogsum.yaml"))
    assert pre.steps == 1500 and pre.overrides["n_layer"] == 4 and pre.out_dir == Path("runs/shakespeare-1m")
    assert ft.method == "lora" and ft.prompt_template.endswith("\n\nSummary: ") and ft.limit == 800
    assert ev.shots == 2 and ev.fields.template.startswith("Summarize the following conversation.\n\n")


def test_eval_config_sampling_ranges_are_the_samplers():
    """EvalConfig checks sampling values early with torch-free copies of the sampler's limits: they must agree."""
    from lmforge.evaluation import harness
    from lmforge.generation import sampling

    assert (harness.MIN_TEMPERATURE, harness.MIN_TOP_P, harness.REPETITION_PENALTY_RANGE, harness.SEED_LIMIT) == (
        sampling.MIN_TEMPERATURE, sampling.MIN_TOP_P, sampling.REPETITION_PENALTY_RANGE, sampling.SEED_LIMIT)


def test_serve_config_from_a_file_and_flags(tmp_path, capsys):
    """`lmforge serve --config` reads the server's settings (flags win); the API key is never in a config."""
    printed = print_config(["serve", "my-model", "--port", "8123", "--max-batch", "4", "--api-key", "s3cret"], capsys)
    assert "s3cret" not in printed and "api_key" not in printed
    values = yaml.safe_load(printed)
    assert (values["model"], values["port"], values["max_batch"], values["host"]) == ("my-model", 8123, 4, "127.0.0.1")
    path = tmp_path / "serve.yaml"
    path.write_text(printed, encoding="utf-8")
    again = yaml.safe_load(print_config(["serve", "--config", str(path), "--max-queue", "2"], capsys))
    assert again == {**values, "max_queue": 2}
    path.write_text("port: 70000\n", encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == 2
    assert f"{path}:1: port: must be >= 0 and <= 65535, got 70000" in capsys.readouterr().err
    assert "--max-body-mb MAX_BODY_MB Largest request body in MiB; larger ones get 413" in help_text("serve", capsys)
