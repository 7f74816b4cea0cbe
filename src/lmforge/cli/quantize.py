"""``lmforge quantize MODEL -o OUT --method int8|int4``: a weight-only quantised copy of a model.

int8: one absmax scale per output row. int4: group-wise scales and zeros along the input dimension
(``--group-size`` 32/64/128, default 64), rounded to nearest (``--algorithm rtn``) or with GPTQ (``gptq``, the
default; Frantar et al. 2022, arXiv:2210.17323), calibrated on the first ``CALIBRATION_TOKENS`` tokens of
``--calibration FILE`` (a UTF-8 text file; default: the embedded Shakespeare corpus). Every linear layer but
``lm_head`` is quantised that way; ``lm_head`` as ``--head`` says: int8 (the default: one scale per row), int4
(group-wise, GPTQ-calibrated with ``--algorithm gptq``; faster, but it changes the model visibly) or none (float).
With a quantised head and tied embeddings the float embedding table is dropped (the lookup reads the head's rows;
measurements in ``lmforge.models.quantized``). Norms, and untied embeddings, stay float. OUT is a folder that
``lmforge.load`` (and so ``generate``, ``eval``, ``serve``) loads with the quantised layers on PyTorch's packed
CPU kernels; its layout is documented in ``lmforge.checkpoints.quantized`` (the arithmetic in
``lmforge.models.int4``). The output follows the policy of ``lmforge.outputs`` (verb ``quantize``); bad input is
refused before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError

CALIBRATION_TOKENS = 1024  # GPTQ's Hessians need far fewer samples than the paper's 128 x 2048 to beat RTN
CALIBRATION_SEQ = 256
_READ_CHARS = 64 * CALIBRATION_TOKENS  # bounded memory: never more text than that is read


def calibration_batches(tokenizer, path: str | os.PathLike | None, tokens: int = CALIBRATION_TOKENS,
                        seq: int = CALIBRATION_SEQ) -> list:
    """Token-id tensors (1, <= seq) from the start of ``path`` (or the embedded Shakespeare), ``tokens`` in all."""
    import torch

    if path is None:
        from lmforge.data.corpus import embedded_corpus_files

        source = embedded_corpus_files()[0]
    else:
        source = Path(path)
        if not source.is_file():
            raise LmforgeError(f"--calibration {path}: no such file")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read(_READ_CHARS)
    except UnicodeDecodeError as e:
        raise LmforgeError(f"--calibration {source}: not UTF-8 text (byte {e.start})") from None
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    if len(ids) < 16:
        raise LmforgeError(f"--calibration {source}: only {len(ids)} tokens of text; GPTQ needs at least 16")
    return [torch.tensor([ids[i:i + seq]]) for i in range(0, len(ids), seq)]


def quantize(model: str | os.PathLike | None, out: str | os.PathLike, method: str, *, group_size: int | None = None,
             algorithm: str | None = None, calibration: str | os.PathLike | None = None, dtype: str = "float32",
             force: bool = False, head: str | None = None) -> Path:
    """Quantise ``model`` with ``method`` (int8 | int4) and its ``lm_head`` with ``head`` (int8 | int4 | none;
    None: ``DEFAULT_HEAD``), and save it into ``out``; the tensors left float (norms, untied embeddings, a float
    ``lm_head``) are saved in ``dtype``. Returns the output folder."""
    from torch import nn

    from lmforge.checkpoints.quantized import quantization_block, save_quantized_dir
    from lmforge.lm import load, resolve_dtype
    from lmforge.models.quantized import DEFAULT_HEAD, HeadEmbedding, check_quantization, quantize_model
    from lmforge.outputs import check_inputs, check_output, claim_output

    algorithm = algorithm or ("gptq" if method == "int4" else "rtn")
    head = DEFAULT_HEAD if head is None else head
    check_quantization(nn.Module(), method, group_size, algorithm, head=head)  # the names, before the (slow) load
    float_dtype = resolve_dtype(dtype, "cpu")
    check_inputs(out, "quantize", {"model": model, "calibration": calibration}, strict=True)
    check_output(out, "quantize", force=force)  # refused before the (slow) load
    loaded = load(model, dtype="float32")
    arch = getattr(getattr(loaded.model, "config", None), "arch", None)
    if not hasattr(loaded, "generate") or arch != "decoder":
        raise LmforgeError(f"{model}: lmforge quantize takes decoder-only language models; this is an {arch} model")
    check_quantization(loaded.model, method, group_size, algorithm, head=head)
    seq = min(CALIBRATION_SEQ, loaded.model.config.max_seq_len)
    batches = calibration_batches(loaded.tokenizer, calibration, seq=seq) if algorithm == "gptq" else None
    if method == "int4" and group_size is None:
        group_size = 64
    quantize_model(loaded.model, method, group_size, algorithm=algorithm, calibration=batches, head=head)
    for p in loaded.model.parameters():  # what stayed float (quantised layers hold buffers, untouched)
        p.data = p.data.to(float_dtype)
    for m in loaded.model.modules():  # a tied embedding reading the head's rows gives them in the float dtype
        if isinstance(m, HeadEmbedding):
            m.anchor = m.anchor.to(float_dtype)
    with claim_output(out, "quantize", force=force) as folder:
        save_quantized_dir(loaded.model, folder, quantization_block(method, group_size, algorithm, head),
                           tokenizer=loaded.tokenizer, generation_config=loaded.generation_config)
    return Path(out)


def cmd_quantize(a: argparse.Namespace) -> int:
    from lmforge.models.quantized import DEFAULT_HEAD

    out = quantize(a.model, a.output, a.method, group_size=a.group_size, algorithm=a.algorithm,
                   calibration=a.calibration, dtype=a.dtype, force=a.force, head=a.head)
    detail = f", group {a.group_size or 64}, {a.algorithm or 'gptq'}" if a.method == "int4" else ""
    print(f"quantized {a.model} to {a.method}{detail}, {a.head or DEFAULT_HEAD} head: wrote {out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``quantize`` to the ``lmforge`` subcommands."""
    from lmforge.cli.args import add_output_args, int_arg

    p = sub.add_parser("quantize", help="weight-only int8/int4 quantisation of a model, saved as a folder",
                       description="Quantise the linear layers of MODEL (lm_head as --head says) and write a "
                                   "folder that "
                                   "lmforge generate/eval/serve load, running PyTorch's packed int8/int4 CPU "
                                   "kernels. int8: one scale per output row; int4: a scale and zero per group of "
                                   "--group-size input columns, rounded to nearest or with GPTQ calibrated on "
                                   "--calibration FILE (default: the embedded Shakespeare).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="model name or path, as for `lmforge generate -m` (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--method", required=True, help="int8 | int4")
    p.add_argument("--group-size", type=int_arg("--group-size", 1), default=None,
                   help="int4: input columns per scale/zero, 32 | 64 | 128 (default: 64)")
    p.add_argument("--algorithm", default=None, help="int4: rtn (round to nearest) | gptq (default: gptq)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help=f"GPTQ: a UTF-8 text file; its first {CALIBRATION_TOKENS} tokens calibrate "
                        "(default: the embedded Shakespeare)")
    p.add_argument("--head", default=None, metavar="int8|int4|none",
                   help="lm_head: int8 (default; one scale per row), int4 (group-wise like the layers: ~4x faster "
                        "head, visibly less exact) or none (float). A tied input embedding then reads the "
                        "quantised rows, and its float table is dropped")
    p.add_argument("--dtype", default="float32",
                   help="dtype of the tensors left float (norms, untied embeddings, a float lm_head): float32 | "
                        "bfloat16 | float16 (default: %(default)s)")
    add_output_args(p, "quantize")
    p.set_defaults(func=cmd_quantize)
