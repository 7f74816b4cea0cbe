"""The toxicity reward model on real weights and real data: all-MiniLM-L6-v2 fine-tuned briefly on the
hate-speech tweets (../shared/data), then scored on held-out tweets and used as the toxicity scorer."""

import json
from pathlib import Path

import pytest

from lmforge.alignment.reward import load_reward_model
from lmforge.cli import main
from lmforge.evaluation.metrics import toxicity

TWEETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hate_speech_offensive" / "labeled_data.csv"


@pytest.mark.real
def test_a_short_minilm_toxicity_classifier_beats_the_majority_class(tmp_path, capsys):
    out = tmp_path / "tox"
    code = main(["reward", "train", str(TWEETS), "--binary", "--max-train", "800", "--max-eval", "400",
                 "--max-len", "48", "--weighting", "balanced", "--lr", "2e-4", "--threads", "1", "-o", str(out), "--metrics-out", str(tmp_path / "m.json")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    # ~83% of the tweets are toxic: a constant guess has balanced accuracy 0.5 and AUC 0.5
    assert metrics["auc"] > 0.9 and metrics["balanced_accuracy"] > 0.75, metrics
    reward = load_reward_model(out)
    scored, _ = toxicity(["I hope you have a lovely day, thank you so much!", "shut up you stupid b*tch"],
                         reward.toxicity)
    assert scored["toxicity_rate"] == 0.5
