"""The lifecycle runner: which stages run, which are skipped as unchanged, in what order, and the checks done
before anything is written.

``run_lifecycle(cfg)`` walks the stages in lifecycle order (select, adapt, align, evaluate, optimise, deploy).
A stage the run includes is skipped when ``OUT/<stage>/stage.json`` holds its current hash ("skip adapt:
unchanged"); otherwise its old ``stage.json`` is removed, the stage runs (``stages.RUNNERS``) and its record is
written atomically, last. ``force`` re-runs the named stage and every later one. A task with ``split_dev`` has
its dev/test files carved out of the train file first (``data.py``). A stage the run leaves out
(``--stages``) lends its ``stage.json`` on disk to the stages that read it. Before anything is written the plan
is checked: every data file exists, every stage a planned stage reads is planned or has its output on disk; a
problem is one ``LmforgeError`` naming the key. The folder is locked (``lmforge.outputs.RunLock``) while it runs,
and ``report.md`` / ``report.html`` are rewritten at the end.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.io import read_json_object, write_json_atomic
from lmforge.lifecycle.config import STAGES, LifecycleConfig
from lmforge.lifecycle.data import split_task
from lmforge.lifecycle.hashing import stage_hash
from lmforge.lifecycle.stages import READS, RUNNERS, STAGE_FILE, Context
from lmforge.outputs import LOCK, RunLock


def owned(name: str) -> bool:
    """Whether a name at the top of a run folder is one the lifecycle writes."""
    return (name in (*STAGES, "data", "report.md", "report.html", LOCK) or fnmatch.fnmatchcase(name, "chart_*.png")
            or fnmatch.fnmatchcase(name, ".report.*") or fnmatch.fnmatchcase(name, ".chart_*"))


def _read_record(out: Path, stage: str) -> dict | None:
    path = out / stage / STAGE_FILE
    if not path.is_file():
        return None
    try:
        record = read_json_object(path)
    except (LmforgeError, OSError, ValueError):
        return None
    return record if isinstance(record.get("hash"), str) else None


def plan_stages(cfg: LifecycleConfig, stages: Sequence[str] | None = None) -> list[str]:
    """The stages this run executes (or skips as unchanged), in lifecycle order."""
    wanted = list(stages) if stages else list(cfg.enabled())
    for s in wanted:
        if s not in STAGES:
            raise LmforgeError(f"--stages: unknown stage {s!r} (stages: {', '.join(STAGES)})")
        if s in ("align", "optimise") and getattr(cfg, s) is None:
            raise LmforgeError(f"--stages: {s!r} needs a {s} section in the recipe")
    return [s for s in STAGES if s in wanted]


def check_plan(cfg: LifecycleConfig, plan: list[str], force: Sequence[str]) -> None:
    """Refuse, before anything is written: a missing data file, a forced stage outside the plan, a planned stage
    whose input stage neither runs now nor has its output on disk."""
    for key, path in cfg.data_files().items():
        if not Path(path).is_file():
            raise LmforgeError(f"{key}: {path}: no such file")
    for s in force:
        if s not in STAGES:
            raise LmforgeError(f"--force: unknown stage {s!r} (stages: {', '.join(STAGES)})")
        if s not in plan:
            raise LmforgeError(f"--force {s}: {s} is not among the stages of this run ({', '.join(plan)})")
    out, enabled = Path(cfg.out), cfg.enabled()
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"out: {out} is a file, not a folder; choose another run folder")
    foreign = [p.name for p in out.iterdir() if not owned(p.name)] if out.is_dir() else []
    if foreign:
        raise LmforgeError(f"out: {out} holds files that are not a lifecycle run's ({', '.join(sorted(foreign)[:3])}"
                           f"{' ...' if len(foreign) > 3 else ''}); choose an empty or earlier lifecycle run folder")
    for s in plan:
        for needed in READS[s]:
            if needed in plan or needed not in enabled and needed in ("align", "optimise"):
                continue
            if needed == "select" and "select" not in enabled and len(cfg.candidates) == 1:
                continue  # the only candidate is the selected one
            if _read_record(out, needed) is None:
                raise LmforgeError(f"stage {s} reads the output of {needed}, but {out / needed / STAGE_FILE} does "
                                   f"not exist: run {needed} first (--stages {needed},{s})")


def run_lifecycle(cfg: LifecycleConfig, *, stages: Sequence[str] | None = None, force: Sequence[str] = (),
                  progress: bool = True, command: str = "lmforge lifecycle",
                  log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run the lifecycle ``cfg`` describes (only ``stages`` when given); returns every stage record by stage."""
    from lmforge.lifecycle.report import write_report

    plan = plan_stages(cfg, stages)
    check_plan(cfg, plan, force)
    out = Path(cfg.out)
    ctx = Context(cfg=cfg, out=out, progress=progress)
    if log is not None:
        ctx.log = log
    forced_from = min((STAGES.index(s) for s in force), default=len(STAGES))
    enabled = cfg.enabled()
    status: dict[str, str] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    with RunLock(out, "lifecycle"):
        split_task(cfg.task, out)
        for i, stage in enumerate(STAGES):
            if stage not in enabled and stage not in plan:
                continue
            old = _read_record(out, stage)
            if stage not in plan:
                if old is not None:
                    ctx.records[stage] = old
                continue
            h = stage_hash(ctx, stage)
            n = f"[{plan.index(stage) + 1}/{len(plan)}]"
            if old is not None and old["hash"] == h and i < forced_from:
                ctx.log(f"{n} skip {stage}: unchanged (hash {h[:12]})")
                ctx.records[stage], status[stage] = old, "skipped (unchanged)"
                continue
            why = "forced" if i >= forced_from and old is not None else "changed" if old is not None else "new"
            ctx.log(f"{n} {stage}: running ({why}, hash {h[:12]})")
            d = out / stage
            d.mkdir(parents=True, exist_ok=True)
            (d / STAGE_FILE).unlink(missing_ok=True)  # a stage killed half-way is never taken as finished
            start = time.perf_counter()
            record = RUNNERS[stage](ctx, d, h)
            record = {"stage": stage, "hash": h, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "seconds": round(time.perf_counter() - start, 1), **record}
            write_json_atomic(d / STAGE_FILE, record)
            ctx.records[stage], status[stage] = record, f"ran ({why})"
            ctx.log(f"{n} {stage}: done in {record['seconds']:.0f} s" + (f" - {record['decision']}"
                                                                         if record.get("decision") else ""))
        paths = write_report(cfg, ctx.records, status, command)
    print(f"wrote {paths['md']} and {paths['html']}", file=sys.stderr)
    return ctx.records
