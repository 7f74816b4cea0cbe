"""The deployment subcommands: ``lmforge serve`` (an OpenAI-compatible server with a web playground).

``register(subparsers)`` adds them to the ``lmforge`` parser (flags from ``ServeConfig``, with ``--config``
and ``--print-config``); handlers import torch, FastAPI and uvicorn only when they run, so ``lmforge --help``
stays fast. Bad input raises ``LmforgeError``,
which ``lmforge.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lmforge.cli.options as options
from lmforge.errors import LmforgeError

API_KEY_ENV = "LMFORGE_API_KEY"


def served_name(model: str) -> str:
    """The id clients send as ``model``: an embedded name as is, a path by its last component."""
    path = Path(model)
    if not path.exists():
        return model
    path = path.resolve()
    return path.stem if path.suffix == ".gguf" else path.name


def load_for_serving(model: str, *, adapter: str | None = None, device: str = "cpu", dtype: str = "auto",
                     quantize: str | None = None, quantize_head: str | None = None):
    """Load a decoder model (plus adapter), optionally with int8 weights (and ``quantize_head``); returns the LM."""
    from lmforge.lm import LM, load

    lm = load(model, device=device, dtype=dtype, adapter=adapter, quantize=quantize, quantize_head=quantize_head)
    if not isinstance(lm, LM) or lm.config.arch != "decoder":
        raise LmforgeError(f"{model} is not a decoder-only language model; `lmforge serve` needs one")
    return lm


def load_lora_models(lm, modules: dict[str, Path]) -> dict:
    """One LM per LoRA adapter on ``lm``'s model, {name: LM}. Each is a copy of the model's modules that shares
    its weights (only the adapter's tensors are new), so N adapters cost N adapters, not N models."""
    import copy

    from lmforge.lm import LM
    from lmforge.peft.adapters import load_adapter, read_adapter

    out = {}
    for name, path in modules.items():
        kind = read_adapter(path)[0].get("peft_type")
        if kind != "LORA":
            raise LmforgeError(f"--lora-modules {name}={path}: a {kind} adapter; only LoRA adapters can be served "
                               "beside the base model")
        shared = {id(t): t for t in [*lm.model.parameters(), *lm.model.buffers()]}
        model = load_adapter(copy.deepcopy(lm.model, shared), path).eval()
        out[name] = LM(model, lm.tokenizer, name, lm.generation_config)
    return out


def load_embedder(model: str, *, device: str = "cpu", dtype: str = "auto"):
    """Load the encoder served at /v1/embeddings."""
    from lmforge.embed import Encoder
    from lmforge.lm import load

    enc = load(model, device=device, dtype=dtype)
    if not isinstance(enc, Encoder):
        raise LmforgeError(f"--embedding-model {model} is not an encoder-only model; /v1/embeddings needs one, "
                           "as `lmforge embed` does")
    return enc


def cmd_serve(a: argparse.Namespace) -> int:
    from lmforge.deploy.serve_config import ServeConfig

    cfg = options.recipe_from_args(ServeConfig, a)
    if a.print_config:
        return 0
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if a.api_key is not None and not a.api_key:
        raise LmforgeError("--api-key is empty")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"`lmforge serve` needs fastapi and uvicorn: pip install fastapi uvicorn ({e.name} "
                           "is missing)") from None
    from lmforge.deploy.server import serve

    model_id = cfg.served_model_name or served_name(cfg.model)
    embedding_id = served_name(cfg.embedding_model) if cfg.embedding_model else None
    names = [model_id, *cfg.adapters(), *([embedding_id] if embedding_id else [])]
    if len(set(names)) < len(names):
        raise LmforgeError(f"two served models share a name ({', '.join(names)}); rename one (--served-model-name, "
                           "--lora-modules NAME=...)")
    from lmforge.generation.threads import set_threads

    set_threads(cfg.threads)  # before the model loads: inter-op threads can be set only then
    lm = load_for_serving(cfg.model, adapter=cfg.adapter, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize,
                          quantize_head=cfg.quantize_head)
    adapters = load_lora_models(lm, cfg.adapters())
    embedder = load_embedder(cfg.embedding_model, device=cfg.device, dtype=cfg.dtype) if cfg.embedding_model else None
    serve(lm, cfg, model_id=model_id, api_key=api_key, adapters=adapters, embedder=embedder,
          embedding_id=embedding_id)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands to the ``lmforge`` parser: the flags of ``serve`` come from ``ServeConfig``
    (``deploy/serve_config.py``; the pattern is described in ``lmforge.cli.training``), except ``--api-key``
    (a secret: never part of a printed config)."""
    from lmforge.deploy.serve_config import ServeConfig

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground",
                       description="Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models (OpenAI's "
                                   "request and response shapes, streaming as server-sent events, logprobs), LoRA "
                                   "adapters beside it (--lora-modules), an encoder at /v1/embeddings "
                                   "(--embedding-model), Prometheus metrics at /metrics, a chat playground "
                                   "at / and /health. Concurrent requests share forward passes (continuous "
                                   "batching). Binds to 127.0.0.1 unless --host says otherwise. A request without "
                                   "'temperature' samples at 1.0, OpenAI's default, so OpenAI client code behaves "
                                   "the same; the playground starts at 0.7 (as `lmforge chat`), `generate` at 0.")
    options.add_recipe_args(s, ServeConfig, positional=("model",))
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every API request (default: ${API_KEY_ENV} if set; "
                        "prefer the variable: a flag shows in the process list)")
    options.add_config_args(s)
    s.set_defaults(func=cmd_serve)
