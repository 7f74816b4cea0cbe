"""Autoregressive generation: prefill once, then decode one token at a time over the KV cache.

``generate_tokens`` is the token-level engine (batched, left-padded prompts); ``TextStream``
turns the ids it yields into text increments that stop at stop strings and never cut a
multi-byte character in half. With ``compile=True`` a decoder-only model decodes through
``StaticDecoderSteps``: the same prefill, then the static-shape step of ``generation.fast``
(compiled once per shape); models or machines it does not cover keep ``DecoderSteps``.
Structured output: ``constraints`` gives each row a ``generation.constrained.ConstraintState`` (or None); its
mask is applied to that row's logits before sampling, each sampled token advances it, and a row whose output
is complete with nothing else possible finishes there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from lmforge.errors import LmforgeError
from lmforge.generation.sampling import SamplingParams, check_seed, sample_next

if TYPE_CHECKING:
    from lmforge.generation.constrained import ConstraintState


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
    compile: bool = False,
    constraints: Sequence[ConstraintState | None] | None = None,
) -> Iterator[list[int | None]]:
    """Yield, each step, one new token id per prompt (None once that prompt has finished).

    A prompt finishes when it emits one of ``eos_ids`` (the EOS id is yielded) or after
    ``max_new_tokens``. Prompts of different lengths are left-padded; padding is masked out and
    positions count real tokens only, so each row decodes as it would alone. ``compile``: decode
    with the compiled static-shape step (``generation.fast``) where the model and machine allow it.
    ``constraints``: one state per prompt (or None) for structured output; a constrained row also finishes,
    without an EOS, when its output is complete and nothing else may follow (``ConstraintState.is_done``).
    """
    check_seed(seed)
    if constraints is not None and len(constraints) != len(prompts):
        raise LmforgeError(f"{len(constraints)} constraints for {len(prompts)} prompts; give one per prompt")
    steps = _generate(model, prompts, max_new_tokens, params, eos_ids, pad_id, seed, use_cache, compile, constraints)
    # Each step runs under no_grad (nothing here needs gradients: with parameters that require them, every step
    # would record its autograd graph, and torch.compile would build the decode step as a training graph that
    # saves its activations). On CPU, softmax tails underflow into subnormal floats, which x86 handles ~100x
    # slower; they carry no signal at inference, so they are flushed to zero while computing each step. Both
    # settings are per thread and belong to the caller: they hold only inside each step, never across a yield.
    cpu = next(model.parameters()).device.type == "cpu"
    try:
        while True:
            with torch.no_grad(), flush_denormal() if cpu else contextlib.nullcontext():
                try:
                    step = next(steps)
                except StopIteration:
                    return
            yield step
    finally:
        steps.close()


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes subnormal floats to zero (torch has a setter but no getter)."""
    return float(torch.full((1,), 2.0 ** -140) * 1.0) == 0.0


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread inside the block; the previous setting comes back after."""
    before = flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


class DecoderSteps:
    """Forward passes of a decoder-only model: the left-padded prompts, then one token per row per step."""

    def __init__(self, model, prompts, max_new_tokens: int, pad_id: int, use_cache: bool):
        device = next(model.parameters()).device
        self.model, self.use_cache = model, use_cache
        B, lens = len(prompts), [len(p) for p in prompts]
        self.L = L = max(lens)
        self.max_new_tokens = check_lengths(L, max_new_tokens, model.config.max_seq_len)
        total = L + self.max_new_tokens
        self.idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        self.key_mask = torch.zeros((B, total), dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            self.idx[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
            self.key_mask[b, L - len(p):] = True
        self.key_mask[:, L:] = True
        self.padded = min(lens) != L
        self.positions = (self.key_mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        self.caches = model.make_caches(B, total) if use_cache else None
        self.step = 0

    def first(self) -> torch.Tensor:
        """Prefill: logits for the next token after each prompt, (B, V)."""
        mask = self.key_mask[:, :self.L] if self.padded else None
        return self.model(self.idx, self.positions, mask, self.caches, 0, last_only=True)[:, -1]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,); logits for the token after it, (B, V)."""
        cur = self.L + self.step  # where the new token sits in the sequence
        self.step += 1
        pos = self.positions[:, -1:] + 1  # (B, 1)
        self.positions = torch.cat([self.positions, pos], dim=1)
        mask = self.key_mask[:, :cur + 1] if self.padded else None
        if self.use_cache:
            return self.model(tokens[:, None], pos, mask, self.caches, cur, last_only=True)[:, -1]
        self.idx = torch.cat([self.idx, tokens[:, None]], dim=1)
        return self.model(self.idx, self.positions, mask, None, 0, last_only=True)[:, -1]


class StaticDecoderSteps(DecoderSteps):
    """``DecoderSteps`` over caches of a fixed width: the prefill is the eager one, written into the static
    caches; each decode step is ``generation.fast.StaticDecoder`` (compiled), whose shapes never change."""

    def __init__(self, model, prompts, max_new_tokens: int, pad_id: int):
        from lmforge.generation import fast

        device = next(model.parameters()).device
        self.model, self.use_cache = model, True
        B, lens = len(prompts), [len(p) for p in prompts]
        self.L = L = max(lens)
        self.max_new_tokens = check_lengths(L, max_new_tokens, model.config.max_seq_len)
        W = fast.cache_width(L + self.max_new_tokens, model.config.max_seq_len)
        self.idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        self.key_mask = torch.zeros((B, W), dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            self.idx[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
            self.key_mask[b, L - len(p):] = True
        self.key_mask[:, L:] = True
        self.padded = min(lens) != L
        self.positions = (self.key_mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        self.entry = fast.decoder_for(model, B, W)
        self.entry.in_use = True
        self.caches = list(self.entry.decoder.caches)  # reused across generations: prefill overwrites [0, L)
        self.step = 0
        self.pos = self.positions[:, -1:]  # (B, 1): the last position id of each row

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        from lmforge.generation.fast import run_step

        cur = self.L + self.step
        self.step += 1
        self.pos = self.pos + 1
        column = torch.tensor([cur], dtype=torch.long, device=tokens.device)
        return run_step(self.model, self.entry, tokens[:, None].contiguous(), self.pos, column, self.key_mask)


def _decoder_steps(model, prompts, max_new_tokens: int, pad_id: int, use_cache: bool, compile: bool):
    """StaticDecoderSteps when asked to compile and possible (otherwise a stderr line says why), else DecoderSteps."""
    if compile and use_cache:
        from lmforge.generation import fast

        why = (fast.static_support(model) or fast.compile_support(next(model.parameters()).device)
               or fast.compile_failed(model))
        if why is None and not fast.in_use(model, len(prompts), fast.cache_width(
                max(len(p) for p in prompts) + max_new_tokens, model.config.max_seq_len)):
            return StaticDecoderSteps(model, prompts, max_new_tokens, pad_id)
        if why is None:  # another generation (another thread) is decoding over that shape's caches right now
            return DecoderSteps(model, prompts, max_new_tokens, pad_id, use_cache)
        _say_once(model, f"lmforge: decoding without torch.compile: {why}")
    return DecoderSteps(model, prompts, max_new_tokens, pad_id, use_cache)


_SAID: set[tuple[int, str]] = set()


def _say_once(model, line: str) -> None:
    if (id(model), line) not in _SAID:
        _SAID.add((id(model), line))
        print(line, file=sys.stderr)


class Seq2SeqSteps:
    """Forward passes of an encoder-decoder model: encode the (right-padded) sources once, then
    decode from the start token, one token per row per step."""

    def __init__(self, model, prompts, max_new_tokens: int, pad_id: int, use_cache: bool):
        device = next(model.parameters()).device
        c = model.config
        self.model, self.use_cache = model, use_cache
        B, S = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0 or max_new_tokens < 1:
            check_lengths(min(len(p) for p in prompts), max_new_tokens, S + max_new_tokens)  # raises the error
        if S > c.max_seq_len:  # relative positions extrapolate, but past the trained length quality drops
            print(f"warning: the source is {S} tokens, longer than the {c.max_seq_len} the model was trained on",
                  file=sys.stderr)
        self.max_new_tokens = max_new_tokens
        src = torch.full((B, S), pad_id, dtype=torch.long, device=device)
        self.src_mask = torch.zeros((B, S), dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            src[b, :len(p)] = torch.tensor(list(p), dtype=torch.long)
            self.src_mask[b, :len(p)] = True
        self.memory = model.encode(src, self.src_mask)  # (B, S, C)
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else pad_id
        self.idx = torch.full((B, 1), start, dtype=torch.long, device=device)
        self.caches = model.make_caches(B, max_new_tokens + 1) if use_cache else None
        self.cross = model.make_cross_caches() if use_cache else None
        self.step = 0

    def first(self) -> torch.Tensor:
        logits = self.model.decode(self.idx, self.memory, self.src_mask, self.caches, self.cross, 0, last_only=True)
        return logits[:, -1]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.use_cache:
            return self.model.decode(tokens[:, None], self.memory, self.src_mask, self.caches, self.cross,
                                     self.step, last_only=True)[:, -1]
        self.idx = torch.cat([self.idx, tokens[:, None]], dim=1)
        return self.model.decode(self.idx, self.memory, self.src_mask, last_only=True)[:, -1]


@torch.inference_mode()
def _allowed(states, finished: torch.Tensor, V: int, device) -> torch.Tensor | None:
    """(B, V) bool: each constrained, unfinished row's allowed tokens (other rows: everything); None if no row
    is constrained."""
    if not states or all(s is None for s in states):
        return None
    allowed = torch.ones((len(states), V), dtype=torch.bool, device=device)
    for b, state in enumerate(states):
        if state is not None and not bool(finished[b]):
            mask = state.allowed_mask()[:V]
            allowed[b] = False
            allowed[b, :mask.numel()] = mask.to(device)
    return allowed


def _generate(model, prompts, max_new_tokens, params, eos_ids, pad_id, seed, use_cache, compile=False,
              constraints=None):
    if getattr(model.config, "arch", "decoder") == "encoder":
        raise LmforgeError("an encoder-only model cannot generate text; use it for embeddings or classification")
    device = next(model.parameters()).device
    seq2seq = model.config.arch == "encoder-decoder"
    steps = (Seq2SeqSteps(model, prompts, max_new_tokens, pad_id, use_cache) if seq2seq
             else _decoder_steps(model, prompts, max_new_tokens, pad_id, use_cache, compile))
    B = len(prompts)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    seen = None
    if params.repetition_penalty != 1.0:  # the context so far: the prompt (decoder-only) or the start token
        seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, steps.idx, True)
        if not seq2seq and steps.padded:
            for b, p in enumerate(prompts):  # padding is not context
                seen[b] = False
                seen[b, torch.tensor(list(p), dtype=torch.long, device=device)] = True

    try:
        logits = steps.first()
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(steps.max_new_tokens):
            allowed = _allowed(constraints, finished, logits.shape[-1], device)
            nxt = sample_next(logits, params, seen, generator, allowed)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            yield [None if f else int(t) for t, f in zip(nxt.tolist(), finished.tolist())]
            finished |= torch.isin(nxt, eos)
            if allowed is not None:  # advance each constrained row; a complete one with nothing to add ends
                for b, state in enumerate(constraints):
                    if state is not None and not bool(finished[b]):
                        state.advance(int(nxt[b]))
                        finished[b] = state.is_done
            if bool(finished.all()) or step == steps.max_new_tokens - 1:
                return
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            logits = steps.next(nxt)
    finally:
        if isinstance(steps, StaticDecoderSteps):
            steps.entry.in_use = False  # its caches are free for the next generation of this shape


class TextStream:
    """Accumulates generated ids and hands out the text that is safe to show so far.

    Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a
    stop string. A stop string ends the stream and is not part of the text (OpenAI semantics).

    Detokenisation is incremental: each token decodes only a short window, the ids from
    ``prefix`` (where the last confirmed piece began, kept as context so leading spaces and merged
    bytes come out as in a full decode) to the end, and the new text is what that window adds to
    the text of ``prefix:read``. A window ending in U+FFFD (an incomplete UTF-8 sequence) is not
    confirmed: later tokens extend it. Tokenizers whose decode rewrites across token boundaries
    (``clean_up_tokenization_spaces`` on a non-BPE model) decode the whole sequence each token.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise LmforgeError("stop strings must be non-empty")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""
        backend = getattr(tokenizer, "backend", None)
        self.incremental = not (getattr(tokenizer, "clean_up_tokenization_spaces", False)
                                and type(getattr(backend, "model", None)).__name__ != "BPE")
        self._prefix = self._read = 0  # ids[:read] are confirmed: their text is self._confirmed
        self._confirmed = ""

    def _decode_new(self) -> str:
        """The text of all ids so far (confirmed text plus the decoded tail), decoding only the window."""
        if not self.incremental:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not window.startswith(before):  # the window rewrote earlier text: a full decode is the truth
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                self._confirmed, self._prefix, self._read = text, self._read, len(self.ids)
            return text
        tail = window[len(before):]
        if tail and not tail.endswith("\ufffd"):
            self._confirmed += tail
            self._prefix, self._read = self._read, len(self.ids)
            return self._confirmed
        return self._confirmed + tail

    def push(self, token_id: int) -> str:
        """Add one token; return the new text to show (possibly '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._decode_new()
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
