"""Typed recipe configs (lmforge.recipe_config) and the flags derived from them (lmforge.cli.options)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml

from lmforge.cli import options
from lmforge.errors import LmforgeError
from lmforge.recipe_config import field_help, from_yaml, load_config, option, to_yaml, validate, write_config


@dataclass(frozen=True)
class ToyRecipe:
    """A recipe with one field of every supported kind."""

    recipe: ClassVar[str] = "toy"

    data: Path
    """Training data (JSONL)."""
    steps: int = option(100, min=1, group="training")
    """Optimiser steps."""
    lr: float = option(3e-4, positive=True, group="training")
    """Peak learning rate: 100% of it is reached at the end of warmup."""
    dropout: float = option(0.0, min=0.0, max=1.0, max_exclusive=True)
    """Dropout probability."""
    name: str = "toy"
    """Run name."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision."""
    seed: int | None = None
    """Random seed; none picks one."""
    clip: float | None = option(1.0, min=0.0)
    """Max gradient norm; none turns clipping off."""
    targets: tuple[str, ...] = option(("q_proj", "v_proj"), sep=",")
    """Layer names to adapt."""
    tags: list[str] = option(default_factory=list)
    """Free-form tags."""
    ratios: tuple[float, ...] = option((0.5,), min=0.0, max=1.0)
    """Mixing ratios."""
    template: str | Path = "default"
    """A template name or a template file."""
    out_dir: Path = option(Path("runs/toy"), flags=("-o", "--out-dir"))
    """Output folder."""
    progress: bool = True
    """Show progress bars."""
    pack: bool = option(False, flags=("-p",))
    """Pack several examples into one row."""
    extra: dict[str, Any] = option(default_factory=dict, cli=False)
    """Extra model settings (YAML only)."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class FilesRecipe:
    """Positional lists, choices given by option(), an optional bool."""

    files: tuple[Path, ...] = ()
    """Input files."""
    mode: str = option("fast", choices=("fast", "exact"))
    """How to read them."""
    keep: bool | None = None
    """Keep the inputs; none decides per file."""

    def __post_init__(self) -> None:
        validate(self)


def _parser(**kwargs: Any) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lmforge")
    sub = top.add_subparsers(dest="command")
    p = sub.add_parser("toy")
    options.add_recipe_args(p, ToyRecipe, positional=("data",), **kwargs)
    options.add_config_args(p)
    return top


def _cfg(argv: list[str], **overrides: Any) -> ToyRecipe:
    return options.recipe_from_args(ToyRecipe, _parser().parse_args(["toy", *argv]), **overrides)


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _help() -> str:
    top = _parser()
    return top._subparsers._group_actions[0].choices["toy"].format_help()


def test_every_field_has_its_docstring_as_help():
    helps = field_help(ToyRecipe)
    assert helps["steps"] == "Optimiser steps." and helps["extra"] == "Extra model settings (YAML only)."
    assert all(helps.values())
    text = " ".join(_help().split())
    assert "Optimiser steps. (default: 100)" in text
    assert "Peak learning rate: 100% of it is reached" in text  # '%' survives argparse's formatting
    assert "Training data (JSONL). (required)" in text and "DATA" in text
    assert "-o OUT_DIR, --out-dir OUT_DIR Output folder. (default: runs/toy)" in text
    assert "--no-progress, --progress Show progress bars. (default: on)" in text
    assert "-p, --pack, --no-pack" in text and "--precision {fp32,bf16}" in text
    assert "training:" in text  # option(group=...) becomes a help section
    assert "--extra" not in text  # cli=False
    assert "--config FILE.yaml" in text and "--print-config" in text


def test_defaults_dashed_flags_and_aliases():
    assert _cfg(["d.jsonl"]) == ToyRecipe(data=Path("d.jsonl"))
    cfg = _cfg(["d.jsonl", "--out-dir", "a", "--steps", "7", "--lr", "1e-3", "--precision", "bf16", "--name", "n"])
    assert (cfg.out_dir, cfg.steps, cfg.lr, cfg.precision, cfg.name) == (Path("a"), 7, 1e-3, "bf16", "n")
    assert _cfg(["d.jsonl", "-o", "b"]).out_dir == Path("b")
    assert isinstance(_cfg(["d.jsonl", "--template", "t.j2"]).template, str)


def test_bool_flags_go_both_ways():
    assert _cfg(["d"]).progress is True and _cfg(["d", "--no-progress"]).progress is False
    assert _cfg(["d", "--no-progress", "--progress"]).progress is True
    assert _cfg(["d"]).pack is False and _cfg(["d", "-p"]).pack is True and _cfg(["d", "--pack"]).pack is True
    assert _cfg(["d", "--pack", "--no-pack"]).pack is False


def test_none_and_lists_on_the_command_line():
    assert _cfg(["d", "--seed", "5"]).seed == 5 and _cfg(["d", "--seed", "none"]).seed is None
    assert _cfg(["d", "--clip", "None"]).clip is None and _cfg(["d", "--clip", "0.5"]).clip == 0.5
    assert _cfg(["d", "--targets", "q_proj, k_proj,,v_proj"]).targets == ("q_proj", "k_proj", "v_proj")
    assert _cfg(["d", "--tags", "a", "b"]).tags == ["a", "b"]
    assert _cfg(["d", "--ratios", "0.25", "1"]).ratios == (0.25, 1.0)


def test_positional_list_choices_and_optional_bool():
    p = argparse.ArgumentParser()
    options.add_recipe_args(p.add_argument_group("inputs"), FilesRecipe, positional=("files",))
    assert "--mode {fast,exact}" in p.format_help() and "FILES" in p.format_help()
    cfg = options.recipe_from_args(FilesRecipe, p.parse_args(["a", "b", "--keep", "false"]))
    assert cfg == FilesRecipe(files=(Path("a"), Path("b")), keep=False)
    assert options.recipe_from_args(FilesRecipe, p.parse_args([])) == FilesRecipe()
    assert options.recipe_from_args(FilesRecipe, p.parse_args(["--keep", "none"])).keep is None
    with pytest.raises(LmforgeError, match="mode \\(--mode\\): must be one of 'fast', 'exact', got 'slow'"):
        options.recipe_from_args(FilesRecipe, p.parse_args(["--mode", "slow"]))
    with pytest.raises(LmforgeError, match="--keep: expected true or false or null, got 'maybe'"):
        options.recipe_from_args(FilesRecipe, p.parse_args(["--keep", "maybe"]))


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = _write(tmp_path, "data: from-file.jsonl\nsteps: 5\nlr: 0.1\nprogress: false\nseed: 3\n")
    cfg = _cfg(["--config", str(path), "--steps", "7", "--progress", "--seed", "none"])
    assert (cfg.data, cfg.steps, cfg.lr, cfg.progress, cfg.seed) == (Path("from-file.jsonl"), 7, 0.1, True, None)
    assert cfg.dropout == 0.0 and cfg.name == "toy"  # defaults where neither says anything
    assert _cfg(["cli.jsonl", "--config", str(path)]).data == Path("cli.jsonl")
    assert _cfg(["--config", str(path)], steps=9).steps == 9  # caller overrides come last


def test_only_registered_fields_are_taken_from_the_namespace():
    top = argparse.ArgumentParser()
    options.add_recipe_args(top, ToyRecipe, skip=("seed",))
    top.add_argument("--seed", default="not-an-int")  # the caller's own flag, not a recipe one
    ns = top.parse_args(["--data", "d"])
    assert options.recipe_from_args(ToyRecipe, ns).seed is None
    assert options.recipe_from_args(ToyRecipe, ns, seed=4).seed == 4


def test_print_config_round_trips_through_config(tmp_path, capsys):
    argv = ["d.jsonl", "--steps", "3", "--lr", "1e-5", "--seed", "0", "--clip", "none", "--targets", "a,b",
            "--tags", "yes", "1e-4", "--ratios", "0", "--no-progress", "-p", "-o", "out dir", "--name", "null"]
    cfg = _cfg([*argv, "--print-config"])
    printed = capsys.readouterr().out
    assert printed.startswith("# lmforge toy config\n") and "# Optimiser steps.\nsteps: 3\n" in printed
    again = _cfg(["--config", str(_write(tmp_path, printed))])
    assert again == cfg and again.tags == ["yes", "1e-4"] and again.name == "null"


def test_yaml_round_trip_for_every_field_type(tmp_path):
    cfg = ToyRecipe(data=Path("a/b.jsonl"), steps=2, lr=1e-10, dropout=0.5, name="no: # not a comment\nline 2",
                    precision="bf16", seed=0, clip=None, targets=("true", "0x10", "1e3"), tags=["é", "~"],
                    ratios=(0.0, 1.0), template=Path("t.j2"), out_dir=Path("o"), progress=False, pack=True,
                    extra={"rope": {"factor": 8.0, "names": ["x"]}, "n": None})
    text = to_yaml(cfg)
    assert "# lmforge toy config" in text and "data: a/b.jsonl" in text
    assert from_yaml(ToyRecipe, text)["targets"] == ("true", "0x10", "1e3")
    assert load_config(ToyRecipe, _write(tmp_path, text)) == dataclasses.replace(cfg, template="t.j2")
    bare = to_yaml(cfg, comments=False)
    assert "#" not in bare.split("\n", 1)[1].replace("# not a comment", "")


def test_yaml_reads_12_style_scalars():
    values = from_yaml(ToyRecipe, "lr: 1e-4\nname: no\nclip: 1\nsteps: 1_000\ndropout: .5\n")
    assert values == {"lr": 1e-4, "name": "no", "clip": 1.0, "steps": 1000, "dropout": 0.5}
    assert isinstance(values["clip"], float)


def test_unknown_key_names_file_line_key_and_close_match(tmp_path):
    path = _write(tmp_path, "data: d\n# comment\nstepz: 3\n")
    with pytest.raises(LmforgeError) as e:
        _cfg(["--config", str(path)])
    msg = str(e.value)
    assert f"{path}:3:" in msg and "'stepz'" in msg and "did you mean 'steps'" in msg and "out_dir" in msg


def test_wrong_type_names_line_field_and_expected_type(tmp_path):
    path = _write(tmp_path, "data: d\nsteps: many\n")
    with pytest.raises(LmforgeError, match=re.escape(f"{path}:2: steps: expected an integer, got 'many'")):
        load_config(ToyRecipe, path)
    for text, words in [("steps: 2.0", "an integer"), ("progress: yes", "true or false"),
                        ("precision: fp16", "one of 'fp32', 'bf16'"), ("targets: q_proj", "a list"),
                        ("name: 3", "a string"), ("data:", "a path, got null"), ("extra: [1]", "a mapping")]:
        with pytest.raises(LmforgeError, match=f"<config>:1: {text.split(':')[0]}: expected {words}"):
            from_yaml(ToyRecipe, text)


def test_bad_yaml_files(tmp_path):
    cases = {"steps: 1\nsteps: 2\n": ":2: steps is given twice", "- a\n- b\n": ":1: expected 'key: value'",
             "steps: [1\n": "not valid YAML", "a: 1\n---\nb: 2\n": "not valid YAML"}
    for text, words in cases.items():
        with pytest.raises(LmforgeError, match=words):
            from_yaml(ToyRecipe, text, source="f.yaml")
    with pytest.raises(LmforgeError, match="--config .*nope.yaml: no such file"):
        load_config(ToyRecipe, tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(LmforgeError, match="not UTF-8"):
        load_config(ToyRecipe, tmp_path / "bin.yaml")
    assert from_yaml(ToyRecipe, "") == {} and from_yaml(ToyRecipe, "# only a comment\n") == {}


def test_out_of_range_and_non_finite_values_name_the_flag_and_range(tmp_path):
    cases = [(["--lr", "-1"], "lr (--lr): must be > 0, got -1.0"), (["--lr", "0"], "must be > 0, got 0.0"),
             (["--steps", "0"], "steps (--steps): must be >= 1, got 0"),
             (["--dropout", "1"], "dropout (--dropout): must be >= 0.0 and < 1.0, got 1.0"),
             (["--lr", "nan"], "lr (--lr): must be a finite number, got nan"),
             (["--clip", "inf"], "clip (--clip): must be a finite number, got inf"),
             (["--ratios", "0.5", "2"], "ratios (--ratios): must be >= 0.0 and <= 1.0, got 2.0"),
             (["--steps", "abc"], "--steps: expected an integer, got 'abc'"),
             (["--seed", "1.5"], "--seed: expected an integer or null, got '1.5'"),
             (["--precision", "fp16"], "--precision: expected one of 'fp32', 'bf16', got 'fp16'")]
    for argv, words in cases:
        with pytest.raises(LmforgeError) as e:
            _cfg(["d", *argv])
        assert words in str(e.value), (argv, str(e.value))
    with pytest.raises(LmforgeError, match=r"run.yaml:2: lr: must be a finite number, got nan"):
        load_config(ToyRecipe, _write(tmp_path, "data: d\nlr: .nan\n"))


def test_python_api_validates_and_normalises():
    cfg = ToyRecipe(data="d", lr=1, targets=["a"], out_dir="o")
    assert (cfg.data, cfg.lr, cfg.targets, cfg.out_dir) == (Path("d"), 1.0, ("a",), Path("o"))
    assert isinstance(cfg.lr, float)
    for kwargs, words in [({"steps": True}, "steps (--steps): expected an integer, got True"),
                          ({"lr": math.inf}, "lr (--lr): must be a finite number"),
                          ({"data": ""}, "data (--data): expected a path"),
                          ({"progress": 1}, "progress (--no-progress): expected true or false"),
                          ({"extra": {1: 2}}, "extra: expected a mapping")]:
        with pytest.raises(LmforgeError, match=re.escape(words)):
            ToyRecipe(**{"data": "d", **kwargs})


def test_missing_required_field_names_it():
    with pytest.raises(LmforgeError, match=r"data \(--data\) is required: give it on the command line or in"):
        _cfg([])
    with pytest.raises(LmforgeError, match="unknown toy setting 'nope'"):
        load_config(ToyRecipe, None, {"data": "d", "nope": 1})


def test_a_field_without_a_flag_form_must_be_marked_off_the_cli():
    @dataclass
    class Bad:
        settings: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="option\\(cli=False\\)"):
        options.add_recipe_args(argparse.ArgumentParser(), Bad)


def test_write_config_is_atomic(tmp_path, monkeypatch):
    cfg = ToyRecipe(data=Path("d"), steps=4)
    path = write_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml" and os.listdir(path.parent) == ["config.yaml"]
    assert load_config(ToyRecipe, path) == cfg

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_config(dataclasses.replace(cfg, steps=5), path.parent)
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left, the old file intact
    assert yaml.safe_load(path.read_text())["steps"] == 4
