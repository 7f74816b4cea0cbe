"""The lifecycle report: one ``report.md`` and one self-contained ``report.html`` with every stage's table, its
charts and the decision made at each gate (which model was selected and why).

Built only from the stage records (``OUT/<stage>/stage.json``), so it can be rewritten after any run. Charts are
``lmforge.evaluation.report.bar_chart`` PNGs, written beside ``report.md`` and embedded in the HTML.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lmforge.evaluation.report import bar_chart, html_page, html_table, md_table
from lmforge.io import write_bytes_atomic, write_text_atomic
from lmforge.lifecycle.config import STAGES, LifecycleConfig

WHAT = {"select": "Select a model: zero/few-shot on the dev set, size and speed, and the gate's choice.",
        "adapt": "Adapt: instruction fine-tuning of the selected model.",
        "align": "Align: DPO on preference pairs, or PPO against a reward, starting from the adapted model.",
        "evaluate": "Evaluate: the base model against the adapted one on held-out data.",
        "optimise": "Optimise for deployment: quantised, distilled and pruned versions, scored like evaluate.",
        "deploy": "Deploy: a serve config, the server started, smoke-tested with the openai client, stopped."}


def write_report(cfg: LifecycleConfig, records: dict[str, dict], status: dict[str, str],
                 command: str) -> dict[str, Path]:
    """Write ``OUT/report.md``, ``OUT/report.html`` and ``OUT/chart_<stage>_<metric>.png``; returns their paths."""
    out, e = Path(cfg.out), html.escape
    task = (f"Task: train `{cfg.task.train}`, dev `{cfg.task.dev}`, test `{cfg.task.test or '(dev)'}`; target "
            f"field `{cfg.task.response_field}`; gate metric `{cfg.task.metric}`.")
    ran = [s for s in STAGES if s in records]
    if ran:
        each = ", ".join(f"{s} {records[s].get('seconds', 0):.0f} s" for s in ran)
        task += (f" Stage time: {sum(records[s].get('seconds', 0) for s in ran) / 60:.1f} min in all ({each}; "
                 "a stage skipped on a re-run keeps the time of the run that made it).")
    md = [f"# {cfg.title}", "", "Run (or resume) with:", "", "```", command, "```", "", task, ""]
    body = [f"<h1>{e(cfg.title)}</h1><p>Run (or resume) with:</p><pre><code>{e(command)}</code></pre>",
            f"<p>{e(task.replace('`', ''))}</p>"]
    gates = [(s, records[s]["decision"]) for s in STAGES if s in records and records[s].get("decision")]
    if gates:
        md += ["## Decisions", "", *(f"- **{s}**: {d}" for s, d in gates), ""]
        body.append("<h2>Decisions</h2><ul>" + "".join(f"<li><b>{e(s)}</b>: {e(d)}</li>" for s, d in gates)
                    + "</ul>")
    for stage in STAGES:
        r = records.get(stage)
        if r is None:
            continue
        state = status.get(stage, "not run this time (output on disk)")
        facts = f"{state}; finished {r.get('finished', '?')} in {r.get('seconds', 0):.0f} s; hash `{r['hash'][:12]}`"
        md += [f"## {stage}", "", WHAT[stage], "", facts, ""]
        body.append(f"<h2>{e(stage)}</h2><p>{e(WHAT[stage])}</p><p>{e(facts.replace('`', ''))}</p>")
        table = r.get("table") or {}
        if table.get("rows"):
            md += [*md_table(table["header"], table["rows"], missing="n/a"), ""]
            body.append(html_table(table["header"], table["rows"], missing="n/a"))
        if r.get("decision"):
            md += [f"**Decision:** {r['decision']}", ""]
            body.append(f"<p><b>Decision:</b> {e(r['decision'])}</p>")
        for metric, (labels, values) in (r.get("charts") or {}).items():
            png = bar_chart(metric, labels, values)
            name = f"chart_{stage}_{metric}.png"
            write_bytes_atomic(out / name, png)
            md += [f"![{stage} {metric}]({name})", ""]
            body.append(f'<figure><img alt="{e(stage)} {e(metric)}" '
                        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')
        links = r.get("reports") or []
        if links:
            md += ["Details: " + ", ".join(f"[{p}]({p})" for p in links), ""]
            body.append("<p>Details: " + ", ".join(f'<a href="{e(p)}">{e(p)}</a>' for p in links) + "</p>")
    page = html_page(cfg.title, "".join(body))
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    write_text_atomic(out / "report.html", page)
    return {"md": out / "report.md", "html": out / "report.html"}
