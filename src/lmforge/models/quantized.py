"""Weight-only quantisation of linear layers: int8 (per output row), int4 (group-wise, ``int4.py``) and 4-bit NF4.

- int8: w ~ q * s with one absmax scale per output row, q in [-127, 127]. Portable form: ``qweight`` int8
  (out, in), ``scale`` (out, 1), ``bias``. On CPU, for calls of fewer than ``INT8_FLOAT_FROM_ROWS[dtype]`` rows
  (decode), ``forward`` runs PyTorch's packed kernel ``torch._weight_int8pack_mm`` (no dequantised weight is
  built); from that many rows on (a prefill), elsewhere, or when a gradient must reach the input (QLoRA
  training), it multiplies by the dequantised weight in the activation dtype. Thresholds from one
  micro-measurement (one thread, the 2-core AVX-512 VM, torch 2.13, busy machine, best of 5, the float time
  including the dequantisation), ms per call, kernel / float:

      bfloat16  rows        16          32          64          128
        576 x  576    0.32 / 0.43  0.67 / 0.43  1.11 / 0.58  1.99 / 0.62
       1536 x  576    0.74 / 0.94  1.53 / 1.20  2.82 / 1.26  5.67 / 1.54
        576 x 1536    0.73 / 0.90  1.42 / 0.97  2.46 / 1.02  4.91 / 1.48
      float32   rows         1           2           4            8
        576 x  576    0.50 / 0.33  0.79 / 0.30  2.03 / 0.35  6.56 / 0.37
       1536 x  576    1.10 / 1.15  2.25 / 0.86  4.98 / 1.69  14.7 / 1.41
      float16   rows         1           2           4           16
        576 x  576    0.69 / 0.50  1.27 / 0.55  2.48 / 0.52  10.0 / 0.62
       1536 x  576    1.70 / 1.45  3.39 / 1.47  6.83 / 1.51  26.4 / 1.61

  (float32 at one row is a tie within this machine's noise; the kernel is kept there: it reads 4x fewer bytes.)
  Those are the thresholds for a CPU with bfloat16 hardware; without it (AVX2 only) the float path computes in
  float32 (``int4.float_linear``) and the kernel keeps bfloat16 calls up to 47 rows: on a 2-core AMD EPYC Zen 3 VM
  (quiet, one thread, best of 5), kernel / float at 32 and 64 rows: 576 x 576 0.85 / 0.63, 1.70 / 0.91;
  1536 x 576 1.50 / 1.60, 2.93 / 2.58; 576 x 1536 1.41 / 1.47, 2.87 / 2.33 ms.
  The paths differ by rounding only: within 1e-4 (float32) and 5e-2 (bfloat16) of a float64 reference.
- int4: see ``lmforge.models.int4`` (round-to-nearest or GPTQ, ``torch._weight_int4pack_mm_for_cpu``).
- nf4: blocks of 64 values, each scaled by its absmax, rounded to the nearest of the 16
  NormalFloat-4 levels (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E), two codes per byte;
  dequantised in ``forward``.

LM head (``quantize_head``; ``quantize_model(head=)``, ``lmforge quantize --head``, ``load(quantize_head=)``).
In a small model the tied embedding / LM head is the largest matrix (SmolLM2-135M: 49152 x 576 = 28.3M of 135M
weights; in bfloat16 ~57 MB read per decoded token, more than all its int4 blocks together). ``Int8Head`` /
``Int4Head`` are the int8 / int4 layers above as the head; with tied embeddings the input embedding becomes a
``HeadEmbedding`` that dequantises the rows it looks up from the head's codes (exact per-row scales: one gather
and one multiply per token), so the float table is dropped and the model shrinks by it (SmolLM2-135M int4 + int8
head: 28.3 MB of codes instead of a 113 MB float32 / 57 MB bfloat16 table; ``load(quantize="int4",
dtype="bfloat16")``: 130 MiB of weights with a float head, 103 MiB with the int8 one). torch's int8/int4 CPU
kernels are slow outside bfloat16 at this width (float32: int8 ~85 ms, int4 ~250 ms per row), so the head runs its
decode calls in bfloat16 whatever the activation dtype (float32 inputs are rounded to bfloat16 for it, the logits
cast back). One 49152 x 576 head, one row, one thread, the 2-core VM under load (~9 on 2 cores: +-50%), best of 20, ms:

    float32 F.linear 21-25   bfloat16 F.linear 15-32   int8 kernel (bfloat16) 11-17   int4 kernel (bfloat16) 2.2-3.3

Quality on SmolLM2-135M-Instruct (the embedded Q4_1 GGUF; the reference is its float dequantisation, which int4
blocks taken over from Q4_1 reproduce exactly; 256 teacher-forced tokens of Shakespeare, float32):

    int4 blocks + float head   KL 0        top-1 agreement 100%
    int4 blocks + int8 head    KL 0.0012   top-1 agreement 98.4%   max |logit change| 0.73 (logit range ~33)
    int4 blocks + int4 head    KL 0.13     top-1 agreement 69.9%   max |logit change| 7.6
    int8 blocks + float head   KL 0.0033   top-1 agreement 97.3%
    int8 blocks + int8 head    KL 0.0044   top-1 agreement 96.5%

The head's kernel keeps more rows than the 576-wide layers' (``HEAD_FLOAT_FROM_ROWS``: 64 with bfloat16 hardware,
128 without), because its float path dequantises all 28M weights per call: at 32 rows, one thread, the AVX-512/AMX
VM: kernel 32 ms, float path 74 + 9 ms eager; the AVX2 VM: kernel ~100 ms, dequantisation alone ~170 ms (under
load), float path ~450 ms in emulated bfloat16. So every decode batch a server runs takes the kernel.

Greedy 24-token answers to 3 chat prompts identical to the reference's: 1/3 with an int8 head, 2/3 with int8
blocks (one near-tie is enough to change the rest of an answer). So the default head is int8 (``DEFAULT_HEAD``;
its cost is a third of what int8 blocks cost); an int4 head (group 64, RTN or GPTQ) is 4x faster again but
visibly changes the model: opt-in only. (llama.cpp keeps this
model's ``token_embd`` tensor, which is also its output head, as Q8_0: 8-bit, blocks of 32.)

Quantised layers keep their codes and scales as buffers (not trainable); they serve as the frozen base under
LoRA (QLoRA-style) and for inference. ``quantize_model`` quantises a whole model for inference (int8 or int4,
GPTQ calibrated on token sequences); ``lmforge quantize`` saves the result (``checkpoints/quantized.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.errors import LmforgeError
from lmforge.models.int4 import NATIVE_BF16, Int4Linear, check_group_size, dequantize_codes, float_linear, unpack_codes

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), from the QLoRA paper's appendix.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
SCHEMES = ("int8", "nf4")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# rows (tokens in one call) from which Int8Linear takes the float path instead of the packed kernel (docstring), on
# a CPU with bfloat16 hardware (True) and one without (False; the float path computes in float32 there)
INT8_BF16_FLOAT_FROM_ROWS = {True: 32, False: 48}
INT8_FLOAT_FROM_ROWS = {torch.bfloat16: INT8_BF16_FLOAT_FROM_ROWS[NATIVE_BF16], torch.float32: 2, torch.float16: 1}


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Module | None = None, *, in_features: int = 0, out_features: int = 0,
                 bias: bool = False, device: torch.device | str | None = None):
        """From a float ``linear`` (quantised here), or an empty shell of the given shape (a loading target)."""
        super().__init__()
        self._kernel_scale = None  # the scale in another dtype, as the kernel takes it (kernel_scale)
        if linear is None:
            self.in_features, self.out_features = in_features, out_features
            self.num_weights = in_features * out_features
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, 1, device=device))
            self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
            return
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.num_weights = linear.in_features, linear.out_features, w.numel()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # (out, 1)
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _apply(self, fn, recurse=True):  # .to(), .half(): the converted scale is rebuilt on the next call
        self._kernel_scale = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_scale = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in)."""
        return self.qweight.to(self.scale.dtype) * self.scale

    def kernel_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The scale (out,) in the activation ``dtype``, as the kernel takes it. A converted copy is kept: inside a
        compiled step, a conversion feeding the kernel fails in inductor's C++ wrapper (torch 2.13), so the step
        reads the copy that ``generation.fast.pack_for_step`` made before compiling."""
        s = self.scale.reshape(-1)
        if s.dtype == dtype:
            return s
        if self._kernel_scale is None or self._kernel_scale.dtype != dtype:
            self._kernel_scale = s.to(dtype)
        return self._kernel_scale

    def prepare_kernel(self, rows: int, dtype: torch.dtype) -> None:
        """Build, eagerly, what a call of ``rows`` rows in ``dtype`` reads from the layer's caches (the converted
        scale when that call runs the kernel): ``generation.fast.pack_for_step``, before a step is compiled."""
        if self.uses_kernel(torch.empty(rows, self.in_features, dtype=dtype, device=self.qweight.device)):
            self.kernel_scale(dtype)

    def float_from_rows(self, dtype: torch.dtype) -> int:
        return INT8_FLOAT_FROM_ROWS[dtype]

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the packed kernel: CPU, a kernel dtype, no gradient to the input, and fewer
        rows than ``float_from_rows`` (static shapes, so a compiled step takes one path for good)."""
        return (x.device.type == "cpu" and self.qweight.device.type == "cpu" and x.dtype in KERNEL_DTYPES
                and not (torch.is_grad_enabled() and x.requires_grad)
                and x.numel() // self.in_features < self.float_from_rows(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return float_linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight,
                                               self.kernel_scale(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


class NF4Linear(nn.Module):
    BLOCK = 64

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.num_weights = linear.in_features, linear.out_features, w.numel()
        self.dtype = linear.weight.dtype
        flat = w.reshape(-1)
        pad = (-flat.numel()) % self.BLOCK
        blocks = F.pad(flat, (0, pad)).view(-1, self.BLOCK)  # (nblocks, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
        codes = (blocks / absmax)[..., None].sub(NF4_LEVELS).abs().argmin(dim=-1).to(torch.uint8)  # nearest level
        codes = codes.view(-1)
        self.register_buffer("packed", codes[0::2] << 4 | codes[1::2])  # two 4-bit codes per byte
        self.register_buffer("absmax", absmax.squeeze(1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).view(-1).long()
        values = NF4_LEVELS.to(self.absmax.device)[codes].view(-1, self.BLOCK) * self.absmax[:, None]
        return values.view(-1)[: self.num_weights].view(self.out_features, self.in_features).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


HEADS = ("int8", "int4", "none")
# rows from which a quantised LM head takes its float path, by CPU as above: the head's float path dequantises
# 28M weights per call for SmolLM2-135M (~75 ms with bfloat16 hardware, ~170 ms without, one thread), so its kernel
# wins to more rows than a 576-wide layer's (figures in the module docstring)
HEAD_BF16_FLOAT_FROM_ROWS = {True: 64, False: 128}
HEAD_FLOAT_FROM_ROWS = {torch.bfloat16: HEAD_BF16_FLOAT_FROM_ROWS[NATIVE_BF16], torch.float32: 2, torch.float16: 1}
DEFAULT_HEAD = "int8"  # the head's quantisation when none is named (measurements in the module docstring)
HEAD_GROUP_SIZE = 64  # an int4 head's group when the blocks give none (int8 blocks)


class _Bf16DecodeHead:
    """A quantised LM head (mixed in before ``Int8Linear``/``Int4Linear``): a decode call on float32/float16 input
    runs the packed kernel in bfloat16, because torch's int8/int4 CPU kernels are slow outside bfloat16 at the
    head's width (module docstring); the rows are rounded to bfloat16 for the kernel and the logits cast back.
    Its kernel runs up to ``HEAD_FLOAT_FROM_ROWS`` rows, the float path from there."""

    def float_from_rows(self, dtype: torch.dtype) -> int:
        return HEAD_FLOAT_FROM_ROWS[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype in (torch.float32, torch.float16) and x.device.type == "cpu"
                and self.qweight.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
                and x.numel() // self.in_features < self.float_from_rows(torch.bfloat16)):
            return super().forward(x.to(torch.bfloat16)).to(x.dtype)
        return super().forward(x)

    def prepare_kernel(self, rows: int, dtype: torch.dtype) -> None:  # float32/float16 decode calls run in bfloat16
        super().prepare_kernel(rows, torch.bfloat16 if dtype in (torch.float32, torch.float16) else dtype)


class Int8Head(_Bf16DecodeHead, Int8Linear):
    """The LM head as an ``Int8Linear``; decode calls in float32/float16 run the kernel in bfloat16."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantised rows ``ids`` (n,) of the weight: (n, in), in the scale's dtype."""
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids]


class Int4Head(_Bf16DecodeHead, Int4Linear):
    """The LM head as an ``Int4Linear`` (group-wise); decode calls in float32/float16 run the kernel in bfloat16."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantised rows ``ids`` (n,) of the weight: (n, in), float32."""
        return dequantize_codes(unpack_codes(self.qweight[ids]), self.scales[ids], self.zeros[ids], self.group_size)


class HeadEmbedding(nn.Module):
    """Token embeddings read from a tied, quantised LM head: a lookup dequantises the rows it needs, so the float
    table is dropped. ``head`` is held as a plain attribute, not a submodule: its tensors stay the head's alone
    (saved once, moved with it)."""

    def __init__(self, head: Int8Head | Int4Head, dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("anchor", torch.empty(0, dtype=dtype, device=head.qweight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantised table (vocab, dim) in the embedding dtype (built on each call)."""
        return self.head.weight.to(self.anchor.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.rows(idx.reshape(-1)).to(self.anchor.dtype).reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantised lm_head"


def check_head(head: str | None, in_features: int | None = None, group_size: int | None = None,
               flag: str = "--head") -> str:
    """``head`` ("int8" | "int4" | "none"; None is "none") checked, and for int4 its group size against the width."""
    head = "none" if head is None else head
    if head not in HEADS:
        raise LmforgeError(f"{flag} {head!r} is not a head quantisation; choose one of: {', '.join(HEADS)}")
    if head == "int4" and in_features is not None:
        check_group_size(in_features, group_size or HEAD_GROUP_SIZE, "lm_head")
    return head


def tied_embeddings(model: nn.Module, weight: torch.Tensor) -> list[str]:
    """Names of the ``nn.Embedding`` modules of ``model`` whose table is ``weight`` (the head's, when tied)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is weight]


def set_head(model: nn.Module, layer: Int8Head | Int4Head, tied: list[str], dtype: torch.dtype) -> None:
    """Make ``layer`` the model's ``lm_head``, and the embeddings named ``tied`` lookups into it."""
    _replace(model, "lm_head", layer)
    for name in tied:
        _replace(model, name, HeadEmbedding(layer, dtype))


def quantize_head(model: nn.Module, head: str | None, group_size: int | None = None,
                  hessian: torch.Tensor | None = None) -> nn.Module:
    """Quantise ``model.lm_head`` in place: "int8" (``Int8Head``, one scale per row), "int4" (``Int4Head``, group
    ``group_size``, default 64; GPTQ when its input ``hessian`` is given) or "none". A tied input embedding becomes a
    ``HeadEmbedding`` reading the quantised rows (its float table is dropped). A model without a linear ``lm_head``
    is left as it is."""
    lm_head = getattr(model, "lm_head", None)
    head = check_head(head, None if lm_head is None else lm_head.in_features, group_size)
    if head == "none" or not isinstance(lm_head, nn.Linear):
        return model
    tied = tied_embeddings(model, lm_head.weight)
    if head == "int8":
        layer: Int8Head | Int4Head = Int8Head(lm_head)
    else:
        layer = Int4Head.from_linear(lm_head, group_size or HEAD_GROUP_SIZE, hessian).to(lm_head.weight.device)
    set_head(model, layer, tied, lm_head.weight.dtype)
    return model


QUANTIZED_LINEARS = (Int8Linear, Int4Linear, NF4Linear)
# the layers a linear map can be: a float nn.Linear or a quantised one (all have in_features, out_features, weight)
LINEAR_LAYERS = (nn.Linear, *QUANTIZED_LINEARS)


def quantize_linears(model: nn.Module, scheme: str, skip: tuple[str, ...] = ("lm_head",),
                     head: str | None = None) -> nn.Module:
    """Replace every nn.Linear (but those whose name ends in ``skip``) by its quantised version, in place; ``head``
    ("int8" | "int4" | "none", the default here: QLoRA bases keep a float head) quantises ``lm_head`` as
    ``quantize_head`` does."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"unknown quantisation {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    lm_head = getattr(model, "lm_head", None)
    check_head(head, getattr(lm_head, "in_features", None))
    cls = Int8Linear if scheme == "int8" else NF4Linear
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, cls(module))
    return quantize_head(model, head)


METHODS = ("int8", "int4")
ALGORITHMS = ("rtn", "gptq")


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith(skip)]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def check_quantization(model: nn.Module, method: str, group_size: int | None = None, algorithm: str = "rtn",
                       skip: tuple[str, ...] = ("lm_head",), head: str | None = None) -> None:
    """Refuse a method, algorithm, group size or head quantisation that does not fit ``model`` (before anything is
    computed)."""
    lm_head = getattr(model, "lm_head", None)
    check_head(head, getattr(lm_head, "in_features", None), group_size)
    if method not in METHODS:
        raise LmforgeError(f"--method {method!r} is not a quantisation method; choose one of: {', '.join(METHODS)}")
    if algorithm not in ALGORITHMS:
        raise LmforgeError(f"--algorithm {algorithm!r} is unknown; choose one of: {', '.join(ALGORITHMS)}")
    if method == "int8":
        if group_size is not None:
            raise LmforgeError("--group-size applies to --method int4 only (int8 has one scale per output row)")
        if algorithm != "rtn":
            raise LmforgeError(f"--algorithm {algorithm} applies to --method int4 only (int8 rounds to nearest)")
        return
    for name, m in _targets(model, skip):
        check_group_size(m.in_features, 64 if group_size is None else group_size, name)


def collect_hessians(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` (in, in) of the inputs of each linear layer in ``names`` over the calibration ``batches``
    (token-id tensors (batch, seq), run through ``model`` without gradients). Layers fed the very same input tensor
    one after the other (q/k/v, gate/up) share one matrix, computed once; memory is one (in x in) matrix per
    distinct input, whatever the calibration length."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    leader: dict[str, str] = {}
    last: list = [None, None]  # the last input seen (held, so its identity cannot be reused) and its layer

    def hook(name):
        def accumulate(module, inputs):
            if inputs[0] is last[0]:  # the same tensor as the previous layer's: its matrix
                leader[name] = leader[last[1]]
                return
            last[0], last[1], leader[name] = inputs[0], name, name
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    hessians = {n: 2 * sums[n] / counts[n] for n in sums}
    return {n: hessians[leader[n]] for n in leader}


def quantize_model(model: nn.Module, method: str, group_size: int | None = None, *, algorithm: str = "rtn",
                   calibration: list[torch.Tensor] | None = None, skip: tuple[str, ...] = ("lm_head",),
                   head: str | None = DEFAULT_HEAD) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers (but ``skip``) by ``Int8Linear`` or ``Int4Linear`` in place, and
    quantise ``lm_head`` as ``head`` says ("int8", the default | "int4" | "none"; see ``quantize_head``).

    int4: ``group_size`` 32/64/128 (default 64), ``algorithm`` "rtn" or "gptq"; GPTQ needs ``calibration``,
    a list of token-id tensors (batch, seq), and calibrates an int4 head too. The model must be on CPU for GPTQ's
    Hessians to stay small."""
    check_quantization(model, method, group_size, algorithm, skip, head)
    targets = _targets(model, skip)
    head_group = group_size if method == "int4" else None
    if method == "int8":
        for name, m in targets:
            _replace(model, name, Int8Linear(m))
        return quantize_head(model, head, head_group)
    hessians: dict[str, torch.Tensor] = {}
    if algorithm == "gptq":
        if not calibration:
            raise LmforgeError("GPTQ needs calibration text (--calibration FILE); none was given")
        with_head = head == "int4" and "lm_head" in dict(model.named_modules())
        names = [n for n, _ in targets] + (["lm_head"] if with_head else [])
        hessians = collect_hessians(model, calibration, names)
    for name, m in targets:
        layer = Int4Linear.from_linear(m, 64 if group_size is None else group_size, hessians.pop(name, None))
        _replace(model, name, layer.to(m.weight.device))
    return quantize_head(model, head, head_group, hessians.pop("lm_head", None))


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
