"""Reference-based text metrics and toxicity scoring, computed by the reference implementations.

Owns the names of the metrics ``lmforge eval`` knows, the checks on what is scored (equal
counts of predictions and references, known metric names) and the glue to the libraries that
define the metrics. Nothing here re-implements a metric:

- ROUGE-1/2/L/Lsum: ``rouge_score.rouge_scorer.RougeScorer(use_stemmer=True)``; the corpus value
  is the mean F-measure over examples (0..1, the library's scale). ``rougeLsum`` splits
  summaries into sentences on newlines, as ``rouge-score`` does.
- BLEU and chrF: ``sacrebleu.corpus_bleu`` / ``sacrebleu.corpus_chrf`` (0..100, sacrebleu's scale);
  per-example values come from ``sentence_bleu`` / ``sentence_chrf``.
- exact match: the prediction equals the reference after stripping surrounding whitespace (0/1).
- answer match: the final answer of a worked solution (GSM8K's ``#### N``, ``answers.extract_answer``) equals
  the reference's (the number after its ``####``, or the whole reference), numbers normalised (0/1); the same
  comparison as GRPO's ``exact_match`` reward. Not in the default metrics: name it.
- several references per example (``score_generations`` with a list of references per prediction): ROUGE
  and exact match are reported against the first reference (``rouge1``...) and against the best one
  (``rouge1_best``: per example the highest F-measure over the references, ``RougeScorer.score_multi``, then
  the mean; ``exact_match_best``: equal to any reference); BLEU and chrF are sacrebleu's multi-reference
  scores (one reference stream per position; an example with fewer references leaves ``None`` in the later
  streams, which sacrebleu skips); the other metrics use the first reference. With one reference per example
  nothing is added.
- toxicity: a ``ToxicityScorer`` maps texts to probabilities of being toxic; the rate is the
  share above a threshold (0.5). The default scorer is alt-profanity-check's ``predict_prob``;
  another one plugs in with ``register_toxicity_scorer``, ``reward:PATH`` (a classifier reward
  model from ``lmforge reward train``: its P(toxic)) or a ``module:function`` path.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

from lmforge.errors import LmforgeError

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
REFERENCE_METRICS = (*ROUGE_METRICS, "bleu", "chrf", "exact_match", "answer_match")
KNOWN_METRICS = (*REFERENCE_METRICS, "toxicity")
DEFAULT_METRICS = tuple(m for m in REFERENCE_METRICS if m != "answer_match")  # answer_match: for worked solutions
TOXICITY_THRESHOLD = 0.5

BEST_SUFFIX = "_best"  # rouge1_best...: the best of several references per example
MULTI_REFERENCE_METRICS = ("bleu", "chrf")  # scored against all references at once
ToxicityScorer = Callable[[Sequence[str]], Sequence[float]]
References = Sequence[str] | Sequence[Sequence[str]]  # one reference per prediction, or a list of them
MULTI_REFERENCE_NOTE = ("rouge1/rouge2/rougeL/rougeLsum and exact_match: against each example's first reference; "
                        "*_best: against the best of its references (per example the highest F-measure, or any "
                        "exact match), then averaged; bleu and chrf: sacrebleu multi-reference, all references")


def check_metrics(names: Sequence[str]) -> list[str]:
    """Validate metric names; an unknown one raises ``LmforgeError`` listing the known ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    if not names:
        raise LmforgeError(f"no metrics given; known metrics: {', '.join(KNOWN_METRICS)}")
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise LmforgeError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                           f"known metrics: {', '.join(KNOWN_METRICS)}")
    return names


def _check_pairs(predictions: Sequence[str], references: References) -> list[list[str]]:
    """The references as one list per prediction (a lone string: a list of one), checked."""
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references: "
                           "each prediction needs exactly one reference (or one list of references)")
    if not predictions:
        raise LmforgeError("nothing to score: no predictions")
    for i, t in enumerate(predictions):
        if not isinstance(t, str):
            raise LmforgeError(f"prediction {i} must be a string, got {type(t).__name__}")
    lists = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else list(r) if isinstance(r, (list, tuple)) else []
        if not refs or not all(isinstance(x, str) for x in refs):
            raise LmforgeError(f"reference {i} must be a string or a non-empty list of strings, got "
                               f"{type(r).__name__}")
        lists.append(refs)
    return lists


def is_multi_reference(references: References | None) -> bool:
    """Whether some example has more than one reference."""
    return references is not None and any(not isinstance(r, str) and len(r) > 1 for r in references)


def rouge(predictions: Sequence[str], references: References,
          types: Sequence[str] = ROUGE_METRICS) -> tuple[dict[str, float], list[dict[str, float]]]:
    """ROUGE F-measures with stemming against each example's (first) reference: (mean over examples per type,
    per-example values)."""
    from rouge_score import rouge_scorer

    refs = _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    per = [{t: s.fmeasure for t, s in scorer.score(r[0], pred).items()} for pred, r in zip(predictions, refs)]
    return {t: sum(p[t] for p in per) / len(per) for t in types}, per


def rouge_best(predictions: Sequence[str], references: References,
               types: Sequence[str] = ROUGE_METRICS) -> tuple[dict[str, float], list[dict[str, float]]]:
    """ROUGE F-measures with stemming against the best of each example's references (per type the highest
    F-measure, ``RougeScorer.score_multi``), keyed ``<type>_best``: (mean over examples, per-example values)."""
    from rouge_score import rouge_scorer

    refs = _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    per = [{t + BEST_SUFFIX: s.fmeasure for t, s in scorer.score_multi(r, pred).items()}
           for pred, r in zip(predictions, refs)]
    return {t + BEST_SUFFIX: sum(p[t + BEST_SUFFIX] for p in per) / len(per) for t in types}, per


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's reference streams: stream j holds each example's j-th reference (None when it has fewer)."""
    return [[r[j] if j < len(r) else None for r in refs] for j in range(max(map(len, refs)))]


def bleu(predictions: Sequence[str], references: References) -> tuple[float, list[float]]:
    """sacrebleu corpus BLEU (0..100) and per-example sentence BLEU, against all of each example's references."""
    import sacrebleu

    refs = _check_pairs(predictions, references)
    corpus = sacrebleu.corpus_bleu(list(predictions), _streams(refs)).score
    return corpus, [sacrebleu.sentence_bleu(p, r).score for p, r in zip(predictions, refs)]


def chrf(predictions: Sequence[str], references: References) -> tuple[float, list[float]]:
    """sacrebleu corpus chrF (0..100) and per-example sentence chrF, against all of each example's references."""
    import sacrebleu

    refs = _check_pairs(predictions, references)
    corpus = sacrebleu.corpus_chrf(list(predictions), _streams(refs)).score
    return corpus, [sacrebleu.sentence_chrf(p, r).score for p, r in zip(predictions, refs)]


def exact_match(predictions: Sequence[str], references: References, *,
                best: bool = False) -> tuple[float, list[float]]:
    """Share of predictions equal to their (first; with ``best``: any) reference after ``str.strip()``, and the
    0/1 per example."""
    refs = _check_pairs(predictions, references)
    per = [float(any(p.strip() == x.strip() for x in (r if best else r[:1]))) for p, r in zip(predictions, refs)]
    return sum(per) / len(per), per


def answer_match(predictions: Sequence[str], references: References) -> tuple[float, list[float]]:
    """Share of predictions whose final answer (the number after the last ``####``) equals the (first) reference's
    answer (``answers.reference_answer``), and the 0/1 per example; a prediction without ``####`` scores 0."""
    from lmforge.evaluation.answers import extract_answer, reference_answer

    refs = _check_pairs(predictions, references)
    per = [float(extract_answer(p, "hashes") == reference_answer(r[0])) for p, r in zip(predictions, refs)]
    return sum(per) / len(per), per


# ----------------------------------------------------------------------------- toxicity
def profanity_check_scorer(texts: Sequence[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive (a small linear SVM)."""
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise LmforgeError("the toxicity metric needs alt-profanity-check: pip install 'lmforge[toxicity]'") from e
    return [float(p) for p in predict_prob(list(texts))] if texts else []


_SCORERS: dict[str, ToxicityScorer] = {"profanity-check": profanity_check_scorer}


# Scorers built from an argument (``SCHEME:ARG``) by a factory in a higher layer, named as "module:function" and
# imported only when used: evaluation sits below alignment, whose reward models score toxicity.
SCORER_SCHEMES = {"reward": "lmforge.alignment.reward:toxicity_scorer"}


def register_toxicity_scorer(name: str, scorer: ToxicityScorer) -> None:
    """Make ``scorer`` (texts -> probabilities in [0, 1]) available as ``--toxicity-scorer NAME``."""
    if not callable(scorer):
        raise LmforgeError(f"toxicity scorer {name!r} must be callable, got {type(scorer).__name__}")
    _SCORERS[name] = scorer


def resolve_toxicity_scorer(spec: str | ToxicityScorer | None = None) -> ToxicityScorer:
    """A scorer from a registered name, a ``package.module:function`` path, or a callable (None: default)."""
    if spec is None:
        return profanity_check_scorer
    if callable(spec):
        return spec
    if spec in _SCORERS:
        return _SCORERS[spec]
    scheme, _, arg = str(spec).partition(":")
    if scheme in SCORER_SCHEMES:  # e.g. reward:PATH, a classifier trained by `lmforge reward train`
        module, _, factory = SCORER_SCHEMES[scheme].partition(":")
        return getattr(importlib.import_module(module), factory)(arg)
    module, sep, attr = str(spec).partition(":")
    if not sep:
        raise LmforgeError(f"unknown toxicity scorer {spec!r}; use one of {', '.join(_SCORERS)}, "
                           "'reward:PATH' (a classifier reward model) or a 'package.module:function' path")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise LmforgeError(f"toxicity scorer {spec!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise LmforgeError(f"toxicity scorer {spec!r} is not callable")
    return fn


def toxicity(texts: Sequence[str], scorer: str | ToxicityScorer | None = None,
             threshold: float = TOXICITY_THRESHOLD) -> tuple[dict[str, float], list[float]]:
    """{"toxicity_rate": share with probability > threshold, "toxicity_mean": mean probability},
    and the per-text probabilities."""
    if not texts:
        raise LmforgeError("nothing to score for toxicity: no texts")
    probs = [float(p) for p in resolve_toxicity_scorer(scorer)(list(texts))]
    if len(probs) != len(texts):
        raise LmforgeError(f"the toxicity scorer returned {len(probs)} scores for {len(texts)} texts")
    bad = [p for p in probs if not 0.0 <= p <= 1.0]
    if bad:
        raise LmforgeError(f"the toxicity scorer must return probabilities in [0, 1], got {bad[0]}")
    rate = sum(p > threshold for p in probs) / len(probs)
    return {"toxicity_rate": rate, "toxicity_mean": sum(probs) / len(probs)}, probs


def score_generations(predictions: Sequence[str], references: References | None, metrics: Sequence[str],
                      toxicity_scorer: str | ToxicityScorer | None = None
                      ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score generations with ``metrics``: (corpus values by name, one dict of values per example).

    ``references``: one string per prediction, or one list of strings each (several references: ``rouge1``...
    is then against the first, ``rouge1_best``... the best of all, BLEU/chrF multi-reference; see the module
    docstring). It may be None only when every metric is reference-free (toxicity).
    """
    metrics = check_metrics(metrics)
    if not predictions:
        raise LmforgeError("nothing to score: no predictions")
    needs_refs = [m for m in metrics if m in REFERENCE_METRICS]
    if needs_refs and references is None:
        raise LmforgeError(f"metrics {', '.join(needs_refs)} need references (set --reference-field)")
    lists = _check_pairs(predictions, references) if references is not None else None
    first = [r[0] for r in lists] if lists is not None else None
    multi = is_multi_reference(references)
    corpus: dict[str, float] = {}
    per: list[dict[str, float]] = [{} for _ in predictions]
    rouge_types = [m for m in metrics if m in ROUGE_METRICS]
    for rouge_fn in ((rouge, rouge_best) if multi else (rouge,)) if rouge_types else ():
        means, rows = rouge_fn(predictions, lists, rouge_types)
        corpus.update(means)
        for d, r in zip(per, rows):
            d.update(r)
    scorers: list[tuple[str, Callable]] = [
        ("bleu", bleu), ("chrf", chrf), ("exact_match", exact_match), ("answer_match", answer_match)]
    if multi:
        scorers.append(("exact_match" + BEST_SUFFIX, functools.partial(exact_match, best=True)))
    for name, fn in scorers:
        if name.removesuffix(BEST_SUFFIX) in metrics:
            multi_fn = name in MULTI_REFERENCE_METRICS or name.endswith(BEST_SUFFIX)
            corpus[name], values = fn(predictions, lists if multi_fn else first)
            for d, v in zip(per, values):
                d[name] = v
    if "toxicity" in metrics:
        values, probs = toxicity(predictions, toxicity_scorer)
        corpus.update(values)
        for d, p in zip(per, probs):
            d["toxicity"] = p
    return corpus, per
