"""The command-line subcommands for training (``tokenizer train``, ``pretrain``, and ``finetune`` from ``sft.py``).

``register(subparsers)`` adds them to the ``lmforge`` parser; each handler imports its heavy
modules (torch, tokenizers) only when it runs, so ``lmforge --help`` stays fast. Handlers catch
nothing: bad input raises ``LmforgeError``, which ``lmforge.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import LmforgeError


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


def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmforge.training.pretrain import pretrain

    metrics = pretrain(model=a.model, corpus=a.corpus, tokenizer=a.tokenizer, out_dir=a.out_dir, seq_len=a.seq_len,
                       batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup=a.warmup, min_lr_ratio=a.min_lr_ratio,
                       weight_decay=a.weight_decay, grad_accum=a.grad_accum, clip=a.clip, precision=a.precision,
                       compile=a.compile, eval_every=a.eval_every, eval_batches=a.eval_batches,
                       save_every=a.save_every, log_every=a.log_every, val_fraction=a.val_fraction,
                       text_field=a.text_field, cache_dir=a.cache_dir, overrides=_parse_overrides(a.set),
                       resume=a.resume, seed=a.seed, device=a.device, overwrite=a.overwrite, force=a.force)
    print(json.dumps(metrics))
    print(f"model saved to {Path(a.out_dir) / 'final'}", file=sys.stderr)
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
    from lmforge.cli import _float_arg, _int_arg
    from lmforge.outputs import add_output_args

    p = sub.add_parser("pretrain", help="pretrain a model from scratch on a text corpus",
                       description="Pretrain a model (decoder: next-token; encoder: masked LM; encoder-decoder: "
                                   "T5 span corruption) on a corpus. Writes OUT_DIR/checkpoint (resumable with "
                                   "--resume), OUT_DIR/final (Hugging Face format), metrics.jsonl and loss.png.")
    p.add_argument("-m", "--model", default="tiny-llama",
                   help="a preset name (random init), a JSON file of config fields, or a model folder to continue "
                        "pretraining (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's config field, repeatable, e.g. --set n_layer=4 --set n_embd=128")
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (embedded: 42 plays and poems), a text/JSONL file, or a folder of *.txt/*.md "
                        "(default: %(default)s)")
    p.add_argument("--text-field", default="text", help="the text field of JSONL lines (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="'char' (a character vocabulary built from the corpus), a tokenizer folder, or omitted: the "
                        "model folder's own tokenizer, 'char' for presets")
    p.add_argument("-o", "--out-dir", default="runs/pretrain", help="output folder (default: %(default)s)")
    p.add_argument("--seq-len", type=_int_arg("--seq-len"), default=128,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_arg("--batch-size"), default=16,
                   help="sequences per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=_int_arg("--grad-accum"), default=1,
                   help="micro-batches per optimiser step (default: %(default)s)")
    p.add_argument("--steps", type=_int_arg("--steps"), default=1000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--lr", type=_float_arg("--lr", 0.0, low_open=True), default=1e-3,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=_int_arg("--warmup", 0), default=50,
                   help="linear warmup steps before the cosine decay (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=_float_arg("--min-lr-ratio", 0.0, 1.0), default=0.1,
                   help="the cosine ends at lr * this (default: %(default)s)")
    p.add_argument("--weight-decay", type=_float_arg("--weight-decay", 0.0), default=0.1,
                   help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--clip", type=_float_arg("--clip", 0.0), default=1.0,
                   help="max gradient norm, 0 = off (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start; default: off)")
    p.add_argument("--eval-every", type=_int_arg("--eval-every", 0), default=100,
                   help="validate every N steps, 0 = only at the end (default: %(default)s)")
    p.add_argument("--eval-batches", type=_int_arg("--eval-batches"), default=20,
                   help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--val-fraction", type=_float_arg("--val-fraction", 0.0, 1.0, low_open=True), default=0.05,
                   help="the last fraction of the corpus kept for validation (default: %(default)s)")
    p.add_argument("--save-every", type=_int_arg("--save-every", 0), default=100,
                   help="checkpoint every N steps, 0 = only at the end (default: %(default)s)")
    p.add_argument("--log-every", type=_int_arg("--log-every", 0), default=10,
                   help="write metrics every N steps (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where tokenised corpora are cached "
                        "(default: $LMFORGE_CACHE/tokens or ~/.cache/lmforge/tokens)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint exactly where it stopped")
    add_output_args(p, "pretrain")
    p.add_argument("--seed", type=_int_arg("--seed", 0), default=0,
                   help="seed for the init and the data order (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("tokenizer", help="tokenizer tools (train)", description="Tokenizer tools.")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE (or character) tokenizer on a corpus",
                         description="Train a tokenizer on a corpus and write tokenizer.json + tokenizer_config.json "
                                     "to OUTPUT; use it with --tokenizer OUTPUT anywhere in lmforge.")
    tt.add_argument("-o", "--output", required=True, help="output folder")
    add_output_args(tt, "tokenizer train")
    tt.add_argument("--corpus", default="shakespeare",
                    help="'shakespeare' (embedded), a text/JSONL file, or a folder of *.txt/*.md "
                         "(default: %(default)s)")
    tt.add_argument("--text-field", default="text", help="the text field of JSONL lines (default: %(default)s)")
    tt.add_argument("--kind", choices=("bpe", "char"), default="bpe",
                    help="byte-level BPE, or one token per character (default: %(default)s)")
    tt.add_argument("--vocab-size", type=_int_arg("--vocab-size", 1), default=8192,
                    help="BPE vocabulary size incl. the 256 bytes and special tokens (default: %(default)s)")
    tt.add_argument("--special-tokens", default=None,
                    help="comma-separated special tokens; the first is EOS and PAD (default: <|endoftext|>)")
    tt.set_defaults(func=cmd_tokenizer_train)

    from lmforge.training.sft import add_finetune_parser  # torch-free at import, like this module

    add_finetune_parser(sub)
