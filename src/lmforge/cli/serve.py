"""The deployment subcommands: ``lmforge serve`` (an OpenAI-compatible server with a web playground).

``register(subparsers)`` adds them to the ``lmforge`` parser; handlers import torch, FastAPI and
uvicorn only when they run, so ``lmforge --help`` stays fast. Bad input raises ``LmforgeError``,
which ``lmforge.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
                     quantize: str | None = None):
    """Load a decoder model (plus adapter), optionally with int8 weights; returns the LM."""
    from lmforge.lm import LM, load

    lm = load(model, device=device, dtype=dtype, adapter=adapter, quantize=quantize)
    if not isinstance(lm, LM) or lm.config.arch != "decoder":
        raise LmforgeError(f"{model} is not a decoder-only language model; `lmforge serve` needs one")
    return lm


def cmd_serve(a: argparse.Namespace) -> int:
    from lmforge.deploy.server import serve

    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if a.api_key is not None and not a.api_key:
        raise LmforgeError("--api-key is empty")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"`lmforge serve` needs fastapi and uvicorn: pip install fastapi uvicorn ({e.name} "
                           "is missing)") from None
    lm = load_for_serving(a.model, adapter=a.adapter, device=a.device, dtype=a.dtype, quantize=a.quantize)
    model_id = a.served_model_name or served_name(a.model)
    serve(lm, model_id=model_id, aliases=(a.model,), host=a.host, port=a.port, api_key=api_key,
          max_batch=a.max_batch, max_queue=a.max_queue, context=a.max_context, log_level=a.log_level,
          max_body_bytes=int(a.max_body_mb * 1024 * 1024), read_timeout=a.read_timeout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the deployment subcommands to the ``lmforge`` parser."""
    from lmforge.checkpoints.resolve import DEFAULT_MODEL
    from lmforge.cli.args import float_arg, int_arg

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground",
                       description="Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models (OpenAI's "
                                   "request and response shapes, streaming as server-sent events), a chat playground "
                                   "at / and /health. Concurrent requests share forward passes (continuous "
                                   "batching). Binds to 127.0.0.1 unless --host says otherwise.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="an embedded name, a local HF directory or .gguf file, or a hub id (default: %(default)s)")
    s.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) to apply on top of the model")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    s.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    s.add_argument("--quantize", choices=("int8",), default=None,
                   help="weight-only int8 linear layers (per-row absmax scales): less memory, logits close to fp32")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int_arg("--port", 0), default=8000, help="TCP port (default: %(default)s)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every API request (default: ${API_KEY_ENV} if set; "
                        "prefer the variable: a flag shows in the process list)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the model name, or a path's last component)")
    s.add_argument("--max-batch", type=int_arg("--max-batch"), default=16,
                   help="sequences decoded together in one forward pass (KV cache slots; default: %(default)s)")
    s.add_argument("--max-queue", type=int_arg("--max-queue", 0), default=64,
                   help="sequences that may wait for a slot; beyond that requests get 503 (default: %(default)s)")
    s.add_argument("--max-context", type=int_arg("--max-context", 2), default=2048,
                   help="tokens per sequence, prompt + completion; capped at the model's context and sizes the KV "
                        "cache (default: %(default)s)")
    s.add_argument("--max-body-mb", type=float_arg("--max-body-mb", 0.0, low_open=True), default=4.0,
                   help="largest request body in MiB; larger ones get 413 before they are read (default: %(default)s)")
    s.add_argument("--read-timeout", type=float_arg("--read-timeout", 0.0, low_open=True), default=30.0,
                   help="seconds a client gets to send its request head, and then its body (408); slower "
                        "connections are closed (default: %(default)s)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: %(default)s)")
    s.set_defaults(func=cmd_serve)
