"""The ``lmforge reward`` subcommands: ``train`` (a classifier or a pairwise reward model) and
``eval`` (held-out metrics of a saved one).

Handlers import torch only when they run; bad input raises ``LmforgeError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.checkpoints.resolve import DEFAULT_ENCODER, DEFAULT_MODEL
from lmforge.errors import LmforgeError

HATE_SPEECH_LABELS = "0=hate,1=offensive,2=neither"  # the class column of Davidson et al.'s labeled_data.csv


def _list(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _print(metrics: dict, output: str | None) -> None:
    print(json.dumps({k: v for k, v in metrics.items() if k != "reliability"}))
    if output:
        from lmforge.io import write_json_atomic

        write_json_atomic(Path(output), metrics)
        print(f"metrics written to {output}", file=sys.stderr)


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from lmforge.data.reward_data import parse_label_map

    if a.threads:
        torch.set_num_threads(a.threads)
    common = dict(data=a.data, out_dir=a.out_dir, eval_file=a.eval_file, eval_fraction=a.eval_fraction,
                  max_train=a.max_train, max_eval=a.max_eval, epochs=a.epochs, batch_size=a.batch_size,
                  weight_decay=a.weight_decay, warmup=a.warmup, precision=a.precision, seed=a.seed,
                  save_every=a.save_every, resume=a.resume, overwrite=a.overwrite, force=a.force)
    if a.kind == "classifier":
        from lmforge.alignment.reward_classifier import train_classifier

        if a.adapter:
            raise LmforgeError("--adapter applies to --kind pairwise (a LoRA adapter merged into the decoder base)")

        metrics = train_classifier(model=a.model or DEFAULT_ENCODER, text_field=a.text_field,
                                   label_field=a.label_field, label_map=parse_label_map(a.label_map or None),
                                   good_labels=_list(a.good_labels), binary=a.binary, max_len=a.max_len or 64,
                                   lr=a.lr or 1e-4, weighting=a.weighting, **common)
    else:
        from lmforge.alignment.reward_pairwise import train_pairwise

        metrics = train_pairwise(model=a.model or DEFAULT_MODEL, adapter=a.adapter, tokenizer=a.tokenizer,
                                 chosen_field=a.chosen_field, rejected_field=a.rejected_field,
                                 train_layers=a.train_layers,
                                 max_len=a.max_len or 128, lr=a.lr or (1e-3 if a.train_layers == 0 else 1e-4),
                                 **common)
    _print(metrics, a.metrics_out)
    print(f"reward model saved to {a.out_dir}", file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from lmforge.alignment.reward import load_reward_model, pairwise_metrics
    from lmforge.alignment.reward_classifier import evaluate_classifier
    from lmforge.data.reward_data import load_labelled, load_pairs, parse_label_map, to_binary

    if a.threads:
        torch.set_num_threads(a.threads)
    reward = load_reward_model(a.model, device=a.device)
    if reward.kind == "pairwise":
        pairs = load_pairs(a.data, a.chosen_field, a.rejected_field)[: a.max_eval]
        scores = reward.score([c for c, _ in pairs] + [r for _, r in pairs])
        metrics = pairwise_metrics(scores[: len(pairs)], scores[len(pairs):])
    else:
        from lmforge.io import read_json_object

        trained = read_json_object(Path(a.model) / "reward_config.json").get("train") or {}
        label_map = parse_label_map(a.label_map or None) if a.label_map is not None else trained.get("label_map")
        binary = trained.get("binary", False)
        text_field, label_field = a.text_field or trained.get("text_field"), a.label_field or trained.get("label_field")
        classes = None if binary else list(reward.config.labels)  # a label outside the model's classes is an error
        data = load_labelled(a.data, text_field or "text", label_field or "label", label_map, names=classes)
        if binary:
            data = to_binary(data, _list(a.good_labels) or trained.get("good_labels") or [])
        indices = list(range(len(data.texts)))[: a.max_eval]
        metrics = evaluate_classifier(reward, data, indices)
    _print(metrics, a.metrics_out)
    return 0


def _shared(p: argparse.ArgumentParser, int_arg) -> None:
    p.add_argument("--max-eval", type=int_arg("--max-eval"), default=None,
                   help="score at most this many examples: of the held-out split (train), the first ones (eval) "
                        "(default: all)")
    p.add_argument("--text-field", default=None,
                   help="classifier: the text column/field (train default: tweet; eval default: as trained)")
    p.add_argument("--label-field", default=None,
                   help="classifier: the label column/field (train default: class; eval default: as trained)")
    p.add_argument("--chosen-field", default="chosen", help="pairwise: the preferred text's field (default: chosen)")
    p.add_argument("--rejected-field", default="rejected",
                   help="pairwise: the dispreferred text's field (default: rejected)")
    p.add_argument("--threads", type=int_arg("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice; use 1 on a shared machine)")
    p.add_argument("--metrics-out", default=None, metavar="FILE",
                   help="also write the metrics (with the reliability table) to this JSON file")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``lmforge reward train`` and ``lmforge reward eval``."""
    from lmforge.cli.args import add_output_args, float_arg, int_arg

    r = sub.add_parser("reward", help="train and evaluate reward models (toxicity classifier, pairwise preferences)",
                       description="Reward models for alignment: a classifier whose reward is P(good class), e.g. "
                                   "P(not toxic), or a pairwise (Bradley-Terry) model trained on chosen/rejected "
                                   "pairs. Load one in Python with "
                                   "lmforge.alignment.reward.load_reward_model(PATH).score(texts).")
    rsub = r.add_subparsers(dest="reward_command", metavar="ACTION", required=True)

    t = rsub.add_parser("train", help="train a reward model and report held-out metrics",
                        description="Train a reward model on DATA (.csv, .jsonl or .json, optionally .gz) and save "
                                    "it to OUT_DIR (a Hugging Face directory + reward_config.json). Prints the "
                                    "held-out metrics as JSON: accuracy, balanced accuracy (classifier), ROC AUC, "
                                    "expected calibration error (10 bins); pairwise: accuracy and mean margin.")
    t.add_argument("data", help="training data: labelled texts (classifier) or chosen/rejected pairs (pairwise)")
    t.add_argument("-o", "--out-dir", required=True,
                   help="the folder to save the reward model in (each file written atomically)")
    add_output_args(t, "reward train")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT_DIR from its checkpoint, step for step as if uninterrupted")
    t.add_argument("--save-every", type=int_arg("--save-every", 0), default=0, metavar="N",
                   help="write OUT_DIR/checkpoint every N steps and keep the last one (default: 0, none kept)")
    t.add_argument("--kind", choices=("classifier", "pairwise"), default="classifier",
                   help="classifier: encoder + classification head; pairwise: decoder + scalar head "
                        "(default: %(default)s)")
    t.add_argument("-m", "--model", default=None,
                   help=f"the base model (default: {DEFAULT_ENCODER} for a classifier, {DEFAULT_MODEL} for pairwise)")
    t.add_argument("--adapter", default=None,
                   help="pairwise: a PEFT LoRA adapter for MODEL, merged into it before the head is trained")
    t.add_argument("--eval-file", default=None, help="held-out data (default: a seeded split of DATA)")
    t.add_argument("--eval-fraction", type=float_arg("--eval-fraction", 0.0, 1.0, low_open=True), default=0.1,
                   help="share of DATA held out when there is no --eval-file; stratified by class for a "
                        "classifier (default: %(default)s)")
    t.add_argument("--max-train", type=int_arg("--max-train"), default=None,
                   help="train on at most this many examples/pairs, a seeded (stratified) sample (default: all)")
    t.add_argument("--max-len", type=int_arg("--max-len"), default=None,
                   help="tokens per text: the first N for a classifier (default 64), the last N for pairwise "
                        "(default 128; the end is where chosen and rejected differ)")
    t.add_argument("--label-map", default=HATE_SPEECH_LABELS,
                   help="classifier: VALUE=NAME pairs naming the classes; a label outside them is an error; '' "
                        "uses the raw values (default: %(default)s)")
    t.add_argument("--good-labels", default="neither",
                   help="classifier: comma-separated classes whose probability is the reward (default: %(default)s)")
    t.add_argument("--binary", action="store_true",
                   help="classifier: merge the classes into two, non_toxic (--good-labels) and toxic (the rest)")
    t.add_argument("--weighting", choices=("none", "balanced"), default="none",
                   help="classifier: 'balanced' weighs the loss by inverse class frequency (default: %(default)s)")
    t.add_argument("--train-layers", type=int_arg("--train-layers", 0), default=0,
                   help="pairwise: train only the top K decoder blocks (+ final norm and head) on hidden states "
                        "cached once from the frozen lower blocks; 0 = a linear probe (default: %(default)s)")
    t.add_argument("--tokenizer", default=None,
                   help="pairwise: a tokenizer folder to use instead of the model's own; it must match the "
                        "model's vocabulary")
    t.add_argument("--epochs", type=int_arg("--epochs"), default=1, help="passes over the data (default: 1)")
    t.add_argument("--batch-size", type=int_arg("--batch-size"), default=32,
                   help="examples (pairwise: pairs) per step (default: %(default)s)")
    t.add_argument("--lr", type=float_arg("--lr", 0.0, low_open=True), default=None,
                   help="peak learning rate (default: 1e-4; pairwise probe with --train-layers 0: 1e-3)")
    t.add_argument("--weight-decay", type=float_arg("--weight-decay", 0.0), default=0.01,
                   help="AdamW weight decay (default: %(default)s)")
    t.add_argument("--warmup", type=float_arg("--warmup", 0.0, 1.0), default=0.1,
                   help="share of the steps spent warming the learning rate up (default: %(default)s)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="bf16 autocast (faster on CPUs with AVX-512 BF16) or fp32 (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed for the split, the head's init and the order "
                                                       "(default: %(default)s)")
    _shared(t, int_arg)
    t.set_defaults(func=cmd_train, text_field="tweet", label_field="class")

    e = rsub.add_parser("eval", help="held-out metrics of a saved reward model",
                        description="Score DATA with the reward model at MODEL and print the metrics as JSON. A "
                                    "classifier reads labelled texts (fields, label map and --binary as it was "
                                    "trained unless overridden); a pairwise model reads chosen/rejected pairs.")
    e.add_argument("model", help="a reward model directory written by `lmforge reward train`")
    e.add_argument("data", help="labelled texts or chosen/rejected pairs (.csv, .jsonl, .json, optionally .gz)")
    e.add_argument("--label-map", default=None, help="classifier: VALUE=NAME pairs (default: as trained)")
    e.add_argument("--good-labels", default=None, help="classifier with --binary: the good classes (default: as "
                                                       "trained)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    _shared(e, int_arg)
    e.set_defaults(func=cmd_eval)
