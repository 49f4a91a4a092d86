"""``report.html``: the eval report as a page a person reads, self-contained.

The summary chart is a hand-written inline SVG rather than a Plotly figure: the page must
open offline, anywhere, and Plotly's script alone is several megabytes. Every piece of text
that came from a model, a prompt or a file goes through ``html.escape``: answers are
untrusted input, and a page that renders them must not run them.
"""

from __future__ import annotations

import html
import time

COLORS = {"base": "#9aa0a6", "adapter": "#1a73e8", "release": "#e8710a"}
MAX_FAILURES_SHOWN = 30


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def summary_svg(report: dict) -> str:
    """Bars of each side's task score (0-1), with its value; an SVG string."""
    sides = report["sides"]
    width, bar_h, gap, left = 520, 26, 10, 90
    height = len(sides) * (bar_h + gap) + gap + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(report["metric"])} by side">']
    for row, (side, data) in enumerate(sides.items()):
        y = gap + row * (bar_h + gap)
        length = max(0.0, min(1.0, float(data["score"]))) * (width - left - 70)
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7:.0f}" text-anchor="end" font-size="13">'
                     f'{_e(side)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar_h}" '
                     f'fill="{COLORS.get(side, "#555")}"/>')
        parts.append(f'<text x="{left + length + 6:.1f}" y="{y + bar_h * 0.7:.0f}" font-size="13">'
                     f'{data["score"]:.3f}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" font-size="11" fill="#555">{_e(report["metric"])} '
                 f'(0 to 1, {"higher" if report.get("higher_is_better", True) else "lower"} is better)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _latency_cell(latency: dict) -> str:
    ms = lambda s: "n/a" if s is None else f"{s * 1000:.1f} ms"
    rate = latency.get("tokens_per_s_p50")
    return (f"TTFT p50 {ms(latency.get('ttft_p50_s'))}, p95 {ms(latency.get('ttft_p95_s'))}; per token p95 "
            f"{ms(latency.get('per_token_p95_s'))}; {'n/a' if rate is None else f'{rate:.1f}'} tokens/s")


def render_report_html(report: dict) -> str:
    sides = report["sides"]
    names = list(sides)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["created_at"]))
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>Eval report: {_e(report['run'])}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
           "vertical-align:top;text-align:left}pre{white-space:pre-wrap;margin:0;font-size:12px}"
           ".bad{color:#b00020}</style></head><body>",
           f"<h1>Eval report: run {_e(report['run'])}</h1>",
           f"<p>{_e(report['n'])} prompts from {_e(report['prompts_source'])}; metric <b>{_e(report['metric'])}</b> "
           f"({_e(report.get('metric_description'))}); greedy, up to {_e(report['generation']['max_new_tokens'])} "
           f"new tokens; made {_e(created)} in {_e(report['seconds'])} s.</p>"]
    if report.get("against"):
        out.append(f"<p>Against release <b>{_e(report['against']['name'])}</b> "
                   f"v{_e(report['against']['version'])}.</p>")
    out += ["<h2>Summary</h2>", summary_svg(report),
            "<table><tr><th>side</th><th>score</th><th>valid JSON</th><th>schema errors</th>"
            "<th>policy violations</th><th>latency</th></tr>"]
    for side, data in sides.items():
        schema = "n/a" if data["schema_errors"] is None else data["schema_errors"]
        out.append(f"<tr><td>{_e(side)}</td><td>{data['score']:.3f}</td><td>{data['valid_json']:.0%}</td>"
                   f"<td>{_e(schema)}</td><td>{_e(data['policy_violations'])}</td>"
                   f"<td>{_e(_latency_cell(data['latency']))}</td></tr>")
    out.append("</table>")
    if report.get("schema_errors_are"):
        out.append(f"<p>A schema error is an answer {_e(report['schema_errors_are'])}.</p>")
    out.append("<h2>Flips</h2><table><tr><th>comparison</th><th>improved</th><th>regressed</th>"
               "<th>unchanged</th></tr>")
    for name, flip in report["flips"].items():
        out.append(f"<tr><td>{_e(name.replace('_', ' '))}</td><td>{len(flip['improved'])}</td>"
                   f"<td class='bad'>{len(flip['regressed'])}</td><td>{len(flip['unchanged'])}</td></tr>")
    out.append("</table>")
    ratings = report.get("ratings") or {}
    if ratings.get("count"):
        out.append(f"<p>Blind A/B: the fine-tuned answer was preferred in {_e(ratings['wins'])} of "
                   f"{_e(ratings['count'])} ratings ({ratings['win_rate']:.0%}); ties and 'both bad' are not wins.</p>")
    else:
        out.append("<p>Blind A/B: no ratings recorded for this run (rate answers in the Chat tab).</p>")
    out.append("<h2>Policy</h2>")
    policy = report.get("policy") or {}
    declared = [f"{key}: {policy[key]}" for key in ("forbidden_phrases", "forbidden_regexes", "max_chars",
                                                    "must_refuse") if policy.get(key)]
    out.append("<p>" + (_e("; ".join(declared)) if declared else "No policy declared.") + "</p>")
    for side, data in sides.items():
        for violation in data["violations"][:MAX_FAILURES_SHOWN]:
            where = "refusal prompt" if violation["item"] is None else f"item {violation['item']}"
            out.append(f"<p class='bad'>{_e(side)}, {_e(where)}: {_e(violation['check'])} "
                       f"({_e(violation['detail'])})</p>")
    out.append(f"<h2>Failure cases ({len(report['failures'])} where the adapter's score is not perfect)</h2>")
    if report["failures"]:
        out.append("<table><tr><th>#</th><th>prompt</th><th>reference</th>"
                   + "".join(f"<th>{_e(side)}</th>" for side in names) + "</tr>")
        for index in report["failures"][:MAX_FAILURES_SHOWN]:
            item = report["items"][index]
            out.append(f"<tr><td>{index}</td><td><pre>{_e(item['prompt'])}</pre></td>"
                       f"<td><pre>{_e(item['reference'])}</pre></td>"
                       + "".join(f"<td><pre>{_e(item['answers'][side])}</pre><small>score "
                                 f"{item['scores'][side]:.2f}</small></td>" for side in names) + "</tr>")
        out.append("</table>")
        if len(report["failures"]) > MAX_FAILURES_SHOWN:
            out.append(f"<p>{len(report['failures']) - MAX_FAILURES_SHOWN} more in report.json.</p>")
    out.append("</body></html>")
    return "\n".join(out)
