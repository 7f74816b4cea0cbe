"""Training a classifier reward model: an encoder (all-MiniLM-L6-v2 by default) with a fresh
sequence-classification head, fine-tuned end to end with (optionally class-weighted) cross-entropy
on labelled texts, evaluated on a held-out split, saved as a reward-model directory.

    >>> metrics = train_classifier(RewardConfig(data="labeled_data.csv", out_dir="out/reward/toxicity-minilm",
    ...                                         text_field="tweet", label_field="class", binary=True,
    ...                                         label_map="0=hate,1=offensive,2=neither", good_labels=["neither"]))
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
from lmforge.alignment.reward_recipe import RewardConfig
from lmforge.checkpoints.resolve import DEFAULT_ENCODER
from lmforge.data.reward_data import LabelledTexts, load_labelled, stratified_split, to_binary
from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import write_config


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


@claims_output("reward train", inputs=("model",), config="cfg")
def train_classifier(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False,
                     force: bool = False) -> dict:
    """Fine-tune ``cfg.base_model`` + a classification head on ``cfg.data``; save the reward model to ``cfg.out_dir``
    (``cfg.kind`` must be ``"classifier"``).

    Held-out examples are ``eval_file`` or a seeded stratified ``eval_fraction`` of ``data``;
    ``max_train``/``max_eval`` cap them (stratified samples). ``label_map`` names the classes (VALUE=NAME
    pairs); ``good_labels`` name the classes whose probability is the reward; ``binary`` merges the classes
    into toxic/non_toxic first. ``weighting="balanced"`` weighs the loss by inverse class frequency.
    Training runs through the training loop (``reward.fit``): ``out_dir/metrics.jsonl`` logs every step;
    every ``save_every`` steps (0: none kept) ``out_dir/checkpoint`` is written. The resolved recipe is written
    to ``out_dir/config.yaml`` once the data have loaded. ``resume`` continues from the checkpoint, step for
    step as the uninterrupted run; ``overwrite``/``force`` as in ``lmforge.outputs``. Returns the held-out
    metrics (also kept in ``out_dir/reward_config.json``, with the run's settings).
    """
    cfg.require("classifier", "train_classifier")
    seed, max_len, label_map = cfg.seed, cfg.length, cfg.labels
    t0 = time.perf_counter()
    train = load_labelled(cfg.data, cfg.text_field, cfg.label_field, label_map)
    if cfg.eval_file is not None:
        held = load_labelled(cfg.eval_file, cfg.text_field, cfg.label_field, label_map, names=train.names)
        train_idx, eval_idx = list(range(len(train.texts))), None
    else:
        held = train
        train_idx, eval_idx = stratified_split(train.labels, cfg.eval_fraction, seed)
    good_labels = list(cfg.good_labels)
    if cfg.binary:
        train, held = to_binary(train, good_labels), to_binary(held, good_labels)
        good_labels = [train.names[1]]
    missing = [g for g in good_labels if g not in train.names]
    if missing:
        raise LmforgeError(f"good label(s) {', '.join(map(repr, missing))} are not among the classes "
                           f"{', '.join(train.names)} (--good-labels)")
    if len(set(train.labels[i] for i in train_idx)) < 2:
        raise LmforgeError(f"{cfg.data}: the training examples hold a single class; a classifier needs two or more")
    eval_idx = list(range(len(held.texts))) if eval_idx is None else eval_idx
    train_idx = _subsample(train.labels, train_idx, cfg.max_train, seed)
    eval_idx = _subsample(held.labels, eval_idx, cfg.max_eval, seed + 1)

    torch.manual_seed(seed)
    random.seed(seed)
    model = cfg.base_model
    clf, tok = build_classifier(model, train.names)
    if clf.config.positions == "learned" and max_len > clf.config.max_seq_len:
        raise LmforgeError(f"--max-len {max_len} is longer than the encoder's {clf.config.max_seq_len} positions "
                           f"({model}); use --max-len {clf.config.max_seq_len} or less")
    write_config(cfg, cfg.out_dir)  # once the inputs have loaded: what reruns this run
    good = [train.names.index(g) for g in good_labels]
    rows = encode_head(tok, [train.texts[i] for i in train_idx], max_len)
    labels = [train.labels[i] for i in train_idx]
    weight = class_weights(labels, len(train.names)) if cfg.weighting == "balanced" else None
    pad = tok.pad_id or 0

    def loss_of(batch: list[int]) -> torch.Tensor:
        idx, mask = pad_right([rows[i] for i in batch], pad)  # (B, T)
        logits = clf(idx, mask).float()  # (B, K)
        return F.cross_entropy(logits, torch.tensor([labels[i] for i in batch]), weight=weight)

    lr = cfg.learning_rate
    run = dict(data=str(cfg.data), eval_file=None if cfg.eval_file is None else str(cfg.eval_file), model=str(model),
               text_field=cfg.text_field, label_field=cfg.label_field, label_map=label_map,
               good_labels=list(cfg.good_labels), binary=cfg.binary, eval_fraction=cfg.eval_fraction,
               max_train=cfg.max_train, max_eval=cfg.max_eval, max_len=max_len, epochs=cfg.epochs,
               batch_size=cfg.batch_size, lr=lr, weighting=cfg.weighting, seed=seed)
    losses, run_dir = fit(clf, loss_of, len(rows), cfg.out_dir, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr,
                          weight_decay=cfg.weight_decay, warmup=cfg.warmup, precision=cfg.precision, seed=seed,
                          save_every=cfg.save_every, resume=resume, run_config={"recipe": "reward classifier", **run},
                          loggers=cfg.logger)
    reward = ClassifierReward(clf.eval(), tok, good, precision=cfg.precision)  # scores whole texts, as later
    metrics = evaluate_classifier(reward, held, eval_idx)
    metrics.update(train_examples=len(rows), train_loss_first=losses[0], train_loss_last=sum(losses[-20:]) /
                   len(losses[-20:]), classes=train.names, good_labels=list(good_labels),
                   seconds=round(time.perf_counter() - t0, 1))
    save_reward_model(reward, cfg.out_dir, extra={"train": run, "metrics": metrics})
    if not cfg.save_every:  # the reward model is saved; no checkpoint was asked for
        run_dir.discard_checkpoint()
    return metrics


def evaluate_classifier(reward: ClassifierReward, data: LabelledTexts, indices: list[int] | None = None) -> dict:
    """Held-out metrics (``classifier_metrics``) of ``reward`` on ``data`` (or its ``indices``)."""
    indices = list(range(len(data.texts))) if indices is None else indices
    if data.names != list(reward.config.labels):
        raise LmforgeError(f"the data's classes {data.names} differ from the model's {reward.config.labels}")
    probs = reward.probs([data.texts[i] for i in indices])  # (N, K)
    return classifier_metrics([data.labels[i] for i in indices], probs, reward.good)

