"""Reward models: what they are on disk, how they score texts, their held-out metrics, and how both
kinds train (``fit``: a step function through the one training loop, resumable).

Two kinds, one interface (``score(texts) -> list[float]``, higher = better):

- ``ClassifierReward``: an encoder with a sequence-classification head (BERT layout) trained on
  labelled texts; the reward is the probability of the "good" classes, e.g. P(not toxic), and
  ``toxicity(texts)`` is 1 - reward (a scorer for ``lmforge eval --metrics toxicity``).
- ``PairwiseReward``: a decoder with a scalar head (``models/heads.py`` ``RewardModel``) trained on
  chosen/rejected pairs with the Bradley-Terry loss (``training/reward_pairwise.py``); the reward
  is the head's value at the last token of the text's last ``max_len`` tokens (left-truncated,
  because two responses to one dialogue differ at its end).

On disk a reward model is a Hugging Face directory (config.json, model.safetensors,
tokenizer.json) plus ``reward_config.json`` ({"kind", "max_len", ...}); the training run leaves
``metrics.jsonl`` (and ``loss.png``, and ``checkpoint/`` with ``--save-every``) beside them. A classifier is a
``BertForSequenceClassification`` directory (``lmforge.load(path)`` reads it as a plain classifier too). A
pairwise model is saved the way TRL and vLLM reward tooling expect it: the family's
``...ForSequenceClassification`` (``LlamaForSequenceClassification``, ``Qwen2...``, ``GPT2...``) with
``num_labels=1``, ``pad_token_id`` set and the head as ``score.weight`` (1, hidden) beside the decoder body, no
language-model head; ``transformers.AutoModelForSequenceClassification.from_pretrained(path)`` scores a text at its
last token that is not ``pad_token_id``, the same number as ``PairwiseReward.score`` for a text of at most
``max_len`` tokens (lmforge keeps a longer text's last ``max_len``) that does not itself end in the pad token.
Folders of the earlier layout (a full causal LM + ``head/score.safetensors``) still load. ``load_reward_model(path)``
reads either kind as a reward model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmforge.data.tokens import pad_right
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.training.loop import precision_autocast as autocast
from lmforge.training.run import RunDir

REWARD_CONFIG = "reward_config.json"
HEAD = "head/score.safetensors"  # the earlier layout's scalar head: still read, no longer written


def encode_head(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Encoder input: each text's first ``max_len`` tokens, keeping the closing special token ([SEP])."""
    return [r if len(r) <= max_len else r[: max_len - 1] + r[-1:] for r in tokenizer.encode_batch(list(texts))]


def encode_tail(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Decoder input: each text's last ``max_len`` tokens (the end, where responses differ)."""
    return [r[-max_len:] or [tokenizer.eos_id or 0] for r in tokenizer.encode_batch(list(texts))]


def by_length(rows: list[list[int]], batch_size: int):
    """Batches of row indices, similar lengths together (less padding); each index once."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


class ClassifierReward:
    """A sequence classifier as a reward: score = P(one of ``good`` classes). Texts are cut to
    ``max_len`` tokens (default: the encoder's positions)."""

    kind = "classifier"

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, good: Sequence[int], max_len: int | None = None,
                 precision: str = "fp32"):
        self.model, self.tokenizer, self.good = model.eval(), tokenizer, list(good)
        self.max_len = max_len or model.config.max_seq_len
        self.precision = precision

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def probs(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (N, num_labels), float32."""
        rows = encode_head(self.tokenizer, texts, self.max_len)
        out = torch.empty(len(rows), len(self.config.labels))
        device = next(self.model.parameters()).device
        for batch in by_length(rows, batch_size):
            idx, mask = pad_right([rows[i] for i in batch], self.tokenizer.pad_id or 0)
            with autocast(self.precision, device.type):
                out[batch] = self.model(idx.to(device), mask.to(device)).float().softmax(-1).cpu()
        return out

    def score(self, texts: Sequence[str]) -> list[float]:
        """P(good) per text, in [0, 1]: for a toxicity classifier, P(not toxic)."""
        return self.probs(texts)[:, self.good].sum(-1).clamp(0.0, 1.0).tolist() if texts else []

    def toxicity(self, texts: Sequence[str]) -> list[float]:
        """1 - score: the probability of the bad classes (a ``--toxicity-scorer``)."""
        return [1.0 - s for s in self.score(texts)]


class PairwiseReward:
    """A decoder + scalar head as a reward: score = the head's value at the last token."""

    kind = "pairwise"

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_len: int, precision: str = "fp32"):
        self.model, self.tokenizer, self.max_len, self.precision = model.eval(), tokenizer, max_len, precision

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def score(self, texts: Sequence[str], batch_size: int = 16) -> list[float]:
        """Scalar rewards, one per text (full "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues for HH models)."""
        rows = encode_tail(self.tokenizer, texts, self.max_len)
        out = torch.empty(len(rows))
        device = next(self.model.parameters()).device
        pad = pad_id_of(self.tokenizer)
        for batch in by_length(rows, batch_size):
            idx, mask = pad_right([rows[i] for i in batch], pad)
            with autocast(self.precision, device.type):
                out[batch] = self.model(idx.to(device), mask.to(device)).float().cpu()
        return out.tolist()


def check_tokenizer_match(reward, tokenizer: Tokenizer, what: str = "the policy tokenizer") -> None:
    """Raise unless ``tokenizer`` gives the same token ids as ``reward.tokenizer`` and fits the
    model's vocabulary (``reward.config.vocab_size``): token ids passed between a policy and a
    reward model (or a model and a separately named tokenizer) must mean the same tokens."""
    if tokenizer.vocab_size > reward.config.vocab_size:
        raise LmforgeError(f"{what} has {tokenizer.vocab_size} tokens, more than the reward model's vocabulary "
                           f"({reward.config.vocab_size}): its ids do not fit the model")
    mine, theirs = reward.tokenizer.backend.get_vocab(), tokenizer.backend.get_vocab()
    differ = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    if differ:
        t = differ[0]
        raise LmforgeError(f"{what} does not match the reward model's tokenizer: {len(differ)} token(s) differ, "
                           f"e.g. {t!r} is id {theirs.get(t)} there and {mine.get(t)} in the reward model")


SEQUENCE_CLASSIFICATION = "ForSequenceClassification"


def sequence_classification_class(config) -> str:
    """The ``transformers`` class name of a decoder family's sequence classifier: the family's causal-LM class
    (``LlamaForCausalLM``, ``GPT2LMHeadModel``...) with ``ForSequenceClassification`` in place of its LM part."""
    from lmforge.checkpoints.hf_config import config_to_hf

    arch = (config_to_hf(config).get("architectures") or [""])[0]
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if arch.endswith(suffix):
            return arch.removesuffix(suffix) + SEQUENCE_CLASSIFICATION
    raise LmforgeError(f"the {config.family} family has no transformers sequence-classification class lmforge knows "
                       f"(its causal LM is {arch!r})")


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id a pairwise reward model pads with (``PairwiseReward.score``), and the ``pad_token_id`` its config.json
    records: the tokenizer's pad token, else its end-of-text token, else 0."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)


def _save_pairwise(reward: PairwiseReward, path: Path) -> None:
    """``path/model.safetensors`` + ``config.json`` of a ``...ForSequenceClassification`` with one label: the decoder
    body under the family's transformers names (with the task class's prefix, e.g. GPT-2's ``transformer.``) and
    ``score.weight`` (1, C); the decoder's LM head is not part of it."""
    from safetensors.torch import save_file

    from lmforge.checkpoints.hf_config import config_to_hf
    from lmforge.checkpoints.names import to_hf
    from lmforge.io import atomic_path, write_json_atomic
    from lmforge.models import families

    decoder = reward.model.decoder
    config = decoder.config
    prefix = families.get(config.family).hf_prefix
    state = {k: v.detach().contiguous() for k, v in decoder.named_parameters() if not k.startswith("lm_head.")}
    state |= {k: v.detach().contiguous() for k, v in decoder.named_buffers() if k in decoder.state_dict()}
    hf_state = {(k if k.startswith(prefix) else prefix + k): v for k, v in to_hf(config, state).items()}
    hf_state["score.weight"] = reward.model.score.weight.detach().contiguous()  # (1, C)
    hf_cfg = config_to_hf(config)
    hf_cfg.update(architectures=[sequence_classification_class(config)], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, pad_token_id=pad_id_of(reward.tokenizer),
                  torch_dtype=str(reward.model.score.weight.dtype).removeprefix("torch."))
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(hf_state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(path / "config.json", hf_cfg)
    reward.tokenizer.save(path)
    (path / HEAD).unlink(missing_ok=True)  # the earlier layout's head, which would no longer match
    if (path / HEAD).parent.is_dir() and not any((path / HEAD).parent.iterdir()):
        (path / HEAD).parent.rmdir()


def save_reward_model(reward: ClassifierReward | PairwiseReward, path: str | os.PathLike,
                      extra: dict | None = None) -> Path:
    """Write the reward model into the folder ``path`` (the layout in the module docstring): each file atomically
    (``lmforge.io``: a temporary name, then a rename), ``reward_config.json`` removed first and written last, so that
    a half-written folder is never read as a reward model. Files under other names are left alone: nothing of the
    user's is moved or deleted. ``lmforge reward train`` checks the folder against the output policy
    (``lmforge.outputs``) first."""
    from lmforge.checkpoints.hf import save_hf_dir
    from lmforge.io import write_json_atomic

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmforgeError(f"{path} is a file, not a folder: a reward model is a folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / REWARD_CONFIG).unlink(missing_ok=True)
    meta = {"kind": reward.kind, "max_len": reward.max_len, "precision": reward.precision, **(extra or {})}
    if reward.kind == "classifier":
        save_hf_dir(reward.model, path, tokenizer=reward.tokenizer)
        meta["good_labels"] = [reward.config.labels[i] for i in reward.good]
    else:
        _save_pairwise(reward, path)
    write_json_atomic(path / REWARD_CONFIG, meta)
    return path


def _read_pairwise(path: Path, device: str) -> tuple[torch.nn.Module, Tokenizer]:
    """The ``RewardModel`` and tokenizer of a pairwise reward model folder, in either layout."""
    from safetensors.torch import load_file

    from lmforge.checkpoints.hf import read_safetensors
    from lmforge.checkpoints.hf_config import config_from_hf
    from lmforge.checkpoints.names import to_lmforge
    from lmforge.checkpoints.resolve import build_model
    from lmforge.io import read_json_object
    from lmforge.lm import load
    from lmforge.models.heads import RewardModel

    hf_cfg = read_json_object(path / "config.json") if (path / "config.json").is_file() else {}
    if not str((hf_cfg.get("architectures") or [""])[0]).endswith(SEQUENCE_CLASSIFICATION):
        loaded = load(path, device=device)  # the earlier layout: a causal LM + head/score.safetensors
        model = RewardModel(loaded.model)
        try:
            model.score.weight.data.copy_(load_file(str(path / HEAD))["score.weight"])
        except (OSError, KeyError, RuntimeError) as e:
            raise LmforgeError(f"{path / HEAD}: cannot read the reward head ({e})") from None
        return model.to(device), loaded.tokenizer
    config = config_from_hf(hf_cfg, path.name)
    if config.arch != "decoder":
        raise LmforgeError(f"{path / 'config.json'}: a pairwise reward model is a decoder, this is {config.arch}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmforgeError(f"{path}: no model.safetensors")
    tensors = read_safetensors([weights])
    score = tensors.pop("score.weight", None)
    if score is None or tuple(score.shape) != (1, config.n_embd):
        got = "none" if score is None else f"shape {tuple(score.shape)}"
        raise LmforgeError(f"{weights}: the reward head score.weight must have shape (1, {config.n_embd}), got {got}")
    state = to_lmforge(config, tensors)
    if not config.tie_embeddings:  # a reward model has no LM head: an unused zero one fills DecoderLM's slot
        state.setdefault("lm_head.weight", torch.zeros(config.vocab_size, config.n_embd))
    model = RewardModel(build_model(config, state, source=str(path)))
    model.score.weight.data.copy_(score.float())
    if not (path / "tokenizer.json").is_file():
        raise LmforgeError(f"{path}: no tokenizer.json beside the reward model's weights")
    return model.to(device).eval(), Tokenizer.from_dir(path)


def load_reward_model(path: str | os.PathLike, device: str = "cpu") -> ClassifierReward | PairwiseReward:
    """A reward model saved by ``lmforge reward train``: ``.score(texts) -> list[float]`` (higher = better)."""
    from lmforge.io import read_json_object
    from lmforge.lm import load

    path = Path(path)
    if not (path / REWARD_CONFIG).is_file():
        raise LmforgeError(f"{path}: no {REWARD_CONFIG}, so not a reward model (train one with `lmforge reward train`)")
    meta = read_json_object(path / REWARD_CONFIG)
    kind, precision = meta.get("kind"), meta.get("precision", "fp32")
    if kind == "classifier":
        loaded = load(path, device=device)
        labels = loaded.config.labels or []
        good = meta.get("good_labels") or []
        missing = [g for g in good if g not in labels]
        if not labels or not good or missing:
            raise LmforgeError(f"{path / REWARD_CONFIG}: good_labels {good} must name classes of the model ({labels})")
        return ClassifierReward(loaded.model, loaded.tokenizer, [labels.index(g) for g in good], meta.get("max_len"),
                                precision)
    if kind == "pairwise":
        model, tokenizer = _read_pairwise(path, device)
        return PairwiseReward(model, tokenizer, int(meta["max_len"]), precision)
    raise LmforgeError(f"{path / REWARD_CONFIG}: unknown kind {kind!r}; expected 'classifier' or 'pairwise'")


def toxicity_scorer(path: str | os.PathLike) -> Callable[[Sequence[str]], list[float]]:
    """``--toxicity-scorer reward:PATH``: the classifier reward model at PATH, as P(toxic)."""
    reward = load_reward_model(path)
    if reward.kind != "classifier":
        raise LmforgeError(f"{path} is a pairwise reward model; a toxicity scorer needs a classifier")
    return reward.toxicity


def fit(model: torch.nn.Module, loss_of: Callable[[list[int]], torch.Tensor], n: int, out_dir: str | os.PathLike, *,
        epochs: int, batch_size: int, lr: float, weight_decay: float, warmup: float, precision: str, seed: int,
        save_every: int = 0, resume: bool = False, run_config: dict | None = None,
        loggers: tuple[str, ...] = ()) -> tuple[list[float], RunDir]:
    """Minimise ``loss_of(indices)`` over ``epochs`` seeded shuffled passes of ``n`` items (the last batch of a
    pass may be short) with the training loop (``training/loop.py``): AdamW on ``model``'s trainable parameters
    (no decay on biases and norms), linear warmup over the first ``warmup`` fraction of the steps then cosine
    decay, gradient clipping, a NaN/inf check of every loss and gradient norm. ``out_dir`` keeps
    ``metrics.jsonl`` and, every ``save_every`` steps and at the end, ``checkpoint/``; ``resume`` continues from
    it exactly; ``loggers``: the experiment trackers the metrics also go to (``training/tracking.py``). Returns
    (every step's loss, the run folder). NaN or infinite hyper-parameters are refused up
    front, named by their flag; trained parameters that are not finite are refused, so nothing non-finite is
    ever saved."""
    from lmforge.training.checkpoint import check_finite
    from lmforge.training.loop import TrainConfig, check_finite_number, train
    from lmforge.training.sources import ShuffledIndices

    for name, value in (("--lr", lr), ("--weight-decay", weight_decay), ("--warmup", warmup)):
        check_finite_number(value, name)
    if not lr > 0:
        raise LmforgeError(f"--lr must be > 0, got {lr}")
    steps = epochs * -(-n // batch_size)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=int(warmup * steps), weight_decay=weight_decay,
                      betas=(0.9, 0.999), precision=precision, save_every=save_every, log_every=1, seed=seed,
                      strategy="ddp")  # the recipe checks and saves the model itself, whole on every rank
    run = RunDir(out_dir, run_config, resume=resume, loggers=loggers)
    train(model, lambda m, rows: loss_of(rows), ShuffledIndices(n, batch_size, seed, whole_passes=True), cfg, run,
          save_final=False, desc="reward train", hint="lower --lr or use fp32")
    check_finite(model.named_parameters(), "the trained reward model")
    return [r["loss"] for r in run.log.rows if "loss" in r], run


def classifier_metrics(labels: Sequence[int], probs: torch.Tensor, good: Sequence[int]) -> dict:
    """Held-out metrics of a classifier: accuracy and balanced accuracy of the argmax class over
    all classes, and for good-vs-bad (P(good) = the summed probabilities of ``good``) the ROC AUC,
    the expected calibration error (10 bins) and its reliability table. probs (N, K)."""
    from lmforge.evaluation.classification import (
        accuracy,
        balanced_accuracy,
        expected_calibration_error,
        reliability_table,
        roc_auc,
    )

    labels = list(labels)
    pred = probs.argmax(-1).tolist()
    p_good = probs[:, list(good)].sum(-1).clamp(0.0, 1.0).tolist()
    y_good = [int(y in set(good)) for y in labels]
    out = {"n": len(labels), "accuracy": accuracy(labels, pred), "balanced_accuracy": balanced_accuracy(labels, pred)}
    if 0 < sum(y_good) < len(y_good):
        out["auc"] = roc_auc(y_good, p_good)
    out["ece"] = expected_calibration_error(y_good, p_good, 10)
    out["reliability"] = reliability_table(y_good, p_good, 10)
    return out


def pairwise_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> dict:
    """Held-out metrics of a pairwise reward model: accuracy (r_chosen > r_rejected), mean margin,
    ROC AUC of all chosen vs all rejected rewards, and the calibration of the Bradley-Terry
    probability sigmoid(r_c - r_r) (each pair counted both ways, so the labels are balanced)."""
    import math

    from lmforge.evaluation.classification import expected_calibration_error, reliability_table, roc_auc

    margins = [c - r for c, r in zip(r_chosen, r_rejected)]
    p = [1 / (1 + math.exp(-max(min(m, 50.0), -50.0))) for m in margins]
    y2, p2 = [1] * len(p) + [0] * len(p), p + [1 - q for q in p]
    return {"n": len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins),
            "auc": roc_auc([1] * len(margins) + [0] * len(margins), list(r_chosen) + list(r_rejected)),
            "ece": expected_calibration_error(y2, p2, 10), "reliability": reliability_table(y2, p2, 10)}
