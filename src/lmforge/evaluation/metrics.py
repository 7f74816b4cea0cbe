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
- toxicity: a ``ToxicityScorer`` maps texts to probabilities of being toxic; the rate is the
  share above a threshold (0.5). The default scorer is alt-profanity-check's ``predict_prob``;
  another one plugs in with ``register_toxicity_scorer``, ``reward:PATH`` (a classifier reward
  model from ``lmforge reward train``: its P(toxic)) or a ``module:function`` path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from lmforge.errors import LmforgeError

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
REFERENCE_METRICS = (*ROUGE_METRICS, "bleu", "chrf", "exact_match")
KNOWN_METRICS = (*REFERENCE_METRICS, "toxicity")
DEFAULT_METRICS = REFERENCE_METRICS
TOXICITY_THRESHOLD = 0.5

ToxicityScorer = Callable[[Sequence[str]], Sequence[float]]


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


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references: "
                           "each prediction needs exactly one reference")
    if not predictions:
        raise LmforgeError("nothing to score: no predictions")
    for kind, texts in (("prediction", predictions), ("reference", references)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise LmforgeError(f"{kind} {i} must be a string, got {type(t).__name__}")


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ROUGE_METRICS) -> tuple[dict[str, float], list[dict[str, float]]]:
    """ROUGE F-measures with stemming: (mean over examples per type, per-example values)."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    per = [{t: s.fmeasure for t, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]
    return {t: sum(p[t] for p in per) / len(per) for t in types}, per


def bleu(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """sacrebleu corpus BLEU (0..100) and per-example sentence BLEU."""
    import sacrebleu

    _check_pairs(predictions, references)
    corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    return corpus, [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]


def chrf(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """sacrebleu corpus chrF (0..100) and per-example sentence chrF."""
    import sacrebleu

    _check_pairs(predictions, references)
    corpus = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score
    return corpus, [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """Share of predictions equal to their reference after ``str.strip()``, and the 0/1 per example."""
    _check_pairs(predictions, references)
    per = [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]
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


def score_generations(predictions: Sequence[str], references: Sequence[str] | None, metrics: Sequence[str],
                      toxicity_scorer: str | ToxicityScorer | None = None
                      ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Score generations with ``metrics``: (corpus values by name, one dict of values per example).

    ``references`` may be None only when every metric is reference-free (toxicity).
    """
    metrics = check_metrics(metrics)
    if not predictions:
        raise LmforgeError("nothing to score: no predictions")
    needs_refs = [m for m in metrics if m in REFERENCE_METRICS]
    if needs_refs and references is None:
        raise LmforgeError(f"metrics {', '.join(needs_refs)} need references (set --reference-field)")
    if references is not None:
        _check_pairs(predictions, references)
    corpus: dict[str, float] = {}
    per: list[dict[str, float]] = [{} for _ in predictions]
    rouge_types = [m for m in metrics if m in ROUGE_METRICS]
    if rouge_types:
        means, rows = rouge(predictions, references, rouge_types)
        corpus.update(means)
        for d, r in zip(per, rows):
            d.update(r)
    for name, fn in (("bleu", bleu), ("chrf", chrf), ("exact_match", exact_match)):
        if name in metrics:
            corpus[name], values = fn(predictions, references)
            for d, v in zip(per, values):
                d[name] = v
    if "toxicity" in metrics:
        values, probs = toxicity(predictions, toxicity_scorer)
        corpus.update(values)
        for d, p in zip(per, probs):
            d["toxicity"] = p
    return corpus, per
