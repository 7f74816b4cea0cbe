"""Weight-only int4 linear layers with group-wise scales: round-to-nearest and GPTQ, on PyTorch's packed CPU kernel.

Arithmetic (the same as ``torch._weight_int4pack_mm_for_cpu`` computes). The weight ``W`` (out, in) is cut along
the input dimension into groups of ``group_size`` (32, 64 or 128) columns; each (row, group) has a float ``scale``
and a float ``zero`` and each weight a 4-bit code ``q`` in [0, 15]:

    W[r, c] ~ (q[r, c] - 8) * scales[r, c // group_size] + zeros[r, c // group_size]

Round-to-nearest (asymmetric, min/max): ``scale = max(hi - lo, 1e-8) / 15``, ``zero = lo + 8 * scale`` and
``q = clamp(round((w - lo) / scale), 0, 15)`` with ``lo``/``hi`` the group's min/max (so ``q * scale + lo``
reconstructs the weight).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323): the columns are quantised one at a time, in order, and the rounding error of each column is
spread over the columns not yet quantised through the inverse Hessian ``H = 2 X^T X`` of the layer's calibration
inputs ``X`` (the paper's Algorithm 1: Cholesky form of the inverse, lazy batch updates of 128 columns, 1%
dampening of the diagonal). A group's scale and zero are taken from the (already updated) weights when its first
column is reached. Here the Hessians of every layer are collected in one pass of the float model over the
calibration text (not layer after layer on quantised inputs, as the paper does): simpler, and memory is bounded by
one (in x in) matrix per linear layer, whatever the calibration length.

Portable form (what ``lmforge quantize`` saves; the kernel packing is done at load time, it is machine-specific):

- ``qweight``: uint8 (out, in / 2), two codes per byte along the input dimension: byte ``j`` of a row holds
  column ``2j`` in its low nibble and column ``2j + 1`` in its high nibble;
- ``scales``, ``zeros``: float32 (out, in / group_size);
- ``bias``: the float bias, when the layer has one.

``Int4Linear.forward`` runs ``torch._weight_int4pack_mm_for_cpu`` on CPU for calls of few rows (decode: the
kernel wants the output width a multiple of 16, so the packed weight is padded with zero rows and the output cut).
From ``FLOAT_FROM_ROWS[dtype]`` rows on (tokens in the call: a prefill), on other devices, or when a gradient must
flow to the input, it multiplies by the weight dequantised from the portable codes (group-wise, in float32, then
cast to the activation dtype; ``float_linear``): the packed kernel is built for a few rows at a time and loses to a
float matmul on long inputs. The thresholds depend on the CPU (``BF16_FLOAT_FROM_ROWS``, chosen at import by
``NATIVE_BF16``). With bfloat16 hardware (this project's 2-core AVX-512/AMX VM, one thread, torch 2.13, busy
machine (load ~8), best of 7; the float time includes dequantising the weight, ``dequantize_packed``, on every
call), ms per call:

    bfloat16   rows:          16     32     48     64     96    128
      576 x  576  kernel    0.23   0.39   0.60   0.77   1.17   1.57   float  0.77  0.86  0.90  0.94  0.95  1.14
     1536 x  576  kernel    0.52   1.03   1.51   2.02   3.02   3.99   float  2.30  2.34  2.53  2.99  2.87  3.49
      576 x 1536  kernel    0.55   1.09   1.59   2.17   2.70     -    float  2.60  2.38  2.57  3.33  3.18    -
    float32    rows:           1      2      4      8
      576 x  576  kernel    1.05   2.08   4.19   8.47          float  1.13  1.11  1.17  1.26
     1536 x  576  kernel    2.70   5.79  14.90  31.06          float  2.91  3.07  4.02  3.67
    float16    rows:           1      2      4     16
      576 x  576  kernel    1.20   2.30   4.41  17.52          float  0.76  0.81  0.80  0.92
     1536 x  576  kernel    3.02   6.05  12.13  46.49          float  1.96  2.16  2.23  2.41

(the float32/float16 rows were taken with a slower dequantisation, so the float path is if anything faster; the
dequantisation itself is most of the float path's time at these rows: ~2 ms for 1536 x 576, against 0.3 ms for a
101-row bfloat16 matmul, so around 100 rows the two paths are level and the float path wins more the longer the
prompt; torch's vectorised int4 kernel is bfloat16-only, float32 and float16 run its scalar loop.) Both paths
compute the same dequantised weight; they differ by rounding only (the kernel accumulates in float32 with
bfloat16/float16 scales, the float path rounds the dequantised weight to the activation dtype): within 1e-4 in
float32 and 5e-2 in bfloat16 of a float64 reference, the tolerances tests/test_quantize.py states for both.

Without bfloat16 hardware (a 2-core AMD EPYC Zen 3 VM, AVX2 only, 2026-12-02, quiet, one thread, best of 5) oneDNN
emulates bfloat16 matmuls: a dense bfloat16 1536 x 576 matmul takes 6.2 ms at 32 rows and 29 ms at 128, float32
1.0 and 4.2 ms. There ``float_linear`` computes a bfloat16 call in float32 (the "float" figures below, dequantising
included), and the kernel keeps calls up to 47 rows (ms per call, kernel / float):

    bfloat16   rows:            1             32             64            128
      576 x  576       0.13 / 0.47    0.99 / 0.94    1.96 / 1.25    3.45 / 1.73
     1536 x  576       0.17 / 0.90    1.52 / 1.80    2.97 / 2.63    6.12 / 5.05
      576 x 1536       0.20 / 0.95    1.51 / 1.75    3.06 / 2.49    6.11 / 4.17

Memory: a layer that has run the kernel holds the portable codes (``qweight``, out x in / 2 bytes) and the
kernel's packed copy (the same size, out padded to 16). The packed layout is torch's and depends on the CPU
(aten/src/ATen/native/cpu/int4mm_kernel.cpp: AVX-512 packs blocks of 64 rows, byte j of a block's column holding
rows j and j + 32; AVX2 blocks of 32; otherwise rows 2j and 2j + 1), so the codes are kept: saving and the
float path read them, and so does ``models.quantized.Int4Head.rows``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lmforge.errors import LmforgeError

GROUP_SIZES = (32, 64, 128)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"


def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume the common case, no bfloat16 hardware
        return False


# Without bfloat16 hardware (e.g. AVX2-only CPUs) oneDNN emulates a bfloat16 matmul, ~7x slower than float32 at
# prefill sizes (1536 x 576, 128 rows, one thread: 29 ms vs 4.2), so the float path computes in float32 there.
NATIVE_BF16 = _native_bf16()
# rows (tokens in one call) from which forward takes the float path instead of the packed kernel (module docstring);
# only the bfloat16 threshold depends on the CPU: with bfloat16 hardware (True) or without (False)
BF16_FLOAT_FROM_ROWS = {True: 96, False: 48}
FLOAT_FROM_ROWS = {torch.bfloat16: BF16_FLOAT_FROM_ROWS[NATIVE_BF16], torch.float32: 2, torch.float16: 1}


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The float path of a quantised layer: ``x @ weight.T + bias`` in ``x``'s dtype, ``weight`` dequantised. A
    bfloat16 call on a CPU without bfloat16 hardware is computed in float32 and the result rounded to bfloat16
    (~6x faster there; an int4 weight, dequantised in float32, is then not rounded to bfloat16 either)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not NATIVE_BF16:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_group_size(in_features: int, group_size: int, name: str = "linear layer") -> None:
    if group_size not in GROUP_SIZES:
        raise LmforgeError(f"--group-size {group_size} is not supported; choose one of: "
                           f"{', '.join(map(str, GROUP_SIZES))}")
    if in_features % group_size:
        fits = ", ".join(str(g) for g in GROUP_SIZES if in_features % g == 0) or "none of 32, 64, 128 does"
        raise LmforgeError(f"--group-size {group_size} does not divide the input width {in_features} of {name}; "
                           f"choose a group size that divides it ({fits})")


def group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero of each row of ``w`` (rows, group): both (rows,)."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    return scale, lo + 8 * scale


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of ``w`` (rows, k) under per-row ``scale``/``zero`` (rows,) or (rows, 1): int64 in [0, 15]."""
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.round((w - (zero - 8 * scale)) / scale).clamp(0, 15).long()


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) float weight from codes (out, in) and group parameters (out, in / group_size)."""
    out_f, in_f = codes.shape
    c = codes.float().reshape(out_f, in_f // group_size, group_size)
    return ((c - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(out_f, in_f)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """``dequantize_codes(unpack_codes(qweight), ...)`` bit for bit, several times faster (the float path of a
    prefill pays it on every call): the nibbles are written straight into one float32 buffer, then scaled in place."""
    out_f, half = qweight.shape
    n_groups = half * 2 // group_size
    w = torch.empty(out_f, n_groups, group_size // 2, 2, device=qweight.device)
    q = qweight.view(out_f, n_groups, group_size // 2)
    w[..., 0] = q & 0xF
    w[..., 1] = q >> 4
    w.sub_(8).mul_(scales.float()[..., None, None]).add_(zeros.float()[..., None, None])
    return w.view(out_f, half * 2)


def rtn_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes (out, in) int64, scales, zeros (out, in / group_size) float32)."""
    out_f, in_f = weight.shape
    groups = weight.detach().float().reshape(out_f * (in_f // group_size), group_size)
    scale, zero = group_params(groups)
    codes = quantize_with(groups, scale, zero).reshape(out_f, in_f)
    return codes, scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, block: int = 128,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (arXiv:2210.17323, Algorithm 1) of ``weight`` (out, in) given ``hessian`` (in, in) ~ X^T X of its inputs.
    Returns the same triple as ``rtn_quantize``."""
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs never active: no information, quantise as they are
    H[dead, dead] = 1
    H += torch.eye(in_f) * (damp * torch.diag(H).mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite even after dampening: round to nearest instead
        return rtn_quantize(weight, group_size)
    codes = torch.zeros(out_f, in_f, dtype=torch.long)
    scales = torch.zeros(out_f, in_f // group_size)
    zeros = torch.zeros(out_f, in_f // group_size)
    block = max(group_size, block // group_size * group_size)  # groups never straddle two blocks
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1, E1, U1 = W[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0), U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                g = col // group_size
                scales[:, g], zeros[:, g] = group_params(W1[:, j:j + group_size])
            g = col // group_size
            q = quantize_with(W1[:, j:j + 1], scales[:, g], zeros[:, g]).squeeze(1)
            codes[:, col] = q
            deq = (q.float() - 8) * scales[:, g] + zeros[:, g]
            err = (W1[:, j] - deq) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return codes, scales, zeros


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> uint8 (out, in / 2): column 2j in the low nibble, 2j + 1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 (out, in / 2) -> int32 (out, in)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1).to(torch.int32)


class Int4Linear(nn.Module):
    """A linear layer holding 4-bit codes with group-wise scales and zeros (the portable form as buffers)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.num_weights = in_features * out_features
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed: tuple | None = None  # (key, packed weight, scales_and_zeros): built on first CPU call

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, group_size, bias=bias is not None, device=codes.device)
        layer.qweight.copy_(pack_codes(codes))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int, hessian: torch.Tensor | None = None) -> Int4Linear:
        """Round-to-nearest, or GPTQ when the layer's input ``hessian`` is given."""
        w = linear.weight.detach().float().cpu()
        codes, scales, zeros = (rtn_quantize(w, group_size) if hessian is None
                                else gptq_quantize(w, hessian, group_size))
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the packed form is rebuilt on the next call
        self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in), float32."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.group_size)

    def packed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's packed weight and (in / group, out, 2) scales_and_zeros in ``dtype`` (cached)."""
        if torch.compiler.is_compiling() and self._packed is not None and self._packed[0][0] == dtype:
            return self._packed[1], self._packed[2]  # packed by the eager prefill; data_ptr cannot be traced
        key = (dtype, self.qweight.data_ptr())
        if self._packed is None or self._packed[0] != key:
            n_pad = (-self.out_features) % _N_ALIGN
            codes = F.pad(unpack_codes(self.qweight), (0, 0, 0, n_pad))
            sz = torch.stack([F.pad(self.scales, (0, 0, 0, n_pad)), F.pad(self.zeros, (0, 0, 0, n_pad))], dim=2)
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            self._packed = (key, w, sz.transpose(0, 1).contiguous().to(dtype))
        return self._packed[1], self._packed[2]

    def prepare_kernel(self, rows: int, dtype: torch.dtype) -> None:
        """Build, eagerly, what a call of ``rows`` rows in ``dtype`` reads from the layer's caches (the packed
        weight when that call runs the kernel): ``generation.fast.pack_for_step``, before a step is compiled."""
        if self.uses_kernel(torch.empty(rows, self.in_features, dtype=dtype, device=self.qweight.device)):
            self.packed(dtype)

    def float_from_rows(self, dtype: torch.dtype) -> int:
        return FLOAT_FROM_ROWS[dtype]

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
        w, sz = self.packed(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), w,
                                                       self.group_size, sz)
        y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
