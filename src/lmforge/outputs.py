"""Where a verb may write: one output policy for every command that writes files, and a lock per run folder.

Every writing verb (``pretrain``, ``finetune``, ``rlhf ppo``/``dpo``, ``reward train``, ``merge``, ``export``,
``prune``, ``eval``, ``compare``, ``tokenizer train``, ``embed -o FILE``) passes its output path through this module
before it writes anything. The rules:

- A folder is written only into a folder: an existing file where a folder is expected (or a folder where a
  file is expected) is refused.
- A verb writes only the names listed for it in ``VERBS`` (``metrics.jsonl``, ``checkpoint/``, ``final/``...).
  Nothing else in the folder is ever renamed, moved or deleted.
- A non-empty folder that is not this verb's own output is refused unless ``--force``; ``--force`` lets the
  verb write its own names there and leaves every other file as it is.
- A folder that already holds a training run is refused unless ``--resume`` (continue it) or
  ``--overwrite`` (start afresh: only the run's own names are removed first; the user's files stay).
- An earlier ``merge`` or ``export`` output is replaced only with ``--force``; ``eval``, ``compare`` and
  ``tokenizer train`` rewrite their own earlier output in place (their two or three files, nothing else).
- A run holds ``OUT/.lmforge.lock`` while it writes: a second run in the same folder is refused with a
  message naming the first (pid, host, command, start time). The kernel drops the lock when its process ends,
  however it ends, so a lock file left by a dead process is simply taken over.
- ``OUT/.lmforge-run.json`` records which verb wrote the folder, so that a later run knows whose files are
  whose.

Recipes use the ``claims_output`` decorator (the Python API is protected as well as the command line);
commands that are not recipes use ``check_output`` (early, before the slow part) and ``claim_output``
(a context manager: check, lock, record). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import inspect
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: an exclusively created lock file instead of a kernel lock
    fcntl = None

LOCK = ".lmforge.lock"
MANIFEST = ".lmforge-run.json"
IGNORED = (LOCK, MANIFEST, MANIFEST + ".tmp", ".DS_Store")  # never the user's files, never a reason to refuse
# (nor the manifest's temporary ``..lmforge-run.json.*.tmp``, see ``_ignored``); every other temporary file
# that lmforge.io writes is named ``.NAME.*.tmp``, which ``_matches`` counts as the verb's own ``NAME``


@dataclass(frozen=True)
class Verb:
    """What a verb writes (names or glob patterns at the top of its output) and how its earlier output is treated."""

    writes: tuple[str, ...]
    run: bool = False      # a training run: never silently restarted (--resume or --overwrite)
    resume: bool = False   # has --resume
    rewrite: bool = False  # rewrites its own earlier output without --force (reports, tokenizers)
    kind: str = "folder"   # "folder" or "file"


_RUN = ("metrics.jsonl", "loss.png", ".loss.tmp.png", "checkpoint", ".checkpoint.old", ".checkpoint.tmp-*", "final",
        "metrics.csv", "tb", "wandb", "mlruns")  # the last four: --logger (training/tracking.py)
_HF_DIR = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

VERBS: dict[str, Verb] = {
    "pretrain": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "finetune": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "distill": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "rlhf ppo": Verb(_RUN + ("config.yaml", "config.json"), run=True, resume=True),  # config.json: earlier runs
    "rlhf dpo": Verb(_RUN + ("config.yaml", "config.json"), run=True, resume=True),
    "rlhf orpo": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "rlhf simpo": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "rlhf kto": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "rlhf grpo": Verb(_RUN + ("config.yaml",), run=True, resume=True),
    "reward train": Verb(_HF_DIR + ("reward_config.json", "head", "config.yaml")
                         + tuple(n for n in _RUN if n != "final"), run=True, resume=True),
    "merge": Verb(_HF_DIR),
    "export": Verb(_HF_DIR + ("chat_template.jinja",)),  # --format hf
    "prune": Verb(_HF_DIR + ("chat_template.jinja", "masks.safetensors", "prune.json")),
    "quantize": Verb(_HF_DIR + ("chat_template.jinja",)),
    "tokenizer train": Verb(("tokenizer.json", "tokenizer_config.json"), rewrite=True),
    "eval": Verb(("predictions.jsonl", "summary.json", "config.yaml"), rewrite=True),
    "compare": Verb(("report.md", "report.html", "chart_*.png", "config.yaml", "config.json", "runs"), rewrite=True),
    "embed": Verb((), kind="file"),
}


def verb_policy(verb: str) -> Verb:
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}; known: {', '.join(VERBS)}")
    return VERBS[verb]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".tmp")
               or fnmatch.fnmatchcase(name, f".{p}.*") for p in patterns)


def owned(name: str, verb: str) -> bool:
    """Whether ``name`` (an entry at the top of an output folder) is one that ``verb`` writes, or its temporary."""
    return _matches(name, verb_policy(verb).writes)


def _ignored(name: str) -> bool:
    return name in IGNORED or fnmatch.fnmatchcase(name, f".{MANIFEST}.*.tmp")  # lmforge.io's temporary


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not _ignored(p.name))


def recorded_verb(folder: str | os.PathLike) -> str | None:
    """The verb named in ``folder``'s run manifest, or None."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    verb = data.get("verb") if isinstance(data, dict) else None
    return verb if verb in VERBS else None


def held_run(folder: Path) -> str | None:
    """The training verb whose run ``folder`` holds, "training" for a run written before manifests, or None."""
    verb = recorded_verb(folder)
    if verb is not None:
        return verb if VERBS[verb].run and any(owned(n, verb) for n in _entries(folder)) else None
    if (folder / "metrics.jsonl").is_file() or any((folder / d / "state.json").is_file()
                                                    for d in ("checkpoint", ".checkpoint.old")):
        return "training"
    return "reward train" if (folder / "reward_config.json").is_file() else None


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def written_names(verb: str) -> str:
    return ", ".join(n + ("/" if n in ("checkpoint", "final", "head", "runs") else "") for n in verb_policy(verb).writes
                     if not n.startswith("."))


def check_output(path: str | os.PathLike, verb: str, *, resume: bool = False, overwrite: bool = False,
                 force: bool = False, kind: str | None = None) -> list[str]:
    """Refuse (``LmforgeError``) what the policy forbids; changes nothing. Returns the entries that
    ``overwrite`` will remove (the earlier run's own names), else []. See the module docstring for the rules."""
    path, v = Path(path), verb_policy(verb)
    kind = kind or v.kind
    if resume and overwrite:
        raise LmforgeError("give --resume (continue the run) or --overwrite (start afresh), not both")
    if kind == "file":
        if path.is_dir():
            raise LmforgeError(f"{path} is a folder; `lmforge {verb}` writes a file: give a file name")
        if path.exists() and not force:
            raise LmforgeError(f"{path} already exists; pass --force to replace it, or choose another file name")
        parent = path.parent
        if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):  # refuse before the slow part
            raise LmforgeError(f"cannot write {path}: the folder {parent} does not let you create files "
                               "(permission denied); choose another file name")
        return []
    if path.exists() and not path.is_dir():
        raise LmforgeError(f"{path} is a file, not a folder; `lmforge {verb}` writes a folder: choose another "
                           "output folder (nothing was written)")
    entries = _entries(path) if path.is_dir() else []
    if resume:
        earlier = held_run(path) if entries else None
        if earlier is None:
            raise LmforgeError(f"--resume: {path} holds no `lmforge {verb}` run to continue (no checkpoint)")
        if earlier not in (verb, "training"):
            raise LmforgeError(f"--resume: {path} holds a `lmforge {earlier}` run, not a `lmforge {verb}` run")
        return []
    if not entries:
        return []
    earlier = held_run(path) if v.run else None
    if earlier is not None:
        mine = [n for n in entries if owned(n, verb) or _matches(n, _RUN if earlier == "training"
                                                                   else VERBS[earlier].writes)]
        if not overwrite:
            how = "pass --resume to continue it or --overwrite" if v.resume and earlier in (verb, "training") \
                else "pass --overwrite"
            run = "a training run" if earlier == "training" else f"a `lmforge {earlier}` run"
            raise LmforgeError(f"{path} already holds {run} ({_some(mine)}); {how} to start afresh (only the "
                               "run's own files are removed), or choose another output folder")
        return mine
    recorded, mine = recorded_verb(path), [n for n in entries if owned(n, verb)]
    if (recorded == verb and mine) or (recorded is None and len(mine) == len(entries)):
        if v.rewrite or force:
            return []
        raise LmforgeError(f"{path} is not empty: it holds an earlier output of `lmforge {verb}` "
                           f"({_some(entries)}); pass --force to replace those files, or choose another output folder")
    if not force:
        theirs = [n for n in entries if not owned(n, verb)]
        raise LmforgeError(f"{path} is not empty and is not an output folder of `lmforge {verb}` (it holds "
                           f"{_some(theirs)}); pass --force to write into it anyway (only {written_names(verb)} are "
                           "written; nothing else is changed or deleted), or choose another output folder")
    return []


def prepare_output(path: str | os.PathLike, verb: str, *, resume: bool = False, overwrite: bool = False,
                   force: bool = False, kind: str | None = None) -> Path:
    """Apply the policy to ``path`` for ``verb`` and make it ready: refuse what is forbidden, create the folder
    (a file's parent folder), remove an earlier run's own files with ``overwrite``, record the verb in the
    folder's manifest. Returns the path. Hold the folder's ``RunLock`` around it (``claim_output`` does)."""
    path, v = Path(path), verb_policy(verb)
    remove = check_output(path, verb, resume=resume, overwrite=overwrite, force=force, kind=kind)
    if (kind or v.kind) == "file":
        _mkdir(path.parent)
        return path
    _mkdir(path)
    for name in remove:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    recorded = recorded_verb(path)
    if recorded is None or (recorded != verb and (v.run or not VERBS[recorded].run)):  # a run's record stays
        _write_manifest(path, verb)
    return path


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LmforgeError(f"cannot create the folder {path}: a part of that path is a file") from None
    except OSError as e:  # permission denied, a read-only file system, no space...
        raise LmforgeError(f"cannot create the folder {path}: {e.strerror or e}; choose another output folder "
                           "(nothing was written)") from None


def _write_manifest(folder: Path, verb: str) -> None:
    write_json_atomic(folder / MANIFEST, {"verb": verb, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=None)


# ----------------------------------------------------------------------------- inputs
def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_inputs(path: str | os.PathLike, verb: str, inputs: dict[str, Any], *, strict: bool = False) -> None:
    """Refuse an output that would write over what the verb reads: an input (``{"model": PATH, ...}``;
    names that are not local paths are skipped) that is ``path`` itself or lies under one of the names the
    verb writes there, or, with ``strict`` (``merge``), any overlap at all: one folder inside the other."""
    out = Path(path).resolve()
    for what, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        src = Path(value).resolve()
        if strict:
            clash = _inside(src, out) or _inside(out, src)
        else:
            clash = src == out or (_inside(src, out) and owned(src.relative_to(out).parts[0], verb))
        if clash:
            where = "is" if src == out else "is inside" if _inside(out, src) else "contains"
            raise LmforgeError(f"the output {path} {where} the {what} {value} that `lmforge {verb}` reads: writing "
                               "there would destroy its input; choose another output folder (--force does not "
                               "change this)")


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on an output folder for the length of a run (``with RunLock(folder, verb): ...``).

    ``folder/.lmforge.lock`` is locked with ``fcntl.flock`` and holds the owner's pid, host, verb, command and
    start time; a second ``RunLock`` on the folder (another process, or another one in this process) is
    refused with an error naming them. The kernel releases the lock when the owner ends, even by SIGKILL,
    so a lock file left behind by a dead process is taken over. Without ``fcntl`` (Windows) the file is
    created exclusively instead and a stale one must be deleted by hand."""

    def __init__(self, folder: str | os.PathLike, verb: str):
        self.folder, self.verb = Path(folder), verb
        self.path = self.folder / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (os.O_EXCL if fcntl is None else 0), 0o644)
            except FileExistsError:
                raise self._busy() from None
            except OSError as e:  # a read-only or permission-denied folder
                raise LmforgeError(f"cannot write into {self.folder}: creating its lock file {LOCK} failed "
                                   f"({e.strerror}); choose another output folder (nothing was written)") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise self._busy() from None
                    raise LmforgeError(f"cannot lock {self.path}: {e.strerror}") from None
                if not self._still_there(fd):  # released and removed between our open and flock: try again
                    os.close(fd)
                    continue
            me = {"pid": os.getpid(), "host": socket.gethostname(), "verb": self.verb,
                  "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(me) + "\n").encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still locked: whoever opened it retries on the new file
            os.close(self.fd)
            self.fd = None

    def _still_there(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def holder(self) -> dict:
        """What the current lock file says about its owner ({} when unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _busy(self) -> LmforgeError:
        h = self.holder()
        who = (f"`lmforge {h.get('verb', '?')}` (pid {h.get('pid', 'unknown')} on {h.get('host', '?')}, "
               f"started {h.get('started', '?')})")
        hint = "" if fcntl is not None else f"; if that process is gone, delete {self.path}"
        return LmforgeError(f"{self.folder} is in use by another run: {who}; wait for it to finish or choose "
                            f"another output folder{hint}")


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, verb: str, *, resume: bool = False, overwrite: bool = False,
                 force: bool = False) -> Iterator[Path]:
    """``with claim_output(OUT, verb, ...) as out:``: check the policy, create the folder, lock it for the
    block, then ``prepare_output``. A folder this created that is still empty at the end is removed again."""
    path = Path(path)
    flags = dict(resume=resume, overwrite=overwrite, force=force)
    check_output(path, verb, **flags)  # refuse before creating anything
    if verb_policy(verb).kind == "file":
        yield prepare_output(path, verb, **flags)
        return
    created = not path.exists()
    _mkdir(path)
    try:
        with RunLock(path, verb):
            yield prepare_output(path, verb, **flags)
    finally:
        if created and not _entries(path):  # the verb failed before writing anything
            with contextlib.suppress(OSError):
                (path / MANIFEST).unlink(missing_ok=True)
                path.rmdir()


def launched_rank() -> int:
    """This process's RANK in a job started by torchrun (0 otherwise): only rank 0 claims and writes output."""
    rank = os.environ.get("RANK", "")
    return int(rank) if rank.isdigit() else 0


def claims_output(verb: str, *, path: str = "out_dir", inputs: tuple[str, ...] = (), config: str | None = None):
    """Decorate a recipe whose parameter ``path`` names its output folder: before the recipe runs, its
    ``inputs`` parameters are checked (``check_inputs``) and the folder is claimed (``claim_output`` with
    the recipe's ``resume``/``overwrite``/``force`` parameters, False where it has none) until it returns or
    raises. A ``path`` of None (nothing written) is let through. With ``config`` (the name of the parameter
    holding a recipe config dataclass), ``path`` and ``inputs`` are read from that config's fields."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def recipe(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if config is not None:
                a = {**a, **vars(a[config])}
            if a[path] is None or launched_rank() != 0:  # rank 0 of a torchrun job claims the folder for all
                return fn(*args, **kwargs)
            check_inputs(a[path], verb, {name: a.get(name) for name in inputs})
            with claim_output(a[path], verb, resume=a.get("resume", False), overwrite=a.get("overwrite", False),
                              force=a.get("force", False)):
                return fn(*args, **kwargs)
        return recipe
    return wrap
