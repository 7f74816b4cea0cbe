"""``ServeConfig``: the recipe config of ``lmforge serve`` (which model to serve, where, and the server's limits).

Declared like every recipe config (``lmforge.recipe_config``: one field per setting, its docstring the
``--help`` text, ranges in ``option(...)``); ``deploy/server.py`` runs it (``serve(lm, cfg)``). It lives apart
from ``server.py`` because that module imports FastAPI and torch, which building the command-line parser
must not (FastAPI is optional). The API key is not part of it: a secret never goes into a printed or
saved config (``--api-key`` / ``$LMFORGE_API_KEY``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError
from lmforge.recipe_config import option, validate

MAX_BODY_MB = 4.0  # default request-body limit: a full 128k-token prompt as JSON fits
READ_TIMEOUT_S = 30.0  # default time a client gets to send its request head, and then its body


@dataclass
class ServeConfig:
    """Everything ``lmforge serve`` needs but the API key. Defaults < ``--config FILE.yaml`` < flags."""

    recipe: ClassVar[str] = "serve"

    model: str = DEFAULT_MODEL
    """An embedded name, a local HF directory or .gguf file, or a hub id."""
    adapter: Path | None = None
    """A PEFT adapter folder (LoRA or prompt tuning) to apply on top of the model."""
    device: str = "cpu"
    """cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto."""
    quantize: Literal["int8", "int4"] | None = None
    """Weight-only linear layers: int8 (per-row absmax scales: less memory, logits close to fp32) or int4 (group 64:
    a GGUF's Q4_1 blocks as they are, else round-to-nearest; for a calibrated GPTQ copy use `lmforge quantize`)."""
    quantize_head: Literal["int8", "int4", "none"] | None = None
    """With quantize: the lm_head's quantisation (default int8; a tied input embedding then reads its rows and the
    float table is dropped; int4: faster, visibly less exact)."""
    lora_modules: tuple[str, ...] = ()
    """More models to serve, each a LoRA adapter on MODEL, as NAME=PATH (vLLM's shape): a request's "model" picks
    one by NAME, or the base model by its own name. Each adapter shares the base's weights but has its own
    batching engine and KV cache (max_batch x max_context tokens)."""
    embedding_model: str | None = None
    """An encoder-only model (as for `lmforge embed`) served at /v1/embeddings under its name."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it)."""
    port: int = option(8000, min=0, max=65535)
    """TCP port."""
    served_model_name: str | None = None
    """The model id clients use (none: the model name, or a path's last component)."""
    max_batch: int = option(16, min=1)
    """Sequences decoded together in one forward pass (KV cache slots)."""
    max_queue: int = option(64, min=0)
    """Sequences that may wait for a slot; beyond that requests get 503."""
    max_context: int = option(2048, min=2)
    """Tokens per sequence, prompt + completion; capped at the model's context and sizes the KV cache."""
    max_body_mb: float = option(MAX_BODY_MB, positive=True)
    """Largest request body in MiB; larger ones get 413 before they are read."""
    read_timeout: float = option(READ_TIMEOUT_S, positive=True)
    """Seconds a client gets to send its request head, and then its body (408); slower connections are closed."""
    compile: bool = False
    """Decode with torch.compile'd static-shape steps (the same tokens; each batch/timeline bucket compiles once,
    on first use, the time in the log)."""
    prefill_chunk: int = option(512, min=1)
    """Most prompt tokens prefilled between two decode steps: new requests that fit share one pass, a longer
    prompt is prefilled a chunk per step, so running streams keep going."""
    threads: int | None = option(None, min=1)
    """Torch compute threads, used by the one engine thread that decodes (default: the allowed cores minus the
    1-minute load average, at least 1)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level."""

    def __post_init__(self) -> None:
        validate(self)
        self.adapters()
        if self.lora_modules and (self.adapter is not None or self.quantize is not None):
            raise LmforgeError("--lora-modules serves adapters on the plain base model: it cannot be combined with "
                               f"--{'adapter' if self.adapter is not None else 'quantize'}")

    def adapters(self) -> dict[str, Path]:
        """--lora-modules as {name: adapter folder}; LmforgeError for an entry that is not NAME=PATH or a repeated
        name."""
        out: dict[str, Path] = {}
        for entry in self.lora_modules:
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise LmforgeError(f"--lora-modules: {entry!r} is not NAME=PATH (an adapter name and its folder)")
            if name in out:
                raise LmforgeError(f"--lora-modules: the name {name!r} is given twice")
            out[name.strip()] = Path(path.strip())
        return out
