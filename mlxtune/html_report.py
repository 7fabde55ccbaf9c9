"""The page `mlxtune compare --html FILE` writes: one self-contained HTML file, no network, no external files.

A summary table (one row per stage, the terminal table's columns) and an examples table: each held-out
prompt with the reference answer and every stage's reply side by side, where text a reply adds is marked
`<ins>` and reference text it lacks `<del>` (a word-level diff against the reference). The one thing to
know: everything from the data or a model is escaped; the only script is a filter that shows just the rows
where a stage after the adapter answers differently from it.
"""

from __future__ import annotations

import difflib
import html
import os
import re
from datetime import datetime
from pathlib import Path

from .files import write_text_atomic

_WORDS = re.compile(r"\s+|\w+|[^\w\s]")

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; }
#stages td.num { text-align: right; font-variant-numeric: tabular-nums; }
#examples td { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; max-width: 28em; }
td.match { background: #eefbea; }
td.miss { background: #fff4f2; }
ins { background: #ffe58a; text-decoration: none; }
del { background: #ffc8c8; color: #900; }
.stopless::after { content: " [no end-of-turn]"; color: #a60; font-style: italic; }
tr.hidden { display: none; }
.notes li { color: #555; }
"""

SCRIPT = """
const box = document.getElementById('only-disagree');
const rows = Array.from(document.querySelectorAll('#examples tbody tr'));
const count = rows.filter(r => r.classList.contains('disagree')).length;
document.getElementById('disagree-count').textContent = count + ' of ' + rows.length;
box.addEventListener('change', () => {
  for (const r of rows) r.classList.toggle('hidden', box.checked && !r.classList.contains('disagree'));
});
"""


def diff_html(reference: str, reply: str) -> str:
    """`reply` escaped, with words it adds to `reference` in <ins> and words it drops in <del>."""
    a, b = _WORDS.findall(reference.strip()), _WORDS.findall(reply.strip())
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(b[j1:j2])))
            continue
        if i2 > i1:
            out.append(f"<del>{html.escape(''.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{html.escape(''.join(b[j1:j2]))}</ins>")
    return "".join(out)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def page(result) -> str:
    """The whole HTML document for a `mlxtune.comparison.Comparison`."""
    e = html.escape
    stages = result.stages
    structured_rows = any(s.json_valid is not None for s in stages)
    head = ["stage", "exact match"] + (["JSON valid", "fields"] if structured_rows else []) + [
        "agreement", "mean KL", "stopped", "loss"]
    summary = []
    for s in stages:
        cells = [_pct(s.exact_match)] + ([_pct(s.json_valid), _pct(s.field_match)] if structured_rows else []) + [
            _pct(s.agreement), _num(s.mean_kl), _pct(s.stopped), _num(s.loss)]
        summary.append(f"<tr><th>{e(s.stage)}</th>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    examples = []
    for i, row in enumerate(result.rows):
        replies = [s.replies[i] if i < len(s.replies) else "" for s in stages]
        # the base is expected to differ: a row counts when a stage after the adapter differs from it
        adapter = next((r for s, r in zip(stages, replies) if s.stage == "adapter"), "")
        disagree = any(r.strip() != adapter.strip() for s, r in zip(stages, replies) if s.stage != "base")
        cells = [f"<td>{i + 1}</td><td>{row.line}</td><td>{e(row.prompt)}</td><td>{e(row.reference)}</td>"]
        for s, reply in zip(stages, replies):
            ok = reply.strip() == row.reference.strip()
            stopless = "" if i >= len(s.stops) or s.stops[i] else " stopless"
            cells.append(f'<td class="{"match" if ok else "miss"}{stopless}" data-stage="{e(s.stage)}">'
                         f"{diff_html(row.reference, reply)}</td>")
        examples.append(f'<tr class="{"disagree" if disagree else "agree"}">' + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{e(n)}</li>" for n in result.notes)
    stage_heads = "".join(f"<th>{e(s.stage)}</th>" for s in stages)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlxtune compare: {e(Path(result.data).name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Did the fine-tune survive?</h1>
<p>{result.n} held-out prompts from <code>{e(result.data)}</code>, {datetime.now():%Y-%m-%d %H:%M}.
Agreement and mean KL are measured against the adapter stage; KL in nats per reference answer token.</p>
<table id="stages"><thead><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr></thead>
<tbody>{"".join(summary)}</tbody></table>
{f'<ul class="notes">{notes}</ul>' if notes else ""}
<h2>Examples</h2>
<p>Each reply is diffed against the reference: <ins>added</ins>, <del>missing</del>. A stage after the adapter
answers differently from it on <span id="disagree-count">?</span> rows.
<label><input type="checkbox" id="only-disagree"> show only those</label></p>
<table id="examples"><thead><tr><th>#</th><th>line</th><th>prompt</th><th>reference</th>{stage_heads}</tr></thead>
<tbody>{"".join(examples)}</tbody></table>
<script>{SCRIPT}</script>
</body></html>
"""


def write_html(result, path: str | os.PathLike) -> Path:
    path = Path(path)
    write_text_atomic(path, page(result))
    return path
