"""Continuous batching: one scheduler thread decodes every running request in the same forward pass.

This module owns ``Engine`` (a bounded waiting queue, a scheduler thread, one batched KV cache); a request is a
``deploy.requests.Sequence``. It knows nothing about HTTP.

The cache layout (``deploy.kv_slots``). Each layer's cache is (slots, n_kv_head, width, head_dim), width the
context (or, with compiled steps, the timeline's width bucket, so a step reads a contiguous block); the running
sequences occupy rows [0, n). All rows share one timeline of columns: a decode step writes the
new token of every row at column ``cur``, then ``cur`` advances. A request admitted between two
steps gets its prompt's keys and values in its own row at columns [cur - P, cur) (see Admission),
so it joins the timeline exactly like a left-padded row in ``generation.generate.DecoderSteps``: a per-row key mask
hides every column that is not the row's own, and each row's position ids count its own tokens
only, so a row decodes as it would alone (greedy outputs equal the request served by itself, up
to float rounding in reductions over masked columns). When ``cur`` reaches the width, or when
most of the timeline is holes, ``_compact`` packs each row's columns against a shorter timeline
(keys are stored after RoPE, so moving them between columns changes nothing). When a row
finishes, the last row moves into its slot so the running rows stay contiguous.

Admission. Newly admitted requests are prefilled together, left-padded in one forward pass, into caches of
their own (``Prefill``), at most ``prefill_chunk`` tokens of work between two decode steps: short prompts share
a pass (as many as fit in the chunk), a longer one is prefilled a chunk per step, so a long prompt delays the
running streams by one chunk's forward pass per token instead of its whole prefill. When its prefill is done,
each request's keys and values move into its slot at columns [cur - P, cur) and it joins the timeline. If a
shared prefill fails, its requests are retried one by one, so a failing request never takes others down.

With ``compile=True`` a decode step runs the static-shape step of ``generation.fast`` over the rows
[0, nb) and columns [0, W) of the engine's caches, nb the running rows rounded up to a power of two and W the
timeline rounded up to ``fast.WIDTH_STEP``: each (nb, W) is compiled once (the time on stderr) and the rows past
the running ones compute on throwaway inputs in free slots. Models the static step does not cover decode eagerly.

A sequence's logprobs and structured output (``deploy.requests``): the engine sends each sampled token's
``token_logprobs`` as a "logprob" event, applies the sequence's constraint mask to its row's logits before
sampling, and ends the row with "stop" once the constrained output is complete. One engine serves one model: the
server runs one per LoRA adapter, so a batch never mixes adapters.

    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=16, max_queue=64).start()
    engine.submit([Sequence(ids, 32, SamplingParams(), on_event=callback)])
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence as Seq

import torch

from lmforge.deploy.kv_slots import Prefill, SlotCaches, SlotRows
from lmforge.deploy.requests import EngineBusy, Sequence, token_logprobs
from lmforge.errors import LmforgeError
from lmforge.generation.generate import TextStream
from lmforge.generation.sampling import sample_next
from lmforge.peft.prompt_tuning import PromptTunedLM

log = logging.getLogger("lmforge.serve")

def _failure(e: Exception) -> str:
    return f"generation failed: {type(e).__name__}: {e}"


class _Row:
    """A running sequence: its slot state between decode steps."""

    def __init__(self, seq: Sequence, tokenizer, vocab_size: int, device: torch.device):
        self.seq = seq
        self.pos = len(seq.prompt_ids)  # position id of the next token fed
        self.length = self.pos  # columns of the timeline this row owns
        self.pending = -1  # the sampled token not yet fed to the model
        self.text = TextStream(tokenizer, seq.stop)
        self.generator = None
        if not seq.params.greedy:
            self.generator = torch.Generator(device=device)
            if seq.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seq.seed)
        self.seen = None
        if seq.params.repetition_penalty != 1.0:
            self.seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(seq.prompt_ids, device=device)] = True


class Engine:
    """Runs ``Sequence``s with continuous batching on one model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, eos_ids: Seq[int], *, max_batch: int = 16,
                 max_queue: int = 64, context: int | None = None, compile: bool = False,
                 prefill_chunk: int | None = 512):
        cfg = model.config
        if getattr(cfg, "arch", "decoder") != "decoder":
            raise LmforgeError(f"serving needs a decoder-only model, this one is {cfg.arch}")
        if isinstance(model, PromptTunedLM):
            raise LmforgeError("serving a prompt-tuning adapter is not supported (its virtual tokens assume every "
                               "row starts at cache column 0); serve a LoRA adapter or use `lmforge generate`")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise LmforgeError(f"prefill_chunk must be >= 1 (or None: whole prompts), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.prefill: Prefill | None = None  # the requests being prefilled, not yet in a slot
        if max_batch < 1 or max_queue < 0:
            raise LmforgeError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.width = min(context or cfg.max_seq_len, cfg.max_seq_len)
        if self.width < 2:
            raise LmforgeError(f"the context must be at least 2 tokens, got {self.width}")
        self.model, self.tokenizer, self.eos = model.eval(), tokenizer, set(eos_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        # in the model's dtype, not attention_dtype's float32: max_batch x context tokens, preallocated
        self.caches = SlotCaches(model, max_batch, self.width, next(model.parameters()).dtype)
        self.key_mask = torch.zeros((max_batch, self.width), dtype=torch.bool, device=self.device)
        self.cur = 0  # the timeline column the next decode step writes
        self.rows: list[_Row] = []  # row i lives in cache slot i
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.steps = 0  # decode steps run (a forward pass for every running row)
        self.tokens = 0  # tokens sampled
        self.compactions = 0
        self.compile = False
        if compile:
            from lmforge.generation import fast

            why = fast.static_support(model) or fast.compile_support(self.device)
            if why:
                log.warning("serving without torch.compile: %s", why)
            self.compile = why is None

    # ---------------------------------------------------------------- the caller's side
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; waiting and running sequences end with an error event."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise LmforgeError unless a prompt of this length and this many new tokens fit the context."""
        if prompt_len < 1:
            raise LmforgeError("the prompt is empty (0 tokens)")
        if max_new_tokens < 1:
            raise LmforgeError(f"max_tokens must be >= 1, got {max_new_tokens}")
        if prompt_len >= self.width:
            raise LmforgeError(f"the prompt is {prompt_len} tokens, but this model's maximum context length is "
                               f"{self.width} tokens (prompt + completion); shorten the prompt")
        if prompt_len + max_new_tokens > self.width:
            raise LmforgeError(f"this model's maximum context length is {self.width} tokens, but "
                               f"{prompt_len + max_new_tokens} were requested ({prompt_len} in the prompt, "
                               f"{max_new_tokens} in the completion); shorten the prompt or lower max_tokens")

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue sequences (all or none); raises EngineBusy when the waiting queue would overflow."""
        for s in seqs:
            self.check(len(s.prompt_ids), s.max_new_tokens)
        with self.cond:
            if self.stopping:
                raise EngineBusy("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue + max(0, self.max_batch - len(self.rows)):
                raise EngineBusy(f"the server is busy: {len(self.rows)} sequences running and {len(self.waiting)} "
                                 f"waiting (limit {self.max_queue}); retry later")
            self.waiting.extend(seqs)
            self.cond.notify_all()

    def cancel(self, seqs: Seq[Sequence]) -> None:
        """Stop sequences early (a client went away); they end with a "cancelled" done event."""
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "slots": self.max_batch,
                    "context": self.width, "decode_steps": self.steps, "tokens": self.tokens,
                    "compactions": self.compactions}

    # ---------------------------------------------------------------- the scheduler thread
    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # see generate_tokens: subnormal softmax tails are slow on x86
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.rows and self.prefill is None:
                        self.cond.wait()
                    if self.stopping:
                        break
                    new = self._next_prefill() if self.prefill is None else []
                for seq in [seq for seq in new if seq.cancelled]:
                    seq._emit("done", "cancelled")
                new = [seq for seq in new if not seq.cancelled]
                if new:
                    self._start_prefill(new)
                if self.prefill is not None:
                    self._prefill_step()
                try:
                    self._retire([i for i, r in enumerate(self.rows) if r.seq.cancelled], "cancelled")
                    if self.rows:
                        self._decode()
                except Exception as e:  # the batched forward pass failed (a bug, out of memory): fail what
                    log.exception("the engine failed a step")  # shares it, keep serving
                    for r in self.rows:
                        r.seq._emit("error", _failure(e))
                    self.rows, self.cur = [], 0
        with self.cond:
            left, self.waiting = [r.seq for r in self.rows] + list(self.waiting), deque()
            left += self.prefill.seqs if self.prefill is not None else []
            self.rows, self.prefill = [], None
        for seq in left:
            seq._emit("error", "the server is shutting down")

    def _next_prefill(self) -> list[Sequence]:
        """Take the next requests to prefill from the waiting queue (under the lock): as many as have free slots
        and fit in one chunk together (k rows x the longest prompt), at least one."""
        new: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.rows) + len(new) < self.max_batch:
            P = max(longest, len(self.waiting[0].prompt_ids))
            if new and self.prefill_chunk is not None and (len(new) + 1) * P > self.prefill_chunk:
                break
            new.append(self.waiting.popleft())
            longest = P
        return new

    def _start_prefill(self, seqs: list[Sequence]) -> None:
        started, rows = [], []
        for seq in seqs:
            try:
                rows.append(_Row(seq, self.tokenizer, self.model.config.vocab_size, self.device))
                started.append(seq)
            except Exception as e:
                log.exception("the engine failed to start a request")
                self._fail_admission(seq, e)
        if started:
            try:
                self.prefill = Prefill(self.model, started, rows, self.device)
            except Exception as e:
                self._prefill_failed(started, e)

    def _prefill_step(self) -> None:
        """One chunk of the current prefill; when it completes, its requests join the running rows."""
        pre = self.prefill
        try:
            if not pre.step(self.model, self.prefill_chunk):
                return
        except Exception as e:
            self.prefill = None
            self._prefill_failed(pre.seqs, e)
            return
        self.prefill = None
        for i, (seq, row) in enumerate(zip(pre.seqs, pre.rows)):
            if seq.cancelled:
                seq._emit("done", "cancelled")
                continue
            try:
                self._join(pre, i, row)
            except Exception as e:
                log.exception("the engine failed to start a request")
                self._fail_admission(seq, e)

    def _prefill_failed(self, seqs: list[Sequence], e: Exception) -> None:
        """A prefill failed: one request alone gets the error; several are retried one by one (``_admit``)."""
        if len(seqs) == 1:
            log.exception("the engine failed to start a request")
            self._fail_admission(seqs[0], e)
            return
        for seq in seqs:
            try:
                self._admit(seq)
            except Exception as e2:
                log.exception("the engine failed to start a request")
                self._fail_admission(seq, e2)

    def _join(self, pre: Prefill, i: int, row: _Row) -> None:
        """Move row i of a finished prefill into the next slot at columns [cur - P, cur) and take its first token."""
        P, s = len(row.seq.prompt_ids), len(self.rows)
        self._fit(max(self.cur, P))
        if self.cur < P:  # stretch the timeline: the new columns are holes for the running rows
            self.key_mask[:s, self.cur:P] = False
            self.cur = P
        start = self.cur - P
        self.key_mask[s] = False
        self.key_mask[s, start:self.cur] = True
        for c, pc in zip(self.caches, pre.caches):
            c.k[s, :, start:self.cur] = pc.k[i, :, pre.L - P:]
            c.v[s, :, start:self.cur] = pc.v[i, :, pre.L - P:]
        logits = pre.logits[i:i + 1]
        self.rows.append(row)
        if not self._take(row, self._sample_row(logits, row), logits):
            self._retire([s], None)

    def _fit(self, cols: int) -> None:
        """With compiled steps, lay the caches out for the width bucket of ``cols`` columns (``kv_slots``)."""
        if self.compile:
            from lmforge.generation.fast import cache_width

            self.caches.relayout(cache_width(cols, self.width), len(self.rows), self.cur)

    def _views(self, lo: int, hi: int) -> list[SlotRows]:
        return [SlotRows(c, lo, hi) for c in self.caches]

    def _fail_admission(self, seq: Sequence, e: Exception) -> None:
        """``seq`` failed while being admitted: free its slot if it got one and answer it with an error."""
        slots = [i for i, r in enumerate(self.rows) if r.seq is seq]
        if slots:
            self.rows.pop(slots[0])  # it was appended last, so no other row moves
            if not self.rows:
                self.cur = 0
        if not seq.done.is_set():
            seq._emit("error", _failure(e))

    def _admit(self, seq: Sequence) -> None:
        """Prefill one new sequence into the next free slot and sample its first token."""
        P, s = len(seq.prompt_ids), len(self.rows)
        row = _Row(seq, self.tokenizer, self.model.config.vocab_size, self.device)  # before the prefill: may fail
        self._fit(max(self.cur, P))
        if self.cur < P:  # stretch the timeline: the new columns are holes for the running rows
            self.key_mask[:s, self.cur:P] = False
            self.cur = P
        start = self.cur - P
        self.key_mask[s] = False
        self.key_mask[s, start:self.cur] = True
        idx = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)  # (1, P)
        positions = torch.arange(P, device=self.device)[None]  # (1, P)
        logits = self.model(idx, positions, self.key_mask[s:s + 1, :self.cur], self._views(s, s + 1), start,
                            last_only=True)[:, -1]  # (1, V)
        self.rows.append(row)
        if not self._take(row, self._sample_row(logits[0:1], row), logits[0:1]):
            self._retire([s], None)

    def _decode(self) -> None:
        """One forward pass for every running row, then sampling and text for each."""
        n = len(self.rows)
        if self.cur >= self.width or self.cur > 2 * max(r.length for r in self.rows) + 64:
            self._compact()
        self._fit(self.cur + 1)
        tokens = torch.tensor([[r.pending] for r in self.rows], dtype=torch.long, device=self.device)  # (n, 1)
        pos = torch.tensor([[r.pos] for r in self.rows], dtype=torch.long, device=self.device)  # (n, 1)
        self.key_mask[:n, self.cur] = True
        if self.compile and not self._compile_failed():
            logits = self._static_decode(tokens, pos)
        else:
            logits = self.model(tokens, pos, self.key_mask[:n, :self.cur + 1], self._views(0, n), self.cur,
                                last_only=True)[:, -1]  # (n, V)
        self.cur += 1
        self.steps += 1
        for r in self.rows:
            r.pos += 1
            r.length += 1
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i, r in enumerate(self.rows):  # one row's failure (its sampling, its text) ends that row only
            try:
                if not self._take(r, self._sample_row(logits[i:i + 1], r, greedy[i]), logits[i:i + 1]):
                    finished.append(i)
            except Exception as e:
                log.exception("the engine failed a request")
                r.seq._emit("error", _failure(e))
                finished.append(i)
        self._retire(finished, None)

    def _compile_failed(self) -> bool:
        from lmforge.generation.fast import compile_failed

        return compile_failed(self.model) is not None

    def _static_decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decode step through ``generation.fast`` (see the module docstring): logits (n, V)."""
        from lmforge.generation import fast

        n = tokens.shape[0]
        nb = fast.batch_bucket(n, self.max_batch)
        W = self.caches.width  # the width bucket of cur + 1 (``_fit`` laid the caches out for it)
        entry = fast.decoder_for(self.model, nb, W, self.caches)
        mask = self.key_mask[:nb, :W].clone()
        mask[n:] = False
        mask[n:, self.cur] = True  # the throwaway rows see their own column: finite, and no running row reads them
        pad = nb - n
        tokens = torch.cat([tokens, tokens.new_zeros(pad, 1)]) if pad else tokens
        pos = torch.cat([pos, pos.new_zeros(pad, 1)]) if pad else pos
        column = torch.tensor([self.cur], dtype=torch.long, device=self.device)
        return fast.run_step(self.model, entry, tokens, pos, column, mask)[:n]

    def _sample_row(self, logits: torch.Tensor, row: _Row, greedy: int | None = None) -> int:
        """logits (1, V) -> the row's next token, with its own sampling settings and generator."""
        p, state = row.seq.params, row.seq.constraint
        if state is not None:  # structured output: only the tokens its constraint allows, greedy or sampled
            allowed = state.allowed_mask()[None].to(logits.device)
            return int(sample_next(logits, p, row.seen, row.generator, allowed)[0])
        if not p.greedy or p.repetition_penalty != 1.0:
            return int(sample_next(logits, p, row.seen, row.generator)[0])
        return int(logits[0].argmax()) if greedy is None else greedy

    def _take(self, row: _Row, tok: int, logits: torch.Tensor | None = None) -> bool:
        """Record a sampled token (``logits`` (1, V): what it was sampled from, for its logprob); False when the
        row has finished (its done event is sent). An end-of-sequence token has no logprob event: like its
        text, it is not part of the completion."""
        seq = row.seq
        seq.token_ids.append(tok)
        self.tokens += 1
        if tok in self.eos:
            return self._finish(row, "stop")
        if seq.constraint is not None:
            seq.constraint.advance(tok)
        if seq.logprobs is not None and logits is not None:
            seq._emit("logprob", token_logprobs(logits, [tok], seq.logprobs)[0])
        piece = row.text.push(tok)
        if piece:
            seq.text += piece
            seq._emit("text", piece)
        if row.text.stopped or (seq.constraint is not None and seq.constraint.is_done):
            return self._finish(row, "stop")
        if len(seq.token_ids) >= seq.max_new_tokens:
            return self._finish(row, "length")
        row.pending = tok
        if row.seen is not None:
            row.seen[0, tok] = True
        return True

    def _finish(self, row: _Row, reason: str) -> bool:
        tail = row.text.finish()
        if tail:
            row.seq.text += tail
            row.seq._emit("text", tail)
        row.seq._emit("done", reason)
        return False

    def _retire(self, slots: list[int], reason: str | None) -> None:
        """Free slots (highest first): the last running row moves into each freed slot."""
        for i in sorted(slots, reverse=True):
            if reason is not None:
                self.rows[i].seq._emit("done", reason)
            last = len(self.rows) - 1
            if i != last:
                for c in self.caches:
                    c.k[i, :, :self.cur] = c.k[last, :, :self.cur]
                    c.v[i, :, :self.cur] = c.v[last, :, :self.cur]
                self.key_mask[i] = self.key_mask[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.cur = 0

    def _compact(self) -> None:
        """Pack each row's columns to end at new_cur = the longest row's length, dropping the holes."""
        n, cur = len(self.rows), self.cur
        mask = self.key_mask[:n, :cur]  # (n, cur)
        lens = mask.sum(dim=1)  # (n,)
        assert lens.tolist() == [r.length for r in self.rows], "key mask and row lengths disagree"
        new_cur = int(lens.max())
        cols = torch.arange(cur, device=self.device)
        owned = torch.sort(torch.where(mask, cols, cur + cols), dim=1).values  # (n, cur): own columns first
        dest = torch.arange(new_cur, device=self.device)[None]  # (1, new_cur)
        j = (dest - new_cur + lens[:, None]).clamp(min=0)  # (n, new_cur): which own column lands there
        src = owned.gather(1, j).clamp(max=cur - 1)  # (n, new_cur); holes read column 0..cur-1 (masked anyway)
        for c in self.caches:
            nkv, hs = c.k.shape[1], c.k.shape[3]
            index = src[:, None, :, None].expand(n, nkv, new_cur, hs)
            c.k[:n, :, :new_cur] = c.k[:n, :, :cur].gather(2, index)
            c.v[:n, :, :new_cur] = c.v[:n, :, :cur].gather(2, index)
        self.key_mask[:n] = False
        self.key_mask[:n, :new_cur] = dest >= new_cur - lens[:, None]
        self.cur = new_cur
        self.compactions += 1
