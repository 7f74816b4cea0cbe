"""The recipe config of ``lmforge reward train``: ``RewardConfig``, one dataclass for both kinds of reward model.

``kind="classifier"`` is read by ``reward_classifier.train_classifier`` (an encoder + classification head on
labelled texts), ``kind="pairwise"`` by ``reward_pairwise.train_pairwise`` (a decoder + scalar head on
chosen/rejected pairs); the fields that only one kind reads say so. The flags of ``lmforge reward train`` are
derived from it (``cli/reward.py``); ``--print-config`` prints it as YAML and every run writes it to
``OUT_DIR/config.yaml``. The module imports no torch, so building the command line stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lmforge.checkpoints.resolve import DEFAULT_ENCODER, DEFAULT_MODEL
from lmforge.data.reward_data import parse_label_map
from lmforge.errors import LmforgeError
from lmforge.recipe_config import TRAINING_SEED_MAX, option, validate
from lmforge.training.tracking import Tracking

HATE_SPEECH_LABELS = "0=hate,1=offensive,2=neither"  # the class column of Davidson et al.'s labeled_data.csv
_CLS, _PAIR, _TRAIN = "classifier", "pairwise", "training"


@dataclass
class RewardConfig(Tracking):
    """Everything ``lmforge reward train`` needs: the data, the kind of reward model and its base, the schedule,
    the output. Defaults < ``--config FILE.yaml`` < flags."""

    recipe: ClassVar[str] = "reward train"

    data: Path | None = None
    """Training data: labelled texts (classifier) or chosen/rejected pairs (pairwise); .csv, .jsonl or .json,
    optionally .gz, or .parquet (required)."""
    kind: Literal["classifier", "pairwise"] = "classifier"
    """classifier: encoder + classification head; pairwise: decoder + scalar head."""
    model: str | None = option(None, flags=("-m", "--model"))
    """The base model (none: all-minilm-l6-v2 for a classifier, smollm2-135m-instruct for pairwise)."""
    eval_file: Path | None = None
    """Held-out data (none: a seeded split of DATA)."""
    eval_fraction: float = option(0.1, positive=True, max=1.0)
    """Share of DATA held out when there is no --eval-file; stratified by class for a classifier."""
    max_train: int | None = option(None, min=1)
    """Train on at most this many examples/pairs, a seeded (stratified) sample (none: all)."""
    max_eval: int | None = option(None, min=1)
    """Score at most this many held-out examples/pairs (none: all)."""
    max_len: int | None = option(None, min=1)
    """Tokens per text: the first N for a classifier (none: 64), the last N for pairwise (none: 128; the end is
    where chosen and rejected differ)."""
    text_field: str = option("tweet", group=_CLS)
    """The text column/field."""
    label_field: str = option("class", group=_CLS)
    """The label column/field."""
    label_map: str = option(HATE_SPEECH_LABELS, group=_CLS)
    """VALUE=NAME pairs naming the classes; a label outside them is an error; '' uses the raw values."""
    good_labels: tuple[str, ...] = option(("neither",), sep=",", group=_CLS)
    """Comma-separated classes whose probability is the reward."""
    binary: bool = option(False, group=_CLS)
    """Merge the classes into two, non_toxic (--good-labels) and toxic (the rest)."""
    weighting: Literal["none", "balanced"] = option("none", group=_CLS)
    """'balanced' weighs the loss by inverse class frequency."""
    adapter: Path | None = option(None, group=_PAIR)
    """A PEFT LoRA adapter for MODEL, merged into it before the head is trained."""
    tokenizer: Path | None = option(None, group=_PAIR)
    """A tokenizer folder to use instead of the model's own; it must match the model's vocabulary."""
    chosen_field: str = option("chosen", group=_PAIR)
    """The preferred text's field."""
    rejected_field: str = option("rejected", group=_PAIR)
    """The dispreferred text's field."""
    train_layers: int = option(0, min=0, group=_PAIR)
    """Train only the top K decoder blocks (+ final norm and head) on hidden states cached once from the frozen
    lower blocks; 0 = a linear probe."""
    epochs: int = option(1, min=1, group=_TRAIN)
    """Passes over the data."""
    batch_size: int = option(32, min=1, group=_TRAIN)
    """Examples (pairwise: pairs) per step."""
    lr: float | None = option(None, positive=True, group=_TRAIN)
    """Peak learning rate (none: 1e-4; pairwise probe with --train-layers 0: 1e-3)."""
    weight_decay: float = option(0.01, min=0.0, group=_TRAIN)
    """AdamW weight decay."""
    warmup: float = option(0.1, min=0.0, max=1.0, group=_TRAIN)
    """Share of the steps spent warming the learning rate up."""
    precision: Literal["fp32", "bf16"] = option("bf16", group=_TRAIN)
    """bf16 autocast (faster on CPUs with AVX-512 BF16) or fp32."""
    seed: int = option(0, min=0, max=TRAINING_SEED_MAX, group=_TRAIN)
    """Seed for the split, the head's init and the order, in [0, 2**32)."""
    save_every: int = option(0, min=0, group=_TRAIN)
    """Write OUT_DIR/checkpoint every N steps and keep the last one; 0 = none kept."""
    out_dir: Path = option(Path("runs/reward"), flags=("-o", "--out-dir"))
    """The folder to save the reward model in (a Hugging Face directory + reward_config.json and config.yaml)."""

    def __post_init__(self) -> None:
        validate(self)
        if self.data is None:
            raise LmforgeError("data (DATA): no training data given")
        if self.kind == "classifier":
            if self.adapter is not None:
                raise LmforgeError("--adapter applies to --kind pairwise (a LoRA adapter merged into the decoder "
                                   "base)")
            if not self.good_labels:
                raise LmforgeError("name the good classes (the reward is their probability), e.g. --good-labels "
                                   "neither")
            parse_label_map(self.label_map or None)  # a malformed map is refused before anything loads

    @property
    def base_model(self) -> str:
        """``model``, or the kind's default base."""
        return self.model or (DEFAULT_ENCODER if self.kind == "classifier" else DEFAULT_MODEL)

    @property
    def length(self) -> int:
        """``max_len``, or the kind's default."""
        return self.max_len or (64 if self.kind == "classifier" else 128)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default: 1e-3 for a pairwise linear probe, else 1e-4."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.kind == "pairwise" and self.train_layers == 0 else 1e-4

    @property
    def labels(self) -> dict[str, str] | None:
        """``label_map`` parsed (None: the raw values)."""
        return parse_label_map(self.label_map or None)

    def require(self, kind: str, recipe: str) -> None:
        """Refuse a config of the other kind (``recipe`` names the function it was given to)."""
        if self.kind != kind:
            other = "train_pairwise" if kind == "classifier" else "train_classifier"
            raise LmforgeError(f"{recipe} trains a {kind} reward model but the config has kind={self.kind!r}; "
                               f"use {other}")
