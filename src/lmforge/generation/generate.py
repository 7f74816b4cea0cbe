"""Autoregressive generation: prefill once, then decode one token at a time over the KV cache.

``generate_tokens`` is the token-level engine (batched, left-padded prompts); ``TextStream``
turns the ids it yields into text increments that stop at stop strings and never cut a
multi-byte character in half.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.generation.sampling import SamplingParams, sample_next


def check_lengths(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """Validate against the context window; returns max_new_tokens, shortened (with a warning) to fit."""
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len == 0:
        raise LmforgeError("the prompt is empty (0 tokens)")
    if prompt_len >= context:
        raise LmforgeError(
            f"the prompt is {prompt_len} tokens, longer than the model's context window of {context} tokens "
            "(leave room for at least one new token)"
        )
    if prompt_len + max_new_tokens > context:
        fit = context - prompt_len
        print(f"warning: max_new_tokens {max_new_tokens} shortened to {fit} to fit the {context}-token context",
              file=sys.stderr)
        return fit
    return max_new_tokens


def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    *,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Yield, each step, one new token id per prompt (None once that prompt has finished).

    A prompt finishes when it emits one of ``eos_ids`` (the EOS id is yielded) or after
    ``max_new_tokens``. Prompts of different lengths are left-padded; padding is masked out and
    positions count real tokens only, so each row decodes as it would alone.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        yield from _generate(model, prompts, max_new_tokens, params, eos_ids, pad_id, seed, use_cache)
        return
    # Softmax tails underflow into subnormal floats, which x86 handles ~100x slower; they carry no
    # signal at inference, so flush them to zero while generating (a per-thread CPU flag, restored after).
    torch.set_flush_denormal(True)
    try:
        yield from _generate(model, prompts, max_new_tokens, params, eos_ids, pad_id, seed, use_cache)
    finally:
        torch.set_flush_denormal(False)


@torch.inference_mode()
def _generate(model, prompts, max_new_tokens, params, eos_ids, pad_id, seed, use_cache):
    device = next(model.parameters()).device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    L = max(lens)
    max_new_tokens = check_lengths(L, max_new_tokens, model.config.max_seq_len)
    total = L + max_new_tokens
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    key_mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        key_mask[b, L - len(p):] = True
    key_mask[:, L:] = True
    padded = min(lens) != L
    positions = (key_mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(list(p), dtype=torch.long, device=device)] = True

    caches = model.make_caches(B, total) if use_cache else None
    logits = model(idx, positions, key_mask[:, :L] if padded else None, caches, 0, last_only=True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, all_pos = idx, positions
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], params, seen, generator)  # (B,)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        yield [None if f else int(t) for t, f in zip(nxt.tolist(), finished.tolist())]
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        pos = all_pos[:, -1:] + 1  # (B, 1)
        cur = L + step  # where nxt sits in the sequence
        if use_cache:
            logits = model(nxt[:, None], pos, key_mask[:, :cur + 1] if padded else None, caches, cur, last_only=True)
        else:
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            all_pos = torch.cat([all_pos, pos], dim=1)
            logits = model(tokens, all_pos, key_mask[:, :cur + 1] if padded else None, None, 0, last_only=True)
            continue
        all_pos = torch.cat([all_pos, pos], dim=1)


class TextStream:
    """Accumulates generated ids and hands out the text that is safe to show so far.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a
    stop string. A stop string ends the stream and is not part of the text (OpenAI semantics).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise LmforgeError("stop strings must be non-empty")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the new text to show (possibly '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._emit(len(self.text))
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        hold = 0  # hold back a suffix that may still grow into a stop string
        for s in self.stop:
            hold = max([hold] + [k for k in range(1, min(len(s) - 1, safe) + 1) if text[:safe].endswith(s[:k])])
        safe -= hold
        return self._emit(safe)

    def finish(self) -> str:
        """Flush what was held back (call when generation ends without a stop string)."""
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out
