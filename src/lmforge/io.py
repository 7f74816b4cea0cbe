"""Reading and writing files: the one atomic-write policy and the one JSON / text reader.

Every file lmforge writes goes through ``atomic_path`` (directly or via ``write_text_atomic``,
``write_bytes_atomic``, ``write_json_atomic`` or ``atomic_open``), so every writer has the same durability:

1. the content goes to a temporary file in the destination's folder, named ``.NAME.XXXXXXXX.tmp`` (a name the
   output policy in ``lmforge.outputs`` counts as the verb's own, and ``tempfile`` makes unique, so two
   writers never share one);
2. the temporary file is flushed and fsynced, then given the usual permissions (``0o666`` less the umask;
   ``tempfile`` would leave ``0o600``);
3. ``os.replace`` renames it over ``NAME`` (a reader sees the old file or the new one, never half of one);
4. the folder is fsynced, so that the rename itself survives a power cut.

If anything fails before the rename the temporary file is removed and ``NAME`` is left as it was. Readers:
``read_text`` (UTF-8, gunzipped when the name ends in ``.gz``) and ``read_json`` / ``read_json_object``;
their errors are ``LmforgeError`` naming the file. Standard library only (a leaf: no torch, no numpy).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lmforge.errors import LmforgeError

__all__ = ["atomic_open", "atomic_path", "fsync_dir", "fsync_file", "read_json", "read_json_object", "read_text",
           "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


# ----------------------------------------------------------------------------- durability primitives
def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s content to the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush ``path``'s entries (renames, new names) to the disk; a no-op where folders cannot be opened
    (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _usual_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(PATH) as tmp: writer(tmp)``: a temporary path beside ``PATH`` for a writer that
    takes a file name (``safetensors.save_file``, ``savefig``...); when the block ends without an error the
    temporary file is fsynced and renamed over ``PATH`` and the folder fsynced, else it is removed. The
    folder is created when missing. See the module docstring for the policy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, _usual_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(PATH, "w" | "wb") as f: f.write(...)``: a file that replaces ``PATH`` only once the
    block has ended without an error (``atomic_path``'s policy). Text mode writes UTF-8."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()


def write_text_atomic(path: str | os.PathLike, text: str | Iterable[str]) -> Path:
    """Write ``text`` (a string, or pieces of one: lines from a generator) to ``path`` as UTF-8, atomically."""
    with atomic_open(path, "w") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            for piece in text:
                f.write(piece)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, not ASCII-escaped, ``indent`` spaces, a final newline) to ``path``
    atomically."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"write_json_atomic(path, data): path must be a str or a path, got {type(path).__name__}")
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- reading
def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, gunzipped when its name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise LmforgeError(f"{path} cannot be read: {e}") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path`` (``.gz`` allowed); errors name the file, line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """``read_json`` for a file that must hold a JSON object (a config file)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
