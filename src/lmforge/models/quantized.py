"""Weight-only quantisation of linear layers: int8 (per output row), int4 (group-wise, ``int4.py``) and 4-bit NF4.

- int8: w ~ q * s with one absmax scale per output row, q in [-127, 127]. Portable form: ``qweight`` int8
  (out, in), ``scale`` (out, 1), ``bias``. On CPU ``forward`` runs PyTorch's packed kernel
  ``torch._weight_int8pack_mm`` (no dequantised weight is built); elsewhere, or when a gradient must reach the
  input (QLoRA training), it multiplies by the dequantised weight.
- int4: see ``lmforge.models.int4`` (round-to-nearest or GPTQ, ``torch._weight_int4pack_mm_for_cpu``).
- nf4: blocks of 64 values, each scaled by its absmax, rounded to the nearest of the 16
  NormalFloat-4 levels (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E), two codes per byte;
  dequantised in ``forward``.

Quantised layers keep their codes and scales as buffers (not trainable); they serve as the frozen base under
LoRA (QLoRA-style) and for inference. ``quantize_model`` quantises a whole model for inference (int8 or int4,
GPTQ calibrated on token sequences); ``lmforge quantize`` saves the result (``checkpoints/quantized.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.errors import LmforgeError
from lmforge.models.int4 import Int4Linear, check_group_size

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), from the QLoRA paper's appendix.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
SCHEMES = ("int8", "nf4")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Module | None = None, *, in_features: int = 0, out_features: int = 0,
                 bias: bool = False, device: torch.device | str | None = None):
        """From a float ``linear`` (quantised here), or an empty shell of the given shape (a loading target)."""
        super().__init__()
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

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in)."""
        return self.qweight.to(self.scale.dtype) * self.scale

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and self.qweight.device.type == "cpu" and x.dtype in KERNEL_DTYPES
                and not (torch.is_grad_enabled() and x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.uses_kernel(x):
            return F.linear(x, self.weight.to(x.dtype), bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight,
                                               self.scale.reshape(-1).to(x.dtype))
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


QUANTIZED_LINEARS = (Int8Linear, Int4Linear, NF4Linear)
# the layers a linear map can be: a float nn.Linear or a quantised one (all have in_features, out_features, weight)
LINEAR_LAYERS = (nn.Linear, *QUANTIZED_LINEARS)


def quantize_linears(model: nn.Module, scheme: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (but those whose name ends in ``skip``) by its quantised version, in place."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"unknown quantisation {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    cls = Int8Linear if scheme == "int8" else NF4Linear
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, cls(module))
    return model


METHODS = ("int8", "int4")
ALGORITHMS = ("rtn", "gptq")


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith(skip)]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def check_quantization(model: nn.Module, method: str, group_size: int | None = None, algorithm: str = "rtn",
                       skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Refuse a method, algorithm or group size that does not fit ``model`` (before anything is computed)."""
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
                   calibration: list[torch.Tensor] | None = None, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers (but ``skip``) by ``Int8Linear`` or ``Int4Linear`` in place.

    int4: ``group_size`` 32/64/128 (default 64), ``algorithm`` "rtn" or "gptq"; GPTQ needs ``calibration``,
    a list of token-id tensors (batch, seq). The model must be on CPU for GPTQ's Hessians to stay small."""
    check_quantization(model, method, group_size, algorithm, skip)
    targets = _targets(model, skip)
    if method == "int8":
        for name, m in targets:
            _replace(model, name, Int8Linear(m))
        return model
    hessians: dict[str, torch.Tensor] = {}
    if algorithm == "gptq":
        if not calibration:
            raise LmforgeError("GPTQ needs calibration text (--calibration FILE); none was given")
        hessians = collect_hessians(model, calibration, [n for n, _ in targets])
    for name, m in targets:
        layer = Int4Linear.from_linear(m, 64 if group_size is None else group_size, hessians.pop(name, None))
        _replace(model, name, layer.to(m.weight.device))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
