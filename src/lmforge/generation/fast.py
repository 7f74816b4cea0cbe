"""The static-shape decode step and its ``torch.compile`` (gpt-fast style), with the eager fallback.

This module owns ``StaticDecoder`` (one decode step of a decoder-only model over preallocated caches of a
fixed width: every tensor has the same shape at every step, the cache column is a tensor, nothing in the
step branches on data, so ``torch.compile`` captures it as one graph) and ``decoder_for``, which keeps one
such step per model, batch size and cache width, compiled once and reused by every later generation of that
shape. The compile time is paid on the first step of a new shape and reported on stderr. When compiling is
unavailable (no C++ compiler for inductor on CPU, a model the static step does not cover) callers keep the
eager path of ``generation.generate`` (``static_support`` says why); when it fails, the step runs uncompiled
for that generation and the model is marked so that later generations take the eager path again.

Cache widths are rounded up to ``WIDTH_STEP`` columns (capped at the context) so prompts of different
lengths share a compiled graph; the extra columns are masked out.

Numerics. In float32 the compiled step gives the eager greedy tokens (tests check equality). In bfloat16 its
tokens can drift from eager's after a while (seen on the 135M bench prompt), and that is rounding, not a bug:
measured on the tiny Llama of the tests (2 layers, width 64, 20-token prompt, 24 steps fed the same tokens,
errors as a fraction of the logits' range, float32 eager as reference):

    eager bf16 vs reference 2.15e-2 | uncompiled static step vs eager: 0 (bit for bit)
    compiled bf16 vs reference 1.64e-2, vs eager 1.53e-2 (argmax equal on 23 of 24 steps; free-running greedy
    tokens equal for the first 8 of 24)
    compiled with inductor's ``emulate_precision_casts``: vs eager 0 (bit for bit; 24 of 24 tokens)

So the static-shape cache (padded width, bool mask over the unused columns) changes nothing; the difference is
inductor fusing chains of bfloat16 pointwise ops (RMSNorm, RoPE, SiLU-gate, residual adds, the softmax casts)
into one kernel that keeps the intermediates in float32 and rounds once at the end, where eager rounds to
bfloat16 after every op. The compiled step is thus slightly *closer* to float32 than eager is, and a near-tie
in the argmax flips. Setting ``TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1`` before starting Python makes inductor
round like eager (identical tokens; its speed cost was not measured here).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.models.decoder import DecoderLM
from lmforge.models.int4 import Int4Linear
from lmforge.models.quantized import Int8Linear

WIDTH_STEP = 256  # cache widths are multiples of this (or the whole context): fewer shapes, fewer compiles


def static_support(model: nn.Module) -> str | None:
    """None when ``model`` can decode through ``StaticDecoder``; otherwise the reason it cannot."""
    if type(model) is not DecoderLM:
        return f"{type(model).__name__} is not a plain decoder-only model"
    if model.config.positions not in ("rope", "learned"):
        return f"{model.config.positions} position biases depend on the step"
    return None


def compile_support(device: torch.device) -> str | None:
    """None when torch.compile can build kernels for ``device``; otherwise the reason it cannot."""
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "c++"
        if shutil.which(cxx) is None and shutil.which("g++") is None:
            return f"inductor needs a C++ compiler on CPU and neither {cxx!r} nor 'g++' is on PATH"
    elif device.type == "cuda":
        return None
    else:
        return f"torch.compile is not set up for device {device.type!r} here"
    return None


def batch_bucket(n: int, most: int) -> int:
    """The batch a static step runs for ``n`` rows: the next power of two, at most ``most``."""
    return min(most, 1 << max(0, n - 1).bit_length())


def cache_width(total: int, context: int) -> int:
    """The static cache width for a generation of ``total`` tokens: rounded up to WIDTH_STEP, within the context."""
    return min(context, -(-total // WIDTH_STEP) * WIDTH_STEP)


class CacheWindow(nn.Module):
    """Rows [0, rows) and columns [0, width) of a larger KVCache (the serving engine's), written at a tensor
    column in place: the static step of a batch bucket and a timeline bucket of ``deploy.batching.Engine``."""

    def __init__(self, cache: nn.Module, rows: int, width: int):
        super().__init__()
        self.cache, self.rows, self.width = cache, rows, width

    def update(self, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, V = self.cache.k[:self.rows], self.cache.v[:self.rows]  # views: index_copy_ writes the engine's cache
        K.index_copy_(2, start, k.to(K.dtype))
        V.index_copy_(2, start, v.to(V.dtype))
        return K[:, :, :self.width], V[:, :, :self.width]


class StaticDecoder(nn.Module):
    """One decode step over caches of a fixed width W: (B, 1) tokens -> (B, V) logits.

    positions (B, 1): each row's position id; column (1,) long: the cache column the token is written to
    (the same for every row: left-padded rows share one timeline); key_mask (B, W) bool: the columns each
    row may attend to besides the rule "not after ``column``" (False for left padding). ``caches``: the
    caches to decode over (default: new ones of this batch and width, owned by this step).
    """

    def __init__(self, model: DecoderLM, batch: int, width: int, caches: list[nn.Module] | None = None):
        super().__init__()
        self.model = model
        p = next(model.parameters())
        self.caches = nn.ModuleList(caches if caches is not None else model.make_caches(batch, width))
        self.register_buffer("columns", torch.arange(width, device=p.device), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        mask = (key_mask & (self.columns <= column))[:, None, None, :]  # (B, 1, 1, W)
        h = self.model.model(tokens, positions, mask, list(self.caches), column)  # (B, 1, C)
        return self.model.lm_head(h)[:, -1]


@dataclass
class _Entry:
    decoder: StaticDecoder
    step: object  # the compiled (or plain) callable
    compiled: bool
    warm: bool = False  # the first call (which compiles) has happened
    in_use: bool = False  # a generation is decoding over this step's caches (they are not shared)


@dataclass
class _ModelState:
    entries: dict[tuple[int, int, int | None], _Entry] = field(default_factory=dict)
    signature: tuple | None = None  # model_signature when the entries were built
    failed: str | None = None  # why compiling failed for this model: later generations decode eagerly


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def in_use(model: nn.Module, batch: int, width: int) -> bool:
    """Whether a generation is decoding over the caches of ``model``'s step for this batch and width."""
    state = _STATES.get(model)
    entry = state.entries.get((batch, width, None)) if state is not None else None
    return entry is not None and entry.in_use


def compile_failed(model: nn.Module) -> str | None:
    state = _STATES.get(model)
    return state.failed if state is not None else None


def decoder_for(model: DecoderLM, batch: int, width: int, caches: list[nn.Module] | None = None) -> _Entry:
    """The (compiled) static decode step of ``model`` for this batch size and cache width, built once.

    ``caches``: a serving engine's caches (rows and columns beyond batch and width are left alone); the step is
    then kept per caches object, else it owns caches of its own, reused by each generation of this shape.
    """
    state = _STATES.setdefault(model, _ModelState())
    key = (batch, width, id(caches[0]) if caches else None)
    if caches is None or key not in state.entries:  # once per generation (an engine builds its steps once)
        signature = model_signature(model)
        if signature != state.signature:  # the model changed since its steps were compiled: they assume the old one
            state.entries.clear()
            state.signature = signature
    if key not in state.entries:
        windows = [CacheWindow(c, batch, width) for c in caches] if caches else None
        with torch.inference_mode(False):  # the caches outlive this generation: a later one may run outside it
            dec = StaticDecoder(model, batch, width, windows)
        state.entries[key] = _Entry(dec, compile_step(dec), compiled=True)
    return state.entries[key]


# Inductor's C++ wrapper: the compiled step calls its kernels from C++, not from a generated Python function (one
# Python call per kernel and per matmul): +6% decode tok/s for SmolLM2-135M, int4, bf16, one thread. Built apart
# from the kernels (the wrapper at -O1): as one -O3 unit, compiling that step took 345 s instead of 96 s.
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


def compile_step(dec: StaticDecoder):
    """torch.compile of one step: on GPU with CUDA graphs (launch overhead is most of a step's time there), on CPU
    with inductor's C++ wrapper. Without dynamo's guards on the model: they check each of its ~400 modules and
    ~700 tensors before every call (~2 ms of a ~20 ms step of SmolLM2-135M on CPU, more than a whole step on a
    GPU); instead ``decoder_for`` drops the steps of a model whose ``model_signature`` changed. Each step compiles
    its own copy of ``StaticDecoder.forward``: dynamo keeps at most ``recompile_limit`` (8) graphs per code object,
    and with one shared code object a process's 9th step shape (a server's batch and timeline buckets reach it)
    failed to compile; a copy also keeps each step's graph in a cache of its own."""
    code = StaticDecoder.forward.__code__.replace()  # a new code object: a dynamo cache of this step's own
    forward = types.MethodType(types.FunctionType(code, StaticDecoder.forward.__globals__, "forward"), dec)
    cuda = next(dec.model.parameters()).device.type == "cuda"
    options = {"guard_filter_fn": _keep_guards_off_the_step, **({"triton.cudagraphs": True} if cuda  # "reduce-overhead"
                                                                 else CPU_COMPILE_OPTIONS)}
    return torch.compile(forward, fullgraph=True, dynamic=False, options=options)


def _keep_guards_off_the_step(guards) -> list[bool]:
    """dynamo's guard filter: keep the guards on the step's inputs and global state, drop those on ``self`` (the
    step, its caches and the model). dynamo names a guard by its source from the frame: ``self``,
    ``self._modules['model']...``, ``tokens``, ``G['...']``."""
    return [not _on_self(g.name) for g in guards]


def _on_self(name: str) -> bool:
    return name == "self" or name.startswith(("self.", "self["))


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def model_signature(model: nn.Module) -> tuple:
    """What a compiled step assumes of ``model`` without checking it each call: each module's name and type, the
    dtype, device and shape of its tensors, its plain attributes (flags such as ``training`` or an adapter's
    ``disabled``, ``eps``, a LoRA ``scaling``: the graph has their values baked in), and which quantised layers
    have built what ``pack_for_step`` builds (a few ms for SmolLM2-135M)."""
    def tensors(d):
        return tuple((n, t.dtype, t.device, t.shape) for n, t in d.items() if t is not None)

    def plain(m):
        return tuple((k, v) for k, v in vars(m).items() if isinstance(v, _PLAIN) or (
            isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)))
    return tuple((name, type(m), tensors(m._parameters), tensors(m._buffers), plain(m),
                  getattr(m, "_packed", 0) is None, getattr(m, "_kernel_scale", 0) is None)
                 for name, m in model.named_modules())


def pack_for_step(model: nn.Module, rows: int, dtype: torch.dtype) -> None:
    """Build what the quantised layers of a step of ``rows`` rows in ``dtype`` read from their caches: the int4
    layers' packed weights, the int8 layers' scales in the kernel's dtype (``prepare_kernel``). Both are cached on
    first use, which cannot be traced (packing keys its cache on ``data_ptr``; inductor's C++ wrapper fails on a
    conversion feeding the int8 kernel), and a prefill of many rows takes the float path and builds neither; so it
    is done here, eagerly, before the step is compiled."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            m.prepare_kernel(rows, dtype)


def run_step(model: DecoderLM, entry: _Entry, tokens: torch.Tensor, positions: torch.Tensor,
             column: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Call the step; the first call of a compiled one compiles it (timed, reported on stderr). If that
    fails, say so, run this step uncompiled and mark the model so that later generations decode eagerly."""
    if entry.warm or not entry.compiled:
        return entry.step(tokens, positions, column, key_mask).clone()  # clone: CUDA graphs reuse the output
    with torch.no_grad():
        pack_for_step(model, tokens.shape[0], next(model.parameters()).dtype)
    _STATES[model].signature = model_signature(model)  # the packed weights are part of what the step assumes
    t0 = time.perf_counter()
    try:
        out = entry.step(tokens, positions, column, key_mask).clone()
    except Exception as e:  # noqa: BLE001 - any compiler failure: decode without it
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _STATES[model].failed = reason
        print(f"warning: torch.compile of the decode step failed ({reason}); decoding without it",
              file=sys.stderr)
        entry.step, entry.compiled, entry.warm = entry.decoder, False, True
        return entry.step(tokens, positions, column, key_mask)
    entry.warm = True
    B, W = tokens.shape[0], entry.decoder.columns.shape[0]
    print(f"lmforge: compiled the decode step (batch {B}, cache {W} tokens) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return out

