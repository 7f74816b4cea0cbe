"""Weight-only quantisation of linear layers: int8 (per output row) and 4-bit NF4 (per block).

- int8: w ~ q * s with one absmax scale per output row, q in [-127, 127].
- nf4: blocks of 64 values, each scaled by its absmax, rounded to the nearest of the 16
  NormalFloat-4 levels (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E), two codes per byte.

Quantised layers keep their codes and scales as buffers (not trainable) and dequantise in
``forward``; they serve as the frozen base under LoRA (QLoRA-style) and for int8 inference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.errors import LmforgeError

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), from the QLoRA paper's appendix.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
SCHEMES = ("int8", "nf4")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


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


QUANTIZED_LINEARS = (Int8Linear, NF4Linear)
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


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
