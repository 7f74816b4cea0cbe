"""Knowledge distillation (``lmforge distill``): a student learns a teacher's next-token distributions.

Owns the distillation divergences (``divergence``: forward KL, reverse KL, generalised JSD), the loss of one
batch against a teacher (``distill_loss``: temperature-softened, scaled by T^2, optionally mixed with the label
cross-entropy), the student (``build_student``: a preset, a saved model, or the teacher with blocks dropped), the
on-disk teacher cache (``TeacherCache``: top-k logits per position in safetensors shards), the held-out KL
(``heldout_kl``), ``DistillConfig`` and ``distill(cfg)``, which hands a step function and a resumable batch
source to ``training/loop.py`` ``train`` (the one loop) and writes ``OUT_DIR/final`` like ``finetune``.

Data: SFT files (``data/sft.py``: the loss covers the response tokens) or a text corpus (``data/corpus.py``:
cut into windows of ``max_len`` tokens; every token after the first of a window is distilled).

The losses (p = teacher, q = student, both softened by the temperature T: softmax(logits / T)):

- ``forward``: KL(p || q) (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"),
- ``reverse``: KL(q || p) (mode-seeking),
- ``jsd``: the generalised Jensen-Shannon divergence of Agarwal et al. 2024 ("On-policy distillation of
  language models: learning from self-generated mistakes", GKD, eq. 2):
  JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q,

each averaged over the distilled positions and multiplied by T^2 (so its gradients keep their scale as T
changes, Hinton et al. section 2). With ``alpha`` > 0 the loss is ``alpha * CE(labels) + (1 - alpha) * T^2 * D``.

Top-k (``top_k`` = k > 0, required by the cache): the teacher keeps only its k largest logits per position and
the log-normaliser ``lse = logsumexp(logits / T)``, so its softened probabilities of those k tokens are exact and
the rest of its mass is one number, 1 - sum (floored at 1e-10). Both distributions are then compared on k + 1
outcomes: the k teacher tokens and "any other token" (the student's probability of the rest is 1 minus its own
probabilities of the k tokens). The divergence of these coarsened distributions is a lower bound of the full one (data
processing) and equals it when the teacher's rest mass is 0. On-the-fly and cached top-k compute the same
numbers; ``top_k=0`` (on the fly only) compares full-vocabulary distributions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import TRAINING_SEED_MAX, option, validate, write_config
from lmforge.training.distill_losses import (  # noqa: F401 (the losses are this recipe's API too)
    LOSSES,
    TopK,
    distill_loss,
    divergence,
    divergence_from_logits,
    teacher_topk,
)
from lmforge.training.scale import ScaleOut
from lmforge.training.teacher_cache import (  # noqa: F401
    TeacherCache,
    _hidden_and_labels,
    items_fingerprint,
    make_batches,
    teacher_fingerprint,
    teacher_logits,
)
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:  # torch is imported inside the functions so that building the CLI parser stays fast
    from torch import Tensor, nn

    from lmforge.data.sft import SFTExample

Loss = Literal["forward", "reverse", "jsd"]
TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class DistillConfig(ScaleOut, Tracking):
    """Everything ``lmforge distill`` needs: the teacher and student, the data, the loss, the schedule and output.

    Defaults < ``--config FILE.yaml`` < flags; ``lmforge distill --print-config`` prints the resolved YAML,
    and every run writes it to ``OUT_DIR/config.yaml``.
    """

    recipe: ClassVar[str] = "distill"

    teacher: str | None = option(None, group="models")
    """Teacher model name or path (required): a decoder-only model lmforge loads."""
    student: str | None = option(None, group="models")
    """Student: a preset name (random init, sized to the teacher's vocabulary), a saved model or a model folder;
    it must share the teacher's tokenizer (or give --student-layers)."""
    student_layers: int | None = option(None, min=1, group="models")
    """Student = the teacher with only K blocks kept, evenly spaced: the first and the last always (K >= 2),
    block i*(L-1)/(K-1) rounded for i = 0..K-1; K = 1 keeps the first."""
    teacher_precision: Literal["fp32", "bf16"] = option("fp32", group="models")
    """The teacher's weights in float32 or bfloat16 (it runs in eval mode, without gradients)."""
    train: tuple[Path, ...] = option((), group="data")
    """Training files: SFT records (.jsonl, .json, .csv, optionally gzipped, or .parquet; the response tokens
    are distilled) or a text corpus (.txt/.md files or a folder: every token) (required)."""
    dev: tuple[Path, ...] = option((), group="data")
    """Held-out files in the same form, for val_kl (the KL to the teacher at T=1) and val_loss (none: a text
    corpus holds out its last 5%; SFT data is not evaluated)."""
    format: Literal["alpaca", "messages", "prompt-completion", "fields", "text"] | None = option(None, group="data")
    """Record format; text: the files are a text corpus (none: text for .txt/.md files and folders, else the
    SFT format detected per record)."""
    text_field: str = option("text", group="data")
    """The text field of a record-file corpus (--format text)."""
    cache_dir: Path | None = option(None, group="data")
    """Text corpus: where its token file is cached (none: $LMFORGE_CACHE/tokens or ~/.cache/lmforge/tokens)."""
    prompt_template: str | None = option(None, group="data")
    """SFT: prompt text with {field} placeholders (on the command line, \\n and \\t are unescaped)."""
    prompt_field: str | None = option(None, group="data")
    """SFT: field holding the whole prompt."""
    response_field: str | None = option(None, group="data")
    """SFT: field holding the response to distil."""
    template: Literal["auto", "chat", "plain"] = option("auto", group="data")
    """SFT: render with the teacher's chat template or as plain text (auto: chat when it has one)."""
    max_len: int | None = option(None, min=2, group="data")
    """Tokens per example (SFT) or window (text) (none: 512 or the context window, whichever is smaller)."""
    limit: int | None = option(None, min=1, group="data")
    """Use only the first N training records (SFT) or windows (text)."""
    loss: Loss = option("forward", group="distillation")
    """forward: KL(teacher || student); reverse: KL(student || teacher); jsd: generalised JSD(beta)."""
    temperature: float = option(2.0, positive=True, group="distillation")
    """Softmax temperature T of both distributions; the divergence is scaled by T^2."""
    beta: float = option(0.5, min=0.0, max=1.0, min_exclusive=True, max_exclusive=True, group="distillation")
    """jsd: the mixture weight of the teacher, in (0, 1)."""
    alpha: float = option(0.0, min=0.0, max=1.0, group="distillation")
    """Weight of the label cross-entropy: loss = alpha * CE + (1 - alpha) * T^2 * divergence, in [0, 1]."""
    top_k: int = option(0, min=0, group="distillation")
    """Keep the teacher's k largest logits per position (+ the rest of its mass as one outcome); 0 = the full
    vocabulary (on the fly only)."""
    cache_teacher: Path | None = option(None, group="distillation")
    """Folder for the teacher's top-k logits (needs --top-k): computed once into safetensors shards, reused by
    later runs on the same teacher, data, k and temperature (none: on the fly)."""
    batch_size: int = option(8, min=1, group="training")
    """Examples per micro-batch."""
    grad_accum: int = option(1, min=1, group="training")
    """Micro-batches per optimiser step."""
    steps: int | None = option(None, min=1, group="training")
    """Optimiser steps (none: --epochs, else one epoch)."""
    epochs: float | None = option(None, positive=True, group="training")
    """Passes over the data (instead of --steps)."""
    lr: float = option(1e-4, positive=True, group="training")
    """Peak learning rate."""
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0, group="training")
    """Cosine floor as a fraction of --lr."""
    warmup: int = option(0, min=0, group="training")
    """Linear warmup steps."""
    weight_decay: float = option(0.0, min=0.0, group="training")
    """AdamW weight decay."""
    clip: float = option(1.0, min=0.0, group="training")
    """Max gradient norm, 0 = off."""
    precision: Literal["fp32", "bf16"] = option("fp32", group="training")
    """The student in fp32, or bf16 autocast."""
    compile: bool = option(False, group="training")
    """torch.compile the student."""
    device: str = option("cpu", group="training")
    """cpu, cuda, ..."""
    seed: int = option(0, min=0, max=TRAINING_SEED_MAX, group="training")
    """Seed for init, shuffling and dropout, in [0, 2**32)."""
    eval_every: int = option(0, min=0, group="evaluation and output")
    """Evaluate every N steps; 0 = before the first step and at the end only."""
    eval_examples: int | None = option(200, min=1, group="evaluation and output")
    """Held-out examples (or windows) for val_kl and val_loss (none: all)."""
    out_dir: Path = option(Path("runs/distill"), flags=("-o", "--out-dir"), group="evaluation and output")
    """Output folder."""
    save_every: int = option(0, min=0, group="evaluation and output")
    """Checkpoint every N steps; 0 = only at the end."""
    log_every: int = option(10, min=1, group="evaluation and output")
    """Log the loss every N steps."""

    def __post_init__(self) -> None:
        if isinstance(self.train, (str, Path)):  # one file given as is (Python API)
            self.train = (self.train,)
        if isinstance(self.dev, (str, Path)):
            self.dev = (self.dev,)
        validate(self)
        if not self.teacher:
            raise LmforgeError("teacher (--teacher): no teacher model given (--teacher NAME_OR_PATH)")
        if (self.student is None) == (self.student_layers is None):
            raise LmforgeError("give the student as exactly one of --student NAME_OR_PATH and --student-layers K")
        if not self.train:
            raise LmforgeError("train (--train): no training data given (--train FILE)")
        if self.steps is not None and self.epochs is not None:
            raise LmforgeError("give either steps (--steps) or epochs (--epochs), not both")
        if self.cache_teacher is not None and self.top_k == 0:
            raise LmforgeError("cache_teacher (--cache-teacher) stores the teacher's top-k logits: give --top-k K "
                               "(e.g. 64)")


# ----------------------------------------------------------------------------- the student
def kept_blocks(n_layer: int, k: int) -> list[int]:
    """K evenly spaced block indices of an L-block model: the first and the last (K >= 2), i*(L-1)/(K-1) rounded
    between; K = 1 keeps block 0."""
    if not 1 <= k <= n_layer:
        raise LmforgeError(f"student_layers (--student-layers): {k} blocks asked for, the teacher has {n_layer}; "
                           f"allowed: 1..{n_layer}")
    if k == 1:
        return [0]
    return sorted({round(i * (n_layer - 1) / (k - 1)) for i in range(k)})


def _shrunk(state: dict[str, Tensor], keep: list[int], prefix: str = "model.layers.") -> dict[str, Tensor]:
    """The state dict with only the ``keep`` blocks, renumbered 0..K-1."""
    new = {old: i for i, old in enumerate(keep)}
    out = {}
    for name, value in state.items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if int(index) in new:
                out[f"{prefix}{new[int(index)]}.{rest}"] = value
        else:
            out[name] = value
    return out


def _same_vocabulary(teacher_name: str, teacher_cfg: Any, teacher_tok: Any, student_name: str, student_cfg: Any,
                     student_tok: Any) -> None:
    """Refuse a student whose next-token distribution is over other tokens than the teacher's."""
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise LmforgeError(f"the student {student_name} has a vocabulary of {student_cfg.vocab_size} tokens, the "
                           f"teacher {teacher_name} {teacher_cfg.vocab_size}: distillation compares their next-token "
                           "distributions token by token, so both need the same tokenizer")
    if student_tok.backend.get_vocab() != teacher_tok.backend.get_vocab():
        raise LmforgeError(f"the student {student_name} and the teacher {teacher_name} have different tokenizers "
                           f"(same size, {student_cfg.vocab_size}, but other tokens): distillation needs the same "
                           "tokenizer")


def build_student(cfg: DistillConfig, teacher_ckpt: Any) -> tuple[nn.Module, list[int] | None]:
    """The student (float32, on ``cfg.device``) and, for ``student_layers``, the teacher blocks it kept."""
    from lmforge.checkpoints.resolve import build_model
    from lmforge.config import PRESETS, preset
    from lmforge.lm import read_checkpoint

    tc = teacher_ckpt.config
    if cfg.student_layers is not None:
        keep = kept_blocks(tc.n_layer, cfg.student_layers)
        config = dataclasses.replace(tc, n_layer=len(keep), n_decoder_layer=len(keep))
        return build_model(config, _shrunk(teacher_ckpt.state_dict, keep), None, cfg.device,
                           source=f"{cfg.teacher} ({len(keep)} blocks)"), keep
    if cfg.student in PRESETS:
        from lmforge.models import model_class

        config = preset(cfg.student, vocab_size=tc.vocab_size, eos_token_id=tc.eos_token_id,
                        bos_token_id=tc.bos_token_id, pad_token_id=tc.pad_token_id)
        if config.arch != "decoder":
            raise LmforgeError(f"student (--student): the preset {cfg.student} is an {config.arch} model; "
                               "distillation needs a decoder-only student")
        net = model_class(config)(config).init_weights(seed=cfg.seed)
        return net.to(cfg.device), None
    sc = read_checkpoint(cfg.student)
    if sc.config.arch != "decoder":
        raise LmforgeError(f"student (--student): {cfg.student} is an {sc.config.arch} model; distillation needs a "
                           "decoder-only student")
    _same_vocabulary(str(cfg.teacher), tc, teacher_ckpt.tokenizer, str(cfg.student), sc.config, sc.tokenizer)
    return build_model(sc.config, sc.state_dict, None, cfg.device, source=str(cfg.student)), None


# ----------------------------------------------------------------------------- data
def is_text_corpus(cfg: DistillConfig) -> bool:
    """--format text, or (no --format) every training path a .txt/.md file or a folder."""
    if cfg.format is not None:
        return cfg.format == "text"
    return all(Path(p).is_dir() or Path(p).suffix.lower() in TEXT_SUFFIXES for p in cfg.train)


def _windows(tokens: Any, max_len: int, limit: int | None) -> list[SFTExample]:
    """Non-overlapping windows of ``max_len`` tokens as examples whose every token (after the first) is distilled."""
    from lmforge.data.sft import SFTExample

    n = len(tokens) // max_len
    if limit is not None:
        n = min(n, limit)
    out = []
    for i in range(n):
        ids = [int(t) for t in tokens[i * max_len:(i + 1) * max_len]]
        out.append(SFTExample(ids, ids, [], ""))
    return out


def load_examples(cfg: DistillConfig, tok: Any, max_len: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """Training and held-out examples: SFT records (response tokens labelled) or corpus windows (all labelled)."""
    if is_text_corpus(cfg):
        from lmforge.data.corpus import tokenize_corpus

        def corpus_tokens(paths: tuple[Path, ...]) -> Any:
            if len(paths) != 1:
                raise LmforgeError(f"a text corpus is one file or one folder, got {len(paths)} paths: "
                                   f"{', '.join(map(str, paths))}")
            return tokenize_corpus(paths[0], tok, cache_dir=cfg.cache_dir, text_field=cfg.text_field)

        train_corpus = corpus_tokens(cfg.train)
        if cfg.dev:
            train, dev = train_corpus.tokens, corpus_tokens(cfg.dev).tokens
        else:
            train, dev = train_corpus.train, train_corpus.val
        examples = _windows(train, max_len, cfg.limit)
        if not examples:
            raise LmforgeError(f"the corpus {cfg.train[0]} has {len(train)} training tokens, fewer than one window "
                               f"of max_len={max_len}; give a smaller --max-len")
        held = _windows(dev, max_len, None)
        if not held and len(dev) >= 2:
            held = _windows(dev, len(dev), None)
        return examples, held
    from lmforge.data.sft import load_sft_data

    chat = {"auto": None, "chat": True, "plain": False}[cfg.template]
    fmt = None if cfg.format == "text" else cfg.format
    args = dict(max_len=max_len, chat=chat, format=fmt, prompt_template=cfg.prompt_template,
                prompt_field=cfg.prompt_field, response_field=cfg.response_field)
    examples = load_sft_data(list(cfg.train), tok, limit=cfg.limit, **args).examples
    dev = load_sft_data(list(cfg.dev), tok, **args).examples if cfg.dev else []
    return examples, dev


# ----------------------------------------------------------------------------- evaluation
def heldout_kl(teacher: nn.Module, student: nn.Module, batches: Any) -> dict[str, float]:
    """``val_kl``: the mean forward KL(teacher || student) at temperature 1 over the full vocabulary, and
    ``val_loss``: the student's label cross-entropy, over the distilled positions of ``batches``."""
    import torch
    import torch.nn.functional as F

    device = next(student.parameters()).device
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            t = teacher_logits(teacher, batch)
            h, labels = _hidden_and_labels(student, batch)
            s = student.lm_head(h).float()
            kl_sum += float(divergence_from_logits(t, s, "forward", 1.0).sum())
            ce_sum += float(F.cross_entropy(s, labels, reduction="sum"))
            n += len(labels)
    return {"val_kl": kl_sum / max(n, 1), "val_loss": ce_sum / max(n, 1)}


# ----------------------------------------------------------------------------- the recipe
@claims_output("distill", inputs=("teacher", "student", "cache_teacher"), config="recipe")
def distill(recipe: DistillConfig, *, resume: bool = False, overwrite: bool = False,
            force: bool = False) -> dict[str, Any]:
    """Distil ``recipe.teacher`` into a student on ``recipe.train``; the student goes to ``out_dir/final``.

    The student is a preset (random init), a saved model, or the teacher with ``student_layers`` blocks kept
    (``kept_blocks``); its vocabulary must be the teacher's. Each step runs the student on a batch and compares
    its softened next-token distributions with the teacher's (computed on the fly, or read from the
    ``cache_teacher`` folder) by ``loss`` (see the module docstring). Held-out data (``dev``, or the last 5% of a
    text corpus) is evaluated before the first step, every ``eval_every`` steps and at the end: ``val_kl`` (the
    KL to the teacher at T=1) and ``val_loss``. ``resume`` / ``overwrite`` / ``force``: as ``finetune``.
    """
    import torch

    from lmforge.lm import read_checkpoint
    from lmforge.training.loop import RunDir, TrainConfig, train
    from lmforge.training.sft import sft_max_len

    r = recipe
    run_config = json.loads(json.dumps(dataclasses.asdict(r), default=str))
    teacher_ckpt = read_checkpoint(r.teacher)
    if teacher_ckpt.config.arch != "decoder":
        raise LmforgeError(f"teacher (--teacher): {r.teacher} is an {teacher_ckpt.config.arch} model; distillation "
                           "needs a decoder-only teacher")
    tok = teacher_ckpt.tokenizer
    net, keep = build_student(r, teacher_ckpt)  # a vocabulary mismatch stops here, before anything is trained
    from lmforge.checkpoints.resolve import build_model

    teacher_dtype = torch.bfloat16 if r.teacher_precision == "bf16" else torch.float32
    teacher = build_model(teacher_ckpt.config, teacher_ckpt.state_dict, teacher_dtype, r.device,
                          source=str(r.teacher)).eval().requires_grad_(False)
    del teacher_ckpt
    max_len = r.max_len or min(512, net.config.max_seq_len, teacher.config.max_seq_len)
    max_len = sft_max_len(sft_max_len(max_len, net.config, "the student"), teacher.config, str(r.teacher))
    examples, held = load_examples(r, tok, max_len)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    batches = make_batches(examples, batch_size=r.batch_size, pad_id=pad, seed=r.seed)
    steps = r.steps
    if steps is None:
        epochs = r.epochs if r.epochs is not None else 1.0
        steps = max(1, math.ceil(epochs * len(examples) / (r.batch_size * r.grad_accum)))
    cache = None
    if r.cache_teacher is not None:
        cache = TeacherCache.ensure(r.cache_teacher, teacher, str(r.teacher), examples, top_k=r.top_k,
                                    temperature=r.temperature, pad_id=pad, batch_size=r.batch_size)

    device = next(teacher.parameters()).device

    def step_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        batch = {k: v.to(device) for k, v in batch.items()}  # the loop hands over the batch as the source made it
        h, labels = _hidden_and_labels(model, batch)
        student_logits = model.lm_head(h)
        if cache is not None:
            target: Tensor | TopK = cache.lookup(batch["items"].tolist())
            target = TopK(*(t.to(student_logits.device) for t in (target.values, target.indices, target.lse)))
        else:
            logits = teacher_logits(teacher, batch)
            target = teacher_topk(logits, r.top_k, r.temperature) if r.top_k else logits
        if len(labels) == 0:  # nothing to distil in this batch
            return student_logits.sum() * 0.0, {"kd": 0.0}
        return distill_loss(student_logits, target, labels, kind=r.loss, temperature=r.temperature, beta=r.beta,
                            alpha=r.alpha)

    eval_fn = None
    if held:
        n_held = len(held) if r.eval_examples is None else min(r.eval_examples, len(held))
        held_batches = make_batches(held[:n_held], batch_size=r.batch_size, pad_id=pad, shuffle=False)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return heldout_kl(teacher, m, held_batches.iter_once())

    write_config(r, r.out_dir)
    what = f"the teacher's blocks {keep}" if keep is not None else str(r.student)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"distill: student = {what} ({n_params:,} parameters); {len(examples)} training examples, "
          f"{len(held)} held out; loss {r.loss} at T={r.temperature:g}"
          f"{f', top-{r.top_k}' if r.top_k else ''}", file=sys.stderr)
    cfg = TrainConfig(steps=steps, lr=r.lr, min_lr_ratio=r.min_lr_ratio, warmup_steps=r.warmup,
                      weight_decay=r.weight_decay, grad_accum=r.grad_accum, clip=r.clip, precision=r.precision,
                      compile=r.compile, eval_every=r.eval_every, eval_at_start=True, save_every=r.save_every,
                      log_every=r.log_every, seed=r.seed, **r.train_kwargs())
    run = RunDir(r.out_dir, {"recipe": "distill", **run_config}, resume=resume, tokenizer=tok, loggers=r.logger)
    result = train(net, step_fn, batches, cfg, run, eval_fn=eval_fn,
                   tokens_per_batch=lambda b: int(b["attention_mask"].sum()))
    return {**result, "train_examples": len(examples), "steps": steps, "out_dir": str(Path(r.out_dir) / "final")}
