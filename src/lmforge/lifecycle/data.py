"""The lifecycle's data split: a task that ships one file gets its dev and test sets carved out of it.

With ``task.split_dev`` set, the train file's records are shuffled with ``split_seed`` and written as JSON lines:
``split_dev`` to ``OUT/data/dev.jsonl``, ``split_test`` to ``OUT/data/test.jsonl``, the rest to
``OUT/data/train.jsonl`` (each atomically, and only when its content changes, so the stage hashes, which cover
the files' bytes, stay the same on a re-run). The task then points at those files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmforge.data.records import load_records
from lmforge.errors import LmforgeError
from lmforge.io import write_text_atomic
from lmforge.lifecycle.config import Task


def split_task(task: Task, out: Path) -> None:
    """Write the split files under ``out/data`` and point ``task`` at them (nothing to do without split_dev)."""
    if task.split_dev is None:
        return
    records = load_records(task.train)
    need = task.split_dev + task.split_test + 1
    if len(records) < need:
        raise LmforgeError(f"task.split_dev: {task.train} has {len(records)} records; split_dev + split_test "
                           f"leave none to train on (need at least {need})")
    order = list(range(len(records)))
    random.Random(task.split_seed).shuffle(order)
    parts = {"dev": order[:task.split_dev], "test": order[task.split_dev:task.split_dev + task.split_test],
             "train": order[task.split_dev + task.split_test:]}
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {"test": None}
    for name, idx in parts.items():
        if not idx:
            continue
        text = "".join(json.dumps(records[i].fields, ensure_ascii=False) + "\n" for i in sorted(idx))
        path = folder / f"{name}.jsonl"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text_atomic(path, text)
        paths[name] = path
    task.train, task.dev, task.test = paths["train"], paths["dev"], paths["test"]
