"""Command-line flags derived from a recipe config dataclass (see ``lmforge.recipe_config``).

``add_recipe_args`` adds one flag per CLI field, named ``--field-name`` plus the field's ``option(flags=...)``
aliases, with the field's docstring as help; ``add_config_args`` adds ``--config FILE.yaml`` and
``--print-config``; ``recipe_from_args`` builds the config: defaults < ``--config`` file < flags given on
the command line. Flags store raw text (their argparse default is ``SUPPRESS``, so only the flags actually
given appear in the namespace); the text is converted and checked here and in ``recipe_config.validate``,
and every bad value is an ``LmforgeError`` naming the flag.

How types become flags:

- ``bool``: a pair, ``--name`` (True) and ``--no-name`` (False), so a flag can undo either value a
  ``--config`` file set; aliases starting with ``--no-`` set False, the others True.
- ``X | None``: a value of X, or the word ``none`` (any case) for None.
- ``tuple[X, ...]`` / ``list[X]``: one or more values (``--train a.jsonl b.jsonl``); with
  ``option(sep=",")`` one token split on the separator instead (``--lora-targets q_proj,v_proj``).
  ``X | tuple[X, ...]`` (one value or several, e.g. ``--reference-field summary1,summary2``) takes the same form.
- ``Literal[...]``: one of its values (shown as ``{a,b}``). ``dict`` fields need ``option(cli=False)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import PurePath
from typing import Any, Literal

from lmforge import recipe_config as rc
from lmforge.errors import LmforgeError
from lmforge.training.tracking import Tracking, check_available

_FIELDS = "_recipe_fields"  # namespace attribute: the fields add_recipe_args turned into arguments


class _Bool(argparse.Action):
    """``--name`` / ``--no-name`` in one action: the option strings in ``off`` store False, the others True."""

    def __init__(self, option_strings: list[str], dest: str, off: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.off = set(off)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        setattr(namespace, self.dest, option_string not in self.off)


def _members(tp: Any) -> tuple[list[Any], bool]:
    """The non-None members of a type and whether None is allowed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _sequence_item(tp: Any) -> Any | None:
    """The item type of ``tuple[X, ...]`` / ``list[X]`` (or of its ``| None``, or of ``X | tuple[X, ...]``: one
    value or several), else None."""
    members, _ = _members(tp)
    seqs = [m for m in members if typing.get_origin(m) in (tuple, list)]
    if len(seqs) == 1:
        args = typing.get_args(seqs[0])
        item = args[0] if args else str
        if all(m is seqs[0] or m == item for m in members):
            return item
    return None


def _scalar_ok(tp: Any) -> bool:
    members, _ = _members(tp)
    return all(m in (int, float, str, bool, Any) or typing.get_origin(m) is Literal
               or (isinstance(m, type) and issubclass(m, PurePath)) for m in members)


def _from_text(tp: Any, text: str) -> Any:
    """One CLI token as ``tp`` (not range-checked: ``validate`` does that); ``ValueError`` if it is not one."""
    members, optional = _members(tp)
    if optional and text.lower() == "none":
        return None
    for m in members:
        if m in (str, Any):
            return text
        if typing.get_origin(m) is Literal:
            for choice in typing.get_args(m):
                if text == str(choice):
                    return choice
        elif m is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        elif m in (int, float):
            try:
                return m(text)
            except ValueError:
                pass
        elif isinstance(m, type) and issubclass(m, PurePath) and text:
            return m(text)
    raise ValueError(text)


def _default_text(f: dataclasses.Field, tp: Any) -> str:
    value = rc.default_of(f)
    if value is dataclasses.MISSING:
        return "required"
    if tp is bool:
        return "default: " + ("on" if value else "off")
    if isinstance(value, (list, tuple)):
        return "default: " + ((rc.field_spec(f).sep or " ").join(map(str, value)) or "empty")
    return f"default: {'none' if value is None else value}"


def add_recipe_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    skip: tuple[str, ...] = (), positional: tuple[str, ...] = ()) -> None:
    """Add an argument for every CLI field of ``cls`` except ``skip``; ``positional`` fields take no dashes.

    Fields with ``option(group=...)`` go into argument groups of that title (when ``parser`` is a parser).
    Raises ``TypeError`` for a CLI field whose type has no flag form (mark it ``option(cli=False)``).
    """
    hints, helps, groups, names = rc.field_types(cls), rc.field_help(cls), {}, []
    for f in rc.recipe_fields(cls):
        spec, tp = rc.field_spec(f), hints[f.name]
        if not spec.cli or f.name in skip:
            continue
        item = _sequence_item(tp)
        if not _scalar_ok(item if item is not None else tp):
            raise TypeError(f"{cls.__name__}.{f.name}: {tp} has no command-line form; use option(cli=False)")
        target = parser
        if spec.group and isinstance(parser, argparse.ArgumentParser):
            target = groups.get(spec.group) or groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        text = " ".join(helps[f.name].split()).replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                      help=f"{text} ({_default_text(f, tp)})".strip())
        members, _ = _members(item if item is not None else tp)
        choices = spec.choices or (typing.get_args(members[0]) if typing.get_origin(members[0]) is Literal else None)
        if choices and len(members) == 1:
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        if f.name in positional:
            if tp is bool:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool cannot be positional")
            kwargs.pop("dest")
            kwargs.setdefault("metavar", f.name.upper())
            target.add_argument(f.name, nargs="*" if item is not None and not spec.sep else "?", **kwargs)
        elif tp is bool:
            on = [s for s in spec.flags if not s.startswith("--no-")] + [f"--{f.name.replace('_', '-')}"]
            off = [s for s in spec.flags if s.startswith("--no-")] + [f"--no-{f.name.replace('_', '-')}"]
            first, second = (off, on) if rc.default_of(f) is True else (on, off)
            flags = list(dict.fromkeys(first + second))
            target.add_argument(*flags, action=_Bool, off=tuple(off), **kwargs)
        else:
            flags = list(dict.fromkeys([*spec.flags, "--" + f.name.replace("_", "-")]))
            nargs = "+" if item is not None and not spec.sep else None
            target.add_argument(*flags, nargs=nargs, **kwargs)
        names.append(f.name)
    parser.set_defaults(**{_FIELDS: (*(parser.get_default(_FIELDS) or ()), *names)})


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--config FILE.yaml`` (settings from a file; flags override it) and ``--print-config``."""
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml", default=None,
                        help="read the settings from this YAML file (as --print-config prints it and every run "
                             "writes it to OUT_DIR/config.yaml); flags given on the command line override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the full resolved configuration as YAML and exit without running")


def _convert(f: dataclasses.Field, tp: Any, raw: Any) -> Any:
    """What a flag stored (text, a list of texts, or a bool) as a value of the field's type."""
    item, sep, optional = _sequence_item(tp), rc.field_spec(f).sep, _members(tp)[1]
    try:
        if isinstance(raw, bool):
            return raw
        if item is None:
            return _from_text(tp, raw)
        if isinstance(raw, str):  # a sep-split list: one token
            raw = [raw] if raw.lower() == "none" else [t.strip() for t in raw.split(sep) if t.strip()]
        if optional and len(raw) == 1 and raw[0].lower() == "none":
            return None
        return [_from_text(item, t) for t in raw]
    except ValueError as e:
        raise LmforgeError(f"{rc.main_flag(f, tp)}: expected {rc.describe_type(tp)}, got {str(e)!r}") from None


def recipe_from_args(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """The validated config: defaults < ``--config`` file < flags given < ``overrides`` (values the caller
    parsed itself, e.g. for ``skip``-ped fields). With ``--print-config`` the YAML is printed to stdout;
    the caller then exits."""
    hints = rc.field_types(cls)
    registered = getattr(namespace, _FIELDS, None)
    given = {f.name: _convert(f, hints[f.name], getattr(namespace, f.name)) for f in rc.recipe_fields(cls)
             if hasattr(namespace, f.name) and (registered is None or f.name in registered)}
    cfg = rc.load_config(cls, getattr(namespace, "config_file", None), {**given, **overrides})
    if getattr(namespace, "print_config", False):
        sys.stdout.write(rc.to_yaml(cfg))
    elif isinstance(cfg, Tracking):  # a --logger whose package is missing: one line before any model loads
        check_available(cfg.logger)
    return cfg
