"""GRPO's verifiable tasks (``grpo.py`` trains on them): prompts with their answers (``load_tasks``), and the
rewards that check completions, summed with weights: the registered rewards (exact match of a final answer, a format
regex, a length penalty), a reward-model folder (e.g. lmforge's toxicity classifier) and ``module:function``.
The answer extractors and normaliser (GSM8K's ``#### N``, or the last number) live in ``evaluation/answers.py``,
shared with the ``answer_match`` metric of ``lmforge eval``/``compare``.
A reward that raises, or returns anything but finite numbers, stops the run with one line naming it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.evaluation.answers import (  # noqa: F401 (re-exported: GRPO's API)
    EXTRACTORS,
    extract_answer,
    normalise_answer,
    reference_answer,
)

if TYPE_CHECKING:
    from torch import Tensor

REWARDS = ("exact_match", "format", "length_penalty")

ScoreFn = Callable[[list[str], list[str], list[str | None]], Any]


@dataclass
class Reward:
    """One term of the reward: ``weight * fn(prompts, completions, answers)``."""

    name: str
    weight: float
    fn: ScoreFn
    needs_answers: bool = False
    model: Any = None  # a reward-model folder's model (its vocabulary is checked against the policy's)


def registered_reward(name: str, *, extractor: str, format_pattern: str, length_target: int) -> Reward:
    """``exact_match``, ``format`` or ``length_penalty`` (see the module docstring)."""
    if name == "exact_match":
        return Reward(name, 1.0, lambda p, c, a: [float(extract_answer(x, extractor) == y) for x, y in zip(c, a)],
                      needs_answers=True)
    if name == "format":
        pattern = re.compile(format_pattern)
        return Reward(name, 1.0, lambda p, c, a: [float(pattern.search(x) is not None) for x in c])
    if name == "length_penalty":
        return Reward(name, 1.0, lambda p, c, a: [-max(0, len(x) - length_target) / length_target for x in c])
    raise LmforgeError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}, a reward-model folder, or "
                       "package.module:function")


def load_rewards(names: Sequence[str], weights: Sequence[float] | None, *, extractor: str = "hashes",
                 format_pattern: str = r"####\s*-?[\d,]*\.?\d+", length_target: int = 200,
                 reward_input: str = "completion") -> list[Reward]:
    """The reward terms of ``names`` (registered names, reward-model folders or ``module:function``)."""
    from lmforge.alignment.rl_inputs import load_reward, reward_scores

    if weights is not None and len(weights) != len(names):
        raise LmforgeError(f"reward_weights (--reward-weights): {len(weights)} weights for {len(names)} rewards "
                           f"({', '.join(names)}); give one weight per reward")
    out = []
    for i, name in enumerate(names):
        weight = 1.0 if weights is None else float(weights[i])
        if name in REWARDS:
            term = registered_reward(name, extractor=extractor, format_pattern=format_pattern,
                                     length_target=length_target)
        elif not Path(name).exists() and ":" in name:
            module, _, attr = name.partition(":")
            try:
                import importlib

                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise LmforgeError(f"reward function {name!r} cannot be imported: {e}") from None
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                params = {}
            takes = "answers" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

            def call(p, c, a, fn=fn, takes=takes, spec=name):
                return reward_scores(fn(p, c, answers=a) if takes else fn(p, c), spec)

            term = Reward(name, 1.0, call)
        elif Path(name).exists():
            fn, model = load_reward(name, reward_input)
            term = Reward(name, 1.0, lambda p, c, a, fn=fn: fn(p, c), model=model)
        else:
            registered_reward(name, extractor=extractor, format_pattern=format_pattern, length_target=length_target)
        term.weight = weight
        out.append(term)
    if not out:
        raise LmforgeError("rewards (--rewards): no reward given")
    return out


def score(rewards: Sequence[Reward], prompts: list[str], completions: list[str], answers: list[str | None],
          step: int | str, terms: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """(the weighted sum of the rewards, (n,), float32; the mean of each term by name); ``terms``, when given, is
    filled with each term's own (unweighted) scores by name. A reward function that raises, returns the wrong
    number of scores or a NaN/infinite one: ``LmforgeError`` naming it and ``step``."""
    import torch

    total = torch.zeros(len(completions), dtype=torch.float32)
    means = {}
    for term in rewards:
        try:
            raw = term.fn(prompts, completions, answers)
        except LmforgeError:
            raise
        except Exception as e:  # a user's function: any failure is one line naming it
            raise LmforgeError(f"reward function {term.name} raised {type(e).__name__}: {e} (at GRPO step {step}); "
                               "stopping without saving") from None
        s = torch.as_tensor(raw, dtype=torch.float32).detach().cpu()
        if s.shape != (len(completions),):
            raise LmforgeError(f"reward function {term.name} returned shape {tuple(s.shape)} for {len(completions)} "
                               "completions; it must return one number per completion")
        bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
        if bad:
            raise LmforgeError(f"reward function {term.name} returned {float(s[bad[0]])} at GRPO step {step} (for "
                               f"{len(bad)} of {len(s)} completions, e.g. {completions[bad[0]]!r}); stopping without "
                               "saving: a reward must be a finite number")
        total += term.weight * s
        means[term.name] = float(s.mean())
        if terms is not None:
            terms[term.name] = s
    return total, means


# ----------------------------------------------------------------------------- prompts with answers
def load_tasks(path: str | Path, *, prompt_field: str = "prompt", template: str | None = None,
               answer_field: str | None = "answer", need_answers: bool = False, limit: int | None = None
               ) -> tuple[list[str], list[str | None]]:
    """(prompts, reference answers) from a .txt file (one prompt per line, no answers) or records: the prompt is
    ``template.format(**record)`` or the record's ``prompt_field``; the answer its ``answer_field``. With
    ``need_answers`` every prompt needs an answer (a one-line error names the first without)."""
    from lmforge.alignment.rl_inputs import load_prompts
    from lmforge.data.records import load_records

    path = Path(path)
    if path.suffix == ".txt" or path.name.endswith(".txt.gz"):
        if need_answers:
            raise LmforgeError(f"{path}: a text file holds prompts without answers, and the exact_match reward needs "
                               "one per prompt: give records (.jsonl) with an answer field (--answer-field)")
        prompts = load_prompts(path, prompt_field, limit)
        return prompts, [None] * len(prompts)
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} does not exist")
    prompts, answers = [], []
    for record in load_records(path)[:limit]:
        fields = record.fields
        if template is not None:
            try:
                prompt = template.format_map(fields)
            except KeyError as e:
                raise LmforgeError(f"{record.where}: the prompt template names the field {e.args[0]!r}, which the "
                                   f"record lacks (fields: {', '.join(map(str, fields))})") from None
            except (ValueError, IndexError, AttributeError) as e:
                raise LmforgeError(f"prompt_template (--prompt-template): not a valid template ({e}); name record "
                                   "fields as {field} and write a literal brace as {{ or }}") from None
        else:
            prompt = fields.get(prompt_field)
            if not isinstance(prompt, str) or not prompt.strip():
                raise LmforgeError(f"{record.where}: no non-empty string field {prompt_field!r} (set --prompt-field "
                                   "or --prompt-template)")
        raw = fields.get(answer_field) if answer_field else None
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if need_answers:
                raise LmforgeError(f"{record.where}: no answer (field {answer_field!r}): the exact_match reward needs "
                                   "a reference answer for every prompt (set --answer-field)")
            answers.append(None)
        else:
            answers.append(reference_answer(raw))
        prompts.append(prompt)
    if not prompts:
        raise LmforgeError(f"{path}: no prompts (the file is empty)")
    return prompts, answers
