"""Pruning a decoder-only model, and keeping a pruned model's zeros through a healing fine-tune.

Four methods (``METHODS``), all scored on a little calibration text when one is given:

- ``layers``: drop whole blocks. Each block's importance is its block influence (BI; Men et al. 2024,
  "ShortGPT", arXiv:2403.03853, eq. 2): one minus the mean cosine similarity between the block's input and
  output hidden states over the calibration tokens. The ``keep`` blocks of highest BI stay, in their order;
  the result is a shallower dense model (``n_layer`` / ``num_hidden_layers`` updated).
- ``width``: shrink every MLP's intermediate size. A channel ``j`` of the down projection scores
  ``sum_i |W_down[i, j]| * ||X_j||_2`` (Wanda's ``|W|·||X||``, Sun et al. 2023, arXiv:2306.11695, eq. 1,
  summed over the channel's weights), ``X_j`` the channel's activation over the calibration tokens; the
  highest-scoring channels stay in every layer (HF configs have one ``intermediate_size``), and the gate/up
  rows and down columns of the others are removed: a smaller dense model. With ``head_sparsity`` the query
  heads are shrunk the same way (a head's score sums its columns of the output projection), the same number
  kept in every key/value group, so grouped-query attention stays consistent (families whose config.json records
  ``head_dim``: Llama, Mistral, Qwen2).
- ``magnitude``: unstructured. In each output row of every linear layer of the blocks, the ``sparsity``
  fraction of weights with the lowest ``|W|·||X||`` (Wanda's per-output comparison group) are zeroed.
- ``2:4``: semi-structured. In every 4 consecutive weights along the input dimension the 2 with the lowest
  ``|W|·||X||`` are zeroed (the pattern NVIDIA's sparse tensor cores run; Mishra et al. 2021, arXiv:2104.08378).

Without calibration text ``magnitude`` and ``2:4`` score by ``|W|`` alone; ``layers`` and ``width`` need it.
Embeddings, norms and the LM head are never pruned.

The two unstructured methods leave a model of the same shape with zeros in it, and the masks (1 = kept) in
``MASKS_FILE`` beside the weights, keyed by lmforge parameter name. ``keep_masks`` (used by the finetune
recipe when its model folder holds that file) multiplies the masked weights by their masks after every
optimiser step through a global ``torch.optim`` step post-hook, so a healing fine-tune keeps them at zero
without a second training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

METHODS = ("layers", "width", "magnitude", "2:4")
MASKS_FILE = "masks.safetensors"
REPORT_FILE = "prune.json"


@dataclass
class PruneResult:
    """What ``prune_model`` did: the pruned model, its masks (unstructured methods) and a JSON-able record."""

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def check_sparsity(sparsity: float, method: str) -> float:
    """``sparsity`` as a float in [0, 1), or ``LmforgeError`` naming the flag; 2:4 is always 0.5."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise LmforgeError(f"--sparsity must be a number in [0, 1) (the fraction removed), got {sparsity!r}")
    if method == "2:4" and sparsity != 0.5:
        raise LmforgeError(f"--method 2:4 removes exactly half the weights (sparsity 0.5); got --sparsity {sparsity}")
    return float(sparsity)


def check_head_sparsity(config: ModelConfig, head_sparsity: float, method: str) -> None:
    """``LmforgeError`` unless heads can be pruned: ``width``, a fraction in [0, 1), a family whose config.json
    records ``head_dim`` (Llama, Mistral, Qwen2: fewer heads leave the head size as it is)."""
    from lmforge.checkpoints.hf_config import config_to_hf

    if method != "width":
        raise LmforgeError("--head-sparsity is for --method width only")
    if isinstance(head_sparsity, bool) or not isinstance(head_sparsity, (int, float)) \
            or not math.isfinite(head_sparsity) or not 0 <= head_sparsity < 1:
        raise LmforgeError(f"--head-sparsity must be a number in [0, 1) (the fraction of query heads removed), "
                           f"got {head_sparsity!r}")
    if "head_dim" not in config_to_hf(config):
        raise LmforgeError(f"--head-sparsity: the {config.family} family's config.json derives the head size from "
                           "the head count, so heads cannot be pruned; Llama, Mistral and Qwen2 models can")


def check_supported(config: ModelConfig, name: str) -> None:
    if config.arch != "decoder":
        raise LmforgeError(f"{name} is an {config.arch} model; `lmforge prune` prunes decoder-only models "
                           "(Llama, Mistral, Qwen2, GPT-2 families)")


# ----------------------------------------------------------------------------------------------- calibration
def calibration_ids(text: str, tokenizer, seq_len: int, samples: int) -> torch.Tensor:
    """The first ``samples`` windows of ``seq_len`` tokens of ``text`` (fewer when it is short): (N, T) long."""
    ids = tokenizer.encode(text[: seq_len * samples * 16], add_special_tokens=False)  # enough text, not a corpus
    if len(ids) < 2:
        raise LmforgeError("the calibration text is too short: it needs at least 2 tokens")
    seq_len = min(seq_len, len(ids))
    n = max(1, min(samples, len(ids) // seq_len))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def block_influence(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """BI of every block (ShortGPT eq. 2): 1 - mean over tokens of cos(block input, block output). ids (N, T)."""
    sums = [0.0] * len(_blocks(model))
    count = 0
    hooks = []
    for i, block in enumerate(_blocks(model)):
        def hook(mod, args, out, i=i):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)  # (B, T)
            sums[i] += float(cos.sum())
        hooks.append(block.register_forward_hook(hook))
    try:
        for row in ids:
            model(row[None])
            count += row.numel()
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / count for s in sums]


@torch.no_grad()
def input_norms(model: nn.Module, ids: torch.Tensor | None, names: list[str]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` over all calibration tokens of each input feature ``j`` of the linear layers ``names``
    ((in_features,) float32 each); all ones without calibration (``ids`` None): scores become ``|W|``."""
    modules = dict(model.named_modules())
    sq = {n: torch.zeros(modules[n].in_features) for n in names}
    if ids is None:
        return {n: torch.ones_like(v) for n, v in sq.items()}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().float()
            sq[n] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # (in,)
        hooks.append(modules[n].register_forward_pre_hook(hook))
    try:
        for row in ids:
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


def block_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the blocks (attention and MLP projections)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


# ----------------------------------------------------------------------------------------------- structured
def _rebuild(model: nn.Module, config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    from lmforge.models.decoder import DecoderLM

    new = DecoderLM(config).to(next(model.parameters()).dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    new.tie_weights()
    return new.eval()


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A new model with only the blocks ``keep`` (indices, in order), renumbered 0..len(keep)-1."""
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            idx, rest = k.removeprefix("model.layers.").split(".", 1)
            if int(idx) not in renumber:
                continue
            k = f"model.layers.{renumber[int(idx)]}.{rest}"
        state[k] = v
    config = dataclasses.replace(model.config, n_layer=len(keep), n_decoder_layer=None)
    return _rebuild(model, config, state)


def mlp_channel_scores(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the Wanda score of each intermediate channel: sum_i |W_down[i, j]| * ||X_j|| ((I,) each)."""
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(len(_blocks(model)))]
    norms = input_norms(model, ids, names)
    modules = dict(model.named_modules())
    return [(modules[n].weight.detach().abs().float() * norms[n][None, :]).sum(0) for n in names]


def head_scores(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the Wanda score of each query head: the sum of |W_o[i, j]| * ||X_j|| over the head's
    ``head_dim`` input columns ``j`` of the output projection ((n_head,) each)."""
    c = model.config
    names = [f"model.layers.{i}.self_attn.o_proj" for i in range(len(_blocks(model)))]
    norms = input_norms(model, ids, names)
    modules = dict(model.named_modules())
    return [(modules[n].weight.detach().abs().float() * norms[n][None, :]).sum(0).view(c.n_head, c.head_dim).sum(1)
            for n in names]


def heads_to_keep(scores: torch.Tensor, n_kv_head: int, per_group: int) -> torch.Tensor:
    """The sorted query heads kept: the ``per_group`` highest-scoring heads of each key/value group, so every
    group keeps the same number of query heads and grouped-query attention stays consistent."""
    g = scores.numel() // n_kv_head
    within = scores.view(n_kv_head, g).topk(per_group, dim=1).indices.sort(dim=1).values  # (n_kv, per_group)
    return (within + torch.arange(n_kv_head)[:, None] * g).flatten()


def shrink_width(model: nn.Module, mlp_keep: list[torch.Tensor] | None,
                 head_keep: list[torch.Tensor] | None = None) -> nn.Module:
    """A new model whose MLPs keep only the intermediate channels ``mlp_keep[layer]`` and whose attention keeps
    only the query heads ``head_keep[layer]`` (sorted indices, equal counts per layer; None: all)."""
    c = model.config
    state = dict(model.state_dict())
    sizes: dict[str, int] = {}
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        if mlp_keep is not None:
            idx = mlp_keep[i]
            for proj in ("gate_proj", "up_proj"):
                for kind in ("weight", "bias"):
                    if p + f"mlp.{proj}.{kind}" in state:
                        state[p + f"mlp.{proj}.{kind}"] = state[p + f"mlp.{proj}.{kind}"][idx].clone()  # (I', C)
            state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, idx].clone()  # (C, I')
            sizes["intermediate_size"] = len(idx)
        if head_keep is not None:
            heads = head_keep[i]
            cols = (heads[:, None] * c.head_dim + torch.arange(c.head_dim)[None, :]).flatten()  # (nh' * hs,)
            for kind in ("weight", "bias"):
                if p + f"self_attn.q_proj.{kind}" in state:
                    state[p + f"self_attn.q_proj.{kind}"] = state[p + f"self_attn.q_proj.{kind}"][cols].clone()
            state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, cols].clone()  # (C, nh'hs)
            sizes["n_head"] = len(heads)
    config = dataclasses.replace(c, **sizes, n_decoder_layer=None)
    return _rebuild(model, config, state)


# ----------------------------------------------------------------------------------------------- unstructured
def magnitude_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (out, in), True = kept: in each row the ``round(sparsity * in)`` lowest scores are dropped."""
    k = round(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices  # (out, k)
        mask.scatter_(1, drop, False)
    return mask


def two_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Bool mask (out, in), True = kept: the 2 highest scores of every 4 consecutive inputs of each row."""
    out, n_in = score.shape
    groups = score.reshape(out, n_in // 4, 4)  # (out, in/4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, n_in)


def is_two_four(mask: torch.Tensor) -> bool:
    """Whether every 4 consecutive entries along the last dimension hold exactly 2 kept weights."""
    return bool((mask.reshape(*mask.shape[:-1], -1, 4).sum(-1) == 2).all())


@torch.no_grad()
def sparsify(model: nn.Module, method: str, sparsity: float, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Zero weights of the block linears in place (``magnitude`` or ``2:4``); returns {param name: bool mask}."""
    names = block_linears(model)
    modules = dict(model.named_modules())
    if method == "2:4":
        odd = [n for n in names if modules[n].in_features % 4]
        if odd:
            raise LmforgeError(f"--method 2:4 needs input sizes divisible by 4; {odd[0]} has "
                               f"{modules[odd[0]].in_features}")
    norms = input_norms(model, ids, names)
    masks = {}
    for n in names:
        w = modules[n].weight
        score = w.detach().abs().float() * norms[n][None, :]  # (out, in): Wanda's |W|·||X||
        mask = two_four_mask(score) if method == "2:4" else magnitude_mask(score, sparsity)
        w.mul_(mask.to(w.dtype))
        masks[n + ".weight"] = mask
    return masks


# ----------------------------------------------------------------------------------------------- entry point
def layers_to_keep(n_layer: int, sparsity: float | None, keep_layers: int | None) -> int:
    """How many blocks ``layers`` keeps: ``keep_layers``, else round((1 - sparsity) * n_layer), at least 1."""
    if keep_layers is not None:
        if isinstance(keep_layers, bool) or not isinstance(keep_layers, int) or not 1 <= keep_layers <= n_layer:
            raise LmforgeError(f"--keep-layers must be an integer from 1 to the model's {n_layer} layers, "
                               f"got {keep_layers!r}")
        return keep_layers
    return max(1, round((1 - sparsity) * n_layer))


def prune_model(model: nn.Module, tokenizer, method: str, *, sparsity: float | None = None,
                keep_layers: int | None = None, head_sparsity: float = 0.0, calibration: str | None = None,
                seq_len: int = 256, samples: int = 16) -> PruneResult:
    """Prune ``model`` (a ``DecoderLM``, float) by ``method`` (see the module docstring). ``calibration`` is the
    text scored on (``samples`` windows of ``seq_len`` tokens). ``head_sparsity`` (``width`` only): the fraction
    of each key/value group's query heads removed too. ``model`` is changed in place by the unstructured
    methods; the structured ones return a new, smaller model."""
    if method not in METHODS:
        raise LmforgeError(f"--method {method!r} is not a pruning method; allowed: {', '.join(METHODS)}")
    check_supported(model.config, "the model")
    if keep_layers is not None and method != "layers":
        raise LmforgeError("--keep-layers is for --method layers only")
    if sparsity is None:
        if method == "2:4":
            sparsity = 0.5
        elif not (method == "layers" and keep_layers is not None):
            raise LmforgeError(f"--method {method} needs --sparsity S (the fraction removed, in [0, 1))")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity, method)
    if head_sparsity:
        check_head_sparsity(model.config, head_sparsity, method)
    n_layer = model.config.n_layer
    keep_n = layers_to_keep(n_layer, sparsity, keep_layers) if method == "layers" else None
    if method in ("layers", "width") and calibration is None:
        raise LmforgeError(f"--method {method} scores on calibration text: give --calibration FILE")
    model.eval()
    ids = None
    if calibration is not None:
        ids = calibration_ids(calibration, tokenizer, min(seq_len, model.config.max_seq_len), samples)
    report: dict[str, Any] = {"method": method, "sparsity": sparsity,
                              "calibration_tokens": 0 if ids is None else ids.numel()}
    if method == "layers":
        bi = block_influence(model, ids)
        keep = sorted(sorted(range(n_layer), key=lambda i: -bi[i])[:keep_n])
        report |= {"block_influence": bi, "kept_layers": keep, "n_layer": [n_layer, keep_n]}
        return PruneResult(drop_layers(model, keep), {}, report)
    if method == "width":
        c = model.config
        size = c.intermediate_size
        kept = max(1, round((1 - sparsity) * size))
        mlp_keep = [s.topk(kept).indices.sort().values for s in mlp_channel_scores(model, ids)] \
            if kept < size else None
        report |= {"intermediate_size": [size, kept]}
        head_keep = None
        if head_sparsity:
            per_group = max(1, round((1 - head_sparsity) * (c.n_head // c.n_kv_head)))
            head_keep = [heads_to_keep(s, c.n_kv_head, per_group) for s in head_scores(model, ids)]
            report |= {"n_head": [c.n_head, per_group * c.n_kv_head], "kept_heads": [h.tolist() for h in head_keep]}
        return PruneResult(shrink_width(model, mlp_keep, head_keep), {}, report)
    masks = sparsify(model, method, sparsity, ids)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    report |= {"pruned_weights": zeros, "prunable_weights": total, "masked_tensors": len(masks)}
    return PruneResult(model, masks, report)


# ----------------------------------------------------------------------------------------------- masks
def save_masks(masks: dict[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    """``masks`` (bool tensors by parameter name) to ``folder/masks.safetensors``, atomically."""
    from safetensors.torch import save_file

    from lmforge.io import atomic_path

    path = Path(folder) / MASKS_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp), metadata={"format": "lmforge-masks"})
    return path


def read_masks(model: str | os.PathLike | None) -> dict[str, torch.Tensor] | None:
    """The masks saved beside a local model folder's weights (``MASKS_FILE``), or None when there are none."""
    if model is None:
        return None
    path = Path(model) / MASKS_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        masks = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LmforgeError(f"{path}: cannot read the pruning masks, the file is truncated or corrupt ({e})") from None
    return {k: v.bool() for k, v in masks.items()}


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor], where: str = MASKS_FILE
                ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask in its dtype) for each mask; ``LmforgeError`` for a mask that fits no parameter."""
    params = dict(model.named_parameters())
    pairs = []
    for name, mask in masks.items():
        p = params.get(name)
        if p is None:
            raise LmforgeError(f"{where}: mask {name!r} names no parameter of the model")
        if tuple(mask.shape) != tuple(p.shape):
            raise LmforgeError(f"{where}: mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}")
        pairs.append((p, mask.to(device=p.device, dtype=p.dtype)))
    return pairs


@contextlib.contextmanager
def keep_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None, where: str = MASKS_FILE) -> Iterator[None]:
    """While inside, every optimiser step that updates a masked parameter of ``model`` is followed by
    ``weight *= mask`` (a ``torch.optim`` step post-hook): pruned weights stay exactly zero. The masks are
    applied once on entry too. ``masks`` None: nothing is done."""
    if not masks:
        yield
        return
    pairs = check_masks(model, masks, where)
    mine = {id(p) for p, _ in pairs}

    @torch.no_grad()
    def reapply() -> None:
        for p, m in pairs:
            p.mul_(m)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            reapply()

    reapply()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------- the command
def prune(model: str | os.PathLike | None, out: str | os.PathLike, method: str, *, sparsity: float | None = None,
          keep_layers: int | None = None, head_sparsity: float = 0.0, calibration: str | os.PathLike | None = None,
          seq_len: int = 256, samples: int = 16, force: bool = False) -> dict[str, Any]:
    """Load ``model`` (anything ``lmforge.load`` takes), prune it (``prune_model``) and write it to ``out`` as a
    Hugging Face folder (+ ``masks.safetensors`` for magnitude / 2:4, + ``prune.json``, the record of what was
    done), under the output policy of ``lmforge.outputs`` (verb ``prune``). Every argument and the calibration
    file are checked before the output folder is touched; nothing is written until the pruned model is built.
    Returns the record."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.io import write_json_atomic
    from lmforge.lm import load
    from lmforge.outputs import check_inputs, check_output, claim_output

    if method not in METHODS:
        raise LmforgeError(f"--method {method!r} is not a pruning method; allowed: {', '.join(METHODS)}")
    if sparsity is not None:
        check_sparsity(sparsity, method)
    for flag, value in (("--seq-len", seq_len), ("--samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LmforgeError(f"{flag} must be a positive integer, got {value!r}")
    check_inputs(out, "prune", {"model": model}, strict=True)  # never into or around the model it reads
    check_inputs(out, "prune", {"calibration": calibration})
    check_output(out, "prune", force=force)
    text = None
    if calibration is not None:
        from lmforge.data.corpus import corpus_text

        try:
            text = corpus_text(calibration)  # a file, a folder or the embedded "shakespeare"
        except LmforgeError as e:
            raise LmforgeError(f"--calibration: {e}") from None
    loaded = load(model, dtype="float32")
    check_supported(loaded.model.config, str(model or "the default model"))
    result = prune_model(loaded.model, loaded.tokenizer, method, sparsity=sparsity, keep_layers=keep_layers,
                         head_sparsity=head_sparsity, calibration=text, seq_len=seq_len, samples=samples)
    params = sum(p.numel() for p in result.model.parameters())
    record = {"model": str(model) if model is not None else None, **result.report, "parameters": params}
    with claim_output(out, "prune", force=force) as folder:
        save_hf_dir(result.model, folder, tokenizer=loaded.tokenizer,
                    generation_config=getattr(loaded, "generation_config", None))
        if result.masks:
            save_masks(result.masks, folder)
        elif (folder / MASKS_FILE).exists():  # an earlier prune's masks, replaced with --force: they no longer fit
            (folder / MASKS_FILE).unlink()
        write_json_atomic(folder / REPORT_FILE, record)
    return record
