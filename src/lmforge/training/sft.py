"""Instruction fine-tuning (SFT): the recipe that turns a model plus an SFT data file into a fine-tuned model.

Uses the SFT losses (masked next-token cross-entropy for decoder-only models, target cross-entropy for
encoder-decoder ones: ``sft_losses.py``; SFT evaluation, the response-token dev loss and ROUGE-L: ``sft_eval.py``),
``FinetuneConfig`` (the recipe's typed config: one field per setting, its docstring the ``--help`` text; see
``lmforge.recipe_config``) and ``finetune(cfg)`` (which builds the model, data and batches, hands them to
``training/loop.py`` and writes the resolved config to ``OUT_DIR/config.yaml``). Data formats, masking,
truncation and packing live in ``data/sft.py``; the ``lmforge finetune`` flags are derived from the config
in ``cli/training.py``.

Methods: ``full`` (every parameter trained), ``lora`` (adapters on the chosen linear layers),
``qlora`` (LoRA over an NF4- or int8-quantised frozen base) and ``prompt-tuning`` (trainable virtual
tokens); the PEFT methods save a PEFT-format adapter instead of the whole model (see ``peft/``). A model folder
pruned by ``lmforge prune`` with ``masks.safetensors`` keeps its pruned weights at zero through a ``full`` run
(``training/prune.py``'s ``keep_masks``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output, launched_rank
from lmforge.recipe_config import TRAINING_SEED_MAX, option, validate, write_config
from lmforge.training.scale import ScaleOut
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:  # torch is imported inside the functions so that building the CLI parser stays fast
    from torch import Tensor, nn


METHODS = ("full", "lora", "qlora", "prompt-tuning")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt-tuning": 3e-2}
Method = Literal["full", "lora", "qlora", "prompt-tuning"]


def parse_lora_targets(text: str) -> str | list[str]:
    """'all-linear', a regex (anything with regex characters), or a comma-separated list of names."""
    if text == "all-linear" or any(c in text for c in "*^$[(|\\+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


_PEFT = "parameter-efficient methods"


@dataclass
class FinetuneConfig(ScaleOut, Tracking):
    """Everything ``lmforge finetune`` needs: the data, the model and method, the schedule, evaluation and output.

    Defaults < ``--config FILE.yaml`` < flags; ``lmforge finetune --print-config`` prints the resolved YAML,
    and every run writes it to ``OUT_DIR/config.yaml``.
    """

    recipe: ClassVar[str] = "finetune"

    train: tuple[Path, ...] = option((), group="data")
    """Training files: .jsonl, .json (a list of objects) or .csv, optionally gzipped, or .parquet (required);
    fields may be dotted paths into nested records (--response-field dialogue.summary)."""
    dev: tuple[Path, ...] = option((), group="data")
    """Dev files for val_loss and ROUGE-L (none: no evaluation)."""
    format: Literal["alpaca", "messages", "prompt-completion", "fields"] | None = option(None, group="data")
    """Force one record format (none: detected per record)."""
    prompt_template: str | None = option(None, group="data")
    """Prompt text with {field} placeholders, e.g. 'Summarize:\\n\\n{dialogue}\\n\\nSummary: ' (on the
    command line, \\n and \\t are unescaped)."""
    prompt_field: str | None = option(None, group="data")
    """Field holding the whole prompt (instead of --prompt-template)."""
    response_field: str | None = option(None, group="data")
    """Field holding the response to learn, e.g. summary."""
    template: Literal["auto", "chat", "plain"] = option("auto", group="data")
    """Render with the model's chat template or as plain text (auto: chat when the tokenizer has a template)."""
    max_len: int | None = option(None, min=1, group="data")
    """Tokens per example; longer responses are cut, too-long prompts dropped (none: 512 or the model's context
    window, whichever is smaller)."""
    pack: bool = option(False, group="data")
    """Pack several examples into each max-len row (no attention across examples)."""
    padding_side: Literal["right", "left"] = option("right", group="data")
    """Padding side."""
    limit: int | None = option(None, min=1, group="data")
    """Use only the first N training records."""
    model: str | None = option(None, flags=("-m", "--model"), group="training")
    """Model name or path (none: the embedded SmolLM2-135M)."""
    adapter: Path | None = option(None, group="training")
    """A PEFT adapter folder for MODEL: --method lora / prompt-tuning continue training it, --method full merges a
    LoRA adapter into the weights first."""
    method: Method = option("full", group="training")
    """full: every weight; lora: low-rank adapters; qlora: LoRA over a 4-bit (or int8) frozen base;
    prompt-tuning: trainable virtual tokens."""
    lora_r: int = option(16, min=1, group=_PEFT)
    """LoRA rank."""
    lora_alpha: float = option(32.0, positive=True, group=_PEFT)
    """LoRA alpha; the update is scaled by alpha/r."""
    lora_dropout: float = option(0.05, min=0.0, max=0.99, group=_PEFT)
    """Dropout on the LoRA input."""
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj", group=_PEFT)
    """Comma-separated layer names, 'all-linear', or a regex over full names."""
    rslora: bool = option(False, group=_PEFT)
    """Scale by alpha/sqrt(r) (rank-stabilised LoRA)."""
    quant: Literal["nf4", "int8"] = option("nf4", group=_PEFT)
    """qlora: base format."""
    virtual_tokens: int = option(20, min=1, group=_PEFT)
    """Prompt tuning: number of virtual tokens."""
    prompt_init_text: str | None = option(None, group=_PEFT)
    """Prompt tuning: initialise the virtual tokens from this text."""
    batch_size: int = option(8, min=1, group="training")
    """Examples per micro-batch."""
    grad_accum: int = option(1, min=1, group="training")
    """Micro-batches per optimiser step."""
    steps: int | None = option(None, min=1, group="training")
    """Optimiser steps (none: --epochs, else one epoch)."""
    epochs: float | None = option(None, positive=True, group="training")
    """Passes over the data (instead of --steps)."""
    lr: float | None = option(None, positive=True, group="training")
    """Peak learning rate (none: 2e-5 full, 2e-4 LoRA/QLoRA, 3e-2 prompt tuning)."""
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0, group="training")
    """Cosine floor as a fraction of --lr."""
    warmup: int = option(0, min=0, group="training")
    """Linear warmup steps."""
    weight_decay: float = option(0.0, min=0.0, group="training")
    """AdamW weight decay."""
    clip: float = option(1.0, min=0.0, group="training")
    """Max gradient norm, 0 = off."""
    precision: Literal["fp32", "bf16"] = option("fp32", group="training")
    """fp32, or bf16 autocast."""
    compile: bool = option(False, group="training")
    """torch.compile the model."""
    device: str = option("cpu", group="training")
    """cpu, cuda, ..."""
    seed: int = option(0, min=0, max=TRAINING_SEED_MAX, group="training")
    """Seed for init, shuffling and dropout, in [0, 2**32)."""
    eval_every: int = option(0, min=0, group="evaluation and output")
    """Evaluate every N steps; 0 = only at the end."""
    eval_examples: int | None = option(200, min=1, group="evaluation and output")
    """Dev examples for val_loss (none: all)."""
    eval_generate: int = option(20, min=0, group="evaluation and output")
    """Dev examples for greedy generation + ROUGE-L, 0 = none."""
    max_new_tokens: int = option(64, min=1, group="evaluation and output")
    """Generation length for ROUGE-L."""
    out_dir: Path = option(Path("runs/sft"), flags=("-o", "--out-dir"), group="evaluation and output")
    """Output folder."""
    save_every: int = option(0, min=0, group="evaluation and output")
    """Checkpoint every N steps; 0 = only at the end."""
    log_every: int = option(10, min=1, group="evaluation and output")
    """Log the loss every N steps."""

    def __post_init__(self) -> None:
        if isinstance(self.train, (str, Path)):  # one file given as is (Python API)
            self.train = (self.train,)
        if isinstance(self.dev, (str, Path)):
            self.dev = (self.dev,)
        validate(self)
        if not self.train:
            raise LmforgeError("train (--train): no training data given (--train FILE)")
        if self.steps is not None and self.epochs is not None:
            raise LmforgeError("give either steps (--steps) or epochs (--epochs), not both")


def apply_method(net: nn.Module, method: str, *, lora_r: int, lora_alpha: float, lora_dropout: float,
                 lora_targets: str | list[str], rslora: bool, quant: str, num_virtual_tokens: int,
                 prompt_init_ids: list[int] | None = None, seed: int | None = None) -> nn.Module:
    """Prepare ``net`` for ``method``: freeze and add LoRA (over a quantised base for qlora), or wrap it
    with a soft prompt. ``full`` returns it unchanged. ``seed``: the new parameters (LoRA's A matrices,
    random virtual tokens) are drawn from a generator seeded with it, so the run's seed fixes them
    (None: torch's global generator)."""
    import torch

    from lmforge.models.quantized import quantize_linears
    from lmforge.peft.lora import LoraSpec, add_lora
    from lmforge.peft.prompt_tuning import PromptTunedLM

    if method == "full":
        return net
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if method == "prompt-tuning":
        return PromptTunedLM(net, num_virtual_tokens, prompt_init_ids, generator=generator)
    spec = LoraSpec(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets, rslora=rslora)
    if method == "qlora":
        quantize_linears(net, quant)
    add_lora(net, spec, generator=generator)
    return net


def continue_adapter(net: nn.Module, method: str, adapter: str | Path) -> nn.Module:
    """Make a model loaded with ``adapter`` trainable for ``method``: the adapter's own parameters for
    ``lora`` / ``prompt-tuning`` (which must match the adapter's kind), every weight after merging the
    adapter for ``full``."""
    from lmforge.peft.lora import lora_layers, merge_lora
    from lmforge.peft.prompt_tuning import PromptTunedLM

    kind = "prompt-tuning" if isinstance(net, PromptTunedLM) else "lora"
    if method == "full":
        if kind != "lora":
            raise LmforgeError(f"{adapter} is a prompt-tuning adapter: full fine-tuning can only start from a LoRA "
                               "adapter (merged into the weights first)")
        return merge_lora(net)
    if method != kind:
        raise LmforgeError(f"{adapter} is a {kind} adapter; continue it with --method {kind} (or --method full "
                           f"to merge a LoRA adapter first), not --method {method}")
    if kind == "lora":
        for _, layer in lora_layers(net):
            layer.lora_A.weight.requires_grad_(True)
            layer.lora_B.weight.requires_grad_(True)
    else:
        net.prompt_embeddings.requires_grad_(True)
    return net


# ----------------------------------------------------------------------------- the recipe
def sft_max_len(max_len: int | None, config: Any, name: str) -> int:
    """Tokens per example: ``max_len``, or 512 or the context window of ``config`` (a model's), whichever is
    smaller; more than a decoder's context window is refused."""
    seq2seq = config.arch == "encoder-decoder"
    if max_len is None:
        max_len = 512 if seq2seq else min(512, config.max_seq_len)
    if not seq2seq and max_len > config.max_seq_len:
        raise LmforgeError(f"max_len={max_len} exceeds the context window of {name} ({config.max_seq_len})")
    return max_len


def check_sft_files(r: FinetuneConfig) -> None:
    """Read the train and dev files and put each record into its SFT format, so that a missing or malformed data
    file fails before the model loads (``load_sft_data`` reads them again, with the tokenizer)."""
    from lmforge.data.records import load_records
    from lmforge.data.sft import to_record

    for paths, limit, train in ((r.train, r.limit, True), (r.dev or (), None, False)):
        raw = [record for path in paths for record in load_records(path)]
        raw = raw[:limit] if limit is not None else raw
        for record in raw:
            to_record(record.fields, record.where, r.format, r.prompt_template, r.prompt_field, r.response_field)
        if train and r.steps is None and r.epochs is not None and r.epochs * len(raw) < 1:
            raise LmforgeError(f"epochs (--epochs): {r.epochs:g} passes over {len(raw)} training records is less "
                               "than one record; give a larger --epochs, or --steps N for a short run")


def pruning_masks(r: FinetuneConfig) -> dict[str, Tensor] | None:
    """The masks of a model pruned by ``lmforge prune`` (magnitude / 2:4; ``masks.safetensors`` in the model
    folder), to keep its pruned weights at zero during a ``full`` fine-tune; None when there are none. A LoRA or
    prompt-tuning run leaves the frozen base (zeros included) as it is, so it needs none; FSDP re-shards the
    parameters, which the masks do not follow, so it is refused."""
    from lmforge.training.prune import MASKS_FILE, read_masks

    masks = read_masks(r.model)
    if masks is not None and r.method != "full":
        print(f"{r.model}/{MASKS_FILE}: not applied by --method {r.method}: the frozen base keeps its zeros, but the "
              "adapter is dense (merged, the pruned weights are no longer zero)", file=sys.stderr)
    if masks is None or r.method != "full":
        return None
    if r.strategy == "fsdp":
        raise LmforgeError(f"{r.model}/{MASKS_FILE}: keeping a pruned model's masks works with --strategy ddp, "
                           "not fsdp")
    return masks


@claims_output("finetune", inputs=("model", "adapter"), config="recipe")
def finetune(recipe: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
             force: bool = False) -> dict[str, Any]:
    """Fine-tune ``recipe.model`` (a name or path ``lmforge.load`` accepts; None = the embedded default) on SFT data.

    Trains ``steps`` optimiser steps (or ``epochs`` passes over the training rows; one epoch when neither
    is given) of ``batch_size * grad_accum`` examples. With ``dev`` files, evaluates every ``eval_every``
    steps and at the end: ``val_loss`` on the first ``eval_examples`` dev examples and ``val_rougeL`` of
    greedy generations (``max_new_tokens``) on the first ``eval_generate``. ``max_len`` (tokens per example
    or packed row) defaults to 512 or the model's context window, whichever is smaller. The fine-tuned model
    and its tokenizer are written to ``out_dir/final`` (a Hugging Face directory), the resolved recipe to
    ``out_dir/config.yaml``. Returns the final metrics plus ``train_examples``/``dropped`` counts.

    ``method``: ``full``; ``lora`` (rank ``lora_r``, ``lora_alpha``, on ``lora_targets``: names,
    ``"all-linear"`` or a regex); ``qlora`` (the same over a ``quant`` = nf4 | int8 frozen base); or
    ``prompt-tuning`` (``virtual_tokens``, initialised from ``prompt_init_text`` when given). PEFT
    methods write a PEFT-format adapter (plus tokenizer) to ``out_dir/final``; ``lr`` defaults to
    2e-5 (full), 2e-4 (LoRA) or 3e-2 (prompt tuning).

    ``adapter``: a PEFT adapter folder for ``model``. With ``lora`` / ``prompt-tuning`` (of the same kind)
    training continues that adapter (its rank, targets and virtual tokens win over the config); with
    ``full`` a LoRA adapter is merged into the weights first.

    How a run starts is not part of the recipe: ``resume`` continues from ``out_dir/checkpoint``; an
    ``out_dir`` that holds a run needs ``resume`` or ``overwrite``; one with other files needs ``force``
    (``lmforge.outputs``); it is locked while training.
    """
    from lmforge.data.sft import SFTBatches, load_sft_data
    from lmforge.lm import load
    from lmforge.training.loop import RunDir, TrainConfig, train
    from lmforge.training.prune import MASKS_FILE, check_masks, keep_masks, save_masks
    from lmforge.training.sft_eval import evaluate_sft
    from lmforge.training.sft_losses import loss_for

    r = recipe
    method, out_dir, batch_size, steps, grad_accum, seed, max_len = r.method, r.out_dir, r.batch_size, r.steps, \
        r.grad_accum, r.seed, r.max_len
    lr = r.lr if r.lr is not None else DEFAULT_LR[method]
    min_lr_ratio, warmup_steps, weight_decay, clip, precision, compile = r.min_lr_ratio, r.warmup, r.weight_decay, \
        r.clip, r.precision, r.compile
    eval_every, save_every, log_every = r.eval_every, r.save_every, r.log_every
    run_config = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))  # Paths as plain JSON
    check_sft_files(r)
    masks = pruning_masks(r)
    lm = load(r.model, device=r.device, dtype="float32", adapter=r.adapter)
    net, tok = lm.model, lm.tokenizer
    arch = net.config.arch
    if arch not in ("decoder", "encoder-decoder"):
        raise LmforgeError(f"{lm.name} is an {arch} model; fine-tuning needs a decoder-only or encoder-decoder model")
    seq2seq = arch == "encoder-decoder"
    init_ids = tok.encode(r.prompt_init_text, add_special_tokens=False) if r.prompt_init_text else None
    if r.adapter is None:
        net = apply_method(net, method, lora_r=r.lora_r, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout,
                           lora_targets=parse_lora_targets(r.lora_targets), rslora=r.rslora, quant=r.quant,
                           num_virtual_tokens=r.virtual_tokens, prompt_init_ids=init_ids, seed=seed)
    else:
        net = continue_adapter(net, method, r.adapter)
    if masks:
        check_masks(net, masks, f"{r.model}/{MASKS_FILE}")  # before anything is written
    max_len = sft_max_len(max_len, net.config, lm.name)
    chat = {"auto": None, "chat": True, "plain": False}[r.template]
    data_args = dict(max_len=max_len, seq2seq=seq2seq, chat=chat, format=r.format, prompt_template=r.prompt_template,
                     prompt_field=r.prompt_field, response_field=r.response_field)
    data = load_sft_data(list(r.train), tok, limit=r.limit, **data_args)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    batch_args = dict(pad_id=pad if pad is not None else 0, seq2seq=seq2seq,
                      decoder_start_id=net.config.decoder_start_token_id if seq2seq else None)
    batches = SFTBatches(data.examples, batch_size=batch_size, seed=seed, pack=r.pack, max_len=max_len,
                         padding_side=r.padding_side, **batch_args)
    if steps is None:
        rows = len(batches.rows(0))
        if r.epochs is not None and r.epochs * rows < 1:
            raise LmforgeError(f"epochs (--epochs): {r.epochs:g} passes over {rows} training rows is less than one "
                               "row; give a larger --epochs, or --steps N for a short run")
        steps = max(1, math.ceil((r.epochs if r.epochs is not None else 1.0) * rows / (batch_size * grad_accum)))
    eval_fn = None
    if r.dev:
        dev = load_sft_data(list(r.dev), tok, **data_args)
        dev_batches = SFTBatches(dev.examples, batch_size=batch_size, shuffle=False, **batch_args)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return evaluate_sft(m, tok, dev_batches, loss_examples=r.eval_examples, generate_examples=r.eval_generate,
                                max_new_tokens=r.max_new_tokens, batch_size=batch_size)

    write_config(recipe, out_dir)  # once the data has loaded: what reruns this run
    from lmforge.peft.lora import trainable_report

    print(f"{method}: {trainable_report(net)}", file=sys.stderr)  # once the data has loaded without error
    cfg = TrainConfig(steps=steps, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, grad_accum=grad_accum, clip=clip, precision=precision,
                      compile=compile, eval_every=eval_every, save_every=save_every, log_every=log_every, seed=seed,
                      **r.train_kwargs())
    run = RunDir(out_dir, {"recipe": "finetune", **run_config}, resume=resume, tokenizer=tok, loggers=r.logger)
    with keep_masks(net, masks, f"{r.model}/{MASKS_FILE}"):  # a pruned model's zeros stay zero (training/prune.py)
        result = train(net, loss_for(net), batches, cfg, run, eval_fn=eval_fn,
                       tokens_per_batch=lambda b: int(b["attention_mask"].sum()))
    if masks and launched_rank() == 0 and (Path(out_dir) / "final").is_dir():  # kept for a later fine-tune
        save_masks(masks, Path(out_dir) / "final")
    return {**result, "train_examples": len(data.examples), "dropped": data.dropped, "steps": steps,
            "out_dir": str(Path(out_dir) / "final")}


def show_example(recipe: FinetuneConfig, *, color: bool = False) -> str:
    """The first training example of ``recipe`` as ``finetune`` would train on it, with its loss mask
    (``data/sft.format_example``), and how many examples there are. Reads the model's config and tokenizer
    and the whole training data (so a bad record is reported as in training); builds no model, writes nothing."""
    import dataclasses

    from lmforge.data.sft import format_example, load_sft_data
    from lmforge.lm import read_checkpoint

    r = recipe
    ckpt = read_checkpoint(r.model)
    config, tok, name = ckpt.config, ckpt.tokenizer, str(r.model or "the default model")
    if config.arch not in ("decoder", "encoder-decoder"):
        raise LmforgeError(f"{name} is an {config.arch} model; fine-tuning needs a decoder-only or encoder-decoder "
                           "model")
    if r.method == "prompt-tuning" and r.adapter is None:  # the virtual tokens take part of the context window
        config = dataclasses.replace(config, max_seq_len=config.max_seq_len - r.virtual_tokens)
    seq2seq = config.arch == "encoder-decoder"
    max_len = sft_max_len(r.max_len, config, name)
    data = load_sft_data(list(r.train), tok, max_len=max_len, seq2seq=seq2seq,
                         chat={"auto": None, "chat": True, "plain": False}[r.template], format=r.format,
                         prompt_template=r.prompt_template, prompt_field=r.prompt_field,
                         response_field=r.response_field, limit=r.limit)
    first = data.records[0]
    head = (f"example 1 of {len(data.examples)} ({first.where}; max_len={max_len}"
            f"{f', {data.dropped} dropped as too long' if data.dropped else ''}):\n")
    return head + format_example(data.examples[0], tok, seq2seq=seq2seq, color=color)


# ----------------------------------------------------------------------------- command line
