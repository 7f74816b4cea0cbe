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

from lmforge.cli.args import add_output_args, float_arg, int_arg, parse_targets
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
    p.add_argument("--seq-len", type=int_arg("--seq-len"), default=128,
                   help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int_arg("--batch-size"), default=16,
                   help="sequences per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int_arg("--grad-accum"), default=1,
                   help="micro-batches per optimiser step (default: %(default)s)")
    p.add_argument("--steps", type=int_arg("--steps"), default=1000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--lr", type=float_arg("--lr", 0.0, low_open=True), default=1e-3,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int_arg("--warmup", 0), default=50,
                   help="linear warmup steps before the cosine decay (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=float_arg("--min-lr-ratio", 0.0, 1.0), default=0.1,
                   help="the cosine ends at lr * this (default: %(default)s)")
    p.add_argument("--weight-decay", type=float_arg("--weight-decay", 0.0), default=0.1,
                   help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--clip", type=float_arg("--clip", 0.0), default=1.0,
                   help="max gradient norm, 0 = off (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start; default: off)")
    p.add_argument("--eval-every", type=int_arg("--eval-every", 0), default=100,
                   help="validate every N steps, 0 = only at the end (default: %(default)s)")
    p.add_argument("--eval-batches", type=int_arg("--eval-batches"), default=20,
                   help="validation batches per evaluation (default: %(default)s)")
    p.add_argument("--val-fraction", type=float_arg("--val-fraction", 0.0, 1.0, low_open=True), default=0.05,
                   help="the last fraction of the corpus kept for validation (default: %(default)s)")
    p.add_argument("--save-every", type=int_arg("--save-every", 0), default=100,
                   help="checkpoint every N steps, 0 = only at the end (default: %(default)s)")
    p.add_argument("--log-every", type=int_arg("--log-every", 0), default=10,
                   help="write metrics every N steps (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where tokenised corpora are cached "
                        "(default: $LMFORGE_CACHE/tokens or ~/.cache/lmforge/tokens)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint exactly where it stopped")
    add_output_args(p, "pretrain")
    p.add_argument("--seed", type=int_arg("--seed", 0), default=0,
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
    from lmforge.training.sft import finetune

    chat = {"auto": None, "chat": True, "plain": False}[a.template]
    result = finetune(a.model, a.train, a.dev, adapter=a.adapter, out_dir=a.out_dir, method=a.method, format=a.format,
                      prompt_template=_unescape(a.prompt_template), prompt_field=a.prompt_field,
                      response_field=a.response_field, chat=chat, max_len=a.max_len, pack=a.pack,
                      padding_side=a.padding_side, batch_size=a.batch_size, steps=a.steps, epochs=a.epochs, lr=a.lr,
                      min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup, weight_decay=a.weight_decay,
                      grad_accum=a.grad_accum, clip=a.clip, precision=a.precision, compile=a.compile,
                      eval_every=a.eval_every, eval_examples=a.eval_examples, eval_generate=a.eval_generate,
                      max_new_tokens=a.max_new_tokens, save_every=a.save_every, log_every=a.log_every,
                      train_limit=a.limit, resume=a.resume, seed=a.seed, device=a.device, lora_r=a.lora_r,
                      lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, rslora=a.rslora, quant=a.quant,
                      lora_targets=parse_targets(a.lora_targets), num_virtual_tokens=a.virtual_tokens,
                      prompt_init_text=a.prompt_init_text, overwrite=a.overwrite, force=a.force)
    print(json.dumps(result, indent=2), file=sys.stdout)
    return 0


def _positive(name: str, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value
    return parse


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    from lmforge.training.sft import METHODS  # torch-free at import

    """Add ``lmforge finetune`` to the subcommands ."""
    p = sub.add_parser(
        "finetune", help="instruction fine-tuning (SFT) on alpaca / chat / prompt-completion / any JSONL",
        description="Fine-tune a model on supervised examples; the loss covers response tokens only. Formats are "
                    "detected per record (alpaca: instruction/input/output; messages; prompt/completion) or given "
                    "by --prompt-template/--response-field for any JSONL. Writes OUT_DIR/final (a Hugging Face "
                    "directory), OUT_DIR/checkpoint (for --resume) and OUT_DIR/metrics.jsonl.")
    d = p.add_argument_group("data")
    d.add_argument("--train", nargs="+", required=True, metavar="FILE",
                   help="training files: .json (array), .jsonl or .jsonl.gz")
    d.add_argument("--dev", nargs="+", metavar="FILE", help="dev files for val_loss and ROUGE-L (default: none)")
    d.add_argument("--format", choices=("alpaca", "messages", "prompt-completion", "fields"), default=None,
                   help="force one record format (default: detected per record)")
    d.add_argument("--prompt-template",
                   help="prompt text with {field} placeholders, e.g. 'Summarize the following "
                        "conversation.\\n\\n{dialogue}\\n\\nSummary: ' (\\n and \\t are unescaped)")
    d.add_argument("--prompt-field", help="field holding the whole prompt (instead of --prompt-template)")
    d.add_argument("--response-field", help="field holding the response to learn, e.g. summary")
    d.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                   help="render with the model's chat template or as plain text (default: chat when the "
                        "tokenizer has a template)")
    d.add_argument("--max-len", type=_positive("--max-len"), default=None,
                   help="tokens per example; longer responses are cut, too-long prompts dropped "
                        "(default: 512 or the model's context window, whichever is smaller)")
    d.add_argument("--pack", action="store_true", help="pack several examples into each max-len row "
                                                       "(no attention across examples)")
    d.add_argument("--padding-side", choices=("right", "left"), default="right", help="padding side (default: right)")
    d.add_argument("--limit", type=_positive("--limit"), help="use only the first N training records")
    t = p.add_argument_group("training")
    t.add_argument("-m", "--model", default=None, help="model name or path (default: the embedded SmolLM2-135M)")
    t.add_argument("--adapter", default=None,
                   help="a PEFT adapter folder for MODEL: --method lora / prompt-tuning continue training it, "
                        "--method full merges a LoRA adapter into the weights first")
    t.add_argument("--method", choices=METHODS, default="full",
                   help="full: every weight; lora: low-rank adapters; qlora: LoRA over a 4-bit (or int8) frozen "
                        "base; prompt-tuning: trainable virtual tokens (default: full)")
    pe = p.add_argument_group("parameter-efficient methods")
    pe.add_argument("--lora-r", type=_positive("--lora-r"), default=16, help="LoRA rank (default: 16)")
    pe.add_argument("--lora-alpha", type=_positive("--lora-alpha", float), default=32.0,
                    help="LoRA alpha; the update is scaled by alpha/r (default: 32)")
    pe.add_argument("--lora-dropout", type=float_arg("--lora-dropout", 0.0, 0.99), default=0.05,
                    help="dropout on the LoRA input (default: 0.05)")
    pe.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated layer names, 'all-linear', or a regex over full names "
                         "(default: q_proj,k_proj,v_proj,o_proj)")
    pe.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    pe.add_argument("--quant", choices=("nf4", "int8"), default="nf4", help="qlora: base format (default: nf4)")
    pe.add_argument("--virtual-tokens", type=_positive("--virtual-tokens"), default=20,
                    help="prompt tuning: number of virtual tokens (default: 20)")
    pe.add_argument("--prompt-init-text", help="prompt tuning: initialise the virtual tokens from this text")
    t.add_argument("--batch-size", type=_positive("--batch-size"), default=8,
                   help="examples per micro-batch (default: 8)")
    t.add_argument("--grad-accum", type=_positive("--grad-accum"), default=1,
                   help="micro-batches per optimiser step (default: 1)")
    t.add_argument("--steps", type=_positive("--steps"), help="optimiser steps (default: one epoch)")
    t.add_argument("--epochs", type=_positive("--epochs", float), help="passes over the data (instead of --steps)")
    t.add_argument("--lr", type=_positive("--lr", float), default=None,
                   help="peak learning rate (default: 2e-5 full, 2e-4 LoRA/QLoRA, 3e-2 prompt tuning)")
    t.add_argument("--min-lr-ratio", type=float_arg("--min-lr-ratio", 0.0, 1.0), default=0.1,
                   help="cosine floor as a fraction of --lr (default: 0.1)")
    t.add_argument("--warmup", type=int_arg("--warmup", 0), default=0, help="linear warmup steps (default: 0)")
    t.add_argument("--weight-decay", type=float_arg("--weight-decay", 0.0), default=0.0,
                   help="AdamW weight decay (default: 0.0)")
    t.add_argument("--clip", type=float_arg("--clip", 0.0), default=1.0,
                   help="max gradient norm, 0 = off (default: 1.0)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (default: fp32)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    t.add_argument("--seed", type=int_arg("--seed", 0), default=0,
                   help="seed for init, shuffling and dropout (default: 0)")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=int_arg("--eval-every", 0), default=0,
                   help="evaluate every N steps; 0 = only at the end (default: 0)")
    e.add_argument("--eval-examples", type=_positive("--eval-examples"), default=200,
                   help="dev examples for val_loss (default: 200)")
    e.add_argument("--eval-generate", type=int_arg("--eval-generate", 0), default=20,
                   help="dev examples for greedy generation + ROUGE-L, 0 = none (default: 20)")
    e.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64,
                   help="generation length for ROUGE-L (default: 64)")
    e.add_argument("-o", "--out-dir", default="runs/sft", help="output folder (default: runs/sft)")
    e.add_argument("--save-every", type=int_arg("--save-every", 0), default=0,
                   help="checkpoint every N steps; 0 = only at the end")
    e.add_argument("--log-every", type=int_arg("--log-every", 0), default=10,
                   help="log the loss every N steps (default: 10)")
    e.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    add_output_args(e, "finetune")
    p.set_defaults(func=cmd_finetune)
