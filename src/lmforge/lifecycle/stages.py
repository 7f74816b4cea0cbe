"""The six lifecycle stages: what each reads, what it runs and what it records.

Each stage is a function ``(ctx, stage_dir) -> record``: it runs one existing verb in-process (``compare``'s
``run_compare``, ``finetune``, ``rlhf dpo``, ``lmforge serve`` as a subprocess) with its output under
``OUT/<stage>/`` and returns the record that ``run.py`` writes to ``OUT/<stage>/stage.json`` last: ``outputs``
(what later stages read, e.g. the adapted model), a ``table`` (header + rows, shown in the report), a
``decision`` (the gate's choice and why, in words) and ``charts`` (metric -> labels and values).

``READS`` says which earlier stages each stage reads; ``hashing.stage_hash`` is sha256 over the stage's resolved
settings, the task, the data files' content hashes and the hashes of the stages it reads, so a changed input
re-runs the stage and every stage that reads it, directly or not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.checkpoints.resolve import DEFAULT_MODEL
from lmforge.errors import LmforgeError
from lmforge.evaluation.compare import CompareConfig, Setting, run_compare
from lmforge.evaluation.report import LOWER_IS_BETTER, fmt_cell
from lmforge.io import write_text_atomic
from lmforge.lifecycle.config import LifecycleConfig
from lmforge.recipe_config import to_yaml

READS: dict[str, tuple[str, ...]] = {
    "select": (), "adapt": ("select",), "align": ("adapt",), "evaluate": ("select", "adapt", "align"),
    "optimise": ("adapt", "align"), "deploy": ("adapt", "align"),
}
STAGE_FILE = "stage.json"


@dataclass
class Context:
    """What a stage sees: the config, the run folder, the records of the stages before it, a progress printer."""

    cfg: LifecycleConfig
    out: Path
    records: dict[str, dict] = field(default_factory=dict)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    progress: bool = True
    fingerprints: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- shared pieces
def model_ref(final: str | Path, base: str | None) -> dict[str, str | None]:
    """A trained run's ``final`` folder as (model, adapter): a PEFT adapter on ``base``, or a whole model."""
    final = Path(final)
    if (final / "adapter_config.json").is_file():
        return {"model": base, "adapter": str(final)}
    return {"model": str(final), "adapter": None}


def selected(ctx: Context) -> dict[str, Any]:
    """The model select chose (or the only candidate when select is not part of the recipe)."""
    if "select" in ctx.records:
        return ctx.records["select"]["outputs"]
    c = ctx.cfg.candidates[0]
    return {"label": c.label, "model": c.model, "adapter": c.adapter, "shots": c.shots}


def latest_model(ctx: Context) -> dict[str, Any]:
    """The aligned model when align ran, else the adapted one."""
    for stage in ("align", "adapt"):
        if stage in ctx.records:
            return ctx.records[stage]["outputs"]
    raise LmforgeError("no adapted model: run the adapt stage first")


def compare_config(ctx: Context, data: Path, settings: list[Setting], out: Path, limit: int | None,
                   title: str) -> CompareConfig:
    t = ctx.cfg.task
    refs = t.references if t.references else (t.response_field,)
    return CompareConfig(data=data, settings=tuple(settings), out=out, input_field=t.input_field,
                         reference_field=refs[0] if len(refs) == 1 else tuple(refs),
                         prompt_template=t.prompt_template, metrics=t.metrics, limit=limit, batch_size=t.batch_size,
                         max_new_tokens=t.max_new_tokens, chat=t.chat, stop=t.stop, examples_shown=2, title=title,
                         device=ctx.cfg.device)


def model_facts(lm, speed_tokens: int) -> dict[str, float]:
    """Parameters (millions), weight memory (MB) and greedy batch-1 decode speed of a loaded ``LM``."""
    import torch

    params = sum(p.numel() for p in lm.model.parameters())
    tensors = [*lm.model.parameters(), *lm.model.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and not t.is_meta)
    prompt = "The"
    list(lm.stream(prompt, chat=False, max_new_tokens=2))  # warm-up
    start, n = time.perf_counter(), 0
    for _ in lm.stream(prompt, chat=False, max_new_tokens=speed_tokens):
        n += 1
    seconds = max(time.perf_counter() - start, 1e-9)
    return {"params_m": round(params / 1e6, 3), "weights_mb": round(size / 2**20, 2),
            "tokens_per_s": round(n / seconds, 1)}


def measuring_loader(ctx: Context, facts: dict[tuple, dict], speed_tokens: int):
    """A ``run_compare`` loader that also records each loaded model's ``model_facts`` under (model, adapter,
    quantize)."""
    from lmforge.lm import load

    def loader(model, adapter, quantize=None):
        lm = load(model, adapter=adapter, device=ctx.cfg.device, quantize=quantize)
        facts[(model, adapter, quantize)] = model_facts(lm, speed_tokens)
        return lm
    return loader


def facts_of(facts: dict[tuple, dict], s: Setting) -> dict:
    return facts[(s.model, s.adapter, s.quantize)]


def metric_value(summary: dict, metric: str) -> float | None:
    v = summary["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


# ----------------------------------------------------------------------------- select
def gate(entries: list[tuple[str, float | None, dict]], metric: str, budget) -> tuple[int, list[str], str]:
    """The select gate over (label, metric value, model facts) entries: a candidate over ``budget.max_params_m`` or
    under ``budget.min_tokens_per_s`` (or without a value) is left out; of the rest, those within
    ``budget.tie_margin`` of the best value count as tied and the smallest (then the fastest) wins. Returns the
    winner's index, each entry's reason for being left out ("" when it is eligible) and the decision in words."""
    reasons = []
    for _, value, f in entries:
        why = []
        if budget.max_params_m is not None and f["params_m"] > budget.max_params_m:
            why.append(f"{f['params_m']:g}M params > budget {budget.max_params_m:g}M")
        if budget.min_tokens_per_s is not None and f["tokens_per_s"] < budget.min_tokens_per_s:
            why.append(f"{f['tokens_per_s']:g} tokens/s < budget {budget.min_tokens_per_s:g}")
        if value is None:
            why.append(f"no {metric}")
        reasons.append("; ".join(why))
    eligible = [i for i, r in enumerate(reasons) if not r]
    if not eligible:
        raise LmforgeError("select: no candidate is within the budget (" + "; ".join(
            f"{e[0]}: {r}" for e, r in zip(entries, reasons)) + "); relax task.budget or add candidates")
    best = eligible[0]
    for i in eligible[1:]:
        if _better(entries[i][1], entries[best][1], metric):
            best = i
    tied = [i for i in eligible if abs(entries[i][1] - entries[best][1]) <= budget.tie_margin]
    pick = min(tied, key=lambda i: (entries[i][2]["params_m"], -entries[i][2]["tokens_per_s"], i != best))
    label, value, f = entries[pick]
    if pick == best:
        why = f"{label!r} has the best {metric} ({value:.4g}) of {len(eligible)} candidate(s) within the budget"
    else:
        why = (f"{label!r} ({metric} {value:.4g}) is within tie_margin {budget.tie_margin:g} of the best "
               f"({entries[best][0]!r}, {entries[best][1]:.4g}) and smaller or faster ({f['params_m']:g}M "
               f"parameters, {f['tokens_per_s']:g} tokens/s)")
    if len(eligible) < len(entries):
        why += f"; {len(entries) - len(eligible)} candidate(s) left out by the budget"
    return pick, reasons, f"selected {label!r}: {why}."


def run_select(ctx: Context, d: Path) -> dict:
    """Zero/few-shot of each candidate on ``select.limit`` dev examples, with size and decode speed, then ``gate``."""
    cfg, t = ctx.cfg, ctx.cfg.task
    facts: dict[tuple, dict] = {}
    cc = compare_config(ctx, t.dev, list(cfg.candidates), d / "compare", cfg.select.limit, "select: zero/few-shot")
    results = run_compare(cc, "lmforge lifecycle (select)", progress=ctx.progress,
                          loader=measuring_loader(ctx, facts, cfg.select.speed_tokens))
    metric, names = t.metric, _metrics(results)
    entries = [(r.setting.label, metric_value(r.summary, metric), facts_of(facts, r.setting)) for r in results]
    pick, reasons, decision = gate(entries, metric, t.budget)
    rows = [[r.setting.label, r.setting.model or "(embedded default)", r.setting.shots, f["params_m"],
             f["weights_mb"], f["tokens_per_s"], *(metric_value(r.summary, m) for m in names), why or "yes"]
            for r, (_, _, f), why in zip(results, entries, reasons)]
    s = results[pick].setting
    header = ["candidate", "model", "shots", "params (M)", "weights (MB)", "decode tokens/s", *names, "within budget"]
    return {"outputs": {"label": s.label, "model": s.model, "adapter": s.adapter, "shots": s.shots},
            "table": {"header": header, "rows": rows}, "decision": decision,
            "charts": {metric: [[e[0] for e in entries], [e[1] for e in entries]]},
            "reports": [str((d / "compare" / "report.md").relative_to(ctx.out))]}


def _metrics(results) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [k for k, v in r.summary["metrics"].items() if k not in names and isinstance(v, (int, float))
                  and k != "tokens_scored"]
    return names


# ----------------------------------------------------------------------------- adapt / align
def _claim_run(run_dir: Path, d: Path, h: str) -> dict[str, bool]:
    """resume=True when ``run_dir`` holds a checkpoint of this very stage hash (a killed run), else overwrite an
    earlier run there (its settings changed). ``d/pending.json`` (``d/pending-NAME.json`` for the other runs of a
    stage, ``run_dir`` = ``d/NAME``) records the hash the run was started with."""
    from lmforge.io import read_json_object, write_json_atomic

    pending = d / ("pending.json" if run_dir.name == "run" else f"pending-{run_dir.name}.json")
    try:
        same = read_json_object(pending).get("hash") == h
    except (LmforgeError, OSError, ValueError):
        same = False
    has_ckpt = any((run_dir / c / "state.json").is_file() for c in ("checkpoint", ".checkpoint.old"))
    write_json_atomic(pending, {"hash": h})
    if same and has_ckpt:
        return {"resume": True}
    return {"overwrite": run_dir.exists() and any(run_dir.iterdir())}


def run_adapt(ctx: Context, d: Path, h: str) -> dict:
    """Fine-tune the selected model with the adapt section (a FinetuneConfig), resuming a killed run."""
    from lmforge.training.sft import finetune

    base = selected(ctx)
    run_dir = d / "run"
    ft = ctx.cfg.finetune_config(model=base["model"], adapter=base["adapter"], out_dir=run_dir)
    how = _claim_run(run_dir, d, h)
    if how.get("resume"):
        ctx.log("  adapt: resuming from its checkpoint")
    result = finetune(ft, **how)
    ref = model_ref(result["out_dir"], base["model"])
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"outputs": {"label": f"adapted ({ft.method})", **ref, "shots": 0, "method": ft.method},
            "table": {"header": ["figure", "value"], "rows": [[k, v] for k, v in shown.items()]},
            "decision": f"fine-tuned {base['label']!r} with {ft.method} for {result.get('steps')} steps"
                        + (" (resumed from its checkpoint)" if how.get("resume") else ""),
            "charts": {}, "reports": [str((run_dir / "loss.png").relative_to(ctx.out))]
            if (run_dir / "loss.png").is_file() else []}


def run_align(ctx: Context, d: Path, h: str) -> dict:
    """DPO on the align section's preference pairs, or PPO against its reward (on its prompts, else the task's
    training prompts), starting from the adapted model."""
    from lmforge.alignment.rlhf import dpo, ppo

    start = ctx.records["adapt"]["outputs"]
    run_dir = d / "run"
    algorithm = ctx.cfg.align_algorithm()
    cfg = ctx.cfg.align_config(model=start["model"], adapter=start["adapter"], out_dir=run_dir,
                               prompts=d / "prompts.jsonl")
    if algorithm == "ppo" and "prompts" not in ctx.cfg.align:  # the task's own prompts, one PPO pass's worth
        pairs = task_examples(ctx, cfg.steps * cfg.batch_size)
        write_text_atomic(cfg.prompts, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p, _ in pairs))
    how = _claim_run(run_dir, d, h)
    result = (dpo if algorithm == "dpo" else ppo)(cfg, progress=ctx.progress, **how)
    ref = model_ref(result["out_dir"], start["model"])
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    name = algorithm.upper()
    on = cfg.data if algorithm == "dpo" else f"{cfg.prompts} against the reward {cfg.reward}"
    return {"outputs": {"label": f"aligned ({name}, {cfg.method})", **ref, "shots": 0},
            "table": {"header": ["figure", "value"], "rows": [[k, v] for k, v in shown.items()]},
            "decision": f"aligned the adapted model with {name} ({cfg.method}) on {on}", "charts": {},
            "reports": []}


# ----------------------------------------------------------------------------- evaluate / optimise
def scored_data(ctx: Context, split: str) -> tuple[Path, str]:
    t = ctx.cfg.task
    if split == "test" and t.test is not None:
        return Path(t.test), "test"
    return Path(t.dev), "dev" + (" (the task has no test file)" if split == "test" else "")


def _setting(label: str, ref: dict[str, Any]) -> Setting:
    return Setting(label=label, model=ref["model"], adapter=ref["adapter"], shots=ref.get("shots", 0))


def run_evaluate(ctx: Context, d: Path) -> dict:
    """The base (selected) model against the adapted (and aligned) one on held-out data."""
    base = selected(ctx)
    settings = [_setting(f"base: {base['label']}", base)]
    for stage in ("adapt", "align"):
        if stage in ctx.records:
            settings.append(_setting(ctx.records[stage]["outputs"]["label"], ctx.records[stage]["outputs"]))
    data, split = scored_data(ctx, ctx.cfg.evaluate.split)
    cc = compare_config(ctx, data, settings, d / "compare", ctx.cfg.evaluate.limit, f"evaluate on {split}")
    results = run_compare(cc, "lmforge lifecycle (evaluate)", progress=ctx.progress)
    names, metric = _metrics(results), ctx.cfg.task.metric
    rows = [[r.setting.label, *(metric_value(r.summary, m) for m in names)] for r in results]
    first, last = metric_value(results[0].summary, metric), metric_value(results[-1].summary, metric)
    change = "" if first is None or last is None else f" ({first:.4g} -> {last:.4g}, {last - first:+.4g})"
    return {"outputs": {"split": split, "n": results[0].summary["counts"]["evaluated"]},
            "table": {"header": ["model", *names], "rows": rows},
            "decision": f"{metric} on {results[0].summary['counts']['evaluated']} {split} examples: "
                        f"{results[-1].setting.label} vs {results[0].setting.label}{change}",
            "charts": {metric: [[r.setting.label for r in results], [metric_value(r.summary, metric)
                                                                      for r in results]]},
            "reports": [str((d / "compare" / "report.md").relative_to(ctx.out))]}


def task_examples(ctx: Context, n: int) -> list[tuple[str, str]]:
    """The first ``n`` training records as (prompt, response): the task's template (or input field) rendered."""
    from lmforge.data.records import load_records, render, text_field

    t = ctx.cfg.task
    return [(text_field(r, t.input_field, "task.input_field") if t.input_field else render(t.prompt_template, r),
             text_field(r, t.response_field, "task.response_field")) for r in load_records(t.train)[:n]]


def calibration_file(ctx: Context, path: Path, n: int = 64) -> Path:
    """The first ``n`` training records as prompt + response text (what pruning scores the blocks on)."""
    write_text_atomic(path, "\n\n".join(p + r for p, r in task_examples(ctx, n)) + "\n")
    return path


def _smaller_models(ctx: Context, d: Path, h: str, final: dict[str, Any]) -> list[Setting]:
    """optimise's distil and prune sections: the distilled student and the pruned (and healed) model, each a
    compare setting. Both are taught by the final model, which must be whole weights (not an adapter)."""
    from lmforge.training.distill import distill

    opt, settings = ctx.cfg.optimise, []
    if (opt.distil is not None or opt.prune is not None) and final["adapter"] is not None:
        raise LmforgeError("optimise.distil / optimise.prune teach from the final model's whole weights, but it is "
                           f"a PEFT adapter ({final['adapter']}): use adapt.method: full, or remove those sections")
    teacher = final["model"]

    def taught(section: str, run_dir: Path, student: str | None = None) -> str:
        cfg = ctx.cfg.distill_config(section, teacher=teacher, out_dir=run_dir, student=student)
        how = _claim_run(run_dir, d, h)
        ctx.log(f"  optimise: distilling ({section}){' - resuming from its checkpoint' if how.get('resume') else ''}")
        return distill(cfg, **how)["out_dir"]

    if opt.distil is not None:
        student = taught("distil", d / "distil")
        settings.append(_setting(f"distilled ({_blocks(student)} blocks)", {"model": student, "adapter": None}))
    if opt.prune is not None:
        from lmforge.training.prune import prune

        p = opt.prune
        ctx.log(f"  optimise: pruning to {p.keep_layers} blocks")
        prune(teacher, d / "pruned", "layers", keep_layers=p.keep_layers, seq_len=p.seq_len, samples=p.samples,
              calibration=calibration_file(ctx, d / "calibration.txt"), force=True)
        pruned = str(d / "pruned")
        if opt.heal is not None:
            pruned = taught("heal", d / "heal", student=pruned)
        settings.append(_setting(f"pruned ({p.keep_layers} blocks){' + healed' if opt.heal else ''}",
                                 {"model": pruned, "adapter": None}))
    return settings


def _blocks(model: str | Path) -> int:
    from lmforge.io import read_json_object

    config = read_json_object(Path(model) / "config.json")
    return int(next(config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config))


def run_optimise(ctx: Context, d: Path, h: str) -> dict:
    """The final model in float32, with each quantisation scheme (compare settings with ``quantize``), and the
    distilled / pruned models of the distil and prune sections, scored like evaluate, with weight memory and
    decode speed."""
    final, opt = latest_model(ctx), ctx.cfg.optimise
    data, split = scored_data(ctx, ctx.cfg.evaluate.split)
    settings = [dataclasses.replace(_setting(scheme or "float32", final), quantize=scheme)
                for scheme in (None, *opt.quantize)]
    settings += _smaller_models(ctx, d, h, final)
    facts: dict[tuple, dict] = {}
    cc = compare_config(ctx, data, settings, d / "compare", opt.limit or ctx.cfg.evaluate.limit,
                        f"optimise {final['label']} on {split}")
    results = run_compare(cc, "lmforge lifecycle (optimise)", progress=ctx.progress,
                          loader=measuring_loader(ctx, facts, ctx.cfg.select.speed_tokens))
    metric = ctx.cfg.task.metric
    rows = [[r.setting.label, facts_of(facts, r.setting)["weights_mb"], facts_of(facts, r.setting)["tokens_per_s"],
             metric_value(r.summary, metric)] for r in results]
    ref = rows[0][3]
    words = [f"{row[0]}: {row[1]:g} MB, {row[2]:g} tokens/s, {metric} {fmt_cell(row[3], 'n/a')}"
             + (f" ({(row[3] - ref):+.4g})" if row[3] is not None and ref is not None else "") for row in rows[1:]]
    return {"outputs": {"schemes": list(opt.quantize), "models": [s.label for s in settings[1:]]},
            "table": {"header": ["weights", "weights (MB)", "decode tokens/s", metric], "rows": rows},
            "decision": f"{final['label']} against float32 on {split}: " + "; ".join(words),
            "charts": {metric: [[row[0] for row in rows], [row[3] for row in rows]]},
            "reports": [str((d / "compare" / "report.md").relative_to(ctx.out))]}


# ----------------------------------------------------------------------------- deploy
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            raise LmforgeError(f"deploy: lmforge serve exited with status {proc.returncode} before it came up: "
                               + " | ".join(tail))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LmforgeError(f"deploy: lmforge serve did not come up in {timeout:g} s (log: {log})")
        time.sleep(0.2)


def run_deploy(ctx: Context, d: Path) -> dict:
    """Write a serve config for the final model, start ``lmforge serve`` on a free localhost port, send one chat
    completion through the ``openai`` client, check it is not empty, stop the server; record the latencies."""
    try:
        import openai
    except ImportError:
        raise LmforgeError("deploy: the smoke test needs the openai client: pip install openai") from None
    final = latest_model(ctx)
    port = free_port()
    sc = ctx.cfg.serve_config(model=final["model"] or DEFAULT_MODEL, adapter=final["adapter"], port=port)
    serve_yaml = write_text_atomic(d / "serve.yaml", to_yaml(sc))
    log_path = d / "server.log"
    key = secrets.token_hex(16)
    env = {**os.environ, "LMFORGE_API_KEY": key}
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--config", str(serve_yaml)]
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, ctx.cfg.deploy.startup_timeout, log_path)
        startup = time.perf_counter() - started
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=name, max_tokens=ctx.cfg.deploy.max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": ctx.cfg.deploy.prompt}])
        except openai.APIError as e:
            raise LmforgeError(f"deploy: the smoke test's chat completion failed: {e}") from None
        latency = time.perf_counter() - t0
        content = r.choices[0].message.content or ""
    finally:
        proc.terminate()
        stopped = "by SIGTERM"
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = "by SIGKILL (SIGTERM was ignored for 30 s)"
    if not content.strip():
        raise LmforgeError("deploy: the smoke test's chat completion came back empty")
    tokens = r.usage.completion_tokens if r.usage else None
    rows = [["served model", name], ["startup (s)", round(startup, 2)], ["chat completion latency (s)",
            round(latency, 3)], ["completion tokens", tokens], ["reply", content.strip()[:200]],
            ["server stopped", stopped]]
    return {"outputs": {"serve_config": str(serve_yaml.relative_to(ctx.out)), "latency_s": round(latency, 3),
                        "startup_s": round(startup, 2), "content": content},
            "table": {"header": ["smoke test", "value"], "rows": rows},
            "decision": f"lmforge serve --config {serve_yaml.relative_to(ctx.out)} answered a chat completion "
                        f"in {latency:.2f} s (non-empty reply); the server was stopped", "charts": {}, "reports": []}


RUNNERS: dict[str, Callable[..., dict]] = {
    "select": lambda ctx, d, h: run_select(ctx, d), "adapt": run_adapt, "align": run_align,
    "evaluate": lambda ctx, d, h: run_evaluate(ctx, d), "optimise": run_optimise,
    "deploy": lambda ctx, d, h: run_deploy(ctx, d),
}
