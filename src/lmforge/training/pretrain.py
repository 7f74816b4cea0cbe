"""Pretraining from scratch (or continued pretraining of a saved model) on a text corpus.

``PretrainConfig`` is the recipe's typed config (one field per setting, its docstring the ``--help``
text; see ``lmforge.recipe_config``), and ``pretrain(cfg)`` runs it: it resolves a tokenizer (trained
character vocabulary, a tokenizer folder, or the model's own), builds the model (a preset or config JSON
with random init, or an HF directory), tokenises the corpus once (``data/corpus.py``), picks the objective
by ``config.arch`` (``objectives.py``: causal LM, masked LM, span corruption) and runs the loop
(``loop.py``); the resolved config is written to ``OUT_DIR/config.yaml`` (``lmforge pretrain --config``
reruns it).

torch and the data pipeline are imported inside the functions that use them, so that building the
command-line parser (which reads ``PretrainConfig``) stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import LmforgeError
from lmforge.outputs import claims_output
from lmforge.recipe_config import TRAINING_SEED_MAX, option, validate, write_config
from lmforge.tokenizer import Tokenizer
from lmforge.training.scale import ScaleOut
from lmforge.training.tracking import Tracking

if TYPE_CHECKING:
    import torch
    from torch import nn

MASK_TOKEN = "[MASK]"
N_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>


@dataclass
class PretrainConfig(ScaleOut, Tracking):
    """Everything ``lmforge pretrain`` needs: the model, the corpus, the schedule and where to write.

    Defaults < ``--config FILE.yaml`` < flags; ``lmforge pretrain --print-config`` prints the resolved
    YAML, and every run writes it to ``OUT_DIR/config.yaml``.
    """

    recipe: ClassVar[str] = "pretrain"

    model: str = option("tiny-llama", flags=("-m", "--model"))
    """A preset name (random init), a JSON file of config fields, or a model folder to continue pretraining."""
    overrides: dict[str, Any] = option(default_factory=dict, cli=False)
    """A preset's config fields to override, e.g. {n_layer: 4, n_embd: 128} (the --set KEY=VALUE flag)."""
    corpus: str = "shakespeare"
    """'shakespeare' (embedded: 42 plays and poems), a text file (read whole), a record file (.jsonl, .json, .csv,
    optionally gzipped, or .parquet), or a folder of *.txt/*.md (else of record files)."""
    text_field: str = "text"
    """The text field of a record file; a dotted path reaches into nested records (meta.body)."""
    tokenizer: str | None = None
    """'char' (a character vocabulary built from the corpus), a tokenizer folder, or none: the model folder's
    own tokenizer, 'char' for presets."""
    out_dir: Path = option(Path("runs/pretrain"), flags=("-o", "--out-dir"))
    """Output folder."""
    seq_len: int = option(128, min=1)
    """Tokens per sequence."""
    batch_size: int = option(16, min=1)
    """Sequences per micro-batch."""
    grad_accum: int = option(1, min=1)
    """Micro-batches per optimiser step."""
    steps: int = option(1000, min=1)
    """Optimiser steps."""
    lr: float = option(1e-3, positive=True)
    """Peak learning rate."""
    warmup: int = option(50, min=0)
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0)
    """The cosine ends at lr * this."""
    weight_decay: float = option(0.1, min=0.0)
    """AdamW weight decay on matrices."""
    clip: float = option(1.0, min=0.0)
    """Max gradient norm, 0 = off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast."""
    compile: bool = False
    """torch.compile the model (slow to start)."""
    eval_every: int = option(100, min=0)
    """Validate every N steps, 0 = only at the end."""
    eval_batches: int = option(20, min=1)
    """Validation batches per evaluation."""
    val_fraction: float = option(0.05, min=0.0, min_exclusive=True, max=1.0)
    """The last fraction of the corpus kept for validation."""
    save_every: int = option(100, min=0)
    """Checkpoint every N steps, 0 = only at the end."""
    log_every: int = option(10, min=1)
    """Write metrics every N steps."""
    cache_dir: Path | None = None
    """Where tokenised corpora are cached (none: $LMFORGE_CACHE/tokens or ~/.cache/lmforge/tokens)."""
    seed: int = option(0, min=0, max=TRAINING_SEED_MAX)
    """Seed for the init and the data order, in [0, 2**32)."""
    device: str = "cpu"
    """cpu, cuda, ..."""

    def __post_init__(self) -> None:
        validate(self)


def resolve_tokenizer(tokenizer: str | None, model: str, corpus: str, text_field: str) -> Tokenizer:
    """``char`` (built from the corpus), a tokenizer folder / tokenizer.json, or None: the model
    directory's own tokenizer, else ``char``."""
    if tokenizer is None:
        own = Path(model)
        tokenizer = str(own) if own.is_dir() and (own / "tokenizer.json").is_file() else "char"
    if tokenizer == "char":
        from lmforge.data.corpus import corpus_text
        from lmforge.training.tokenizer_train import char_tokenizer

        return char_tokenizer(corpus_text(corpus, text_field))
    path = Path(tokenizer)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise LmforgeError(f"--tokenizer {tokenizer}: not 'char' and not a folder with a tokenizer.json")
    return Tokenizer.from_dir(path)


def _add_special(tok: Tokenizer, tokens: list[str]) -> None:
    from tokenizers import AddedToken

    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        tok.backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def sentinel_ids(tok: Tokenizer, n: int = N_SENTINELS) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ...; added from the end of the vocabulary down (as in T5:
    <extra_id_0> is the last id) when the tokenizer lacks them."""
    names = [f"<extra_id_{i}>" for i in range(n)]
    _add_special(tok, names[::-1])
    return [tok.token_to_id(t) for t in names]


def build_pretrain_model(model: str, tok: Tokenizer, overrides: dict[str, Any],
                         seed: int) -> tuple[nn.Module, ModelConfig]:
    """A preset name or a config JSON (random init, vocabulary sized to ``tok``), or an HF directory
    (its weights, for continued pretraining; a saved ``BertForMaskedLM`` keeps its trained MLM head,
    a plain ``BertModel`` gets a fresh one)."""
    from lmforge.models import init_weights, model_class

    path = Path(model)
    loaded = None
    if model in PRESETS:
        config = preset(model, vocab_size=tok.vocab_size, **overrides)
    elif path.is_file() and path.suffix == ".json":
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(fields, dict):
            raise LmforgeError(f"{path}: expected a JSON object of model config fields")
        config = ModelConfig.from_dict({"name": path.stem, **fields, "vocab_size": tok.vocab_size, **overrides})
    elif path.is_dir():
        from lmforge.checkpoints.hf import read_hf_dir

        config, loaded, _ = read_hf_dir(path, with_mlm_head=True)
        loaded = {k: v for k, v in loaded.items() if not k.startswith("pooler.")}  # BertForMaskedLM has none
        if overrides:
            raise LmforgeError(f"--set cannot change the shape of the saved model {path}; drop it")
        if tok.vocab_size > config.vocab_size:
            raise LmforgeError(f"the tokenizer has {tok.vocab_size} tokens but the model {path} only "
                               f"{config.vocab_size} embeddings")
    else:
        raise LmforgeError(f"--model {model}: not a preset ({', '.join(sorted(PRESETS))}), a config .json "
                           "or a model folder")
    if config.arch == "encoder":
        config.pooler, config.labels = False, None  # BertForMaskedLM has no pooler
    if config.arch == "encoder-decoder" and config.decoder_start_token_id is None:
        config.decoder_start_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if config.arch == "encoder":
        from lmforge.models.mlm import MaskedLM

        net: nn.Module = MaskedLM(config)
    else:
        net = model_class(config)(config)
    init_weights(net, std=0.02, seed=seed)
    if loaded is not None:
        fresh_head = ()  # parameters that may stay as initialised: tied aliases, an absent MLM head
        if config.arch == "encoder":  # MaskedLM: the encoder's tensors under encoder.*, the head's as saved
            has_head = any(k.startswith("predictions.") for k in loaded)
            loaded = {(k if k.startswith("predictions.") else "encoder." + k): v for k, v in loaded.items()}
            fresh_head = ("predictions.decoder.weight",) if has_head else ("predictions.",)
        missing, unexpected = net.load_state_dict(loaded, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k and not k.startswith(fresh_head)]:
            raise LmforgeError(f"{path}: weights do not fit the model (missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]})")
    return net, config


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def causal_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss; the LM head and the cross-entropy are fused (``linear_cross_entropy``) unless
    the model is not a plain ``DecoderLM`` (a compiled one's forward gives the logits; so does a prompt-tuned
    wrapper's) or its head is not a plain linear."""
    from torch import nn

    from lmforge.models.decoder import DecoderLM
    from lmforge.training import objectives as obj

    device = next(model.parameters()).device
    b = _to(batch, device)
    if isinstance(model, DecoderLM) and type(model.lm_head) is nn.Linear and model.lm_head.bias is None:
        return obj.linear_cross_entropy(model.hidden_states(b["input_ids"]), model.lm_head.weight, b["labels"])
    return obj.causal_lm_loss(model(b["input_ids"]), b["labels"])


def mlm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lmforge.training import objectives as obj

    b = _to(batch, next(model.parameters()).device)
    return obj.masked_lm_loss(model(b["input_ids"]), b["labels"])


def span_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lmforge.training import objectives as obj

    b = _to(batch, next(model.parameters()).device)
    return obj.span_corruption_loss(model(b["input_ids"], b["decoder_input_ids"]), b["labels"])


def mlm_collate(windows: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    import torch

    from lmforge.training import objectives as obj

    inputs, labels = obj.mask_tokens(windows[:, :-1], rng, mask_id, vocab_size, special_ids)
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


def span_collate(windows: np.ndarray, rng: np.random.Generator, *, sentinels: list[int], eos_id: int | None,
                 start_id: int) -> dict[str, torch.Tensor]:
    import torch

    from lmforge.training import objectives as obj

    pairs = [obj.span_corrupt(row, rng, sentinels, eos_id) for row in windows[:, :-1]]
    inputs, targets = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    decoder_in = obj.shift_right(targets, start_id)
    return {"input_ids": torch.from_numpy(inputs), "decoder_input_ids": torch.from_numpy(decoder_in),
            "labels": torch.from_numpy(targets)}


def objective(config: ModelConfig, tok: Tokenizer):
    """(loss_fn, collate) for the model's architecture."""
    from lmforge.data.corpus import causal_collate

    if config.arch == "decoder":
        return causal_step, causal_collate
    if config.arch == "encoder":
        specials = tuple(i for i in tok.backend.get_added_tokens_decoder() if i != tok.token_to_id(MASK_TOKEN))
        return mlm_step, functools.partial(mlm_collate, mask_id=tok.token_to_id(MASK_TOKEN),
                                           vocab_size=tok.vocab_size, special_ids=specials)
    return span_step, functools.partial(span_collate, sentinels=sentinel_ids(tok), eos_id=tok.eos_id,
                                        start_id=config.decoder_start_token_id)


@claims_output("pretrain", inputs=("model",), config="recipe")
def pretrain(recipe: PretrainConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """Pretrain ``recipe.model`` on ``recipe.corpus`` for ``recipe.steps`` optimiser steps; returns the final
    metrics (``loss``, ``val_loss``, ``val_ppl``, ``tokens_per_s``...). Writes ``out_dir/config.yaml`` (the
    resolved recipe), ``out_dir/checkpoint``, ``out_dir/final`` (HF format, with the tokenizer),
    ``metrics.jsonl`` and ``loss.png``.

    How a run starts is not part of the recipe: an ``out_dir`` that holds a run needs ``resume`` (continue it)
    or ``overwrite``; one with other files needs ``force`` (``lmforge.outputs``); it is locked while training.
    """
    from lmforge.data.corpus import RandomWindows, eval_windows, tokenize_corpus
    from lmforge.training import objectives as obj
    from lmforge.training.loop import TrainConfig, train

    r = recipe
    model, overrides, corpus, text_field, out_dir, seq_len = r.model, r.overrides, r.corpus, r.text_field, \
        r.out_dir, r.seq_len
    steps, lr, min_lr_ratio, warmup, weight_decay, grad_accum, clip = r.steps, r.lr, r.min_lr_ratio, r.warmup, \
        r.weight_decay, r.grad_accum, r.clip
    precision, compile, eval_every, save_every, log_every, seed = r.precision, r.compile, r.eval_every, \
        r.save_every, r.log_every, r.seed
    run_config = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))  # Paths as text
    tok = resolve_tokenizer(r.tokenizer, model, corpus, text_field)
    probe_arch = _arch_of(model, overrides)
    if probe_arch == "encoder":
        _add_special(tok, [MASK_TOKEN])
    elif probe_arch == "encoder-decoder":
        sentinel_ids(tok)
    net, config = build_pretrain_model(model, tok, overrides, seed)
    limit = config.max_seq_len if config.positions != "relative" else math.inf
    if seq_len > limit:
        raise LmforgeError(f"--seq-len {seq_len} is longer than the model's context of {config.max_seq_len} tokens "
                           f"({config.name}); lower --seq-len or raise max_seq_len")
    if config.arch == "encoder-decoder":
        obj.check_sentinels(seq_len, N_SENTINELS)
    net.to(r.device)
    loss_fn, collate = objective(config, tok)
    data = tokenize_corpus(corpus, tok, r.cache_dir, text_field, r.val_fraction)
    batches = RandomWindows(data.train, seq_len, r.batch_size, seed, collate)
    val = eval_windows(data.val, seq_len, r.batch_size, r.eval_batches)
    write_config(recipe, out_dir)  # once the inputs have loaded: what reruns this run

    def eval_fn(m: nn.Module) -> dict[str, float]:
        rng = np.random.Generator(np.random.PCG64(seed + 1))  # the same masks/spans every evaluation
        losses = [float(loss_fn(m, collate(w, rng))) for w in val]
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    cfg = TrainConfig(steps=steps, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup, weight_decay=weight_decay,
                      grad_accum=grad_accum, clip=clip, precision=precision, compile=compile, eval_every=eval_every,
                      save_every=save_every, log_every=log_every, seed=seed, **r.train_kwargs())
    run_config["model_config"] = config.to_dict()
    run_config["corpus_tokens"] = {"train": int(data.n_train), "val": int(len(data.val))}
    from lmforge.training.loop import RunDir

    run = RunDir(out_dir, run_config, resume=resume, tokenizer=tok, loggers=r.logger)
    return train(net, loss_fn, batches, cfg, run, eval_fn=eval_fn)


def _arch_of(model: str, overrides: dict[str, Any]) -> str:
    """The architecture a model argument will build, before building it (to prepare the tokenizer)."""
    if "arch" in overrides:
        return overrides["arch"]
    if model in PRESETS:
        return PRESETS[model].get("arch", "decoder")
    path = Path(model)
    try:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("arch", "decoder")
        if (path / "config.json").is_file():
            from lmforge.io import read_json_object
            from lmforge.models import families

            return families.family_for_hf(read_json_object(path / "config.json").get("model_type")).arch
    except (json.JSONDecodeError, AttributeError):
        pass
    return "decoder"
