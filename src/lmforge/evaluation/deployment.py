"""What a model costs to deploy: the deployment columns of ``lmforge compare`` (``deployment_stats: true``).

Owns four measures of one loaded model, each defined once here:

- ``disk_bytes``: the size on disk of what the setting loads: the model folder's files (or the one .gguf file), plus
  the adapter folder when there is one. A quantisation done at load time (a setting's ``quantize``) is not on disk:
  the folder's size is reported as it is, and ``weights_bytes`` shows the quantised size.
- ``weights_bytes``: bytes held by the loaded model's parameters and buffers (tied tensors once).
- ``parameters``: how many weights the model represents: float parameters (tied ones once) plus, for each
  quantised linear layer, its ``out x in`` weights and its bias: the same count for a model and its int8/int4 form.
- ``PeakMemory``: the peak memory of a span; ``lmforge compare`` measures the batch-1 decode timing (the model as
  deployed for one user: weights, packed forms, KV cache, one token's activations), not the batched evaluation (over
  which it read 8.2 GB for a 135M model scored 8 prompts at a time). On CPU (Linux): the process's resident-set
  high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` after the model loads, minus the resident set
  measured before the model was loaded: the model's resident weights (with caches such as int4's packed form) plus the
  working set (activations, KV cache, allocator slack). The caller warms up first (``lmforge compare`` loads its first
  model once beforehand and calls ``warm_up_scoring``) so that libraries imported on first use are not counted.
  ``resource.getrusage`` and ``tracemalloc`` are not used: the first cannot be reset, the second does not see torch's
  allocations. On CUDA: ``torch.cuda.max_memory_allocated`` over the same span, less what was allocated before the
  model loaded. None where neither is available (macOS, Windows).
- ``decode_speed``: batch-1 greedy decode tokens/s on one prompt: a short warm-up, then ``new_tokens`` tokens with
  EOS ignored, timed from the first new token to the last (prefill excluded), apart from the evaluation; the median
  of ``repeats`` such runs (a burst of other work on a shared machine then moves it less).
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoints.resolve import resolve
from lmforge.generation.generate import generate_tokens
from lmforge.generation.sampling import SamplingParams
from lmforge.models.quantized import QUANTIZED_LINEARS, model_bytes

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def path_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (links followed, hidden lock/run files included)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def disk_bytes(model: str | os.PathLike | None, adapter: str | os.PathLike | None = None) -> int:
    """The size on disk of ``model`` (a name ``lmforge.load`` takes) plus its ``adapter`` folder."""
    total = path_bytes(resolve(model).path)
    return total + (path_bytes(adapter) if adapter is not None else 0)


def weights_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors once)."""
    return model_bytes(model)


def count_parameters(model: nn.Module) -> int:
    """Weights the model represents: float parameters (tied once) plus each quantised linear's out x in + bias."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for m in model.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            total += m.num_weights + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return total


def _status_kib(key: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset VmHWM to the current resident set
    except OSError:
        return False
    return True


def _release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so that the memory of a model freed
    before this one does not sit in the resident set as a baseline the next model then fills unseen (it read 0 MB
    for the second of several models timed in one process). A no-op where glibc is not the allocator."""
    import ctypes

    try:  # the process's own symbols: libc is loaded already (find_library would run ldconfig on every call)
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class PeakMemory:
    """Peak memory of a span, above the memory in use before the model loaded (see the module docstring).

    ``baseline()`` before loading the model; ``start()`` after loading, before what is measured (``lmforge compare``:
    the decode timing); ``peak()`` after it (bytes, or None where it cannot be measured)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self._base: int | None = None
        self._ok = False

    def baseline(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_freed_heap()
            rss = _status_kib("VmRSS")
            self._base = None if rss is None else rss * 1024

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._ok = self._base is not None
        else:
            self._ok = self._base is not None and _reset_hwm()

    def peak(self) -> int | None:
        if not self._ok or self._base is None:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._base
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(0, hwm * 1024 - self._base)


def decode_speed(lm, prompt_ids: list[int], new_tokens: int = 64, warmup_tokens: int = 8, repeats: int = 3) -> float:
    """Batch-1 greedy decode tokens/s of ``lm`` (an ``lmforge.LM``) after ``prompt_ids``: a warm-up of
    ``warmup_tokens``, then ``new_tokens`` with EOS ignored, from the first new token to the last; the median of
    ``repeats`` runs."""
    from lmforge.errors import LmforgeError

    context = lm.config.max_seq_len
    ids = list(prompt_ids)[-max(1, context - new_tokens):]  # keep the prompt's end when it would not fit
    n = min(new_tokens, context - len(ids))
    if n < 2:
        raise LmforgeError(f"decode speed: the model's context of {context} tokens leaves no room to decode")
    pad = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else 0

    def run(count: int) -> list[float]:
        stamps = []
        for _ in generate_tokens(lm.model, [ids], count, SamplingParams(), eos_ids=(), pad_id=pad,
                                 compile=lm.compile):
            stamps.append(time.perf_counter())
        return stamps

    speeds = []
    with torch.inference_mode():
        run(min(warmup_tokens, n))
        for _ in range(max(1, repeats)):
            stamps = run(n)
            speeds.append((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    return statistics.median(speeds)


def warm_up_scoring(metrics: list[str]) -> None:
    """Score one made-up prediction with ``metrics`` (toxicity left out), so that the libraries scoring imports
    and the caches it fills (~150 MB for rouge-score) are in memory before a baseline is taken."""
    from lmforge.evaluation.metrics import score_generations

    names = [m for m in metrics if m != "toxicity"]
    if names:
        score_generations(["a short summary."], ["a short summary."], names, None)


def stats(lm, *, model: str | os.PathLike | None, adapter: str | os.PathLike | None, decode_tok_s: float,
          decode_tokens: int, peak: int | None) -> dict:
    """The deployment columns of one setting, as written to its summary.json under ``deployment``."""
    mib = 2 ** 20
    return {"disk_mb": round(disk_bytes(model, adapter) / mib, 2),
            "weights_mb": round(weights_bytes(lm.model) / mib, 2),
            "parameters": count_parameters(lm.model),
            "peak_mem_mb": None if peak is None else round(peak / mib, 1),
            "decode_tok_s": round(decode_tok_s, 2), "decode_tokens": decode_tokens}
