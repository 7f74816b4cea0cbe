"""Argument types and argument groups the ``lmforge`` subcommands share: numbers with ranges (one-line
errors), the model flags, the sampling flags, and loading a text generator from them."""

from __future__ import annotations

import argparse

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError
from lmforge.outputs import verb_policy, written_names


def float_arg(name: str, low: float | None = None, high: float | None = None, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            bound = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}" + (f" and <= {high}" if high else "")
                                             + f", got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{name} must be <= {high}, got {value}")
        return value
    return parse


def int_arg(name: str, low: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"model: an embedded name ({DEFAULT_MODEL}), a local HF directory or .gguf file, "
                        "or a hub id when online (default: %(default)s)")
    p.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) to apply on top of the model")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only linear layers for inference: int8 (one scale per row, ~0.4x the weight memory) or "
                        "int4 (group-wise, group 64: a GGUF's Q4_1 blocks taken over as they are, else rounded to "
                        "nearest; for a calibrated GPTQ copy use `lmforge quantize`); both on PyTorch's packed CPU "
                        "kernels")
    p.add_argument("--quantize-head", default=None, metavar="int8|int4|none",
                   help="with --quantize: the lm_head's quantisation (default: int8; a tied embedding then reads "
                        "its rows)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (bfloat16 on GPU and for int8/int4 weights, else "
                        "float32 on CPU; default: auto)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--threads`` (generate, chat; serve has them as ServeConfig fields)."""
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd static-shape step: the same tokens, faster per token; "
                        "compiling takes a while on the first generation (the time is printed)")
    p.add_argument("--threads", type=int_arg("--threads"), default=None, metavar="N",
                   help="torch compute threads (default: the allowed cores minus the 1-minute load average, >= 1)")


def temperature_arg(text: str) -> float:
    from lmforge.generation.sampling import MIN_TEMPERATURE

    value = float_arg("--temperature", 0.0)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"--temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {value}")
    return value


def top_p_arg(text: str) -> float:
    from lmforge.generation.sampling import MIN_TOP_P

    return float_arg("--top-p", MIN_TOP_P, 1.0)(text)


def repetition_penalty_arg(text: str) -> float:
    from lmforge.generation.sampling import REPETITION_PENALTY_RANGE

    return float_arg("--repetition-penalty", *REPETITION_PENALTY_RANGE)(text)


def seed_arg(text: str) -> int:
    value = int_arg("--seed", 0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, 2**63), got {value}")
    return value


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.0,
                      why: str = "greedy: the same output every run, for scripts and comparisons") -> None:
    """The sampling flags. ``temperature`` and ``why``: the verb's default and its reason, shown in ``--help``
    (``generate`` 0, greedy; ``chat`` 0.7; the HTTP API's is OpenAI's 1.0: README "Temperature defaults")."""
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-new-tokens", type=int_arg("--max-new-tokens"), default=256,
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("-t", "--temperature", type=temperature_arg, default=temperature,
                   help=f"0 = greedy, deterministic; otherwise >= 0.01, higher = more random "
                        f"(default: {temperature:g}, {why})")
    g.add_argument("--top-k", type=int_arg("--top-k"), default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=top_p_arg, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, in [1e-6, 1]")
    g.add_argument("--repetition-penalty", type=repetition_penalty_arg,
                   default=1.0, help="> 1 discourages repeating tokens already seen, in [0.01, 100] (default: 1 = off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    g.add_argument("--seed", type=seed_arg, default=None,
                   help="random seed in [0, 2**63): the same seed gives the same text")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)


def load_generator(a: argparse.Namespace):
    from lmforge.lm import LM, load

    if hasattr(a, "threads"):
        from lmforge.generation.threads import set_threads

        set_threads(a.threads)
    lm = load(a.model, device=a.device, dtype=a.dtype, adapter=a.adapter, quantize=a.quantize,
              quantize_head=getattr(a, "quantize_head", None),
              compile=getattr(a, "compile", False))
    if not isinstance(lm, LM):
        raise LmforgeError(f"{a.model} is an encoder-only model ({lm.config.family}): it cannot generate text; "
                           "use `lmforge embed` for its embeddings")
    return lm


def add_output_args(p, verb: str) -> None:
    """Add the policy's flags for ``verb`` to an argparse parser or group: ``--overwrite`` (training runs) and
    ``--force``."""
    v = verb_policy(verb)
    if v.run:
        p.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output folder that holds an earlier run: only that run's own files "
                            f"({written_names(verb)}) are removed first; other files stay")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output file" if v.kind == "file" else
                   "write into an output folder that holds other files" + ("" if v.run or v.rewrite else
                                                                           " or this command's earlier output")
                   + f": only {written_names(verb)} are written; nothing else is changed or deleted")



def add_nproc_arg(p) -> None:
    """``--nproc N`` on a training verb: a run flag (not part of the recipe config) that starts the command under
    torchrun with N processes on this machine (``training.distributed.launch_local``)."""
    p.add_argument("--nproc", type=int_arg("--nproc", 1), default=None, metavar="N",
                   help="train data-parallel on N processes of this machine: re-launches this command under "
                        "`torchrun --standalone --nproc-per-node N` (default: one process, no torchrun)")
