"""Instruction fine-tuning (SFT): the recipe that turns a model plus an SFT data file into a fine-tuned model.

Owns the SFT losses (masked next-token cross-entropy for decoder-only models, target cross-entropy for
encoder-decoder ones), SFT evaluation (response-token dev loss and ROUGE-L of greedy generations),
``finetune`` (which builds the model, data and batches and hands them to ``training/loop.py``) and the
``lmforge finetune`` command-line parser (``add_finetune_parser``). Data formats, masking, truncation and
packing live in ``data/sft.py``.

Methods: ``full`` (every parameter trained), ``lora`` (adapters on the chosen linear layers),
``qlora`` (LoRA over an NF4- or int8-quantised frozen base) and ``prompt-tuning`` (trainable virtual
tokens); the PEFT methods save a PEFT-format adapter instead of the whole model (see ``peft/``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output

if TYPE_CHECKING:  # torch is imported inside the functions so that building the CLI parser stays fast
    import torch
    from torch import Tensor, nn

    from lmforge.data.sft import Example, SFTBatches
    from lmforge.tokenizer import Tokenizer

METHODS = ("full", "lora", "qlora", "prompt-tuning")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt-tuning": 3e-2}


# ----------------------------------------------------------------------------- losses
def decoder_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Final hidden states (B, T, C) of a ``DecoderLM`` for an SFT batch.

    Packed batches (with ``segment_ids``) get a block-diagonal causal mask, so each example only sees
    itself. Left-padded batches pass the padding mask; right padding needs none (causal).
    """
    import torch

    idx, positions, mask = batch["input_ids"], batch.get("positions"), batch.get("attention_mask")
    if "segment_ids" in batch:
        seg = batch["segment_ids"]  # (B, T), 0 = padding
        T = idx.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        attend = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T): same example, not the future
        return model.hidden_states(idx, positions=positions, attn_mask=attend[:, None])  # mask (B, 1, T, T)
    key_mask = None if mask is None or bool(mask[:, 0].all()) else mask.bool()
    return model.hidden_states(idx, positions=positions, key_mask=key_mask)


def decoder_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (B, T, V) of a ``DecoderLM`` for an SFT batch (see ``decoder_hidden``)."""
    return model.lm_head(decoder_hidden(model, batch))


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the tokens whose label is not -100; logits (N, V), labels (N,).
    A batch with no labelled token gives 0 (not NaN)."""
    import torch.nn.functional as F

    from lmforge.data.sft import IGNORE_INDEX

    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token loss on response tokens: logits at t predict labels at t+1 (labels are aligned with inputs).

    The LM head runs only where a label follows (prompts are usually most of the tokens, and the head
    over a large vocabulary is a good share of the compute and most of the activation memory).
    """
    from lmforge.data.sft import IGNORE_INDEX

    h = decoder_hidden(model, batch)[:, :-1]  # (B, T-1, C)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    keep = labels != IGNORE_INDEX
    return masked_cross_entropy(model.lm_head(h[keep]), labels[keep])  # (N, V), (N,)


def seq2seq_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy over the target given the source (teacher forcing)."""
    logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"])  # (B, T, V)
    return masked_cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def prompt_tuned_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``causal_lm_loss`` through a ``PromptTunedLM``, whose logits cover the real tokens only."""
    from lmforge.data.sft import IGNORE_INDEX

    if "segment_ids" in batch:
        raise LmforgeError("packing (--pack) is not supported with prompt tuning")
    mask = batch.get("attention_mask")
    key_mask = None if mask is None or bool(mask[:, 0].all()) else mask.bool()
    logits = model(batch["input_ids"], batch.get("positions"), key_mask)[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return masked_cross_entropy(logits[keep], labels[keep])


def loss_for(model: nn.Module):
    from lmforge.peft.prompt_tuning import PromptTunedLM

    if isinstance(model, PromptTunedLM):
        return prompt_tuned_loss
    return seq2seq_loss if model.config.arch == "encoder-decoder" else causal_lm_loss


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


# ----------------------------------------------------------------------------- evaluation
def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _labelled(batch: dict[str, Tensor], seq2seq: bool) -> int:
    from lmforge.data.sft import IGNORE_INDEX

    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def response_loss(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> float:
    """Token-weighted mean loss over the response tokens of all ``batches``."""
    import torch

    loss_fn, seq2seq = loss_for(model), model.config.arch == "encoder-decoder"
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = _labelled(batch, seq2seq)
            total += float(loss_fn(model, _to(batch, device))) * n
            count += n
    return total / max(count, 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004; ``rouge-score`` with stemming, via ``evaluation/metrics.py``)."""
    from lmforge.evaluation.metrics import rouge

    return rouge(predictions, references, ["rougeL"])[0]["rougeL"]


def generate_responses(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], *,
                       max_new_tokens: int = 64, batch_size: int = 8, eos_ids: Sequence[int] = ()) -> list[str]:
    """Greedy responses to each example's prompt (the exact prompt ids it was trained on)."""
    from lmforge.generation.generate import generate_tokens

    eos = set(eos_ids) | set(tokenizer.eos_ids) | set(getattr(model.config, "eos_token_ids", []))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else min(eos, default=0)
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        tokens: list[list[int]] = [[] for _ in chunk]
        for step in generate_tokens(model, [e.prompt_ids for e in chunk], max_new_tokens, eos_ids=sorted(eos),
                                    pad_id=pad):
            for i, t in enumerate(step):
                if t is not None and t not in eos:
                    tokens[i].append(t)
        out += [tokenizer.decode(t).strip() for t in tokens]
    model.train(was_training)
    return out


def evaluate_sft(model: nn.Module, tokenizer: Tokenizer, dev: SFTBatches, *, loss_examples: int | None = None,
                 generate_examples: int = 0, max_new_tokens: int = 64, batch_size: int = 8) -> dict[str, float]:
    """``val_loss`` (response tokens of the first ``loss_examples`` dev examples) and, with
    ``generate_examples`` > 0, ``val_rougeL`` of greedy generations on the first N dev examples."""
    from lmforge.data.sft import SFTBatches

    n = len(dev.examples) if loss_examples is None else min(loss_examples, len(dev.examples))
    sub = SFTBatches(dev.examples[:n], batch_size=batch_size, pad_id=dev.pad_id, seq2seq=dev.seq2seq,
                     decoder_start_id=dev.decoder_start_id, shuffle=False)
    metrics = {"val_loss": response_loss(model, sub.iter_once())}
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    if generate_examples > 0:
        exs = dev.examples[:generate_examples]
        preds = generate_responses(model, tokenizer, exs, max_new_tokens=max_new_tokens, batch_size=batch_size)
        metrics["val_rougeL"] = rouge_l(preds, [e.reference for e in exs])
    return metrics


# ----------------------------------------------------------------------------- the recipe
@claims_output("finetune", inputs=("model", "adapter"))
def finetune(
    model: str | None = None,
    train_data: str | Path | Sequence[str | Path] = (),
    dev_data: str | Path | Sequence[str | Path] | None = None,
    *,
    adapter: str | Path | None = None,
    out_dir: str | Path = "runs/sft",
    method: str = "full",
    format: str | None = None,
    prompt_template: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    chat: bool | None = None,
    max_len: int | None = None,
    pack: bool = False,
    padding_side: str = "right",
    batch_size: int = 8,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    clip: float = 1.0,
    precision: str = "fp32",
    compile: bool = False,
    eval_every: int = 0,
    eval_examples: int | None = 200,
    eval_generate: int = 20,
    max_new_tokens: int = 64,
    save_every: int = 0,
    log_every: int = 10,
    train_limit: int | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "cpu",
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_targets: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    rslora: bool = False,
    quant: str = "nf4",
    num_virtual_tokens: int = 20,
    prompt_init_text: str | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` (a name or path ``lmforge.load`` accepts; None = the embedded default) on SFT data.

    Trains ``steps`` optimiser steps (or ``epochs`` passes over the training rows; one epoch when neither
    is given) of ``batch_size * grad_accum`` examples. With ``dev_data``, evaluates every ``eval_every``
    steps and at the end: ``val_loss`` on the first ``eval_examples`` dev examples and ``val_rougeL`` of
    greedy generations (``max_new_tokens``) on the first ``eval_generate``. ``max_len`` (tokens per example
    or packed row) defaults to 512 or the model's context window, whichever is smaller. The fine-tuned model and its
    tokenizer are written to ``out_dir/final`` (a Hugging Face directory); ``resume`` continues from
    ``out_dir/checkpoint``. Returns the final metrics plus ``train_examples``/``dropped`` counts. An ``out_dir``
    that holds a run needs ``resume`` or ``overwrite``; one with other files needs ``force``
    (``lmforge.outputs``); it is locked while training.

    ``method``: ``full``; ``lora`` (rank ``lora_r``, ``lora_alpha``, on ``lora_targets``: names,
    ``"all-linear"`` or a regex); ``qlora`` (the same over a ``quant`` = nf4 | int8 frozen base); or
    ``prompt-tuning`` (``num_virtual_tokens``, initialised from ``prompt_init_text`` when given). PEFT
    methods write a PEFT-format adapter (plus tokenizer) to ``out_dir/final``; ``lr`` defaults to
    2e-5 (full), 2e-4 (LoRA) or 3e-2 (prompt tuning).

    ``adapter``: a PEFT adapter folder for ``model``. With ``lora`` / ``prompt-tuning`` (of the same kind)
    training continues that adapter (its rank, targets and virtual tokens win over the arguments); with
    ``full`` a LoRA adapter is merged into the weights first.
    """
    if method not in METHODS:
        raise LmforgeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if lr is None:
        lr = DEFAULT_LR[method]
    if isinstance(lora_targets, tuple):
        lora_targets = list(lora_targets)
    if not train_data:
        raise LmforgeError("no training data given (--train FILE)")
    if steps is not None and epochs is not None:
        raise LmforgeError("give either steps or epochs, not both")
    for name, value in (("batch_size", batch_size), ("max_len", max_len), ("grad_accum", grad_accum)):
        if (value is not None or name != "max_len") and (not isinstance(value, int) or value < 1):
            raise LmforgeError(f"{name} must be an integer >= 1, got {value!r}")
    run_config = json.loads(json.dumps(locals(), default=str))  # Paths and tuples as plain JSON
    from lmforge.data.sft import SFTBatches, load_sft_data
    from lmforge.lm import load
    from lmforge.training.loop import RunDir, TrainConfig, train

    lm = load(model, device=device, dtype="float32", adapter=adapter)
    net, tok = lm.model, lm.tokenizer
    arch = net.config.arch
    if arch not in ("decoder", "encoder-decoder"):
        raise LmforgeError(f"{lm.name} is an {arch} model; fine-tuning needs a decoder-only or encoder-decoder model")
    seq2seq = arch == "encoder-decoder"
    init_ids = tok.encode(prompt_init_text, add_special_tokens=False) if prompt_init_text else None
    if adapter is None:
        net = apply_method(net, method, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           lora_targets=lora_targets, rslora=rslora, quant=quant,
                           num_virtual_tokens=num_virtual_tokens, prompt_init_ids=init_ids, seed=seed)
    else:
        net = continue_adapter(net, method, adapter)
    if max_len is None:
        max_len = 512 if seq2seq else min(512, net.config.max_seq_len)
    if not seq2seq and max_len > net.config.max_seq_len:
        raise LmforgeError(f"max_len={max_len} exceeds the context window of {lm.name} ({net.config.max_seq_len})")
    data_args = dict(max_len=max_len, seq2seq=seq2seq, chat=chat, format=format, prompt_template=prompt_template,
                     prompt_field=prompt_field, response_field=response_field)
    data = load_sft_data(list(train_data) if isinstance(train_data, (list, tuple)) else train_data, tok,
                         limit=train_limit, **data_args)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    batch_args = dict(pad_id=pad if pad is not None else 0, seq2seq=seq2seq,
                      decoder_start_id=net.config.decoder_start_token_id if seq2seq else None)
    batches = SFTBatches(data.examples, batch_size=batch_size, seed=seed, pack=pack, max_len=max_len,
                         padding_side=padding_side, **batch_args)
    if steps is None:
        rows = len(batches.rows(0))
        steps = max(1, math.ceil((epochs if epochs is not None else 1.0) * rows / (batch_size * grad_accum)))
    eval_fn = None
    if dev_data:
        dev = load_sft_data(list(dev_data) if isinstance(dev_data, (list, tuple)) else dev_data, tok, **data_args)
        dev_batches = SFTBatches(dev.examples, batch_size=batch_size, shuffle=False, **batch_args)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return evaluate_sft(m, tok, dev_batches, loss_examples=eval_examples, generate_examples=eval_generate,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)

    from lmforge.peft.lora import trainable_report

    print(f"{method}: {trainable_report(net)}", file=sys.stderr)  # once the data has loaded without error
    cfg = TrainConfig(steps=steps, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, grad_accum=grad_accum, clip=clip, precision=precision,
                      compile=compile, eval_every=eval_every, save_every=save_every, log_every=log_every, seed=seed)
    run = RunDir(out_dir, {"recipe": "finetune", **run_config}, resume=resume, tokenizer=tok)
    result = train(net, loss_for(net), batches, cfg, run, eval_fn=eval_fn,
                   tokens_per_batch=lambda b: int(b["attention_mask"].sum()))
    return {**result, "train_examples": len(data.examples), "dropped": data.dropped, "steps": steps,
            "out_dir": str(Path(out_dir) / "final")}


# ----------------------------------------------------------------------------- command line
