"""The ``lmforge`` command line: each subcommand parses its flags and calls the Python API.

Bad input ends in one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from lmforge.checkpoints.resolve import DEFAULT_ENCODER, DEFAULT_MODEL
from lmforge.cli.args import (
    add_model_args,
    add_sampling_args,
    add_speed_args,
    int_arg,
    load_generator,
    sampling_kwargs,
)
from lmforge.errors import LmforgeError
from lmforge.outputs import launched_rank


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `error: lmforge generate: argument --top-p: ...`, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _utf8_argv(argv: list[str]) -> None:
    """Refuse command-line arguments that are not UTF-8: Python passes such bytes on as lone surrogates, which
    the tokenizer (and every file written) cannot take."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape" if _escaped(arg) else "backslashreplace")
            raise LmforgeError(f"argument {i} is not valid UTF-8 text ('{shown.decode('utf-8', 'backslashreplace')}'); "
                               "lmforge reads its command line as UTF-8") from None


def _escaped(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def read_stdin(line: bool = False) -> str:
    """All of standard input (or one line of it) as text; bytes that are not UTF-8 are a one-line error."""
    try:
        text = sys.stdin.readline() if line else sys.stdin.read()
    except UnicodeDecodeError as e:
        raise LmforgeError(f"standard input is not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded); "
                           "convert it first, e.g. with iconv -t UTF-8") from None
    try:
        text.encode("utf-8")  # a C/POSIX locale decodes stdin with surrogateescape instead of failing
    except UnicodeEncodeError as e:
        raise LmforgeError(f"standard input is not UTF-8 text (character {e.start} cannot be encoded); "
                           "convert it first, e.g. with iconv -t UTF-8") from None
    return text


def _read_prompt(a: argparse.Namespace) -> str:
    if a.prompt is not None and a.file is not None:
        raise LmforgeError("give the prompt either as an argument or with --file, not both")
    if a.file is not None:
        path = Path(a.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path}: no such file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--file {path}: not UTF-8 text (byte {e.start})") from None
    if a.prompt is not None and a.prompt != "-":
        return a.prompt
    if a.prompt is None and sys.stdin.isatty():
        raise LmforgeError("no prompt: pass it as an argument, with --file PATH, or on standard input")
    return read_stdin()


def cmd_generate(a: argparse.Namespace) -> int:
    from lmforge.prompts import build_messages, build_prompt, load_examples

    prompt = _read_prompt(a)
    if not prompt.strip():
        raise LmforgeError("the prompt is empty")
    examples = load_examples(a.shots) if a.shots else []
    lm = load_generator(a)
    chat = lm.has_chat_template and not a.raw
    if a.system and not chat:
        raise LmforgeError("--system needs a chat template; drop --raw or the --system flag")
    if chat:
        query = build_messages(prompt, a.instruction, examples, system=a.system)
    elif examples or a.instruction:
        query = build_prompt(prompt, a.instruction, examples)
    else:
        query = prompt
    if a.show_prompt:
        shown = lm.tokenizer.decode(lm.encode(query, chat=chat), skip_special_tokens=False)
        print(f"--- prompt ---\n{shown}\n--- output ---", file=sys.stderr)
    kwargs = sampling_kwargs(a)
    if a.json_schema is not None or a.regex is not None:
        from lmforge.generation.constrained import read_schema

        if a.json_schema is not None and a.regex is not None:
            raise LmforgeError("give either --json-schema or --regex, not both")
        kwargs.update(json_schema=None if a.json_schema is None else read_schema(a.json_schema), regex=a.regex)
    if a.stream:
        for piece in lm.stream(query, chat=chat, **kwargs):
            print(piece, end="", flush=True)
        print()
    else:
        print(lm.generate(query, chat=chat, **kwargs))
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from lmforge.cli.chat import chat_loop

    lm = load_generator(a)
    if not lm.has_chat_template:
        raise LmforgeError(f"{a.model} has no chat template, so it cannot chat; use `lmforge generate` instead")
    kwargs = sampling_kwargs(a)
    chat_loop(lambda: read_stdin(line=True), lambda messages: lm.stream(messages, **kwargs), model=a.model,
              system=a.system, interactive=sys.stdin.isatty())
    return 0


def _read_texts(a: argparse.Namespace) -> list[str]:
    texts = list(a.texts)
    if a.file:
        path = Path(a.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path}: no such file")
        try:
            texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--file {path}: not UTF-8 text (byte {e.start})") from None
    if not texts:
        raise LmforgeError("no texts: pass them as arguments or with --file (one per line)")
    return texts


def cmd_embed(a: argparse.Namespace) -> int:
    from lmforge.embed import Encoder
    from lmforge.lm import load

    texts = _read_texts(a)
    if a.similarity and len(texts) % 2:
        raise LmforgeError(f"--similarity compares texts in pairs, but {len(texts)} texts were given")
    if a.output and Path(a.output).suffix not in (".jsonl", ".npy"):
        raise LmforgeError(f"--output {a.output}: use a .jsonl or .npy file name")
    if a.output and not a.similarity:
        from lmforge.outputs import check_output

        check_output(a.output, "embed", force=a.force)  # before the model loads
    enc = load(a.model, device=a.device, dtype=a.dtype, adapter=a.adapter)
    if not isinstance(enc, Encoder):
        raise LmforgeError(f"{a.model} is not an encoder-only model; `lmforge embed` needs one, "
                           f"such as {DEFAULT_ENCODER}")
    vecs = enc.embed(texts, pooling=a.pooling, normalize=not a.no_normalize, batch_size=a.batch_size,
                     truncate=not a.no_truncate)
    if a.similarity:
        for i in range(0, len(texts), 2):
            cos = torch_cosine(vecs[i], vecs[i + 1])
            print(f"{cos:.4f}\t{texts[i]}\t{texts[i + 1]}")
        return 0
    if a.output:
        write_vectors(Path(a.output), texts, vecs, force=a.force)
        print(f"wrote {len(texts)} vectors of size {vecs.shape[1]} to {a.output}", file=sys.stderr)
    else:
        for text, vec in zip(texts, vecs.tolist()):
            print(json.dumps({"text": text, "embedding": [round(x, 7) for x in vec]}))
    return 0


def torch_cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def write_vectors(path: Path, texts: list[str], vecs, force: bool = False) -> None:
    """JSONL ({"text", "embedding"} per line) or .npy (N, C) float32, written to a temp file then renamed.
    An existing file at ``path`` is replaced only with ``force`` (``lmforge.outputs``)."""
    from lmforge.io import atomic_open
    from lmforge.outputs import prepare_output

    prepare_output(path, "embed", force=force)
    try:
        with atomic_open(path, "wb") as f:
            if path.suffix == ".npy":
                import numpy as np

                np.save(f, vecs.numpy().astype("float32"))
            else:
                for text, vec in zip(texts, vecs.tolist()):
                    f.write((json.dumps({"text": text, "embedding": vec}) + "\n").encode("utf-8"))
    except OSError as e:  # permission denied, a read-only file system, no space: nothing is left half-written
        raise LmforgeError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_merge(a: argparse.Namespace) -> int:
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.lm import load
    from lmforge.outputs import check_inputs, claim_output
    from lmforge.peft.lora import lora_layers, merge_lora

    # never into (or around) the adapter or base model it reads, even with --force
    check_inputs(a.output, "merge", {"adapter": a.adapter, "model": a.model}, strict=True)
    with claim_output(a.output, "merge", force=a.force) as out:
        loaded = load(a.model, adapter=a.adapter, dtype=a.dtype)
        if not list(lora_layers(loaded.model)):
            raise LmforgeError(f"{a.adapter} is not a LoRA adapter; only LoRA adapters can be merged into the "
                               "weights (a prompt-tuning adapter stays an adapter: use --adapter)")
        model = merge_lora(loaded.model)
        save_hf_dir(model, out, tokenizer=loaded.tokenizer,
                    generation_config=getattr(loaded, "generation_config", None))
    print(f"merged {a.adapter} into {a.model}: wrote {out}", file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from lmforge.info import describe, format_info

    info = describe(a.model)
    if a.adapter:
        from lmforge.info import describe_adapter

        info["adapter"] = describe_adapter(a.adapter, info["parameters"])
    print(json.dumps(info, indent=2) if a.json else format_info(info))
    return 0


class _Version(argparse.Action):
    """``lmforge --version``: lmforge's and torch's versions from the installed packages' metadata (torch itself is
    not imported, so this is instant)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        print(version_line())
        parser.exit(0)


def version_line() -> str:
    """``lmforge X.Y.Z (torch A.B.C, Python D.E.F)`` from package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"lmforge {of('lmforge')} (torch {of('torch')}, Python {sys.version.split()[0]})"


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` while a command runs: ``warning: MESSAGE`` on one line of stderr, without Python's
    source file, line number and source line."""
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmforge",
        description="Run, inspect and chat with language models in lmforge's own PyTorch code.",
        epilog="Run `lmforge COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action=_Version, help="print lmforge's version (and torch's) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation or answer for one prompt. Instruct models get their "
                                   "chat template applied (use --raw for plain completion).")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or omitted reads standard input")
    g.add_argument("-f", "--file", help="read the prompt from this UTF-8 file")
    g.add_argument("--shots", metavar="FILE",
                   help="few-shot examples: JSONL/JSON with input/output fields, placed before the prompt in order")
    g.add_argument("--instruction", help="an instruction placed before the examples and the prompt")
    g.add_argument("--system", help="system message (chat-templated models only)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template: plain text completion")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--show-prompt", action="store_true", help="print the exact prompt text to stderr first")
    g.add_argument("--json-schema", metavar="FILE",
                   help="structured output: the answer is JSON valid against the JSON schema in FILE "
                        "(README \"Structured output\")")
    g.add_argument("--regex", metavar="PATTERN", help="structured output: the whole answer matches this regex")
    add_model_args(g)
    add_speed_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model that has a chat template. Reads one message per line from "
                                   "standard input (a message between \"\"\" marks may span lines); replies go to "
                                   "standard output. /help lists the commands: /reset clears the conversation, "
                                   "/save FILE writes it (.json or Markdown), /exit quits. Samples at temperature "
                                   "0.7 by default, like the playground: varied replies for a person; -t 0 is "
                                   "greedy and repeatable.")
    c.add_argument("--system", help="system message for the conversation")
    add_model_args(c)
    add_speed_args(c)
    add_sampling_args(c, temperature=0.7, why="varied replies for a person, as in the playground; -t 0 is greedy")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("embed", help="sentence embeddings and cosine similarity with an encoder model",
                       description="Embed texts with an encoder-only model (mean pooling, L2-normalised by default). "
                                   "Texts longer than the encoder's positions (512 tokens for BERT-style models) are "
                                   "truncated with a warning; --no-truncate makes that an error.")
    e.add_argument("texts", nargs="*", help="texts to embed")
    e.add_argument("-f", "--file", help="UTF-8 file with one text per line (added after any argument texts)")
    e.add_argument("-o", "--output", help="write vectors to a .jsonl or .npy file (default: JSONL on stdout)")
    e.add_argument("--force", action="store_true", help="replace an existing --output file")
    e.add_argument("--similarity", action="store_true",
                   help="print the cosine similarity of each consecutive pair of texts instead of vectors")
    e.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="how token vectors become one vector")
    e.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the vectors")
    e.add_argument("--no-truncate", action="store_true", help="error on texts longer than the encoder's positions")
    e.add_argument("--batch-size", type=int_arg("--batch-size"), default=32, help="texts per forward pass")
    e.add_argument("-m", "--model", default=DEFAULT_ENCODER,
                   help="an encoder-only model: embedded name, local HF directory or hub id (default: %(default)s)")
    e.add_argument("--adapter", help="a PEFT adapter folder (LoRA) to apply on top of the model")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    e.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    e.set_defaults(func=cmd_embed)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save an HF directory",
                        description="Load MODEL, apply the LoRA ADAPTER, merge the low-rank updates into the "
                                    "weights and write a Hugging Face directory (weights, config, tokenizer) that "
                                    "loads anywhere without peft.")
    mg.add_argument("adapter", help="the PEFT LoRA adapter folder")
    mg.add_argument("-m", "--model", default=DEFAULT_MODEL, help="the base model the adapter was trained on "
                                                                  "(default: %(default)s)")
    mg.add_argument("-o", "--output", required=True, help="output folder")
    mg.add_argument("--dtype", default="float32", help="dtype of the saved weights (default: %(default)s)")
    mg.add_argument("--force", action="store_true",
                    help="write into an output folder that holds other files or an earlier merge: only the "
                         "model's files (config.json, model.safetensors, tokenizer...) are written; nothing else is "
                         "changed or deleted. Never allowed: an output that is, holds or is inside the adapter or "
                         "the base model")
    mg.set_defaults(func=cmd_merge)

    i = sub.add_parser("info", help="architecture, parameters, memory and context of a model",
                       description="Describe a model without running it.")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name or path (default: %(default)s)")
    i.add_argument("--adapter", help="also describe this PEFT adapter folder (kind, rank, targets, parameters)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_info)

    from lmforge.cli.training import register as register_training

    register_training(sub)
    from lmforge.cli.evaluation import register as register_eval
    register_eval(sub)
    from lmforge.cli.serve import register as register_deploy
    register_deploy(sub)
    from lmforge.cli.rlhf import register as register_rlhf
    register_rlhf(sub)
    from lmforge.cli.reward import register as register_reward
    register_reward(sub)
    from lmforge.cli.export import register as register_export
    register_export(sub)
    from lmforge.cli.prune import register as register_prune
    register_prune(sub)
    from lmforge.cli.quantize import register as register_quantize
    register_quantize(sub)
    from lmforge.cli.plan import register as register_plan
    register_plan(sub)
    from lmforge.cli.distill import register as register_distill
    register_distill(sub)
    from lmforge.cli.lifecycle import register as register_lifecycle
    register_lifecycle(sub)
    return parser


@contextlib.contextmanager
def _warnings_as_lines():
    import warnings

    before = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = before


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error already printed
        return int(e.code or 0)
    try:
        _utf8_argv(sys.argv[1:] if argv is None else list(argv))
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.environ.get("WORLD_SIZE", "")
    rank, world = launched_rank(), int(size) if size.isdigit() else 1
    try:
        if getattr(args, "nproc", None) is not None:  # a training verb's --nproc N: the same command under torchrun
            from lmforge.training.distributed import launch_local

            return launch_local(sys.argv[1:] if argv is None else list(argv), args.nproc)
        if world > 1:  # started by torchrun: each rank's "cuda" is its own GPU
            from lmforge.training.distributed import bind_local_device

            bind_local_device()
        with contextlib.ExitStack() as quiet:
            quiet.enter_context(_warnings_as_lines())
            if rank != 0:  # a torchrun job's other ranks: rank 0 speaks for them, their errors still reach the user
                devnull = quiet.enter_context(open(os.devnull, "w", encoding="utf-8"))
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
            return args.func(args)
    except LmforgeError as e:
        # another rank's open progress bar may hold the current line: a rank's error starts a line of its own
        lead = "\n" if rank != 0 else ""
        print(f"{lead}error{f' (rank {rank}/{world})' if world > 1 else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a torchrun job: a rank whose peer died says so in one line, not a traceback
        reason = None
        if world > 1:
            from lmforge.training.distributed import lost_peer

            reason = lost_peer(e)
        if reason is None:
            raise
        print(f"{chr(10) if rank != 0 else ''}error (rank {rank}/{world}): {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
