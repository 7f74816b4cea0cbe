"""A generation request as the serving engine sees it, and the log-probabilities it reports.

Owns ``Sequence`` (one generation: prompt ids, sampling settings, stop strings, optional logprobs and structured
output constraint, and a callback that receives text pieces and the end), ``EngineBusy`` (the full waiting
queue), and the logprob helpers: ``token_logprobs`` (the sampled tokens' log-probabilities and top-k
alternatives, from the raw logits) and ``prompt_logprobs`` (an echoed prompt scored in one forward pass).
``deploy.batching.Engine`` runs the sequences; this module knows nothing about batching or HTTP.

Logprobs (``Sequence(logprobs=k)``): each sampled token's log-probability and the k likeliest alternatives, from
the raw logits (before temperature and the other sampling settings), sent as "logprob" events. Structured output
(``Sequence(constraint=...)``, a ``generation.constrained.ConstraintState`` of its own): the mask is applied to the
row's logits before sampling (greedy or sampled), each token advances it, and the row ends with "stop" once the
output is complete and nothing else may follow.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from lmforge.generation.constrained import ConstraintState
from lmforge.generation.sampling import SamplingParams, check_seed

log = logging.getLogger("lmforge.serve")

# on_event(seq, kind, value): kind "text" (value: the new text), "logprob" (value: a ``TokenLogprob``, sent
# before the text of that token, only when the sequence asked for logprobs), "done" (value: finish reason
# "stop" | "length" | "cancelled") or "error" (value: a message). Called on the engine thread.
EventCallback = Callable[["Sequence", str, Any], None]

# (token id, its log-probability, [(id, log-probability) of the k likeliest tokens]): the model's own
# distribution, log_softmax of the raw logits, before temperature, top-k/top-p and repetition penalty.
# A prompt's first token, which nothing predicts, has (id, None, None).
TokenLogprob = tuple[int, float | None, list[tuple[int, float]] | None]


def token_logprobs(logits: torch.Tensor, tokens: Seq[int], k: int) -> list[TokenLogprob]:
    """logits (T, V) and the token chosen at each of the T positions -> one ``TokenLogprob`` each."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    if k:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [(int(t), c, top) for t, c, top in zip(tokens, chosen, tops)]


@torch.inference_mode()
def prompt_logprobs(model: torch.nn.Module, ids: Seq[int], k: int) -> list[TokenLogprob]:
    """Teacher-forced logprobs of a prompt's tokens (one forward pass, no cache): ``(id, None, None)`` for the
    first token, which nothing predicts, then each token's logprob given the ones before it (``echo`` with
    ``logprobs``). Safe beside the engine thread: a plain forward pass changes no state of the model."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = model(idx)[0, :-1]  # (T - 1, V): position t predicts token t + 1
    return [(int(ids[0]), None, None), *(token_logprobs(logits, ids[1:], k) if len(ids) > 1 else [])]


class EngineBusy(RuntimeError):
    """The waiting queue is full: the caller should answer 503 and let the client retry."""


class Sequence:
    """One generation request as the engine sees it."""

    def __init__(self, prompt_ids: Seq[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), *,
                 stop: Seq[str] = (), seed: int | None = None, on_event: EventCallback | None = None,
                 index: int = 0, logprobs: int | None = None, constraint: ConstraintState | None = None):
        check_seed(seed)
        self.constraint = constraint  # structured output: this sequence's own state, or None
        self.logprobs = logprobs  # None: no logprobs; k: each sampled token's logprob and the top k
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens, self.params, self.stop, self.seed = max_new_tokens, params, list(stop), seed
        self.on_event, self.index = on_event, index
        self.token_ids: list[int] = []  # every sampled token, EOS included (the usage count)
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()

    def _emit(self, kind: str, value: Any) -> None:
        if kind == "done":
            self.finish_reason = value
        if self.on_event is not None:
            try:
                self.on_event(self, kind, value)
            except Exception:  # a closed event loop or a gone client must not stop the engine
                log.exception("event callback failed")
        if kind in ("done", "error"):
            self.done.set()
