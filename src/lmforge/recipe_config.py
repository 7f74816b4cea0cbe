"""Typed recipe configs: what a recipe config is, how it is checked, and how it travels as YAML.

A recipe config is a dataclass. Each field's help is the string literal written right under it (PEP 257
attribute docstring); ``option(...)`` adds what a type cannot say: extra CLI flag names, numeric ranges,
choices, whether the field is on the command line. ``validate`` checks every field against its type and
limits (recipe dataclasses call it from ``__post_init__``); ``to_yaml`` / ``from_yaml`` / ``load_config``
write and read the full resolved config; ``write_config`` puts it into a run folder. The argparse side
lives in ``lmforge.cli.options``; this module imports neither argparse nor torch.

YAML is read with YAML 1.2 scalars: only ``true``/``false`` are booleans (``yes``/``no``/``on`` stay
strings) and ``1e-4`` is a number.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Union

import yaml

from lmforge.errors import LmforgeError
from lmforge.io import write_text_atomic

_KEY = "lmforge"  # the dataclasses.field metadata key holding a FieldSpec
TRAINING_SEED_MAX = 2**32 - 1  # a training recipe's seed: the loop seeds numpy's global generator, which takes
# 32 bits (``option(0, min=0, max=TRAINING_SEED_MAX)``)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What ``option(...)`` records for one field; see ``option`` for the meaning of each entry."""

    flags: tuple[str, ...] = ()
    help: str | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    finite: bool = True
    sep: str | None = None
    group: str | None = None
    cli: bool = True


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           flags: tuple[str, ...] = (), help: str | None = None, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False, positive: bool = False,
           choices: tuple[Any, ...] | None = None, finite: bool = True, sep: str | None = None,
           group: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with lmforge metadata.

    ``flags``: CLI names besides ``--field-name`` (e.g. ``("-o", "--out-dir")``); for a bool, names starting
    with ``--no-`` set False and the others set True. ``help`` overrides the attribute docstring on the CLI.
    ``min``/``max`` bound numbers (and each number of a list), inclusive unless ``*_exclusive``;
    ``positive`` is ``min=0, min_exclusive=True``. ``choices`` limits the values (``Literal`` types need
    none). ``finite=False`` lets a float be NaN or infinite. ``sep``: a list field's CLI value is one token
    split on ``sep`` (``--targets q,v``) instead of several tokens. ``group``: the help section.
    ``cli=False`` keeps the field out of the command line (YAML and Python only).
    """
    if positive:
        min, min_exclusive = 0, True
    spec = FieldSpec(tuple(flags), help, min, max, min_exclusive, max_exclusive,
                     tuple(choices) if choices is not None else None, finite, sep, group, cli)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


def field_spec(f: dataclasses.Field) -> FieldSpec:
    """The ``FieldSpec`` of a field (the defaults when it was declared without ``option``)."""
    return f.metadata.get(_KEY, FieldSpec())


def recipe_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a config is built from (``init=False`` fields are derived, so left out), in order; keyword-only
    fields (shared option sets a recipe inherits, such as ``training.scale.ScaleOut``) come last."""
    return sorted((f for f in dataclasses.fields(cls) if f.init), key=lambda f: bool(f.kw_only))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved type (string annotations evaluated)."""
    return typing.get_type_hints(cls)


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's help: its ``option(help=...)`` or else the string literal written right under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return {f.name: field_spec(f).help or docs.get(f.name, "") for f in recipe_fields(cls)}


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value, or ``dataclasses.MISSING`` when it must be given."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def main_flag(f: dataclasses.Field, tp: Any) -> str:
    """The flag errors name: the first long ``flags`` alias (for a bool: one that flips the default), else
    ``--field-name`` (``--no-field-name`` for a bool that defaults to True)."""
    flip = tp is bool and default_of(f) is True
    for flag in field_spec(f).flags:
        if flag.startswith("--") and (tp is not bool or flag.startswith("--no-") == flip):
            return flag
    return ("--no-" if flip else "--") + f.name.replace("_", "-")


def _fields_with_types(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = field_types(cls)
    return [(f, hints[f.name]) for f in recipe_fields(cls)]


def describe_type(tp: Any) -> str:
    """Words for a type, as error messages and help show it: ``an integer``, ``one of 'a', 'b'``..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        words = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list (each {describe_type(args[0]) if args else 'any value'})"
    if origin is dict or tp is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if tp in names:
        return names[tp]
    return "a path" if isinstance(tp, type) and issubclass(tp, PurePath) else f"a {getattr(tp, '__name__', tp)}"


class _Mismatch(Exception):
    """A value that is not of the expected type (carries no message: the caller words it)."""


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` (int -> float, list -> tuple, str -> Path), or ``_Mismatch``; no silent conversions."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        items = [coerce(v, args[0] if args else Any) for v in value]
        return tuple(items) if origin is tuple else items
    if (origin is dict or tp is dict) and isinstance(value, dict):
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt): coerce(v, vt) for k, v in value.items()}
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is float:
            return float(value)
        if isinstance(value, int):
            return value
    if isinstance(tp, type) and issubclass(tp, PurePath) and isinstance(value, (str, os.PathLike)) and str(value):
        return tp(value)
    if isinstance(tp, type) and tp not in (bool, int, float, str) and isinstance(value, tp):
        return value  # an instance of another class (e.g. a nested config dataclass) as it is
    raise _Mismatch


def check_value(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` checked against the field's type, choices, finiteness and range; ``ValueError`` says why."""
    try:
        value = coerce(value, tp)
    except _Mismatch:
        raise ValueError(f"expected {describe_type(tp)}, got {_shown(value)}") from None
    spec = field_spec(f)
    for x in value if isinstance(value, (list, tuple)) else [value]:  # limits hold for each item of a list
        if spec.choices is not None and x is not None and x not in spec.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, spec.choices))}, got {_shown(x)}")
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            if spec.finite:
                raise ValueError(f"must be a finite number, got {x}")
            continue
        low = spec.min is not None and (x < spec.min or (spec.min_exclusive and x == spec.min))
        high = spec.max is not None and (x > spec.max or (spec.max_exclusive and x == spec.max))
        if low or high:
            raise ValueError(f"must be {_range(spec)}, got {x!r}")
    return value


def _range(spec: FieldSpec) -> str:
    parts = [f"{'>' if spec.min_exclusive else '>='} {spec.min}"] if spec.min is not None else []
    parts += [f"{'<' if spec.max_exclusive else '<='} {spec.max}"] if spec.max is not None else []
    return " and ".join(parts)


def _shown(value: Any) -> str:
    return "null" if value is None else repr(str(value) if isinstance(value, PurePath) else value)


def _label(f: dataclasses.Field, tp: Any) -> str:
    return f"{f.name} ({main_flag(f, tp)})" if field_spec(f).cli else f.name


def validate(cfg: Any) -> None:
    """Check every field of ``cfg``; normalise in place (int -> float, list -> tuple, str -> Path).

    Raises ``LmforgeError`` naming the field, its main CLI flag, what is allowed and the value given.
    """
    for f, tp in _fields_with_types(type(cfg)):
        value = getattr(cfg, f.name)
        try:
            checked = check_value(f, tp, value)
        except ValueError as e:
            raise LmforgeError(f"{_label(f, tp)}: {e}") from None
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)


def _plain(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested config: its fields, in order
        return {f.name: _plain(getattr(value, f.name)) for f in recipe_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return {_plain(k): _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_FLOAT_RE = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings ``_Loader`` would not read back as strings."""


for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {ch: [(tag, rx) for tag, rx in rs if tag not in (_BOOL, _FLOAT)]
                                    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _cls.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    _cls.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def to_yaml(cfg: Any, *, comments: bool = True) -> str:
    """The full resolved config as YAML, fields in declaration order, each under its help as a comment."""
    cls = type(cfg)
    out = [f"# lmforge {getattr(cls, 'recipe', cls.__name__)} config\n"]
    helps = field_help(cls)
    for f in recipe_fields(cls):
        if comments and helps[f.name]:
            out += [f"# {line}\n" for line in textwrap.wrap(" ".join(helps[f.name].split()), 100)]
        out.append(yaml.dump({f.name: _plain(getattr(cfg, f.name))}, Dumper=_Dumper, sort_keys=False,
                             default_flow_style=False, allow_unicode=True, width=1000))
    return "".join(out)


def from_yaml(cls: type, path_or_text: Path | str, *, source: str | None = None) -> dict[str, Any]:
    """The checked field values a YAML config gives (only the keys it has).

    A ``Path`` is read as a file; a ``str`` is YAML text (``source`` names it in errors). Unknown keys,
    duplicate keys, wrong types and out-of-range values raise ``LmforgeError`` naming the file, the line
    and the key.
    """
    if isinstance(path_or_text, PurePath):
        source = source or str(path_or_text)
        try:
            text = Path(path_or_text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LmforgeError(f"--config {source}: no such file") from None
        except IsADirectoryError:
            raise LmforgeError(f"--config {source}: is a folder, not a YAML file") from None
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--config {source}: not UTF-8 text (byte {e.start})") from None
    else:
        text, source = path_or_text, source or "<config>"
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        pairs = [] if root is None else root.value
        if root is not None and not isinstance(root, yaml.MappingNode):
            raise LmforgeError(f"{source}:{root.start_mark.line + 1}: expected 'key: value' lines at the top level")
        items = [(k.start_mark.line + 1, loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                 for k, v in pairs]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise LmforgeError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    fields = dict((f.name, (f, tp)) for f, tp in _fields_with_types(cls))
    values: dict[str, Any] = {}
    for line, key, value in items:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LmforgeError(f"{source}:{line}: unknown key {key!r}{hint} (allowed: {', '.join(fields)})")
        if key in values:
            raise LmforgeError(f"{source}:{line}: {key} is given twice")
        try:
            values[key] = check_value(*fields[key], value)
        except ValueError as e:
            raise LmforgeError(f"{source}:{line}: {key}: {e}") from None
    return values


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """A validated ``cls``: its defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    values = from_yaml(cls, Path(path)) if path is not None else {}
    names = [f.name for f in recipe_fields(cls)]
    for key in overrides or {}:
        if key not in names:
            raise LmforgeError(f"unknown {getattr(cls, 'recipe', cls.__name__)} setting {key!r}")
    values.update(overrides or {})
    for f, tp in _fields_with_types(cls):
        if f.name not in values and default_of(f) is dataclasses.MISSING:
            raise LmforgeError(f"{_label(f, tp)} is required: give it on the command line or in the --config file")
    cfg = cls(**values)
    validate(cfg)
    return cfg


def write_config(cfg: Any, out_dir: str | os.PathLike) -> Path:
    """Write ``to_yaml(cfg)`` to ``out_dir/config.yaml`` atomically (``lmforge.io``); by rank 0 only in a job
    started by torchrun (the other ranks run the same recipe)."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return Path(out_dir) / "config.yaml"
    return write_text_atomic(Path(out_dir) / "config.yaml", to_yaml(cfg))
