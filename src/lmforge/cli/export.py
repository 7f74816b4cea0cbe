"""``lmforge export MODEL --format FORMAT -o OUT``: any model lmforge loads, written in a format other tools load.

MODEL is anything ``lmforge.load`` takes: the embedded default (a quantised GGUF, dequantised on loading), a saved
folder, a ``.gguf`` file or a hub id; ``--adapter`` folds a LoRA adapter into the weights first. Each format is one
writer in ``FORMATS`` (name -> function of the loaded model and the output path); ``hf`` writes a Hugging Face
folder (config.json, model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json with the
chat template) that ``transformers.AutoModelForCausalLM`` (``AutoModel`` for an encoder) loads with the same
logits. ``gguf`` writes one llama.cpp file (``lmforge.checkpoints.gguf_writer``; ``--type f32|f16|bf16|q8_0|q4_0``
for its matrices) that llama.cpp and Ollama run and ``lmforge.load`` reads back. A new format is a writer added to
``FORMATS`` (one taking a file, not a folder, is also listed in ``FILE_FORMATS``). The output follows the output
policy of ``lmforge.outputs`` (verb ``export``): never into or around its input, an earlier export or a folder
holding other files replaced only with ``--force``, and then only the export's own names are written; an existing
file is replaced only with ``--force``, and a file appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError


def write_hf(loaded: Any, out: Path) -> None:
    """``loaded`` (an ``LM`` or ``Encoder``) as a Hugging Face folder in ``out`` (``save_hf_dir``)."""
    from lmforge.checkpoints.hf import save_hf_dir

    save_hf_dir(loaded.model, out, tokenizer=loaded.tokenizer,
                generation_config=getattr(loaded, "generation_config", None))


def write_gguf_file(loaded: Any, out: Path, *, type: str = "f16") -> None:
    """``loaded`` (an ``LM``) as one GGUF file ``out`` with the matrices as ``type`` (``gguf_writer.TYPES``)."""
    from lmforge.checkpoints.gguf_writer import write_gguf

    write_gguf(loaded.model, loaded.tokenizer, out, type=type)


FORMATS: dict[str, Callable[..., None]] = {"hf": write_hf, "gguf": write_gguf_file}
FILE_FORMATS = frozenset({"gguf"})  # formats whose -o is a file, not a folder
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # gguf_writer.TYPES, kept here so --help needs no import


def export(model: str | os.PathLike | None, fmt: str, out: str | os.PathLike, *,
           adapter: str | os.PathLike | None = None, dtype: str = "float32", force: bool = False,
           type: str | None = None) -> Path:
    """Load ``model`` (+ a LoRA ``adapter``, merged) and write it as ``fmt`` (a key of ``FORMATS``) into ``out``,
    under the output policy (``force`` as in ``lmforge.outputs``). ``type``: the GGUF tensor type (``gguf`` only;
    default f16). Returns the output folder (the file, for a format in ``FILE_FORMATS``)."""
    from lmforge.outputs import check_inputs, check_output, claim_output

    if fmt not in FORMATS:
        raise LmforgeError(f"--format {fmt!r} is not a format lmforge exports; allowed: {', '.join(FORMATS)}")
    if type is not None and fmt != "gguf":
        raise LmforgeError(f"--type {type!r} applies to --format gguf only (the {fmt} format takes --dtype)")
    if fmt == "gguf" and (type := type or "f16") not in GGUF_TYPES:
        raise LmforgeError(f"--type {type!r} is not a GGUF type lmforge writes; allowed: {', '.join(GGUF_TYPES)}")
    # never into (or around) the model or adapter it reads, even with --force
    check_inputs(out, "export", {"model": model, "adapter": adapter}, strict=True)
    if fmt in FILE_FORMATS:
        check_output(out, "export", force=force, kind="file")  # refuse before the slow load
        loaded = _load_merged(model, adapter, dtype)
        FORMATS[fmt](loaded, Path(out), type=type)
        return Path(out)
    with claim_output(out, "export", force=force) as folder:
        FORMATS[fmt](_load_merged(model, adapter, dtype), folder)
    return Path(out)


def _load_merged(model: str | os.PathLike | None, adapter: str | os.PathLike | None, dtype: str) -> Any:
    """``lmforge.load(model)`` with a LoRA ``adapter`` merged into the weights."""
    from lmforge.lm import load
    from lmforge.peft.lora import lora_layers, merge_lora

    loaded = load(model, adapter=adapter, dtype=dtype)
    from lmforge.models.quantized import QUANTIZED_LINEARS, HeadEmbedding

    if any(isinstance(m, (*QUANTIZED_LINEARS, HeadEmbedding)) for m in loaded.model.modules()):
        raise LmforgeError(f"{model} is quantised (a folder lmforge quantize wrote, for lmforge.load only): export "
                           "the float model it came from (GGUF: --type q8_0 or q4_0 quantises while writing)")
    if adapter is not None:
        if not list(lora_layers(loaded.model)):
            raise LmforgeError(f"--adapter {adapter} is not a LoRA adapter; only LoRA adapters can be merged into "
                               "the exported weights (a prompt-tuning adapter stays an adapter)")
        loaded.model = merge_lora(loaded.model)
    return loaded


def cmd_export(a: argparse.Namespace) -> int:
    out = export(a.model, a.format, a.output, adapter=a.adapter, dtype=a.dtype, force=a.force, type=a.type)
    what = a.model + (f" + {a.adapter}" if a.adapter else "")
    print(f"exported {what} as {a.format}: wrote {out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``lmforge`` subcommands."""
    from lmforge.cli.args import add_output_args

    p = sub.add_parser("export", help="write a model in a format other tools load (a Hugging Face folder)",
                       description="Load MODEL (the embedded GGUF default, a saved folder, a .gguf file; with "
                                   "--adapter a LoRA adapter merged in) and write it as --format into -o OUT. "
                                   "hf: config.json, model.safetensors, generation_config.json and the tokenizer "
                                   "files with the chat template, loadable by transformers' AutoModelForCausalLM. "
                                   "gguf: one llama.cpp file (-o FILE.gguf; --type) that llama.cpp and Ollama run.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="model name or path, as for `lmforge generate -m` (default: %(default)s)")
    p.add_argument("--format", default="hf", choices=sorted(FORMATS), help="output format (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="output folder (a .gguf file for --format gguf)")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"gguf only: tensor type of the matrices: {' | '.join(GGUF_TYPES)} (default: f16)")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder to merge into the weights first")
    p.add_argument("--dtype", default="float32",
                   help="dtype of the written weights: float32 | bfloat16 | float16 (default: %(default)s)")
    add_output_args(p, "export")
    p.set_defaults(func=cmd_export)
