"""Evaluation: score a model on a dataset (``lmforge eval``) and compare settings side by side
(``lmforge compare``).

Modules, each owning one thing:

- ``data``        reading evaluation records (JSONL, JSON list, CSV, .txt/.md, optionally .gz; parquet), field mapping,
                  prompt templates and picking few-shot examples.
- ``metrics``     reference-based scores (ROUGE via ``rouge-score``, BLEU/chrF via ``sacrebleu``,
                  exact match) and the toxicity-scorer hook.
- ``likelihood``  model log-likelihoods: perplexity with a sliding window, multiple-choice scores.
- ``harness``     one evaluation run: prompts -> batched model calls -> predictions.jsonl + summary.json.
- ``compare``     several settings (shots, sampling, models, adapters) in one run, from a YAML recipe.
- ``report``      Markdown / HTML reports and PNG charts of a comparison.
- ``commands``    the ``eval`` and ``compare`` subcommands.
"""
