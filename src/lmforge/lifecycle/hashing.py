"""The stage hash: what decides whether a lifecycle stage is unchanged and can be skipped on a re-run.

``stage_hash`` is sha256 over the stage's resolved settings (``stage_settings``), the task, the data files'
content hashes (computed once per run, in ``Context.fingerprints``) and the hashes of the stages it reads
(``stages.READS``), so a changed input re-runs the stage and every stage that reads it, directly or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.lifecycle.config import LifecycleConfig
from lmforge.lifecycle.stages import READS, Context


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def stage_settings(cfg: LifecycleConfig, stage: str) -> Any:
    """The settings one stage depends on (besides the task, the data and the stages it reads)."""
    section = {"select": {"candidates": cfg.candidates, "select": cfg.select}}.get(stage, getattr(cfg, stage))
    return _plain({"section": section, "device": cfg.device})


def stage_hash(ctx: Context, stage: str) -> str:
    """sha256 over the stage's settings, the task, the data files' hashes and the hashes of the stages it reads."""
    cfg = ctx.cfg
    for key, path in cfg.data_files().items():
        if key not in ctx.fingerprints:
            ctx.fingerprints[key] = file_hash(path)
    upstream = {s: ctx.records[s]["hash"] for s in READS[stage] if s in ctx.records}
    blob = json.dumps({"stage": stage, "settings": stage_settings(cfg, stage), "task": _plain(cfg.task),
                       "data": ctx.fingerprints, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
