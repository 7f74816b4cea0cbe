"""Optimise a fine-tuned model for deployment and measure what each step costs and saves (issue 16's report).

Given a teacher fine-tuned on DialogSum (a model folder, e.g. from ``lmforge finetune --method full``), it builds
in --work DIR, one stage at a time, each skipped when its output is already there (an interrupted run continues;
a distillation stopped half-way resumes from its checkpoint):

  calibration.txt  the first --calib-n DialogSum train dialogues as prompt + summary (GPTQ's and pruning's text)
  int4/            lmforge quantize --method int4 --algorithm gptq --group-size 64 --calibration calibration.txt
                   --dtype bfloat16 (the tensors left float, embeddings and lm_head, in bf16)
  int8/            lmforge quantize --method int8 (round to nearest, one scale per row; same --dtype)
  distilled/       lmforge distill --teacher T --student-layers K (K = --student-layers, default half the blocks,
                   evenly spaced) on the first --distill-limit DialogSum train dialogues (default: --train-limit),
                   --distill-steps steps
  pruned/          lmforge prune --method layers --keep-layers K (the blocks of lowest block influence dropped,
                   scored on calibration.txt), K = ceil(--keep-fraction x blocks): at least that fraction of the
                   blocks stays (0.75 of 30 -> 23)
  healed/          the pruned model healed by distillation from the same teacher (lmforge distill --teacher T
                   --student pruned/), --heal-steps steps: the teacher's soft targets carry more than the labels
                   alone (alpha mixes in the label loss), the teacher's top-64 logits are cached once in
                   teacher-top64/ and reused by both distillations, and the healed and the distilled rows then
                   differ only in how the smaller model was made (block influence vs evenly spaced blocks)
  runs/, score/    every variant scored through ``lmforge compare`` (one recipe per variant, so that each finished
  compare/         row survives an interruption; then compare.yaml with all six rows, --report-only) on the SAME first
                   --eval-n dev dialogues as bench/sft_dialogsum.py, same prompt (chat template), greedy,
                   --max-new-tokens 64: ROUGE-1/2/L (rouge-score, stemmed) and the deployment columns (size on
                   disk, parameters, peak memory while decoding at batch 1, batch-1 greedy decode tok/s over 64 tokens)
  optimize.md/.json  the table, and issue 16's checks as PASS/FAIL lines with their ratios (the decode ratios come
                   from single timings minutes apart, which move by up to 25% on a shared VM: bench/decode_ratio.py
                   times the student against the teacher in alternating rounds)

Rows: teacher (fp32), int8, int4, pruned (not healed), pruned+healed, distilled. Every stage is the lmforge CLI in
a subprocess (logs in --work/logs/); --threads sets OMP_NUM_THREADS for all of them.

    HF_HUB_OFFLINE=1 python bench/optimize.py --teacher /work/runs/teacher-full/final --work runs/optimize \\
        [--threads 2] [--eval-n 100] [--distill-steps 300] [--heal-steps 200] [--train-limit 800] [--lr 2e-4]
        [--distill-limit N] [--student-layers K] [--keep-fraction 0.75] [--batch-size 8] [--precision bf16]
        [--json out.json]

A quick plumbing check: a tiny model and a 20-record jsonl as --train/--dev, --eval-n 4 --distill-steps 2
--heal-steps 2 --max-len 256 --max-new-tokens 8.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dialogsum"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "  # as bench/sft_dialogsum.py
LMFORGE = [sys.executable, "-m", "lmforge.cli"]
ROWS = ("teacher", "int8", "int4", "pruned", "pruned+healed", "distilled")


def records(path: Path, n: int) -> list[dict]:
    """The first ``n`` records of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if len(out) == n:
                    break
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def run(stage: str, argv: list[str], work: Path, env: dict, times: dict) -> None:
    """Run one lmforge command, its output in work/logs/<stage>.log; stop the script when it fails."""
    log = work / "logs" / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{stage}] {shlex.join(argv[2:] if argv[:3] == LMFORGE else argv)}  (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    times[stage] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        sys.exit(f"[{stage}] failed (exit {rc}) after {times[stage]:.0f} s; the end of {log}:\n" + "\n".join(tail))
    print(f"[{stage}] done in {times[stage]:.0f} s", flush=True)


def distill_args(a: argparse.Namespace, work: Path, out: Path, steps: int, limit: int) -> list[str]:
    """The shared flags of both distillations (same teacher and settings), with resume/overwrite as needed.

    The teacher's top-64 logits of the first ``limit`` train dialogues are cached in teacher-top64/ for
    --train-limit (both distillations share it) and in teacher-top64-nLIMIT/ for another --distill-limit."""
    cache = work / ("teacher-top64" if limit == a.train_limit else f"teacher-top64-n{limit}")
    argv = [*LMFORGE, "distill", "--teacher", str(a.teacher), "--train", str(a.train), "--limit", str(limit),
            "--prompt-template", PROMPT, "--response-field", "summary", "--max-len", str(a.max_len),
            "--steps", str(steps), "--lr", str(a.lr), "--warmup", str(min(20, max(1, steps // 10))),
            "--batch-size", str(a.batch_size), "--precision", a.precision, "--temperature", "2.0", "--alpha", "0.5",
            "--top-k", "64", "--teacher-precision", a.teacher_precision,
            "--cache-teacher", str(cache), "--save-every", str(max(1, min(50, steps))),
            "--eval-every", "0", "--log-every", "10", "-o", str(out)]
    if (out / "checkpoint").exists():
        argv.append("--resume")
    elif out.exists() and any(out.iterdir()):
        argv.append("--overwrite")
    return argv


def n_layers(model: Path) -> int:
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    sys.exit(f"{model}/config.json: no num_hidden_layers")


def compare_recipe(a: argparse.Namespace, work: Path, settings: list[dict], out: Path) -> dict:
    return {"data": str(a.dev), "prompt_template": PROMPT, "reference_field": "summary", "limit": a.eval_n,
            "max_new_tokens": a.max_new_tokens, "batch_size": a.gen_batch, "metrics": ["rouge1", "rouge2", "rougeL"],
            "deployment_stats": True, "decode_tokens": a.decode_tokens, "out": str(out),
            "runs_out": str(work / "runs"), "title": "bench/optimize.py: DialogSum dev, every variant",
            "settings": settings}


def scored(summary: Path, model: Path, a: argparse.Namespace) -> bool:
    """Whether ``summary`` already scores ``model`` (written after it, with deployment columns, same settings)."""
    if not summary.is_file() or summary.stat().st_mtime < (model / "config.json").stat().st_mtime:
        return False
    done = json.loads(summary.read_text(encoding="utf-8"))
    st = done.get("settings", {})
    return ("deployment" in done and st.get("limit") == a.eval_n and st.get("max_new_tokens") == a.max_new_tokens
            and done["deployment"].get("decode_tokens") == a.decode_tokens)


def slug(label: str) -> str:
    return label.replace("+", "-")


def ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def fmt_ratio(x: float | None, y: float | None, spec: str = ".2f", unit: str = "x") -> str:
    """x / y formatted ("n/a" when y is 0 or a value is missing)."""
    r = ratio(x, y)
    return "n/a" if r is None else format(r, spec) + unit


def checks(rows: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """Issue 16's must-show checks: (name, passed (None: a row is missing), the figures)."""
    t = rows.get("teacher")
    out = []

    def check(name, row, test, detail):
        r = rows.get(row)
        if t is None or r is None:
            out.append((name, None, f"no {row if r is None else 'teacher'} row"))
        else:
            ok, text = test(r), detail(r)
            out.append((name, ok, text))

    check("int4 ROUGE-L within 1.0 point of fp32", "int4", lambda r: (t["rougeL"] - r["rougeL"]) * 100 <= 1.0,
          lambda r: f"int4 {100 * r['rougeL']:.2f} vs fp32 {100 * t['rougeL']:.2f} "
                    f"({100 * (r['rougeL'] - t['rougeL']):+.2f} pt)")
    check("int4 size on disk <= 0.3x fp32", "int4", lambda r: r["disk_mb"] <= 0.3 * t["disk_mb"],
          lambda r: f"{r['disk_mb']:.1f} MB / {t['disk_mb']:.1f} MB = {fmt_ratio(r['disk_mb'], t['disk_mb'], '.3f')}")
    check("int4 batch-1 decode faster than fp32", "int4", lambda r: r["decode_tok_s"] > t["decode_tok_s"],
          lambda r: f"{r['decode_tok_s']:.1f} / {t['decode_tok_s']:.1f} tok/s = "
                    f"{fmt_ratio(r['decode_tok_s'], t['decode_tok_s'])}")
    check("student ROUGE-L >= 90% of the teacher's", "distilled", lambda r: r["rougeL"] >= 0.9 * t["rougeL"],
          lambda r: f"{100 * r['rougeL']:.2f} / {100 * t['rougeL']:.2f} = "
                    f"{fmt_ratio(r['rougeL'], t['rougeL'], '.1%', '')}")
    check("student decode >= 1.7x the teacher's", "distilled", lambda r: r["decode_tok_s"] >= 1.7 * t["decode_tok_s"],
          lambda r: f"{r['decode_tok_s']:.1f} / {t['decode_tok_s']:.1f} tok/s = "
                    f"{fmt_ratio(r['decode_tok_s'], t['decode_tok_s'])}")
    check("pruned+healed ROUGE-L >= 90% of the teacher's", "pruned+healed",
          lambda r: r["rougeL"] >= 0.9 * t["rougeL"],
          lambda r: f"{100 * r['rougeL']:.2f} / {100 * t['rougeL']:.2f} = "
                    f"{fmt_ratio(r['rougeL'], t['rougeL'], '.1%', '')}")
    return out


def table(rows: dict[str, dict], meta: dict) -> str:
    t = rows.get("teacher", {})
    head = ["variant", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-L vs teacher", "disk MB", "disk vs teacher",
            "parameters (M)", "peak memory MB", "decode tok/s", "decode vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, spec):
        return "" if v is None else format(v, spec)
    for label in ROWS:
        r = rows.get(label)
        if r is None:
            continue
        lines.append("| " + " | ".join([
            label, f(100 * r["rouge1"], ".2f"), f(100 * r["rouge2"], ".2f"), f(100 * r["rougeL"], ".2f"),
            f(ratio(r["rougeL"], t.get("rougeL")), ".1%"), f(r["disk_mb"], ".1f"),
            f(ratio(r["disk_mb"], t.get("disk_mb")), ".3f"), f(r["parameters"] / 1e6, ".1f"),
            f(r["peak_mem_mb"], ".0f"), f(r["decode_tok_s"], ".1f"),
            f(ratio(r["decode_tok_s"], t.get("decode_tok_s")), ".2f")]) + " |")
    notes = (f"{meta['eval_n']} DialogSum dev dialogues (the first, as bench/sft_dialogsum.py), greedy, at most "
             f"{meta['max_new_tokens']} new tokens; ROUGE: rouge-score F-measure with stemming, x100. Disk: the model "
             f"folder. Peak memory: the process's resident-set high-water mark while timing the batch-1 decode, "
             f"above the memory in use before the model loaded (after a warm-up load and scoring). Decode: "
             f"batch 1, greedy, {meta['decode_tokens']} tokens after a warm-up, EOS ignored, median of 3. Threads: "
             f"{meta['threads']}. Teacher: {meta['teacher']}.")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True, help="the fine-tuned model folder to optimise")
    p.add_argument("--work", type=Path, required=True, help="folder for every variant, the logs and the report")
    p.add_argument("--train", type=Path, default=DATA / "dialogsum.train.jsonl.gz", help="DialogSum train file")
    p.add_argument("--dev", type=Path, default=DATA / "dialogsum.dev.jsonl", help="DialogSum dev file")
    p.add_argument("--eval-n", type=int, default=100, help="dev dialogues scored (default: 100)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="summary length cap (default: 64)")
    p.add_argument("--gen-batch", type=int, default=8, help="prompts generated together when scoring (default: 8)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for decode tok/s (default: 64)")
    p.add_argument("--calib-n", type=int, default=64, help="train dialogues in calibration.txt (default: 64)")
    p.add_argument("--train-limit", type=int, default=800, help="train dialogues distilled on (default: 800)")
    p.add_argument("--distill-limit", type=int, default=None,
                   help="train dialogues the half-layer student is distilled on (default: --train-limit)")
    p.add_argument("--distill-steps", type=int, default=300, help="steps of the half-layer student (default: 300)")
    p.add_argument("--heal-steps", type=int, default=200, help="steps healing the pruned model (default: 200)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of both distillations (default: 2e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per distillation step (default: 8)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="the students' training precision (bf16 autocast, as the teacher's SFT; default: bf16)")
    p.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="fp32",
                   help="the teacher's weights while it fills the top-64 cache (bf16 runs on the CPU's bf16 matmul "
                        "units where it has them, several times faster; default: fp32)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per distillation example (default: 512)")
    p.add_argument("--student-layers", type=int, default=None, help="blocks of the student (default: half)")
    p.add_argument("--keep-fraction", type=float, default=0.75,
                   help="fraction of the blocks pruning keeps, rounded up (default: 0.75)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every stage (default: unset)")
    p.add_argument("--json", type=Path, help="also write the results here (besides WORK/optimize.json)")
    a = p.parse_args()

    if not is_model(a.teacher):
        p.error(f"--teacher {a.teacher}: not a model folder (no config.json and *.safetensors)")
    if not 0 < a.keep_fraction < 1:
        p.error(f"--keep-fraction must be in (0, 1), got {a.keep_fraction}")
    for path, flag in ((a.train, "--train"), (a.dev, "--dev")):
        if not path.is_file():
            p.error(f"{flag} {path}: no such file")
    a.teacher, a.train, a.dev = a.teacher.resolve(), a.train.resolve(), a.dev.resolve()
    a.distill_limit = a.distill_limit or a.train_limit
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    times_path = work / "stage_seconds.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    layers = n_layers(a.teacher)
    student_k = a.student_layers or max(1, layers // 2)
    keep_k = min(layers, math.ceil(a.keep_fraction * layers - 1e-9))

    calib = work / "calibration.txt"
    if not calib.is_file():
        text = "\n\n".join(PROMPT.format(dialogue=r["dialogue"]) + r["summary"] for r in records(a.train, a.calib_n))
        write_atomic(calib, text + "\n")
        print(f"[calibration] {calib}: the first {a.calib_n} train dialogues", flush=True)

    stages = [
        ("int4", work / "int4", [*LMFORGE, "quantize", str(a.teacher), "-o", str(work / "int4"), "--method", "int4",
                                 "--algorithm", "gptq", "--group-size", "64", "--calibration", str(calib),
                                 "--dtype", "bfloat16", "--force"]),
        ("int8", work / "int8", [*LMFORGE, "quantize", str(a.teacher), "-o", str(work / "int8"), "--method", "int8",
                                 "--dtype", "bfloat16", "--force"]),
        ("distill", work / "distilled" / "final",
         [*distill_args(a, work, work / "distilled", a.distill_steps, a.distill_limit),
          "--student-layers", str(student_k)]),
        ("prune", work / "pruned", [*LMFORGE, "prune", str(a.teacher), "-o", str(work / "pruned"), "--method",
                                    "layers", "--keep-layers", str(keep_k), "--calibration", str(calib), "--force"]),
    ]
    for stage, output, argv in stages:
        if is_model(output):
            print(f"[{stage}] {output} exists: skipped", flush=True)
        else:
            run(stage, argv, work, env, times)
            write_atomic(times_path, json.dumps(times, indent=2))
    healed = work / "healed" / "final"
    if is_model(healed):
        print(f"[heal] {healed} exists: skipped", flush=True)
    else:
        heal = distill_args(a, work, work / "healed", a.heal_steps, a.train_limit)
        run("heal", [*heal, "--student", str(work / "pruned")], work, env, times)
        write_atomic(times_path, json.dumps(times, indent=2))

    import yaml

    models = {"teacher": a.teacher, "int8": work / "int8", "int4": work / "int4", "pruned": work / "pruned",
              "pruned+healed": healed, "distilled": work / "distilled" / "final"}
    settings = [{"label": label, "model": str(models[label])} for label in ROWS]
    (work / "score").mkdir(exist_ok=True)
    for s in settings:  # one compare per variant, so that a finished row survives an interruption
        summary = work / "runs" / slug(s["label"]) / "summary.json"
        if scored(summary, Path(s["model"]), a):
            print(f"[score {s['label']}] {summary} exists: skipped", flush=True)
            continue
        recipe = work / "score" / f"{slug(s['label'])}.yaml"
        write_atomic(recipe, yaml.safe_dump(compare_recipe(a, work, [s], work / "score" / slug(s["label"])),
                                            sort_keys=False))
        run(f"score-{slug(s['label'])}", [*LMFORGE, "compare", "--config", str(recipe), "--no-progress", "--force"],
            work, env, times)
        write_atomic(times_path, json.dumps(times, indent=2))
    recipe = work / "compare.yaml"
    write_atomic(recipe, yaml.safe_dump(compare_recipe(a, work, settings, work / "compare"), sort_keys=False))
    run("report", [*LMFORGE, "compare", "--config", str(recipe), "--report-only", "--force"], work, env, times)

    rows = {}
    for s in settings:
        summary = json.loads((work / "runs" / slug(s["label"]) / "summary.json").read_text())
        rows[s["label"]] = {**{m: summary["metrics"][m] for m in ("rouge1", "rouge2", "rougeL")},
                            **summary["deployment"], "model": s["model"]}
    meta = {"teacher": str(a.teacher), "eval_n": a.eval_n, "max_new_tokens": a.max_new_tokens,
            "decode_tokens": a.decode_tokens, "threads": a.threads or "default",
            "student_layers": f"{student_k} of {layers}", "precision": a.precision,
            "pruned_layers": f"{keep_k} of {layers}",
            "distill_steps": a.distill_steps, "heal_steps": a.heal_steps, "lr": a.lr, "train_limit": a.train_limit,
            "teacher_precision": a.teacher_precision,
            "distill_limit": a.distill_limit,
            "stage_seconds": times, "compare_report": str(work / "compare" / "report.md")}
    results = checks(rows)
    md = table(rows, meta)
    lines = [f"{'PASS' if ok else 'FAIL' if ok is False else 'N/A '}  {name}: {detail}" for name, ok, detail in results]
    report = (f"# bench/optimize.py\n\nStudent: {student_k} of {layers} blocks, {a.distill_steps} distillation steps "
              f"on {a.distill_limit} train dialogues; "
              f"pruned: {keep_k} of {layers} blocks, healed {a.heal_steps} steps.\n\n{md}\n```\n"
              + "\n".join(lines) + "\n```\n")
    write_atomic(work / "optimize.md", report)
    out = {"meta": meta, "rows": rows, "checks": [{"check": n, "pass": ok, "detail": d} for n, ok, d in results]}
    write_atomic(work / "optimize.json", json.dumps(out, indent=2))
    if a.json:
        write_atomic(a.json.resolve(), json.dumps(out, indent=2))
    print("\n" + md)
    print("\n".join(lines))
    print(f"\nwrote {work / 'optimize.md'}, {work / 'optimize.json'} and {work / 'compare' / 'report.md'}")


if __name__ == "__main__":
    main()
