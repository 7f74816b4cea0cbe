"""Training a classifier reward model: an encoder (all-MiniLM-L6-v2 by default) with a fresh
sequence-classification head, fine-tuned end to end with (optionally class-weighted) cross-entropy
on labelled texts, evaluated on a held-out split, saved as a reward-model directory.

    >>> metrics = train_classifier(data="labeled_data.csv", out_dir="out/reward/toxicity-minilm",
    ...                            text_field="tweet", label_field="class", binary=True,
    ...                            label_map={"0": "hate", "1": "offensive", "2": "neither"},
    ...                            good_labels=["neither"])
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from lmforge.alignment.reward import (
    ClassifierReward,
    classifier_metrics,
    encode_head,
    fit,
    pad_right,
    save_reward_model,
)
from lmforge.checkpoints.resolve import DEFAULT_ENCODER
from lmforge.data.reward_data import LabelledTexts, load_labelled, stratified_split, to_binary
from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output

WEIGHTINGS = ("none", "balanced")


def class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """'balanced' weights n / (k * n_c), as sklearn's ``compute_class_weight``; absent classes get 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=n_classes).float()  # (K,)
    return torch.where(counts > 0, len(labels) / (n_classes * counts.clamp(min=1)), torch.zeros(()))


def build_classifier(model: str | os.PathLike, labels: list[str]):
    """(SequenceClassifier with the encoder's pretrained weights and a fresh N(0, 0.02) head, tokenizer)."""
    from lmforge.lm import read_checkpoint
    from lmforge.models.heads import SequenceClassifier

    ckpt = read_checkpoint(model)
    if ckpt.config.arch != "encoder":
        raise LmforgeError(f"{model} is a {ckpt.config.arch} model; a classifier reward needs an encoder-only model "
                           f"such as {DEFAULT_ENCODER}")
    clf = SequenceClassifier(replace(ckpt.config, labels=list(labels)))
    state = {k.removeprefix("encoder."): v for k, v in ckpt.state_dict.items() if not k.startswith("classifier.")}
    clf.encoder.load_state_dict(state)
    torch.nn.init.normal_(clf.classifier.weight, std=0.02)
    torch.nn.init.zeros_(clf.classifier.bias)
    return clf, ckpt.tokenizer


def _subsample(labels: list[int], indices: list[int], limit: int | None, seed: int) -> list[int]:
    """At most ``limit`` of ``indices``, keeping the class proportions (a stratified sample)."""
    if limit is None or limit >= len(indices):
        return indices
    _, keep = stratified_split([labels[i] for i in indices], limit / len(indices), seed)
    return [indices[k] for k in keep]


@claims_output("reward train", inputs=("model",))
def train_classifier(*, data: str | os.PathLike, out_dir: str | os.PathLike, model: str = DEFAULT_ENCODER,
                     text_field: str = "text", label_field: str = "label", label_map: dict[str, str] | None = None,
                     good_labels: list[str] | None = None, binary: bool = False, eval_file: str | None = None,
                     eval_fraction: float = 0.1, max_train: int | None = None, max_eval: int | None = None,
                     max_len: int = 64, epochs: int = 1, batch_size: int = 32, lr: float = 1e-4,
                     weight_decay: float = 0.01, warmup: float = 0.1, weighting: str = "none",
                     precision: str = "bf16", seed: int = 0, save_every: int = 0, resume: bool = False,
                     overwrite: bool = False, force: bool = False) -> dict:
    """Fine-tune ``model`` + a classification head on ``data``; save the reward model to ``out_dir``.

    Held-out examples are ``eval_file`` or a seeded stratified ``eval_fraction`` of ``data``;
    ``max_train``/``max_eval`` cap them (stratified samples). ``good_labels`` name the classes
    whose probability is the reward (required); ``binary`` merges the classes into
    toxic/non_toxic first. ``weighting="balanced"`` weighs the loss by inverse class frequency.
    Training runs through the training loop (``reward.fit``): ``out_dir/metrics.jsonl`` logs every step;
    every ``save_every`` steps (0: none kept) ``out_dir/checkpoint`` is written and ``resume`` continues from
    it, step for step as the uninterrupted run. Returns the held-out metrics (also kept in
    ``out_dir/reward_config.json``, with the run's settings).
    """
    if weighting not in WEIGHTINGS:
        raise LmforgeError(f"weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if not good_labels:
        raise LmforgeError("name the good classes (the reward is their probability), e.g. --good-labels neither")
    t0 = time.perf_counter()
    train = load_labelled(data, text_field, label_field, label_map)
    if eval_file is not None:
        held = load_labelled(eval_file, text_field, label_field, label_map, names=train.names)
        train_idx, eval_idx = list(range(len(train.texts))), None
    else:
        held = train
        train_idx, eval_idx = stratified_split(train.labels, eval_fraction, seed)
    named_good = list(good_labels)
    if binary:
        train, held = to_binary(train, good_labels), to_binary(held, good_labels)
        good_labels = [train.names[1]]
    missing = [g for g in good_labels if g not in train.names]
    if missing:
        raise LmforgeError(f"good label(s) {', '.join(map(repr, missing))} are not among the classes "
                           f"{', '.join(train.names)} (--good-labels)")
    if len(set(train.labels[i] for i in train_idx)) < 2:
        raise LmforgeError(f"{data}: the training examples hold a single class; a classifier needs two or more")
    eval_idx = list(range(len(held.texts))) if eval_idx is None else eval_idx
    train_idx = _subsample(train.labels, train_idx, max_train, seed)
    eval_idx = _subsample(held.labels, eval_idx, max_eval, seed + 1)

    torch.manual_seed(seed)
    random.seed(seed)
    clf, tok = build_classifier(model, train.names)
    if clf.config.positions == "learned" and max_len > clf.config.max_seq_len:
        raise LmforgeError(f"--max-len {max_len} is longer than the encoder's {clf.config.max_seq_len} positions "
                           f"({model}); use --max-len {clf.config.max_seq_len} or less")
    good = [train.names.index(g) for g in good_labels]
    rows = encode_head(tok, [train.texts[i] for i in train_idx], max_len)
    labels = [train.labels[i] for i in train_idx]
    weight = class_weights(labels, len(train.names)) if weighting == "balanced" else None
    pad = tok.pad_id or 0

    def loss_of(batch: list[int]) -> torch.Tensor:
        idx, mask = pad_right([rows[i] for i in batch], pad)  # (B, T)
        logits = clf(idx, mask).float()  # (B, K)
        return F.cross_entropy(logits, torch.tensor([labels[i] for i in batch]), weight=weight)

    run = dict(data=str(data), eval_file=eval_file, model=str(model), text_field=text_field,
               label_field=label_field, label_map=label_map, good_labels=named_good, binary=binary,
               eval_fraction=eval_fraction, max_train=max_train, max_eval=max_eval, max_len=max_len, epochs=epochs,
               batch_size=batch_size, lr=lr, weighting=weighting, seed=seed)
    losses, run_dir = fit(clf, loss_of, len(rows), out_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, warmup=warmup, precision=precision, seed=seed,
                          save_every=save_every, resume=resume, run_config={"recipe": "reward classifier", **run})
    reward = ClassifierReward(clf.eval(), tok, good, precision=precision)  # scores whole texts, as later
    metrics = evaluate_classifier(reward, held, eval_idx)
    metrics.update(train_examples=len(rows), train_loss_first=losses[0], train_loss_last=sum(losses[-20:]) /
                   len(losses[-20:]), classes=train.names, good_labels=list(good_labels),
                   seconds=round(time.perf_counter() - t0, 1))
    save_reward_model(reward, out_dir, extra={"train": run, "metrics": metrics})
    if not save_every:  # the reward model is saved; no checkpoint was asked for
        run_dir.discard_checkpoint()
    return metrics


def evaluate_classifier(reward: ClassifierReward, data: LabelledTexts, indices: list[int] | None = None) -> dict:
    """Held-out metrics (``classifier_metrics``) of ``reward`` on ``data`` (or its ``indices``)."""
    indices = list(range(len(data.texts))) if indices is None else indices
    if data.names != list(reward.config.labels):
        raise LmforgeError(f"the data's classes {data.names} differ from the model's {reward.config.labels}")
    probs = reward.probs([data.texts[i] for i in indices])  # (N, K)
    return classifier_metrics([data.labels[i] for i in indices], probs, reward.good)

