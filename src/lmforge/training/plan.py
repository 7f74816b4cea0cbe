"""``lmforge plan``: memory per rank and FLOPs per token of a training run, before it is launched.

For a decoder-only model (its config only: no weights are read) x method (full, lora, qlora, prompt-tuning) x
strategy (ddp replicates the model on every rank; fsdp shards parameters, gradients and optimiser states over
the world size) x precision x micro-batch x sequence length x activation checkpointing, ``plan`` counts, per rank:

- weights: 4 bytes a parameter in fp32 and under bf16 autocast (fp32 master weights), 2 in pure bf16;
  qlora's frozen linear layers as NF4 (0.5 byte a weight + one fp32 absmax per block of 64) or int8 (1 byte a
  weight + one scale per output row), as ``models/quantized.py`` stores them;
- gradients: one per trainable parameter, in the parameters' dtype;
- AdamW states: two moments per trainable parameter in the parameters' dtype (``torch.optim.AdamW`` allocates
  them like the parameter: fp32, or bf16 for pure bf16 weights), plus the step's temporaries (``foreach`` on
  CUDA: one trainable-sized buffer; the per-tensor loop on CPU: the largest trainable tensor);
- activations: what autograd keeps for backward in ``models/decoder.py``'s blocks (listed in
  ``_block_saved``; checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks``), the rotary
  tables, and the loss over the vocabulary (``_loss_buffers``); with activation checkpointing only each block's
  input is kept, plus one block's activations while it is recomputed;
- strategy buffers: DDP's gradient buckets (a second copy of the gradients, ``gradient_as_bucket_view`` off),
  FSDP's all-gathered parameters (the root's embeddings/head plus two blocks: the current one and the prefetch).

``peak`` adds them all, as if everything were alive at once: an upper bound (gradients grow while activations are
freed during backward), which is what "will it fit" needs. The KV cache for serving and FLOPs per token
(``flops_per_token``, PaLM's appendix B formula) come with it. ``max_batch_size`` finds the largest micro-batch
whose peak fits a memory size. Only the decoder-only variant is planned.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import LmforgeError

METHODS = ("full", "lora", "qlora", "prompt-tuning")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16", "bf16-pure")  # bf16: autocast over fp32 weights (the loop's --precision bf16)
DEVICES = ("cuda", "cpu")
QUANTS = ("nf4", "int8")
LOSSES = ("plain", "fused")  # F.cross_entropy over the logits; objectives.linear_cross_entropy (pretraining)
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                "max_seq_len")
NF4_BYTES = 0.5 + 4 / 64  # two codes a byte, one float32 absmax per block of 64 weights


def load_config(model: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The config of ``model``: a preset name (``lmforge.config.PRESETS``), or what ``-m`` resolves to in the
    other verbs (an embedded model, an HF directory, a .gguf file); only its config is read. ``overrides``:
    config fields to change (``--set n_layer=4``)."""
    overrides = dict(overrides or {})
    _check_shape({k: v for k, v in overrides.items() if k in SHAPE_FIELDS and v is not None})
    if model in PRESETS:
        return preset(model, **overrides)
    from lmforge.checkpoints.resolve import resolve

    source = resolve(model)
    if source.kind == "hf":
        from lmforge.checkpoints.hf_config import config_from_hf
        from lmforge.io import read_json_object

        config = config_from_hf(read_json_object(source.path / "config.json"), source.path.name)
    else:
        from lmforge.checkpoints.gguf import read_gguf_info

        config = read_gguf_info(source.path)[0]
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    config.name = str(model)  # the name the user gave, not the folder's or the GGUF's
    return config


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block: its name in the block (``self_attn.q_proj``), input and output widths."""

    name: str
    fin: int
    fout: int


def block_linears(c: ModelConfig) -> list[Linear]:
    """The linear layers of one decoder block, in forward order (as ``models/attention.py`` and ``layers.py``)."""
    hd, q, kv, d, inter = c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_embd, c.intermediate_size
    assert hd is not None
    attn = ([Linear("self_attn.qkv_proj", d, q + 2 * kv)] if c.fused_qkv else
            [Linear("self_attn.q_proj", d, q), Linear("self_attn.k_proj", d, kv), Linear("self_attn.v_proj", d, kv)])
    attn.append(Linear("self_attn.o_proj", q, d))
    gated = c.mlp in ("swiglu", "geglu")
    mlp = [Linear("mlp.gate_proj", d, inter)] if gated else []
    mlp += [Linear("mlp.up_proj", d, inter), Linear("mlp.down_proj", inter, d)]
    return attn + mlp


def adapted_names(c: ModelConfig, targets: str | list[str]) -> set[str]:
    """Full names of the layers LoRA ``targets`` select, by ``peft.lora.match_targets`` on a shape-only model."""
    from lmforge.models import build_empty
    from lmforge.peft.lora import match_targets

    return set(match_targets(build_empty(c), targets))


@dataclass
class Plan:
    """Bytes per rank of one training configuration, FLOPs per token and the serving KV cache."""

    model: str
    method: str
    strategy: str
    world: int
    precision: str
    batch_size: int  # micro-batch per rank
    seq_len: int
    activation_checkpointing: bool
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    optimizer_step: int  # the AdamW step's temporaries
    activations: int
    loss: int  # logits over the vocabulary, their log-softmax and its gradient
    strategy_buffers: int  # DDP gradient buckets / FSDP all-gathered parameters
    train_flops_per_token: float  # model FLOPs (PaLM's MFU convention: no recomputation)
    recompute_flops_per_token: float  # extra forward FLOPs of activation checkpointing
    inference_flops_per_token: float
    kv_cache: int  # serving: serve_batch x context tokens, in the compute dtype
    serve_batch: int
    context: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Everything above alive at once: an upper bound of the peak per rank."""
        return (self.weights + self.gradients + self.optimizer + self.optimizer_step + self.activations + self.loss
                + self.strategy_buffers)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for a table."""
        mib = format_bytes
        rows = [
            ("model", f"{self.model}: {self.parameters:,} parameters, {self.trainable:,} trainable ({self.method})"),
            ("setup", f"{self.strategy} x {self.world} rank(s), {self.precision}, micro-batch {self.batch_size} x "
                      f"{self.seq_len} tokens, activation checkpointing "
                      f"{'on' if self.activation_checkpointing else 'off'}"),
            ("weights", mib(self.weights)),
            ("gradients", mib(self.gradients)),
            ("AdamW states", mib(self.optimizer)),
            ("AdamW step temporaries", mib(self.optimizer_step)),
            ("activations", mib(self.activations)),
            ("logits + log-softmax", mib(self.loss)),
            ("DDP buckets" if self.strategy == "ddp" else "FSDP gathered params", mib(self.strategy_buffers)),
            ("peak per rank (upper bound)", mib(self.peak)),
            ("train FLOPs / token", f"{self.train_flops_per_token:.4g}"
             + (f" (+{self.recompute_flops_per_token:.4g} recomputed)" if self.recompute_flops_per_token else "")),
            ("inference FLOPs / token", f"{self.inference_flops_per_token:.4g}"),
            ("KV cache (serving)", f"{mib(self.kv_cache)} for {self.serve_batch} x {self.context} tokens"),
        ]
        return rows + [("note", n) for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}


def format_bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(text: str) -> int:
    """'24GiB', '80GB', '512M' (K/M/G/T alone: binary), '1.5e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise LmforgeError(f"memory size {text!r}: expected a number with an optional unit, e.g. 24GiB, 80GB, "
                           f"512MiB (units: {', '.join(u for u in _UNITS if u)})")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise LmforgeError(f"memory size {text!r} must be > 0")
    return int(value)


def _check_shape(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LmforgeError(f"config field {name} must be an integer >= 1, got {value!r}")


def _check(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise LmforgeError(f"{name} {value!r}; allowed: {', '.join(allowed)}")


def plan(config: ModelConfig, *, method: str = "full", strategy: str = "ddp", world: int = 1,
         precision: str = "fp32", batch_size: int = 1, seq_len: int | None = None,
         activation_checkpointing: bool = False, lora_r: int = 16, lora_targets: str | list[str] =
         "q_proj,k_proj,v_proj,o_proj", lora_dropout: float = 0.05, quant: str = "nf4", virtual_tokens: int = 20,
         device: str = "cuda", serve_batch: int = 1, context: int | None = None, loss: str = "plain") -> Plan:
    """Memory per rank and FLOPs per token for training ``config`` (a decoder-only model) this way.

    ``seq_len`` defaults to min(2048, the context window); ``lora_*``, ``quant`` and ``virtual_tokens`` mean
    what they mean in ``lmforge finetune`` (the same defaults); ``device`` picks the AdamW implementation
    torch uses there (foreach on cuda, a per-tensor loop on cpu); ``serve_batch`` x ``context`` sizes the
    KV cache (context defaults to the context window). The loss is counted over every position (pretraining,
    or SFT whose every token is labelled: the worst case); ``loss``: ``plain`` (``F.cross_entropy`` over the
    logits: fine-tuning, DPO) or ``fused`` (``objectives.linear_cross_entropy``: decoder pretraining).
    """
    _check("method", method, METHODS)
    _check("strategy", strategy, STRATEGIES)
    _check("precision", precision, PRECISIONS)
    _check("device", device, DEVICES)
    _check("quant", quant, QUANTS)
    _check("loss", loss, LOSSES)
    if config.arch != "decoder":
        raise LmforgeError(f"{config.name} is an {config.arch} model (arch={config.arch!r}); lmforge plan covers "
                           "decoder-only models")
    _check_shape({name: getattr(config, name) for name in SHAPE_FIELDS})
    seq_len = min(2048, config.max_seq_len) if seq_len is None else seq_len
    context = config.max_seq_len if context is None else context
    for name, value in (("world", world), ("batch_size", batch_size), ("seq_len", seq_len), ("lora_r", lora_r),
                        ("virtual_tokens", virtual_tokens), ("serve_batch", serve_batch), ("context", context)):
        if not isinstance(value, int) or value < 1:
            raise LmforgeError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= lora_dropout < 1:
        raise LmforgeError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    virtual = virtual_tokens if method == "prompt-tuning" else 0
    if seq_len + virtual > config.max_seq_len or context > config.max_seq_len:
        what = (f"seq_len {seq_len}" + (f" + {virtual} virtual tokens" if virtual else "")
                if seq_len + virtual > config.max_seq_len else f"context {context}")
        raise LmforgeError(f"{what} exceeds the context window of {config.name} ({config.max_seq_len} tokens)")
    if isinstance(lora_targets, str) and lora_targets != "all-linear" and not any(c in lora_targets
                                                                                   for c in "*^$[(|\\+?"):
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]  # as sft.parse_lora_targets
    c = config
    d, V, L = c.n_embd, c.vocab_size, c.n_layer
    linears = block_linears(c)
    n_params = c.num_parameters() if c.mlp in ("swiglu", "gelu") else _count(c)
    linear_weights = L * sum(lin.fin * lin.fout for lin in linears)  # the block matrices (quantised by qlora)
    peft = method in ("lora", "qlora")
    adapted = adapted_names(c, lora_targets) if peft else set()
    lora_params = sum(lora_r * (lin.fin + lin.fout) for i in range(L) for lin in linears
                      if f"model.layers.{i}.{lin.name}" in adapted)
    trainable = {"full": n_params, "lora": lora_params, "qlora": lora_params, "prompt-tuning": virtual_tokens * d}[
        method]
    largest = (max(V * d, max(lin.fin * lin.fout for lin in linears)) if method == "full" else
               max((lora_r * max(lin.fin, lin.fout) for lin in linears), default=0) if peft else virtual_tokens * d)

    pb = 2 if precision == "bf16-pure" else 4  # bytes of a parameter (and of its gradient and moments)
    shards = world if strategy == "fsdp" else 1
    weights = n_params * pb + (lora_params if peft else trainable if method == "prompt-tuning" else 0) * pb
    if method == "qlora":
        per_weight = NF4_BYTES if quant == "nf4" else 1.0
        row_scales = 0 if quant == "nf4" else L * sum(lin.fout for lin in linears) * pb
        weights -= linear_weights * pb
        weights += math.ceil(linear_weights * per_weight) + row_scales
    weights = math.ceil(weights / shards)
    gradients = math.ceil(trainable * pb / shards)
    optimizer = math.ceil(2 * trainable * pb / shards)
    optimizer_step = gradients if device == "cuda" else largest * pb

    t_eff = seq_len + (virtual_tokens if method == "prompt-tuning" else 0)
    tokens = batch_size * t_eff
    per_block = [_block_saved(c, i, method, adapted, precision, lora_r, lora_dropout) for i in range(L)]
    rope = 2 * c.head_dim * (2 if precision == "bf16-pure" else 4) if c.positions == "rope" else 0
    res = 2 if precision == "bf16-pure" else 4  # residual stream bytes
    head_trains = method == "full"
    final = d * res + 4 + (d * res if head_trains else 0)  # the final norm's x, 1/rms, and hn
    if head_trains and loss == "plain":  # the head's input, kept by the linear (fused keeps gradients instead)
        final += 2 * d if precision == "bf16" else d * res  # under autocast a bf16 copy
    if activation_checkpointing:
        kept = L * d * res + max(per_block)  # block inputs, and one block recomputed during backward
    else:
        kept = sum(per_block)
    activations = tokens * (kept + rope + final) + 8 * tokens  # + the token ids (int64)
    weight_copies = 0
    if method == "qlora":  # dequantised weights saved by F.linear for backward (input needs a gradient)
        weight_copies = linear_weights * pb // (L if activation_checkpointing else 1)
    if precision == "bf16":  # autocast's bf16 weight casts are saved for backward by every linear
        weight_copies += (linear_weights // (L if activation_checkpointing else 1) + V * d) * 2
    activations += weight_copies
    loss_bytes = _loss_buffers(batch_size * seq_len, V, precision, loss)
    if loss == "fused":  # it computes both gradients in the forward pass and keeps them until backward
        loss_bytes += batch_size * seq_len * d * res + (V * d * pb if head_trains else 0)

    if strategy == "ddp":
        strategy_buffers = gradients if world > 1 else 0
    else:  # FSDP2: the root (embeddings, head, final norm) stays gathered, plus the current and next block
        block_params = sum(lin.fin * lin.fout for lin in linears) + 2 * d
        root = n_params - L * block_params
        cb = 2 if precision != "fp32" else 4  # FSDP's mixed-precision policy gathers in bf16
        strategy_buffers = (root + 2 * block_params) * cb if world > 1 else 0

    n_matmul = n_params - V * d * (0 if c.tie_embeddings else 1) - (c.max_seq_len * d if c.positions == "learned"
                                                                    else 0)
    attn = L * c.n_head * c.head_dim * seq_len  # PaLM appendix B: 6N + 12 L H Q T for a training token
    if method == "full":
        train_flops = 6 * n_matmul + 12 * attn
    else:  # frozen weights: forward and the input gradients, but no weight gradients (except the adapters')
        train_flops = 4 * n_matmul + 2 * (lora_params if peft else 0) + 8 * attn
    recompute = (2 * n_matmul + 4 * attn) if activation_checkpointing else 0
    notes = []
    if method == "prompt-tuning":
        notes.append(f"{virtual_tokens} virtual tokens lengthen every sequence to {t_eff} positions")
    kv = 2 * L * c.n_kv_head * c.head_dim * serve_batch * context * (4 if precision == "fp32" else 2)
    return Plan(model=c.name, method=method, strategy=strategy, world=world, precision=precision,
                batch_size=batch_size, seq_len=seq_len, activation_checkpointing=activation_checkpointing,
                parameters=n_params, trainable=trainable, weights=weights, gradients=gradients, optimizer=optimizer,
                optimizer_step=optimizer_step, activations=activations, loss=loss_bytes,
                strategy_buffers=strategy_buffers,
                train_flops_per_token=float(train_flops), recompute_flops_per_token=float(recompute),
                inference_flops_per_token=float(2 * n_matmul + 4 * L * c.n_head * c.head_dim * context),
                kv_cache=kv, serve_batch=serve_batch, context=context, notes=notes)


def _count(c: ModelConfig) -> int:
    from lmforge.models import count_parameters

    return count_parameters(c)


def _block_saved(c: ModelConfig, i: int, method: str, adapted: set[str], precision: str, r: int,
                 dropout: float) -> int:
    """Bytes per token that autograd keeps for backward in decoder block ``i``.

    Read off ``models/layers.py`` and ``attention.py`` (fp32 checked with ``saved_tensors_hooks``):
    - a norm keeps its input and the fp32 1/rms (LayerNorm: mean and 1/std), and the normalised input only
      when its weight trains;
    - a linear layer keeps its input only when its weight trains (a frozen one needs just the weight for the
      input gradient); under bf16 autocast that input is a bf16 cast, one per layer; in fp32 the q/k/v (and
      gate/up) layers share one. A LoRA adapter keeps its input (a dropout output and mask when dropout > 0)
      and the r-wide A output;
    - attention keeps the rotated q and k, v, SDPA's output and its fp32 log-sum-exp per head;
    - the MLP keeps the activation's input, its output and the up projection (gated), the down projection's
      input when it trains.
    Nothing is kept in a block before the first trainable parameter (LoRA, block 0's norm).
    """
    full = method == "full"
    peft = method in ("lora", "qlora")
    grad_flows = not peft or any(n.startswith(f"model.layers.{j}.") for n in adapted for j in range(i))
    a = 4 if precision == "fp32" else 2  # matmul outputs
    res = 2 if precision == "bf16-pure" else 4  # residual stream and norm outputs
    hd, q, kv, d = c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_embd
    assert hd is not None
    total = 0

    def norm() -> int:
        if not grad_flows:
            return 0
        kept = d * (4 if precision == "bf16-pure" and c.norm == "rmsnorm" else res)  # input (RMSNorm: fp32)
        kept += 4 if c.norm == "rmsnorm" else 8  # 1/rms, or mean and 1/std
        if full and c.norm == "rmsnorm":
            kept += d * res  # the normalised input, for the weight's gradient
        return kept

    def inputs(group: list[Linear], width: int, needs_grad: bool, already_kept: bool = False) -> int:
        """Bytes kept for the inputs of linear layers that read one tensor of ``width`` (``needs_grad``: that
        tensor needs a gradient; ``already_kept``: it is counted elsewhere, as SDPA's output is)."""
        kept, shared = 0, False
        for lin in group:
            lora = f"model.layers.{i}.{lin.name}" in adapted
            if full or (lora and dropout == 0):  # the input itself is kept (by the layer, or by lora_A)
                if precision == "bf16" and width == lin.fin and lin.name.endswith(("q_proj", "k_proj", "v_proj",
                                                                                   "qkv_proj", "gate_proj",
                                                                                   "up_proj")):
                    kept += 2 * width  # autocast's bf16 copy of the fp32 norm output, per layer
                else:
                    shared = True
            if lora:
                kept += r * a  # lora_A's output, kept by lora_B
                if dropout > 0:  # lora_A keeps the dropout's output (under autocast, its bf16 cast) ...
                    kept += width * a
                    if needs_grad:  # ... and the dropout its float mask (x * mask / (1 - p)) for x's gradient
                        kept += width * (2 if precision == "bf16-pure" else 4)
        return kept + (width * (res if width == d and precision != "bf16" else a)
                       if shared and not already_kept else 0)

    linears = block_linears(c)
    qkv = [lin for lin in linears if lin.name.split(".")[1] in ("q_proj", "k_proj", "v_proj", "qkv_proj")]
    o = [lin for lin in linears if lin.name.endswith("o_proj")]
    up = [lin for lin in linears if lin.name.endswith(("gate_proj", "up_proj"))]
    down = [lin for lin in linears if lin.name.endswith("down_proj")]
    # attention: input norm, projections' inputs, rotated q and k, v, SDPA output (= o_proj's input), lse
    total += norm() + inputs(qkv, d, grad_flows)
    attn_grad = grad_flows or any(f"model.layers.{i}.{lin.name}" in adapted for lin in qkv)
    if attn_grad:
        total += (2 * q + 2 * kv) * a + 4 * c.n_head
        total += inputs(o, q, True, already_kept=True)
    grad_flows = grad_flows or any(f"model.layers.{i}.{lin.name}" in adapted for lin in qkv + o)
    # MLP: its norm, gate/up inputs, the activation's input and output and up's output (gated), down's input
    total += norm() + inputs(up, d, grad_flows)
    if grad_flows:
        inter = c.intermediate_size
        total += (3 if len(up) == 2 else 1) * inter * a
        total += inputs(down, inter, True)
    return total


def _loss_buffers(n: int, vocab: int, precision: str, loss: str) -> int:
    """Bytes of the loss over the vocabulary for n positions, at its peak.

    plain (``F.cross_entropy``): the fp32 log-softmax kept for backward, and during backward its gradient and the
    logits' gradient (fp32): 3 x 4 bytes a logit; under bf16 the logits are bf16 and cast to fp32 first (+2).
    fused (``linear_cross_entropy``): the logits (fp32, or bf16 plus an fp32 cast) and the fp32 log-probabilities
    that become the logits' gradient in place: 2 x 4 bytes; under bf16 the bf16 logits, their fp32 cast and the
    log-probabilities: 2 + 4 + 4."""
    per_logit = {"plain": 12 if precision == "fp32" else 14, "fused": 8 if precision == "fp32" else 10}[loss]
    return n * vocab * per_logit


def max_batch_size(config: ModelConfig, memory: int, **kwargs: Any) -> int:
    """The largest micro-batch whose ``plan(...).peak`` fits ``memory`` bytes (0: not even one sequence).

    The peak is affine in the micro-batch (activations and loss grow with it, the rest does not), so two
    plans give the line; the answer is checked against the plan itself."""
    kwargs.pop("batch_size", None)
    one = plan(config, batch_size=1, **kwargs).peak
    per_sample = plan(config, batch_size=2, **kwargs).peak - one
    if one > memory:
        return 0
    b = 1 + (memory - one) // max(per_sample, 1)
    while b > 1 and plan(config, batch_size=b, **kwargs).peak > memory:
        b -= 1
    return int(b)
