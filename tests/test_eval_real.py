"""One small evaluation with the real embedded model on DialogSum dev (read from ../shared/data)."""

import json
from pathlib import Path

import pytest

from lmforge.evaluation.harness import EvalConfig, run_eval
from lmforge.evaluation.likelihood import perplexity

DIALOGSUM_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"


@pytest.mark.real
def test_one_shot_dialogsum_and_perplexity_with_the_real_model(real_lm, tmp_path):
    if not DIALOGSUM_DEV.is_file():
        pytest.skip(f"{DIALOGSUM_DEV} is not here")
    s = EvalConfig(data=DIALOGSUM_DEV, out=tmp_path, reference_field="summary",
                   prompt_template="Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
                   metrics=["rouge1", "chrf"], limit=2, shots=1, batch_size=2, max_new_tokens=12)
    summary = run_eval(real_lm, s, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["shots"] for r in rows] == [1, 1] and summary["counts"]["shots_dropped"] == 0
    # The shot is the first record after the evaluated ones (dev_2), with its reference as the answer.
    first_after = json.loads(DIALOGSUM_DEV.read_text().splitlines()[2])
    assert first_after["summary"] in rows[0]["prompt"] and rows[0]["prompt"].count("Summary:") == 2
    assert all(r["prediction"] for r in rows) and 0 < summary["metrics"]["chrf"] <= 100
    # English prose is far more predictable to a trained model than to a uniform guess (vocab 49k).
    ids = real_lm.tokenizer.encode("The weather was lovely, so we walked to the park and had a picnic by the lake.")
    assert 1 < perplexity(real_lm.model, [ids]).value < 100
