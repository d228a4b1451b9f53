"""report.html: the whole report in one self-contained file to open and share. Figures are
inline (base64 PNG data URIs), tables sort by a click on a column's header (a few lines of
inline JavaScript), nothing is fetched: it opens from disk, from a mail attachment, with
no server and no network.

Order: the sweep's counts and notes, then the findings (the report's `findings` table,
`FINDINGS_TABLE`, when it has one; else the method x model tables, the comparison the
studies make), the unfinished trials, the figures, and every other table.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from memray.report.figures import FigureFile
from memray.report.tables import Table

#: The table that holds the report's findings: shown first, under "Findings".
FINDINGS_TABLE = "findings"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       background: #fff; margin: 0 auto; max-width: 1400px; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin: 0 0 .3em; } h2 { font-size: 1.25em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.meta { color: #555; } .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .4em 0; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; margin-top: .3em; }
.table-wrap { overflow-x: auto; margin: .5em 0 1.2em; }
table { border-collapse: collapse; font-size: .9em; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; white-space: nowrap; }
th { background: #f3f5f8; position: sticky; top: 0; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
tr:hover td { background: #f8fafc; }
.tablenote { color: #555; font-size: .9em; }
"""

#: Click a header: sort its table's rows by that column (numbers as numbers, "-" last),
#: again: the other way.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    function key(row) {
      var text = row.cells[column].textContent.trim(), number = parseFloat(text.replace(/,/g, ""));
      return isNaN(number) ? [1, text] : [0, number];
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x[0] !== y[0]) return x[0] - y[0];
      var order = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
      return ascending ? order : -order;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _table(table: Table, heading: str = "h2") -> str:
    parts = [f"<{heading} id=\"table-{html.escape(table.name)}\">{html.escape(table.title)}</{heading}>"]
    if table.note:
        parts.append(f"<p class=\"tablenote\">{html.escape(table.note)}</p>")
    if table.text.empty:
        parts.append("<p>(none)</p>")
        return "\n".join(parts)
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in table.text.columns)
    rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in row) + "</tr>"
                     for row in table.text.itertuples(index=False))
    parts.append(f"<div class=\"table-wrap\"><table class=\"sortable\" data-table=\"{html.escape(table.name)}\">"
                 f"<thead><tr>{header}</tr></thead><tbody>\n{rows}\n</tbody></table></div>")
    return "\n".join(parts)


def _figure(key: str, figure: FigureFile) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (f"<figure id=\"figure-{html.escape(key)}\"><img src=\"data:image/png;base64,{data}\" alt=\"{caption}\">"
            f"<figcaption>{caption}</figcaption></figure>")


def findings_tables(tables: dict[str, Table]) -> list[Table]:
    """The tables of the Findings section: FINDINGS_TABLE where the report has one, else
    the method x model tables (one per dataset)."""
    if FINDINGS_TABLE in tables:
        return [tables[FINDINGS_TABLE]]
    return [table for key, table in tables.items() if key.startswith("method_by_model_")]


def html_report(name: str, sweep_dir: Path, counts: dict[str, int], tables: dict[str, Table],
                figures: dict[str, FigureFile], notes: list[str]) -> str:
    """The report as one HTML page (see the module): `counts` of trials per state, the
    report's tables by key, its figures (PNG files, read and inlined) and notes."""
    total = sum(counts.values())
    counted = ", ".join(f"{count} {state}" for state, count in counts.items())
    findings = findings_tables(tables)
    shown = {table.name for table in findings}
    body = [f"<h1>Sweep report: {html.escape(name)}</h1>",
            f"<p class=\"meta\">{total} trials: {html.escape(counted)}. Sweep folder: <code>{html.escape(str(sweep_dir))}"
            f"</code>. Made {time.strftime('%Y-%m-%d %H:%M')} by <code>memray report</code> from the trial result "
            "files; every number is also in <code>report.json</code>, every table in <code>tables/</code> as CSV. "
            "Click a column's header to sort its table.</p>"]
    body += [f"<p class=\"note\">{html.escape(note)}</p>" for note in notes]
    body.append("<section id=\"findings\"><h2>Findings</h2>")
    body += [_table(table, "h3") for table in findings] or ["<p>No finished trials to compare yet.</p>"]
    body.append("</section>")
    unfinished = tables.get("unfinished")
    if unfinished is not None and not unfinished.data.empty:
        body.append(_table(unfinished))
        shown.add(unfinished.name)
    elif unfinished is not None:
        body.append("<p>Every trial finished.</p>")
        shown.add(unfinished.name)
    if figures:
        body.append("<section id=\"figures\"><h2>Figures</h2>")
        body += [_figure(key, figure) for key, figure in figures.items()]
        body.append("</section>")
    body += [_table(table) for table in tables.values() if table.name not in shown]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Sweep report: {html.escape(name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
