"""The command-line subcommands for training: ``tokenizer train``, ``pretrain`` and ``finetune``.

``register(subparsers)`` adds them to the ``lmforge`` parser; each handler imports its heavy
modules (torch, tokenizers) only when it runs, so ``lmforge --help`` stays fast. Handlers catch
nothing: bad input raises ``LmforgeError``, which ``lmforge.cli.main`` prints as one line.

How a recipe verb is wired (the pattern ``rlhf`` and ``reward`` follow too):

1. The recipe module declares a config dataclass (``PretrainConfig`` in ``training/pretrain.py``): one
   field per setting, ``option(...)`` for flag aliases and ranges, a docstring under each field (the
   ``--help`` text), ``validate(self)`` in ``__post_init__``; the recipe function takes it
   (``pretrain(cfg, resume=..., overwrite=..., force=...)``: how a run starts is not part of the recipe).
2. ``register`` builds the flags with ``options.add_recipe_args(parser, Config)`` (``skip=`` for fields
   parsed by hand, e.g. an append-style flag), adds the run flags (``--resume``, ``add_output_args``) and
   ``options.add_config_args`` (``--config FILE.yaml``, ``--print-config``).
3. The handler builds the config with ``options.recipe_from_args(Config, a, **values_parsed_by_hand)``
   (defaults < file < flags), returns 0 after ``--print-config``, and else calls the recipe, which writes
   ``OUT/config.yaml`` (name it in the verb's ``lmforge.outputs.VERBS`` entry).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lmforge.cli.options as options
from lmforge.cli.args import add_nproc_arg, add_output_args, int_arg
from lmforge.errors import LmforgeError
from lmforge.recipe_config import from_yaml


def _parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, true/false, null), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LmforgeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set n_layer=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _set_overrides(cls: type, a: argparse.Namespace) -> dict:
    """``--set KEY=VALUE`` flags merged over the ``overrides`` of the ``--config`` file, as a recipe override."""
    if not a.set:
        return {}
    base = from_yaml(cls, Path(a.config_file)).get("overrides", {}) if a.config_file else {}
    return {"overrides": {**base, **_parse_overrides(a.set)}}


def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmforge.training.pretrain import PretrainConfig, pretrain

    cfg = options.recipe_from_args(PretrainConfig, a, **_set_overrides(PretrainConfig, a))
    if a.print_config:
        return 0
    metrics = pretrain(cfg, resume=a.resume, overwrite=a.overwrite, force=a.force)
    print(json.dumps(metrics))
    print(f"model saved to {Path(cfg.out_dir) / 'final'}", file=sys.stderr)
    return 0


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from lmforge.data.corpus import corpus_text
    from lmforge.outputs import check_output, claim_output
    from lmforge.training.tokenizer_train import char_tokenizer, train_bpe

    check_output(a.output, "tokenizer train", force=a.force)  # before the corpus is read and the tokenizer trained
    text = corpus_text(a.corpus, a.text_field)
    if a.kind == "char":
        tok = char_tokenizer(text)
    else:
        specials = [t for t in a.special_tokens.split(",") if t] if a.special_tokens is not None else None
        tok = train_bpe([text[i: i + 1_000_000] for i in range(0, len(text), 1_000_000)], a.vocab_size, specials)
    with claim_output(a.output, "tokenizer train", force=a.force) as out:
        tok.save(out)
    print(f"wrote a {a.kind} tokenizer with {tok.vocab_size} tokens to {out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the ``lmforge`` parser."""
    from lmforge.training.pretrain import PretrainConfig  # torch-free at import

    p = sub.add_parser("pretrain", help="pretrain a model from scratch on a text corpus",
                       description="Pretrain a model (decoder: next-token; encoder: masked LM; encoder-decoder: "
                                   "T5 span corruption) on a corpus. Writes OUT_DIR/checkpoint (resumable with "
                                   "--resume), OUT_DIR/final (Hugging Face format), metrics.jsonl and loss.png.")
    options.add_recipe_args(p, PretrainConfig)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's config field, repeatable, e.g. --set n_layer=4 --set n_embd=128 "
                        "(the config's 'overrides')")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint exactly where it stopped")
    add_output_args(p, "pretrain")
    add_nproc_arg(p)
    options.add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("tokenizer", help="tokenizer tools (train)", description="Tokenizer tools.")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE (or character) tokenizer on a corpus",
                         description="Train a tokenizer on a corpus and write tokenizer.json + tokenizer_config.json "
                                     "to OUTPUT; use it with --tokenizer OUTPUT anywhere in lmforge.")
    tt.add_argument("-o", "--output", required=True, help="output folder")
    add_output_args(tt, "tokenizer train")
    tt.add_argument("--corpus", default="shakespeare",
                    help="'shakespeare' (embedded), a text file (read whole), a record file (.jsonl, .json, .csv, "
                         "optionally gzipped, or .parquet), or a folder of *.txt/*.md (else of record files) "
                         "(default: %(default)s)")
    tt.add_argument("--text-field", default="text",
                    help="the text field of a record file; a dotted path reaches into nested records, e.g. "
                         "meta.body (default: %(default)s)")
    tt.add_argument("--kind", choices=("bpe", "char"), default="bpe",
                    help="byte-level BPE, or one token per character (default: %(default)s)")
    tt.add_argument("--vocab-size", type=int_arg("--vocab-size", 1), default=8192,
                    help="BPE vocabulary size incl. the 256 bytes and special tokens (default: %(default)s)")
    tt.add_argument("--special-tokens", default=None,
                    help="comma-separated special tokens; the first is EOS and PAD (default: <|endoftext|>)")
    tt.set_defaults(func=cmd_tokenizer_train)


    add_finetune_parser(sub)


# ----------------------------------------------------------------------------- finetune
def _unescape(text: str | None) -> str | None:
    """Turn the two-character sequences \\n and \\t typed on a shell line into newline and tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_finetune(a: argparse.Namespace) -> int:
    from lmforge.training.sft import FinetuneConfig, finetune

    if getattr(a, "prompt_template", None) is not None:
        a.prompt_template = _unescape(a.prompt_template)
    cfg = options.recipe_from_args(FinetuneConfig, a)
    if a.print_config:
        return 0
    if a.show_example:
        from lmforge.training.sft import show_example

        print(show_example(cfg, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR")), end="")
        return 0
    result = finetune(cfg, resume=a.resume, overwrite=a.overwrite, force=a.force)
    print(json.dumps(result, indent=2), file=sys.stdout)
    return 0


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge finetune`` to the subcommands: its flags come from ``FinetuneConfig``."""
    from lmforge.training.sft import FinetuneConfig  # torch-free at import

    p = sub.add_parser(
        "finetune", help="instruction fine-tuning (SFT) on alpaca / chat / prompt-completion / any JSONL",
        description="Fine-tune a model on supervised examples; the loss covers response tokens only. Formats are "
                    "detected per record (alpaca: instruction/input/output; messages; prompt/completion) or given "
                    "by --prompt-template/--response-field for any JSONL. Writes OUT_DIR/final (a Hugging Face "
                    "directory), OUT_DIR/checkpoint (for --resume), OUT_DIR/metrics.jsonl and OUT_DIR/config.yaml "
                    "(the resolved settings: rerun with --config).")
    options.add_recipe_args(p, FinetuneConfig)
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    # An action like --print-config, not a recipe setting: it is not saved in config.yaml and changes no run.
    run.add_argument("--show-example", action="store_true",
                     help="print the first training example as it will be trained (tokens with no loss in [[ ]], "
                          "dim on a terminal; then the trained tokens alone) and exit without training; loads "
                          "the tokenizer and the data, not the model")
    add_output_args(run, "finetune")
    add_nproc_arg(run)
    options.add_config_args(run)
    p.set_defaults(func=cmd_finetune)
