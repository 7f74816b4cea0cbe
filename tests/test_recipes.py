"""The recipe configs of the verbs (pretrain, finetune, eval, compare, serve, rlhf ppo/dpo, reward train): ``--print-config`` YAML that
reruns the same run through ``--config``, flags over the file, file:line errors, docstrings as ``--help``,
``OUT/config.yaml`` written by every run, and the YAML files in ``recipes/`` (parsed and validated only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lmforge.cli.main import build_parser, main
from lmforge.recipe_config import load_config
from test_dpo import pairs_file
from test_ppo import toy_reward  # noqa: F401 (a fixture)
from test_reward import _toy_csv, _toy_pairs, tiny_decoder, tiny_encoder  # noqa: F401 (fixtures)

RECIPES = Path(__file__).parent.parent / "recipes"
TIMING = ("tokens_per_s", "seconds", "elapsed", "time", "step_s")  # differ between two identical runs


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
    from lmforge.alignment.reward_recipe import RewardConfig
    from lmforge.alignment.rlhf import DPOConfig
    from lmforge.evaluation.compare import CompareConfig
    from lmforge.evaluation.harness import EvalConfig
    from lmforge.training.pretrain import PretrainConfig
    from lmforge.training.sft import FinetuneConfig

    kinds = {"pretrain_shakespeare_1m.yaml": PretrainConfig, "finetune_dialogsum_lora.yaml": FinetuneConfig,
             "eval_dialogsum.yaml": EvalConfig, "dialogsum_lab.yaml": CompareConfig, "detox_ppo.yaml": CompareConfig,
             "dpo_hh.yaml": DPOConfig, "reward_toxicity.yaml": RewardConfig}
    on_disk = {p.name for p in RECIPES.glob("*.yaml")}
    assert set(kinds) <= on_disk, on_disk
    configs = {name: load_config(cls, RECIPES / name) for name, cls in kinds.items()}
    pre, ft, ev = (configs[n] for n in ("pretrain_shakespeare_1m.yaml", "finetune_dialogsum_lora.yaml",
                                        "eval_dialogsum.yaml"))
    assert pre.steps == 1500 and pre.overrides["n_layer"] == 4 and pre.out_dir == Path("runs/shakespeare-1m")
    assert ft.method == "lora" and ft.prompt_template.endswith("\n\nSummary: ") and ft.limit == 800
    assert ev.shots == 2 and ev.fields.template.startswith("Summarize the following conversation.\n\n")
    dpo, rm = configs["dpo_hh.yaml"], configs["reward_toxicity.yaml"]
    assert (dpo.limit, dpo.steps, dpo.max_len, dpo.template, dpo.out_dir) == (64, 16, 256, "plain", Path("runs/dpo-hh"))
    assert rm.kind == "classifier" and rm.binary and rm.good_labels == ("neither",) and rm.max_train == 6000
    assert rm.labels == {"0": "hate", "1": "offensive", "2": "neither"}


RUN_LINE = re.compile(r"^#\s+lmforge ([a-z ]+?) --config recipes/(\S+\.yaml)", re.M)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_names_its_verb_and_holds_every_setting(name, capsys):
    """Each recipe's header shows the one `lmforge VERB --config recipes/NAME` that runs it; that verb's
    --print-config of the file gives back the file's own values (a verb recipe holds every resolved setting,
    as --print-config wrote it; a compare recipe's settings merge over its defaults); README names it."""
    path = RECIPES / name
    text = path.read_text(encoding="utf-8")
    verbs = {m.group(1) for m in RUN_LINE.finditer(text) if m.group(2) == name}
    assert len(verbs) == 1, f"{name}: the header must show one `lmforge VERB --config recipes/{name}` line"
    verb = verbs.pop().split()
    in_file = yaml.safe_load(text)
    printed = yaml.safe_load(print_config([*verb, "--config", str(path)], capsys))
    if verb == ["compare"]:
        assert set(in_file) <= set(printed)
        assert {k: printed[k] for k in in_file if k != "settings"} == {k: v for k, v in in_file.items()
                                                                      if k != "settings"}
        assert [s["label"] for s in printed["settings"]] == [s["label"] for s in in_file["settings"]]
    else:
        assert printed == in_file
    assert f"recipes/{name}" in (RECIPES.parent / "README.md").read_text(encoding="utf-8")


def test_the_ppo_and_pairwise_reward_recipes_are_the_readme_examples():
    """The README's `lmforge rlhf ppo` and pairwise `lmforge reward train` examples as recipes; the PPO prompts
    file is committed beside them and the reward folder is the one recipes/reward_toxicity.yaml writes."""
    from lmforge.alignment.reward_recipe import RewardConfig
    from lmforge.alignment.rl_inputs import load_prompts
    from lmforge.alignment.rlhf import PPOConfig

    ppo = load_config(PPOConfig, RECIPES / "ppo_detox_tweets.yaml")
    toxicity = load_config(RewardConfig, RECIPES / "reward_toxicity.yaml")
    assert (ppo.steps, ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs, ppo.max_new_tokens, ppo.kl_coef,
            ppo.lr, ppo.out_dir) == (40, 8, 4, 4, 24, 0.02, 5e-4, Path("runs/detox"))
    assert Path(ppo.reward) == toxicity.out_dir
    prompts = load_prompts(RECIPES.parent / ppo.prompts, ppo.prompt_field)
    assert len(prompts) >= 12 and len(set(prompts)) == len(prompts)
    assert all(p.startswith("Continue this tweet: ") for p in prompts)
    pairwise = load_config(RewardConfig, RECIPES / "reward_hh_pairwise.yaml")
    assert (pairwise.kind, pairwise.train_layers, pairwise.epochs, pairwise.eval_fraction, pairwise.seed) == (
        "pairwise", 0, 2, 0.2, 1)
    assert str(pairwise.data).endswith("hh_rlhf/harmless-base.test.jsonl.gz")
    assert pairwise.out_dir == Path("out/reward/hh-pairwise-smollm2")


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


# ----------------------------------------------------------------------------- rlhf ppo/dpo and reward train
def assert_config_reruns(argv: list[str], out: Path, capsys, *extra: str) -> str:
    """``argv --print-config`` prints YAML and runs nothing; ``argv`` (writing ``out``) writes the same YAML to
    ``out/config.yaml``; ``--config`` that YAML into ``out``-b reproduces ``metrics.jsonl``. Returns the YAML."""
    printed = print_config([*argv, "-o", str(out), *extra], capsys)
    assert not out.exists() and printed.startswith(f"# lmforge {' '.join(argv[:2])} config\n")
    path = out.parent / f"{out.name}.yaml"
    path.write_text(printed, encoding="utf-8")
    assert main([*argv, "-o", str(out), *extra]) == 0
    assert (out / "config.yaml").read_text(encoding="utf-8") == printed  # the run wrote the same YAML
    again = out.parent / f"{out.name}-b"
    assert main([*argv[:2], "--config", str(path), "-o", str(again), *extra]) == 0
    capsys.readouterr()
    first = rows(out)
    assert len(first) >= 2 and rows(again) == first
    assert (again / "config.yaml").read_text(encoding="utf-8") == printed.replace(f"out_dir: {out}",
                                                                                  f"out_dir: {again}")
    return printed


def test_dpo_print_config_then_config_reproduces_the_run(tiny_lm_dirs, tmp_path, capsys):
    argv = ["rlhf", "dpo", "-m", str(tiny_lm_dirs["plain"]), "--data", str(pairs_file(tmp_path)), "--steps", "3",
            "--batch-size", "3", "--lr", "3e-3", "--seed", "5", "--lora-r", "4", "--lora-targets", "q_proj,v_proj",
            "--eval-fraction", "0.25", "--template", "plain", "--precompute-ref"]
    printed = assert_config_reruns(argv, tmp_path / "a", capsys, "--threads", "1")
    values = yaml.safe_load(printed)
    assert (values["steps"], values["lora_targets"], values["precompute_ref"], values["template"]) == (
        3, "q_proj,v_proj", True, "plain")
    assert "threads" not in values and "resume" not in values  # how a run starts is not part of the recipe
    assert any("eval_loss" in r for r in rows(tmp_path / "a"))


def test_ppo_print_config_then_config_reproduces_the_run(tiny_lm_dirs, tmp_path, capsys, toy_reward):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfour five\nsix seven\nfox dog\n", encoding="utf-8")
    argv = ["rlhf", "ppo", "-m", str(tiny_lm_dirs["plain"]), "--prompts", str(prompts), "--reward", toy_reward,
            "--steps", "2", "--batch-size", "2", "--mini-batch-size", "2", "--ppo-epochs", "1", "-n", "4",
            "--target-kl", "1.0", "--seed", "3"]
    printed = assert_config_reruns(argv, tmp_path / "a", capsys, "--threads", "1")
    assert yaml.safe_load(printed)["reward"] == toy_reward and "max_new_tokens: 4\n" in printed
    assert all("completion" in r["sample"] for r in rows(tmp_path / "a"))  # the rollouts are the same too


def test_reward_train_print_config_then_config_reproduces_the_run(tiny_encoder, tiny_decoder, tmp_path,  # noqa: F811
                                                                  capsys):
    argv = ["reward", "train", str(_toy_csv(tmp_path / "toy.csv", n=40)), "--model", str(tiny_encoder),
            "--text-field", "text", "--label-field", "label", "--label-map", "0=toxic,1=fine", "--good-labels", "fine",
            "--max-len", "16", "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--eval-fraction", "0.25"]
    values = yaml.safe_load(assert_config_reruns(argv, tmp_path / "clf", capsys))
    assert values["good_labels"] == ["fine"] and values["kind"] == "classifier" and values["data"].endswith("toy.csv")
    argv = ["reward", "train", str(_toy_pairs(tmp_path / "pairs.jsonl", n=24)), "--kind", "pairwise", "-m",
            str(tiny_decoder), "--max-len", "12", "--batch-size", "8", "--epochs", "2", "--precision", "fp32"]
    values = yaml.safe_load(assert_config_reruns(argv, tmp_path / "pairwise", capsys))
    assert (values["kind"], values["train_layers"], values["lr"]) == ("pairwise", 0, None)


def test_alignment_flags_override_the_file(tmp_path, capsys):
    path = tmp_path / "dpo.yaml"
    path.write_text("data: pairs.jsonl\nbeta: 0.3\nprecompute_ref: true\nsteps: 9\n", encoding="utf-8")
    values = yaml.safe_load(print_config(["rlhf", "dpo", "--config", str(path), "--steps", "2",
                                          "--no-precompute-ref", "-o", "x"], capsys))
    assert (values["data"], values["beta"], values["steps"], values["precompute_ref"], values["out_dir"]) == (
        "pairs.jsonl", 0.3, 2, False, "x")
    path.write_text("prompts: p.txt\nreward: m:f\nbatch_size: 8\n", encoding="utf-8")
    values = yaml.safe_load(print_config(["rlhf", "ppo", "--config", str(path), "--mini-batch-size", "8"], capsys))
    assert (values["prompts"], values["batch_size"], values["mini_batch_size"]) == ("p.txt", 8, 8)
    path.write_text("data: a.csv\ngood_labels: [neither]\nbinary: true\n", encoding="utf-8")
    values = yaml.safe_load(print_config(["reward", "train", "b.csv", "--config", str(path), "--good-labels",
                                          "fine,kind", "--no-binary"], capsys))
    assert (values["data"], values["good_labels"], values["binary"]) == ("b.csv", ["fine", "kind"], False)


def test_alignment_config_errors_name_the_file_line_and_flag(tmp_path, capsys):
    path = tmp_path / "ppo.yaml"
    path.write_text("prompts: p.txt\nreward: m:f\nbatch_size: 6\n", encoding="utf-8")
    assert main(["rlhf", "ppo", "--config", str(path)]) == 2  # 6 rollouts do not split into minibatches of 4
    assert "batch_size (--batch-size): PPO batch size 6 is not divisible by the mini-batch size 4" in \
        capsys.readouterr().err
    path.write_text("data: a.csv\nkind: pairwise\nwarmup: 2\n", encoding="utf-8")
    assert main(["reward", "train", "--config", str(path)]) == 2
    assert f"{path}:3: warmup: must be >= 0.0 and <= 1.0, got 2" in capsys.readouterr().err
    assert main(["rlhf", "dpo", "--data", "p.jsonl", "--loss", "kto"]) == 2
    assert "error: --loss: expected one of 'dpo', 'ipo', got 'kto'" in capsys.readouterr().err
    text = help_text_of(["rlhf", "ppo"], capsys)
    assert "--kl-coef KL_COEF Beta: the per-token KL penalty (the starting value with --target-kl). (default: 0.05)" \
        in text and "--config FILE.yaml" in text
    assert "--train-layers TRAIN_LAYERS Train only the top K decoder blocks" in help_text_of(["reward", "train"], capsys)


def help_text_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())
