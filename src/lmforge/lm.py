"""The Python API: ``lmforge.load(name)`` returns an ``LM`` that tokenises, prompts and generates.

    >>> import lmforge
    >>> lm = lmforge.load()                       # the embedded SmolLM2-135M-Instruct
    >>> lm.generate("What is the capital of France?", max_new_tokens=32)
    >>> for piece in lm.stream("Tell me a story", temperature=0.8, seed=1): print(piece, end="")
    >>> lm.chat([{"role": "user", "content": "Hi!"}])

Prompts go through the model's chat template by default when it has one (``chat=None``);
pass ``chat=False`` for raw text completion. Structured output: ``json_schema={...}`` (a JSON schema; ``True``:
any JSON object) or ``regex="..."`` constrains generate/stream/chat (``generation.constrained``).

    >>> lm.generate("Name a city as JSON", json_schema={"type": "object", "properties": {"city": {"type": "string"}},
    ...                                                 "required": ["city"]})
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoints.resolve import DEFAULT_MODEL, ModelSource, build_model, resolve
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generation.constrained import ConstraintState, make_constraint
from lmforge.generation.generate import TextStream, generate_tokens
from lmforge.generation.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

Prompt = str | list[dict[str, str]]


@dataclass
class Checkpoint:
    """Everything read from disk for one model, before it is built."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: ModelSource | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(name: str | Path | None = None) -> Checkpoint:
    """Resolve ``name`` and read config, weights (float32) and tokenizer."""
    source = resolve(name)
    if source.kind == "gguf":
        from lmforge.checkpoints.gguf import read_gguf

        g = read_gguf(source.path)
        tok = Tokenizer(g.tokenizer_backend, bos_token=g.bos_token, eos_token=g.eos_token, pad_token=g.pad_token,
                        unk_token=g.unk_token, add_bos_token=g.add_bos_token, chat_template=g.chat_template)
        return Checkpoint(g.config, g.state_dict, tok, {}, source, g.metadata)
    from lmforge.checkpoints.hf import read_hf_dir

    config, state, gen = read_hf_dir(source.path)
    if not (source.path / "tokenizer.json").exists():
        raise LmforgeError(f"{source.path}: no tokenizer.json; lmforge needs the fast-tokenizer file "
                           "beside the weights")
    from lmforge.io import read_json_object

    block = read_json_object(source.path / "config.json").get("quantization")  # `lmforge quantize` output
    return Checkpoint(config, state, Tokenizer.from_dir(source.path), gen, source,
                      {} if block is None else {"quantization": block})


def resolve_dtype(dtype: str | torch.dtype | None, device: str, quantized: bool = False) -> torch.dtype:
    """``auto``: bfloat16 on CUDA; on CPU float32, except for int8/int4 weights (``quantized``), which get bfloat16:
    torch's packed CPU kernels are vectorised for bfloat16 only and run a scalar loop on float32 activations
    (bench/optimize.py, 2026-12-01: an int4 folder decoded 5.3 tok/s in float32 against 20.2 for the float32
    model it came from)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") or quantized else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(table)}")
    return table[dtype]


def load(name: str | Path | None = None, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
         adapter: str | Path | None = None, quantize: str | None = None, compile: bool = False,
         quantize_head: str | None = None):
    """Load a model by name: the embedded default (None), a local HF dir or .gguf file, or a hub id.

    ``adapter``: a PEFT adapter folder (LoRA or prompt tuning) applied on top; ``quantize="int8"``:
    weight-only int8 linear layers for inference (LoRA adapters are merged first); ``quantize="int4"``: int4
    group-wise layers, taken over bit for bit from a GGUF's Q4_1 blocks (the embedded default) or rounded to
    nearest (group 64) otherwise. ``quantize_head``: how the LM head is quantised with ``quantize``, "int8" (the
    default), "int4" or "none" (``models.quantized.quantize_head``; a tied input embedding then reads the quantised
    rows). A folder ``lmforge quantize`` wrote is loaded quantised as it is. Returns an ``LM``
    for decoder-only and encoder-decoder models, an ``Encoder`` (embeddings, classification) for
    encoder-only ones. ``compile=True``: generation decodes through the compiled static-shape step
    (``generation.fast``; compiled on the first generation of each batch size, the time reported on stderr).
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    ckpt = read_checkpoint(name)
    label = str(name or DEFAULT_MODEL)
    block = ckpt.metadata.get("quantization")
    if block is not None:  # a folder `lmforge quantize` wrote: its linear layers are built quantised
        from lmforge.checkpoints.quantized import build_quantized_model

        if quantize is not None or quantize_head is not None:
            raise LmforgeError(f"{label} is already quantised ({block.get('method')}); drop --quantize"
                               f"{'' if quantize_head is None else ' and --quantize-head'}")
        model = build_quantized_model(ckpt.config, ckpt.state_dict, block, resolve_dtype(dtype, device, True),
                                      device, source=label)
    elif quantize == "int4" and ckpt.source is not None and ckpt.source.kind == "gguf":
        from lmforge.checkpoints.quantized import build_quantized_model, gguf_int4_state

        state, block = gguf_int4_state(ckpt.source.path, ckpt.config, ckpt.state_dict)  # Q4_1 blocks as they are
        model = build_quantized_model(ckpt.config, state, block, resolve_dtype(dtype, device, True), device,
                                      source=label)
        model = _quantized(model, None, quantize_head)
        quantize = quantize_head = None
    else:
        model = build_model(ckpt.config, ckpt.state_dict, resolve_dtype(dtype, device, quantize is not None),
                            device, source=label)
    if adapter is not None:
        from lmforge.peft.adapters import load_adapter

        model = load_adapter(model, adapter).eval()
    if quantize is not None:
        model = _quantized(model, quantize, quantize_head)
    elif quantize_head is not None:
        raise LmforgeError("--quantize-head goes with --quantize int8|int4 (the head is quantised with the layers)")
    if ckpt.config.arch == "encoder":
        from lmforge.embed import Encoder

        return Encoder(model, ckpt.tokenizer, label)
    return LM(model, ckpt.tokenizer, label, ckpt.generation_config, compile=compile)


def _quantized(model: torch.nn.Module, scheme: str | None, head: str | None = None) -> torch.nn.Module:
    """``model`` with its linear layers quantised to ``scheme`` (None: they are already, only the head is left) and
    its head to ``head`` (None: ``DEFAULT_HEAD``)."""
    import sys

    from lmforge.models.quantized import DEFAULT_HEAD, check_head, model_bytes, quantize_head, quantize_linears
    from lmforge.peft.lora import lora_layers, merge_lora

    head = DEFAULT_HEAD if head is None else head
    check_head(head, flag="--quantize-head")
    before = model_bytes(model)
    if next(lora_layers(model), None) is not None:
        merge_lora(model)  # quantise the adapted weights, not a frozen base beside float adapters
    if scheme == "int4":  # group-wise int4, round to nearest (lmforge quantize has GPTQ)
        from lmforge.models.quantized import quantize_model

        quantize_model(model, "int4", head=head)
    elif scheme is not None:
        quantize_linears(model, scheme, head=head)
    else:
        quantize_head(model, head)
    model.requires_grad_(False)
    if scheme is not None:
        print(f"lmforge: {scheme} weights, {head} head: {before / 2**20:.0f} MiB -> "
              f"{model_bytes(model) / 2**20:.0f} MiB", file=sys.stderr)
    return model


class LM:
    """A loaded model with its tokenizer: prompt in, text out."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, name: str = "model",
                 generation_config: dict[str, Any] | None = None, compile: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.generation_config = generation_config or {}
        self.compile = compile  # the default of generate/stream/chat's ``compile``

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def eos_ids(self) -> list[int]:
        ids = list(self.tokenizer.eos_ids) + self.config.eos_token_ids
        gen_eos = self.generation_config.get("eos_token_id")
        ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return sorted(set(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: a string (chat-templated when ``chat`` or, if None, when the model
        has a template) or a list of chat messages."""
        if isinstance(prompt, list):
            return self.encode_messages(prompt)
        if not isinstance(prompt, str):
            raise LmforgeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        if chat is None:
            chat = self.has_chat_template
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise LmforgeError(f"{self.name} has no chat template; use a plain prompt (chat=False / --raw)")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def constraint_states(self, n: int, json_schema: dict[str, Any] | bool | None = None,
                          regex: str | None = None) -> list[ConstraintState] | None:
        """Structured output: one fresh state per prompt for a JSON schema or a regex (None: free text)."""
        constraint = make_constraint(self.tokenizer, json_schema=json_schema, regex=regex,
                                     vocab_size=self.config.vocab_size, eos_ids=self.eos_ids)
        return None if constraint is None else [constraint.new_state() for _ in range(n)]

    def _token_stream(self, prompts: Sequence[Prompt], chat, max_new_tokens, temperature, top_k, top_p,
                      repetition_penalty, seed, stop, compile=None, states=None):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        ids = [self.encode(p, chat) for p in prompts]
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.eos_ids or [0])[0]
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        steps = generate_tokens(self.model, ids, max_new_tokens, params, eos_ids=self.eos_ids, pad_id=pad, seed=seed,
                                compile=self.compile if compile is None else compile, constraints=states)
        return steps, streams

    @staticmethod
    def _warn_incomplete(states: list[ConstraintState] | None, max_new_tokens: int) -> None:
        """Say so when a constrained output ended before it was complete: it does not match, never claim it does."""
        for i, state in enumerate(states or []):
            if not state.is_accepting:
                which = f"output {i}" if len(states) > 1 else "the output"
                warnings.warn(f"{which} is incomplete: generation ended (max_new_tokens={max_new_tokens} or a stop "
                              f"string) before it matched {state.constraint.what}", stacklevel=3)

    def stream(self, prompt: Prompt, *, chat: bool | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, compile: bool | None = None,
               json_schema: dict[str, Any] | bool | None = None, regex: str | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens arrive (``compile``, ``json_schema``, ``regex``: as in
        ``generate``)."""
        states = self.constraint_states(1, json_schema, regex)
        steps, (ts,) = self._token_stream([prompt], chat, max_new_tokens, temperature, top_k, top_p,
                                          repetition_penalty, seed, stop, compile, states)
        eos = set(self.eos_ids)
        for (tok,) in steps:
            if tok is None or tok in eos:
                break
            piece = ts.push(tok)
            if piece:
                yield piece
            if ts.stopped:
                steps.close()
                self._warn_incomplete(states, max_new_tokens)
                return
        tail = ts.finish()
        if tail:
            yield tail
        self._warn_incomplete(states, max_new_tokens)

    def generate(self, prompt: Prompt | Sequence[Prompt], *, chat: bool | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, compile: bool | None = None,
                 json_schema: dict[str, Any] | bool | None = None, regex: str | None = None) -> str | list[str]:
        """Generate for one prompt (returns str) or a batch (a list of prompts; returns list[str]).

        A batch is decoded together with left padding; each row stops at EOS, a stop string or
        ``max_new_tokens``. temperature 0 = greedy; ``seed`` makes sampling reproducible. ``compile``: decode
        through the compiled static-shape step (None: the ``compile`` given to ``load``); the same tokens.
        Structured output: ``json_schema`` (a JSON schema as a dict; ``True``: any JSON object) or ``regex`` (matched
        in full) constrains every output to it; an output cut short by ``max_new_tokens`` or a stop string is
        incomplete and a warning says so. A schema that nothing can satisfy or an invalid regex raises
        LmforgeError.
        """
        single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                             and all(isinstance(m, dict) for m in prompt))
        if not single and not isinstance(prompt, (list, tuple)):
            raise LmforgeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise LmforgeError("no prompts given")
        states = self.constraint_states(len(prompts), json_schema, regex)
        steps, streams = self._token_stream(prompts, chat, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, seed, stop, compile, states)
        eos = set(self.eos_ids)
        done = [False] * len(prompts)
        for toks in steps:
            for i, tok in enumerate(toks):
                if done[i] or tok is None or tok in eos:
                    done[i] = True
                    continue
                streams[i].push(tok)
                done[i] = streams[i].stopped
            if all(done):
                steps.close()
                break
        outs = []
        for s in streams:
            s.finish()
            outs.append(s.text)
        self._warn_incomplete(states, max_new_tokens)
        return outs[0] if single else outs

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """Reply to a conversation (a list of {"role", "content"} messages) using the chat template."""
        return self.generate(messages, **kwargs)
