"""``lmforge prune MODEL -o OUT --method layers|width|magnitude|2:4 --sparsity S [--calibration FILE]``.

The command line of ``lmforge.training.prune.prune`` (what each method does and which papers it follows is that
module's docstring). The output is a Hugging Face folder any HF loader reads, plus ``masks.safetensors`` for the
unstructured methods (kept by a healing ``lmforge finetune -m OUT``) and ``prune.json`` (what was removed); it
follows the output policy of ``lmforge.outputs`` (verb ``prune``).
"""

from __future__ import annotations

import argparse
import sys

from lmforge.checkpoints.resolve import DEFAULT_MODEL

METHODS = ("layers", "width", "magnitude", "2:4")  # lmforge.training.prune.METHODS, which imports torch: not here


def cmd_prune(a: argparse.Namespace) -> int:
    from lmforge.training.prune import prune

    record = prune(a.model, a.output, a.method, sparsity=a.sparsity, keep_layers=a.keep_layers,
                   head_sparsity=a.head_sparsity, calibration=a.calibration, seq_len=a.seq_len, samples=a.samples,
                   force=a.force)
    what = {"layers": lambda r: f"{r['n_layer'][0]} -> {r['n_layer'][1]} layers (kept {r['kept_layers']})",
            "width": lambda r: f"MLP width {r['intermediate_size'][0]} -> {r['intermediate_size'][1]}"
                               + (f", heads {r['n_head'][0]} -> {r['n_head'][1]}" if "n_head" in r else ""),
            }.get(a.method, lambda r: f"{r['pruned_weights']:,} of {r['prunable_weights']:,} block weights zeroed")
    print(f"pruned {a.model} ({a.method}): {what(record)}; {record['parameters']:,} parameters; wrote {a.output}",
          file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``prune`` to the ``lmforge`` subcommands."""
    from lmforge.cli.args import add_output_args, float_arg, int_arg

    p = sub.add_parser("prune", help="prune a model: drop layers, shrink MLP width, or zero weights (magnitude, 2:4)",
                       description="Prune MODEL and write it to -o OUT as a Hugging Face folder. layers: drop the "
                                   "blocks of lowest block influence (ShortGPT); width: shrink every MLP by "
                                   "activation-weighted magnitude (Wanda scores per channel); magnitude: zero the "
                                   "lowest |W|·||X|| weights of each row; 2:4: keep 2 of every 4 weights. The last two "
                                   "save masks.safetensors, which `lmforge finetune -m OUT --method full` keeps "
                                   "(pruned weights stay zero while it heals the model).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="model name or path, as for `lmforge generate -m` (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--method", required=True, choices=METHODS, help="what to remove")
    p.add_argument("--sparsity", type=float_arg("--sparsity"), default=None, metavar="S",
                   help="the fraction removed, in [0, 1): of the layers, of the MLP channels, or of each row's "
                        "weights (2:4: always 0.5)")
    p.add_argument("--keep-layers", type=int_arg("--keep-layers", 1), default=None, metavar="K",
                   help="--method layers: keep K layers (instead of --sparsity)")
    p.add_argument("--head-sparsity", type=float_arg("--head-sparsity"), default=0.0, metavar="S",
                   help="--method width: also remove this fraction of the query heads of each key/value group "
                        "(Llama, Mistral, Qwen2; default: %(default)s)")
    p.add_argument("--calibration", metavar="FILE",
                   help="text to score on (a .txt/.jsonl/... file or folder, as for pretrain --corpus); needed by "
                        "layers and width; magnitude and 2:4 score by |W| alone without it")
    p.add_argument("--seq-len", type=int_arg("--seq-len", 1), default=256,
                   help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--samples", type=int_arg("--samples", 1), default=16,
                   help="calibration windows at most (default: %(default)s)")
    add_output_args(p, "prune")
    p.set_defaults(func=cmd_prune)
