"""lmforge as an lm-evaluation-harness model: ``LmforgeLM``, registered in lm-eval's model registry as ``lmforge``.

lm-eval (``pip install lm_eval``) asks a model three things; each is answered with lmforge's own scoring:

- ``loglikelihood``: log p(continuation | context) and whether greedy decoding would produce it. The context is
  encoded as ``lmforge eval`` encodes a plain prompt (``LM.encode(text, chat=False)``: with the tokenizer's BOS),
  the continuation on its own without special tokens, and the whitespace at the end of a context is moved to the
  start of its continuation (lm-eval's convention, and ``lmforge eval``'s: a choice follows the prompt after one
  space). So a multiple-choice task scores every choice with exactly the token ids ``lmforge eval --task
  multiple_choice`` scores (``likelihood.choice_logprobs``), and lm-eval's ``acc`` equals its ``accuracy``.
  (lm-eval's ``acc_norm`` divides by the choice's length in bytes, ``lmforge eval``'s ``accuracy_norm`` by its
  tokens: those two differ.) A context longer than the model's window loses tokens from its start.
- ``loglikelihood_rolling``: the log-likelihood of a whole text after the BOS token (EOS when the tokenizer has
  none), through ``likelihood.perplexity``: windows of the model's context every half context, each token
  predicted once with at least half a context before it (lm-eval's own models use disjoint windows; the total
  is the same quantity).
- ``generate_until``: ``LM.generate`` on the plain prompt, greedy unless the task asks ``do_sample`` (then its
  ``temperature``), stopping at EOS, at any ``until`` string (cut off) or after ``max_gen_toks`` tokens.

lm-eval 0.4 finds models only in its registry (no entry points), so this module must be imported before lm-eval
looks the name up. From Python: ``import lmforge.evaluation.lm_eval_model`` then ``lm_eval.simple_evaluate(
model="lmforge", model_args="pretrained=PATH", ...)`` (or pass ``LmforgeLM(...)`` itself). From the shell,
``lmforge lm-eval`` (or ``python -m lmforge.evaluation.lm_eval_model``) is lm-eval's command line with the model
registered::

    lmforge lm-eval run --model lmforge --model_args pretrained=PATH --tasks my_task --include_path tasks/

Model arguments: ``pretrained`` (a model name or path, as ``lmforge.load`` takes; none: the embedded default),
``adapter``, ``device`` (cuda when there is one, else cpu; lm-eval's command line asks for ``cuda:0`` by
default, which falls back to the CPU with a note), ``dtype`` (auto), ``batch_size`` (rows per forward pass, 8).
Runs on one process. This module imports ``lm_eval`` and is imported by nothing else in lmforge.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it reads them only into an empty registry)
import torch
from lm_eval.api.model import LM as _HarnessLM
from lm_eval.api.registry import register_model

from lmforge.data.tokens import pad_rows
from lmforge.errors import LmforgeError

__all__ = ["LmforgeLM"]


def _batch_size(value: Any) -> int:
    """lm-eval's ``--batch_size`` (a number, or ``auto``: 8 here) as rows per forward pass."""
    if value is None or str(value).startswith("auto"):
        return 8
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LmforgeError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise LmforgeError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


@register_model("lmforge")
class LmforgeLM(_HarnessLM):
    """An ``lmforge.LM`` (decoder-only) behind lm-eval's ``LM`` interface; see the module docstring."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, device: str | None = None,
                 dtype: str = "auto", batch_size: int | str | None = 8, max_batch_size: int | None = None,
                 lm: Any = None, **unused: Any):
        super().__init__()
        from lmforge.lm import LM, load

        if unused:
            print(f"lmforge: model arguments {sorted(unused)} are not used", file=sys.stderr)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line asks for cuda:0 unless told --device
                print(f"lmforge: {device} is not available; running on the CPU", file=sys.stderr)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.lm = lm if lm is not None else load(pretrained or None, device=device, dtype=dtype, adapter=adapter)
        if not isinstance(self.lm, LM) or self.lm.config.arch != "decoder":
            raise LmforgeError(f"{pretrained}: lm-eval through lmforge needs a decoder-only language model")
        self.batch_size = _batch_size(batch_size)
        tok = self.lm.tokenizer
        self.prefix_id = tok.bos_id if tok.bos_id is not None else (self.lm.eos_ids or [0])[0]

    # ------------------------------------------------------------------ what lm-eval reads besides the requests
    @property
    def max_length(self) -> int:
        return self.lm.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    # ------------------------------------------------------------------ the three request types
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): trailing whitespace of the context moves to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.lm.encode(context, chat=False) if context else []
        cont = self.lm.tokenizer.encode(continuation, add_special_tokens=False)
        return (ctx or [self.prefix_id]), cont

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of the continuation's log-probs, every token greedy).
        Right-padded batches (causal attention: no row sees the padding after it)."""
        model = self.lm.model
        device = next(model.parameters()).device
        limit = self.max_length
        out: list[tuple[float, bool]] = []
        for b in range(0, len(pairs), self.batch_size):
            rows, spans = [], []
            for ctx, cont in pairs[b:b + self.batch_size]:
                if not cont:
                    raise LmforgeError("lm-eval asked for the log-likelihood of an empty continuation")
                if len(cont) >= limit:
                    raise LmforgeError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                       f"{limit} tokens")
                ids = (ctx + cont)[-limit:]  # a context too long loses its start
                rows.append(ids)
                spans.append((len(ids) - len(cont), len(ids)))
            logits = model(pad_rows(rows, 0).to(device)).float()  # (B, T, V)
            for i, (ids, (start, end)) in enumerate(zip(rows, spans)):
                logp = torch.log_softmax(logits[i, start - 1:end - 1], dim=-1)  # (n, V): position t-1 predicts t
                target = torch.tensor(ids[start:end], device=device)  # (n,)
                chosen = logp.gather(-1, target[:, None])[:, 0]
                out.append((float(chosen.sum()), bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self._score([self._split(*r.args) for r in requests])
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lmforge.evaluation.likelihood import perplexity

        out = []
        for r in requests:
            (text,) = r.args
            ids = [self.prefix_id, *self.lm.tokenizer.encode(text, add_special_tokens=False)]
            if len(ids) < 2:
                out.append(0.0)  # nothing to predict
                continue
            total = -perplexity(self.lm.model, [ids], batch_size=self.batch_size).nll
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
            text = self.lm.generate(context, chat=False, max_new_tokens=max_new, temperature=temperature,
                                    stop=until or None, seed=0 if sample else None)
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...``) with the ``lmforge`` model registered; ``argv``: its arguments
    (None: this process's own). ``lmforge lm-eval ARGS`` calls this."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = ["lmforge lm-eval", *argv]  # lm-eval reads its arguments from sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
