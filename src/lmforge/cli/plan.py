"""``lmforge plan``: memory per rank and FLOPs per token of a training run before launching it.

``register(subparsers)`` adds the verb; the arithmetic is ``lmforge.training.plan``'s.
"""

from __future__ import annotations

import argparse
import json

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.cli.args import int_arg
from lmforge.errors import LmforgeError


def memory_arg(text: str) -> int:
    from lmforge.training.plan import parse_memory

    try:
        return parse_memory(text)
    except LmforgeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_plan(a: argparse.Namespace) -> int:
    from lmforge.cli.training import _parse_overrides
    from lmforge.training.plan import format_bytes, load_config, max_batch_size, plan

    config = load_config(a.model, _parse_overrides(a.set))
    kwargs = dict(method=a.method, strategy=a.strategy, world=a.world, precision=a.precision, seq_len=a.seq_len,
                  activation_checkpointing=a.activation_checkpointing, lora_r=a.lora_r,
                  lora_targets=a.lora_targets, lora_dropout=a.lora_dropout, quant=a.quant,
                  virtual_tokens=a.virtual_tokens, device=a.device, serve_batch=a.serve_batch, context=a.context,
                  loss=a.loss)
    result = plan(config, batch_size=a.batch_size, **kwargs)
    fits = None if a.memory is None else max_batch_size(config, a.memory, **kwargs)
    if a.json:
        out = result.to_dict()
        if fits is not None:
            out.update(memory=a.memory, max_batch_size=fits)
        print(json.dumps(out, indent=2))
        return 0
    rows = result.rows()
    if fits is not None:
        rows.append((f"largest micro-batch in {format_bytes(a.memory)}",
                     str(fits) if fits else "none: even one sequence does not fit"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge plan`` to the ``lmforge`` parser."""
    from lmforge.training.plan import DEVICES, LOSSES, METHODS, PRECISIONS, QUANTS, STRATEGIES

    p = sub.add_parser(
        "plan", help="memory per rank and FLOPs per token of a training run, before launching it",
        description="Estimate, per rank, the memory of training MODEL (weights, gradients, AdamW states, "
                    "activations, the logits' loss buffers, DDP buckets or FSDP gathered parameters) and its peak "
                    "(an upper bound: everything alive at once), FLOPs per token (PaLM appendix B: 6N + 12LHQT), "
                    "the KV cache for serving, and with --memory the largest micro-batch that fits. Reads only "
                    "the model's config. Decoder-only models.")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help="a preset (smollm2-135m, gpt2, llama-3.2-1b, ...), an embedded model, an HF directory or "
                        "a .gguf file (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, repeatable, e.g. --set n_layer=4")
    p.add_argument("--method", choices=METHODS, default="full", help="what trains (default: %(default)s)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="ddp replicates the model on each rank; fsdp shards parameters, gradients and optimiser "
                        "states over --world (default: %(default)s)")
    p.add_argument("--world", type=int_arg("--world"), default=1, help="number of ranks (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32; bf16 = autocast over fp32 master weights (the training verbs' --precision bf16); "
                        "bf16-pure = bf16 weights, gradients and moments (default: %(default)s)")
    p.add_argument("--batch-size", type=int_arg("--batch-size"), default=1,
                   help="micro-batch per rank (default: %(default)s)")
    p.add_argument("--seq-len", type=int_arg("--seq-len"), default=None,
                   help="tokens per sequence (default: min(2048, the context window))")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in backward")
    p.add_argument("--memory", type=memory_arg, default=None, metavar="SIZE",
                   help="also report the largest micro-batch whose peak fits SIZE per rank, e.g. 24GiB, 80GB")
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="where it trains: the AdamW step's temporaries differ (default: %(default)s)")
    p.add_argument("--loss", choices=LOSSES, default="plain",
                   help="plain: cross-entropy over the logits (finetune, dpo); fused: the LM head and loss in one "
                        "(pretrain's decoder objective), one (batch x seq x vocab) buffer less (default: %(default)s)")
    peft = p.add_argument_group("parameter-efficient methods (as in lmforge finetune)")
    peft.add_argument("--lora-r", type=int_arg("--lora-r"), default=16, help="LoRA rank (default: %(default)s)")
    peft.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                      help="LoRA target layers: names, 'all-linear' or a regex (default: %(default)s)")
    peft.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    peft.add_argument("--quant", choices=QUANTS, default="nf4", help="qlora: base format (default: %(default)s)")
    peft.add_argument("--virtual-tokens", type=int_arg("--virtual-tokens"), default=20,
                      help="prompt tuning: virtual tokens (default: %(default)s)")
    serve = p.add_argument_group("serving")
    serve.add_argument("--serve-batch", type=int_arg("--serve-batch"), default=1,
                       help="sequences served at once, for the KV cache (default: %(default)s)")
    serve.add_argument("--context", type=int_arg("--context"), default=None,
                       help="tokens per served sequence (default: the context window)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)
