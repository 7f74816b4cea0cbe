"""Tokenizers: a thin wrapper around a ``tokenizers.Tokenizer`` plus chat templates.

Owns reading and writing Hugging Face tokenizer directories (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``), the special
tokens (BOS/EOS/PAD/UNK and the end-of-turn tokens generation stops on), encoding and decoding
that match ``transformers`` on the same files, and rendering Jinja chat templates the way
``transformers`` does (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
``strftime_now``, a ``tojson`` that leaves HTML alone).

Special-token rules follow ``transformers`` 5: every named special token is registered with the
backend as a special added token, and when a ``tokenizer.json`` is present its post-processor alone
decides whether BOS/EOS are added (the ``add_bos_token`` keys of ``tokenizer_config.json`` are
ignored there). A ``Tokenizer`` built in code with ``add_bos_token=True`` adds BOS itself unless the
post-processor already does; ``save`` bakes that into the saved post-processor.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors

from lmforge.errors import LmforgeError
from lmforge.io import read_json_object, write_json_atomic, write_text_atomic

# Named special tokens in the order transformers registers them.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens chat templates use to close a turn; generation should stop on them as well as on EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
# What transformers' clean_up_tokenization_spaces undoes (only applied to non-BPE models, as there).
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def load_tokenizer_json(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Read a ``tokenizer.json``; a missing or corrupt file raises ``LmforgeError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"tokenizer file {path} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise LmforgeError(f"{path} is not a valid tokenizer.json: {e}") from e


def _as_added_token(value: Any, where: str) -> AddedToken | None:
    """A special token from a config: a string, an AddedToken dict ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return None if value is None else AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
        flags.setdefault("normalized", False)
        return AddedToken(value["content"], special=True, **flags)
    raise LmforgeError(f"{where} must be a string or an object with a 'content' string, got {value!r}")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with named special tokens, BOS/EOS rules and a chat template.

    The wrapper takes over ``backend``: it switches off any padding/truncation stored in it (as a
    plain ``transformers`` call does) and registers the named special tokens as special added tokens.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 add_bos_token: bool = False, add_eos_token: bool = False, chat_template: str | None = None,
                 extra_special_tokens: dict[str, str] | None = None, clean_up_tokenization_spaces: bool = False,
                 name: str | None = None):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise LmforgeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                 **(extra_special_tokens or {})}
        for key, value in named.items():
            if value is not None and (not isinstance(value, str) or not value):
                raise LmforgeError(f"{key} must be a non-empty string or None, got {value!r}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise LmforgeError(f"chat_template must be a string, got {type(chat_template).__name__}")
        if add_bos_token and bos_token is None:
            raise LmforgeError("add_bos_token=True needs a bos_token")
        if add_eos_token and eos_token is None:
            raise LmforgeError("add_eos_token=True needs an eos_token")
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.special_tokens = {k: v for k, v in named.items() if v is not None}
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name = name or "this tokenizer"
        backend.no_padding()
        backend.no_truncation()
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in self.special_tokens.values() if t not in added]
        if missing:
            backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        # What the backend's post-processor adds around a single sequence (probe with empty text).
        probe = backend.encode("", add_special_tokens=True).ids if backend.post_processor is not None else []
        self._post_adds_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
        self._post_adds_eos = bool(probe) and self.eos_id is not None and probe[-1] == self.eos_id
        self._add_bos = add_bos_token and not self._post_adds_bos
        self._add_eos = add_eos_token and not self._post_adds_eos

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: ``tokenizer.json`` plus optional config files."""
        path = Path(path)
        if not path.is_dir():
            raise LmforgeError(f"tokenizer folder {path} does not exist or is not a folder")
        backend = load_tokenizer_json(path / "tokenizer.json")
        config_file = path / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        map_file = path / "special_tokens_map.json"
        # As in transformers: special_tokens_map.json only counts when the config has no added_tokens_decoder.
        if map_file.is_file() and "added_tokens_decoder" not in config:
            config.update(read_json_object(map_file))
        added_tokens = config.get("added_tokens_decoder", {})
        if not isinstance(added_tokens, dict) or not all(str(k).isdigit() for k in added_tokens):
            raise LmforgeError(f"{config_file}: added_tokens_decoder must map token ids to token objects")
        for idx, spec in sorted(added_tokens.items(), key=lambda kv: int(kv[0])):
            if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
                raise LmforgeError(f"{config_file}: added_tokens_decoder[{idx}] needs a 'content' string")
            flags = {k: bool(spec[k]) for k in ("lstrip", "rstrip", "single_word", "normalized", "special")
                     if k in spec}
            backend.add_tokens([AddedToken(spec["content"], **flags)])
        tokens = {key: _as_added_token(config.get(key), f"{config_file}: {key}") for key in SPECIAL_TOKEN_KEYS}
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extras = list(extras.values()) if isinstance(extras, dict) else list(extras)
        extra_added = [_as_added_token(t, f"{config_file}: extra special token") for t in extras]
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_add = [t for t in [*tokens.values(), *extra_added] if t is not None and t.content not in present]
        if to_add:  # keep lstrip/rstrip flags from AddedToken dicts, like transformers does
            backend.add_tokens(to_add)
        chat_template = cls._read_chat_template(path, config, config_file)
        strings = {k: (t.content if t is not None else None) for k, t in tokens.items()}
        tok = cls(backend, bos_token=strings["bos_token"], eos_token=strings["eos_token"],
                  pad_token=strings["pad_token"], unk_token=strings["unk_token"], chat_template=chat_template,
                  extra_special_tokens={k: v for k in ("sep_token", "cls_token", "mask_token")
                                        if (v := strings[k]) is not None},
                  clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                  name=str(path))
        for flag, adds in (("add_bos_token", tok.add_bos_token), ("add_eos_token", tok.add_eos_token)):
            if flag in config and bool(config[flag]) != adds:
                warnings.warn(f"{config_file} sets {flag}={config[flag]} but tokenizer.json's post-processor "
                              f"{'adds' if adds else 'does not add'} it; following tokenizer.json, as transformers "
                              "5 does", stacklevel=2)
        return tok

    @staticmethod
    def _read_chat_template(path: Path, config: dict, config_file: Path) -> str | None:
        template_file = path / "chat_template.jinja"  # transformers 5 saves the template here; it wins
        if template_file.is_file():
            return template_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if template is None or isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
            raise LmforgeError(f"{config_file}: chat_template lists {sorted(map(str, named))} but no 'default'")
        raise LmforgeError(f"{config_file}: chat_template must be a string or a list, got {type(template).__name__}")

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that ``transformers`` loads as this tokenizer."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LmforgeError(f"cannot save a tokenizer to {path}: it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        if self._add_bos or self._add_eos:  # transformers 5 reads BOS/EOS only from the post-processor
            bos, eos = ([self.bos_token] if self._add_bos else []), ([self.eos_token] if self._add_eos else [])
            first = [*bos, "$A", *eos]
            second = [*(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)]
            special = [(t, self.token_to_id(t)) for t in (*bos, *eos)]
            template = processors.TemplateProcessing(single=first, pair=first + second, special_tokens=special)
            old = backend.post_processor
            backend.post_processor = template if old is None else processors.Sequence([old, template])
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(backend.get_added_tokens_decoder().items())}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                                  "added_tokens_decoder": added}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text_atomic(path / "tokenizer.json", backend.to_str(pretty=True))
        write_json_atomic(path / "tokenizer_config.json", config)
        stale = path / "chat_template.jinja"  # would shadow the config's template on reload
        if stale.is_file():
            if self.chat_template is None:
                stale.unlink()
            else:
                write_text_atomic(stale, self.chat_template)

    # ----------------------------------------------------------------- vocabulary and special tokens
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode`` starts with BOS (added by us or by the backend's post-processor)."""
        return self._add_bos or self._post_adds_bos

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos or self._post_adds_eos

    @property
    def eos_ids(self) -> list[int]:
        """Ids generation stops on: EOS plus the end-of-turn tokens the chat template closes turns with."""
        ids = [] if self.eos_id is None else [self.eos_id]
        for token in END_OF_TURN_TOKENS:
            tid = self.backend.token_to_id(token)
            if tid is not None and self.chat_template is not None and token in self.chat_template:
                ids.append(tid)
        return list(dict.fromkeys(ids))

    # ----------------------------------------------------------------- encoding and decoding
    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        if self._add_bos:
            ids = [self.bos_id, *ids]
        if self._add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; equals ``transformers``' ``tokenizer(text)["input_ids"]``."""
        if not isinstance(text, str):
            raise LmforgeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._with_bos_eos(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise LmforgeError(f"encode_batch expects a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LmforgeError(f"encode_batch: texts[{i}] must be a str, got {type(text).__name__}")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._with_bos_eos(e.ids) if add_special_tokens else e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple or 1-D tensor of ints); special tokens dropped by default."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors and arrays
        if isinstance(ids, int) or not isinstance(ids, Iterable):
            ids = [ids]
        size, checked = self.vocab_size, []
        for i, tid in enumerate(ids):
            if isinstance(tid, bool) or not hasattr(tid, "__index__"):
                raise LmforgeError(f"decode: ids[{i}] must be an int, got {type(tid).__name__}")
            tid = operator.index(tid)
            if not 0 <= tid < size:
                raise LmforgeError(f"decode: ids[{i}] = {tid} is outside the vocabulary (size {size})")
            checked.append(tid)
        text = self.backend.decode(checked, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    # ----------------------------------------------------------------- chat templates
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` (dicts with string ``role`` and ``content``) with the chat template.

        ``extra`` becomes template variables (for example ``tools=[...]`` or ``enable_thinking=False``).
        """
        if self.chat_template is None:
            raise LmforgeError(f"{self.name} has no chat template; use `generate` with a plain prompt instead "
                               "(or pass a chat_template)")
        check_messages(messages)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens,
                                     **_plain(extra)}
        template = _compile_template(self.chat_template)
        try:
            return template.render(messages=_plain(list(messages)), add_generation_prompt=bool(add_generation_prompt),
                                   **variables)
        except _TemplateRaised as e:
            raise LmforgeError(f"the chat template of {self.name} rejected the conversation: {e.message}") from e
        except jinja2.TemplateError as e:
            raise LmforgeError(f"the chat template of {self.name} failed: {type(e).__name__}: {e}") from e

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def check_messages(messages: Any) -> None:
    """Raise ``LmforgeError`` unless ``messages`` is a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(messages, (list, tuple)):
        raise LmforgeError(f"messages must be a list of dicts with 'role' and 'content', "
                           f"got {type(messages).__name__}")
    if not messages:
        raise LmforgeError("messages is empty; a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LmforgeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                fields = ", ".join(map(str, message)) or "no fields"
                raise LmforgeError(f"messages[{i}] has no '{field}' (it has: {fields})")
            if not isinstance(message[field], str):
                raise LmforgeError(f"messages[{i}]['{field}'] must be a str, got {type(message[field]).__name__}")


def _plain(value: Any) -> Any:
    """A copy of ``value`` made only of JSON-like types, so templates cannot reach arbitrary objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _TemplateRaised(jinja2.TemplateError):
    """The template itself called ``raise_exception(message)``."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _SafeNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


class _DictMaker:
    """``dict(...)`` / ``dict.fromkeys(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) and render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=_SafeNamespace, dict=_DictMaker())
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
