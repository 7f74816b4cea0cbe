"""The side-by-side report of a comparison: Markdown, a self-contained HTML page and PNG charts.

Owns how results are shown: a settings table, a metrics table (one row per setting), one bar
chart per metric across settings (matplotlib, Agg backend), and the first few examples with the
reference next to every setting's output. ``report.html`` embeds its charts as base64 PNGs and
needs no other file; ``report.md`` links the PNGs written beside it. Both start with the one
command that regenerates them.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from lmforge.io import write_bytes_atomic, write_text_atomic

# Metrics where lower is better (shown in the chart title).
LOWER_IS_BETTER = {"perplexity", "nll_per_token", "toxicity_rate", "toxicity_mean"}
SETTING_COLUMNS = ("model", "adapter", "quantize", "shots", "temperature", "top_k", "top_p", "seed")
# The deployment columns (``deployment_stats``): header -> key in a summary's "deployment".
DEPLOYMENT_COLUMNS = {"disk MB": "disk_mb", "weights MB": "weights_mb", "parameters": "parameters",
                      "peak memory MB": "peak_mem_mb", "decode tok/s": "decode_tok_s"}
DEPLOYMENT_NOTE = ("disk MB: the model folder (or .gguf file) and adapter as stored; a setting's load-time "
                   "quantize is not on disk (see weights MB). weights MB: parameters and buffers in memory. "
                   "parameters: weights the model represents (a quantised layer counts out x in). peak memory: the "
                   "highest memory while decoding at batch 1 (CPU: the process's resident-set "
                   "high-water mark; CUDA: allocated) above what was in use before the model loaded (after a "
                   "warm-up load and scoring, so that libraries are not counted). decode tok/s: batch 1, greedy, "
                   "{n} new tokens on the first prompt after a warm-up, EOS ignored, the median of 3 runs timed "
                   "apart from the evaluation.")


def metric_names(results: Sequence) -> list[str]:
    """Every metric any setting reports, in first-seen order (counts like tokens_scored left out)."""
    names: list[str] = []
    for r in results:
        for k, v in r.summary["metrics"].items():
            if k not in names and k != "tokens_scored" and isinstance(v, (int, float)):
                names.append(k)
    return names


def bar_chart(metric: str, labels: Sequence[str], values: Sequence[float | None]) -> bytes:
    """A PNG bar chart of one metric across settings."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 1.5), 3.2), dpi=100)
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color="#4C72B0")
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=10)
    ax.margins(y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
              "vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}pre{background:#f7f7f7;padding:8px;"
              "white-space:pre-wrap}figure{display:inline-block;margin:4px}code{background:#f3f3f3;padding:2px 4px}")


def fmt_cell(v, missing: str = "") -> str:
    """A table cell: floats to 4 significant digits, None as ``missing``."""
    if v is None:
        return missing
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_cell(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", "<br>")


def md_table(header: Sequence, rows: Sequence[Sequence], missing: str = "") -> list[str]:
    """A Markdown table's lines (cells escaped; None shown as ``missing``)."""
    lines = ["| " + " | ".join(_md_cell(fmt_cell(h)) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(fmt_cell(c, missing)) for c in row) + " |" for row in rows]
    return lines


def html_table(header: Sequence, rows: Sequence[Sequence], missing: str = "") -> str:
    """An HTML table (cells escaped; None shown as ``missing``)."""
    e = html.escape
    head = "".join(f"<th>{e(fmt_cell(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(fmt_cell(c, missing))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page around ``body``."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head><body>{body}</body></html>\n")


def _tables(results: Sequence) -> tuple[list[str], list[list], list[str], list[list]]:
    columns = SETTING_COLUMNS + (("compile",) if any(r.summary["settings"].get("compile") for r in results) else ())
    set_header = ["setting", *columns, "examples", "shots dropped", "seconds"]
    set_rows = []
    for r in results:
        st = r.summary["settings"]
        set_rows.append([r.setting.label, *[st.get(c) for c in columns],
                         r.summary["counts"]["evaluated"], r.summary["counts"]["shots_dropped"],
                         round(r.summary["timing"]["seconds"], 1)])
    names = metric_names(results)
    metric_rows = [[r.setting.label, *[r.summary["metrics"].get(m) for m in names]] for r in results]
    return set_header, set_rows, ["setting", *names], metric_rows


def _deployment_table(results: Sequence) -> tuple[list[str], list[list]] | None:
    """The deployment columns, one row per setting (None when no setting measured them)."""
    if not any(r.summary.get("deployment") for r in results):
        return None
    rows = [[r.setting.label, *[(r.summary.get("deployment") or {}).get(k) for k in DEPLOYMENT_COLUMNS.values()]]
            for r in results]
    return ["setting", *DEPLOYMENT_COLUMNS], rows


def _example_text(row: dict) -> str:
    if "choices" in row:
        return f"{row['choices'][row['prediction']]} (choice {row['prediction']})"
    if "prediction" in row:
        return row["prediction"]
    return f"perplexity {row.get('perplexity', float('nan')):.4g}"


def metric_note(results: Sequence) -> str:
    """What the metrics table's numbers are; with several references per example, which column used which."""
    note = "ROUGE: mean F-measure (rouge-score, stemmed; 0–1). BLEU and chrF: sacrebleu corpus scores (0–100)."
    multi = next((r.summary["references"] for r in results if r.summary.get("references")), None)
    if multi:
        note += f" Several references per example ({', '.join(multi['fields'])}): {multi['scoring']}."
    return note


def _examples(results: Sequence, k: int) -> list[dict]:
    """The first ``k`` examples: input, reference and each setting's output."""
    n = min([k, *[len(r.rows) for r in results]])
    out = []
    for i in range(n):
        first = results[0].rows[i]
        ref = first.get("reference")
        if first.get("references"):  # several: numbered, the first is the one rouge1... used
            ref = "\n".join(f"[{j}] {x}" for j, x in enumerate(first["references"], start=1))
        if ref is None and "choices" in first:
            ref = first["choices"][first["answer"]]
        out.append({"input": first["input"], "reference": ref,
                    "outputs": [(r.setting.label, _example_text(r.rows[i])) for r in results]})
    return out


def write_report(cfg, results: Sequence, command: str) -> dict[str, Path]:
    """Write report.md, report.html and one chart_<metric>.png per metric into ``cfg.out`` (the caller writes the
    resolved config, ``config.yaml``, beside them)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    title = cfg.title or f"lmforge compare: {Path(cfg.data).name}"
    labels = [r.setting.label for r in results]
    set_header, set_rows, metric_header, metric_rows = _tables(results)
    charts: dict[str, bytes] = {}
    for j, m in enumerate(metric_header[1:], start=1):
        charts[m] = bar_chart(m, labels, [row[j] for row in metric_rows])
    paths: dict[str, Path] = {}
    for m, png in charts.items():
        p = out / f"chart_{m}.png"
        write_bytes_atomic(p, png)
        paths[m] = p
    examples = _examples(results, cfg.examples_shown)
    first = results[0].summary
    facts = (f"Data: `{cfg.data}` ({first['counts']['evaluated']} of {first['counts']['records']} records), "
             f"task: {cfg.task}, max_new_tokens: {cfg.max_new_tokens}, chat template: "
             f"{'on' if first['settings']['chat'] else 'off'}.")
    total = sum(r.summary["timing"]["seconds"] for r in results)

    notes = [cfg.notes.strip(), ""] if cfg.notes else []
    md = [f"# {title}", "", "Regenerate this report with:", "", "```", command, "```", "", *notes, facts,
          f"Evaluation time: {total:.0f} s in all on {cfg.device} (model loading not included).", "",
          "## Settings", "", *md_table(set_header, set_rows), "",
          "## Metrics", "", *md_table(metric_header, metric_rows), "",
          metric_note(results), ""]
    deploy = _deployment_table(results)
    note = DEPLOYMENT_NOTE.format(n=getattr(cfg, "decode_tokens", 64))
    if deploy is not None:
        md += ["## Deployment", "", *md_table(*deploy), "", note, ""]
    md += [f"![{m}](chart_{m}.png)" for m in charts] + [""]
    md += ["## Example outputs", ""]
    for i, ex in enumerate(examples):
        md += [f"### Example {i + 1}", "", "<details><summary>input</summary>", "", "```",
               ex["input"].replace("```", "ʼʼʼ"), "```", "", "</details>", ""]
        md += md_table(["", "output"], [["**reference**", ex["reference"] or ""], *ex["outputs"]]) + [""]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")

    e, table = html.escape, html_table
    imgs = "".join(f'<figure><img alt="{e(m)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                   f"</figure>" for m, png in charts.items())
    ex_html = ""
    for i, ex in enumerate(examples):
        rows = [["reference", ex["reference"] or ""], *ex["outputs"]]
        ex_html += (f"<h3>Example {i + 1}</h3><details><summary>input</summary><pre>{e(ex['input'])}</pre></details>"
                    + table(["", "output"], rows))
    page = html_page(title, f"<h1>{e(title)}</h1><p>Regenerate this report with:</p>"
                     f"<pre><code>{e(command)}</code></pre>{f'<p>{e(cfg.notes.strip())}</p>' if cfg.notes else ''}"
                     f"<p>{e(facts.replace('`', ''))} Evaluation time: {total:.0f} s on {e(cfg.device)} "
                     f"in all (model loading not included).</p><h2>Settings</h2>{table(set_header, set_rows)}"
                     f"<h2>Metrics</h2>{table(metric_header, metric_rows)}<p>{e(metric_note(results))}</p>"
                     + (f"<h2>Deployment</h2>{table(*deploy)}<p>{e(note)}</p>" if deploy is not None else "")
                     + f"{imgs}<h2>Example outputs</h2>{ex_html}")
    write_text_atomic(out / "report.html", page)
    paths.update(md=out / "report.md", html=out / "report.html")
    return paths
