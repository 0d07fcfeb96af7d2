"""One self-contained HTML page per run, drawn from the report's JSON alone (`Report.to_dict()`),
so a JSON written earlier renders the same page: inline CSS, charts as inline SVG (matplotlib,
the `report` extra; without it the page has the tables and says the charts need it), no
scripts, nothing fetched when it opens.

Sections: the plan (every step: kind, rewrites, status, check, time); the model before and
after (nodes, parameters, bytes, op histogram side by side); speed (every lowering step's
details: its tables, charted columns as bars, the chosen row marked; a benchmark's contenders);
fidelity (every approximate step's details: per-layer tables and charts, end to end per output
with the bound drawn); the machine (CPU, the flags that matter, runtime versions); the notes.
Steps are drawn from their declared details only (graphopt/details.py, report schema 3); a
schema-2 JSON renders without the speed and fidelity sections.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d2430; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d7dce3; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { padding: 3px 10px; border-bottom: 1px solid #e6e9ee; text-align: left; }
th { background: #f3f5f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #17803d; } .bad { color: #b42318; } .muted { color: #6b7280; } .chart { margin: 0.5em 0 1em; }
.headline { font-size: 1.15em; padding: 0.5em 0.8em; background: #f3f5f8; border-left: 4px solid #17803d; }
code { background: #f3f5f8; padding: 0 3px; border-radius: 3px; }
"""
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "neon", "sve")


def render(report: Mapping[str, Any], *, title: str = "graphopt report", bench: Mapping[str, Any] | None = None) -> str:
    """The page for `report` (a `Report.to_dict()`), with a benchmark's result when given."""
    charts = _Charts()
    parts = [f"<h1>{_e(title)}</h1>", _headline(report), _summary(report)]
    parts += ["<h2>Plan</h2>", _plan(report["steps"])]
    parts += ["<h2>Model before and after</h2>", _model(report["model"], charts)]
    speed = _speed(report["steps"], bench, charts)
    if speed:
        parts += ["<h2>Speed</h2>", speed]
    fid = _fidelity(report["steps"], charts)
    if fid:
        parts += ["<h2>Fidelity</h2>", fid]
    if report.get("validation"):
        parts += ["<h2>Validation</h2>", _validation(report["validation"])]
    parts += ["<h2>Machine</h2>", _machine(report.get("machine") or {})]
    if report.get("notes"):
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report["notes"]) + "</ul>"]
    if charts.missing:
        parts.insert(2, f"<p class='muted'>Charts need matplotlib ({_e(charts.missing)}): "
                        "<code>pip install graphopt[report]</code>; the tables are complete without it.</p>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(report: Mapping[str, Any]) -> str:
    """The result first (reports before it had no "result" key: nothing then)."""
    from graphopt import headline

    result = report.get("result")
    if not result:
        return ""
    good = result["fidelity"].get("passed", True) and result.get("speedup", 1.0) >= 1.0
    return (f"<p class='headline'><strong>Result:</strong> <span class='{'ok' if good else 'bad'}'>"
            f"{_e(headline.line(result))}</span></p>")


def _summary(report: Mapping[str, Any]) -> str:
    steps = report["steps"]
    applied = sum(1 for s in steps if s["status"] == "applied")
    validation = report.get("validation")
    verdict = ("" if not validation else
               f", validation <span class='{'ok' if validation['passed'] else 'bad'}'>"
               f"{'passed' if validation['passed'] else 'FAILED'}</span>")
    before, after = report["model"]["before"], report["model"]["after"]
    return (f"<p>Preset <code>{_e(report.get('preset') or 'explicit passes')}</code>: {len(steps)} steps, {applied} applied"
            f"{verdict}; nodes {before['num_nodes']} &rarr; {after['num_nodes']}, parameter bytes "
            f"{before['param_bytes']:,} &rarr; {after['param_bytes']:,}.</p>")


def _check(check: Mapping[str, Any] | None) -> str:
    if not check:
        return "<span class='muted'>-</span>"
    if "skipped" in check:
        return "<span class='muted'>skipped (unchanged)</span>"
    ok = check.get("passed")
    text = "ok" if ok else "FAILED"
    if "max_abs_error" in check:
        text += f" (max abs {check['max_abs_error']:.2e})"
    elif "bound" in check:
        text += f" (cosine {check['min_cosine']:.4f} vs bound {check['bound']})"
    if len(check.get("group", ())) > 1:
        text += f" [group of {len(check['group'])}]"
    return f"<span class='{'ok' if ok else 'bad'}'>{_e(text)}</span>"


def _plan(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in steps:
        fired = ", ".join(f"{r}={n}" for r, n in s["rewrites"].items() if n) or "-"
        status = _e(s["status"]) + (f": <span class='muted'>{_e(s['note'])}</span>" if s.get("note") else "")
        rows.append([_e(s["name"]), _e(s["kind"]), _e(fired), status, _check(s.get("check")), f"{s['seconds'] * 1e3:.1f}"])
    return _table(["step", "kind", "rewrites", "status", "check", "ms"], rows, numeric=(5,))


def _model(model: Mapping[str, Any], charts: "_Charts") -> str:
    before, after = model["before"], model["after"]
    rows = [[label, d["num_nodes"], f"{d['num_params']:,}", f"{d['param_bytes']:,}"] for label, d in
            (("before", before), ("after", after))]
    out = _table(["", "nodes", "parameters", "bytes"], rows, numeric=(1, 2, 3))
    ops = sorted(set(before["op_counts"]) | set(after["op_counts"]),
                 key=lambda o: (-(before["op_counts"].get(o, 0) + after["op_counts"].get(o, 0)), o))[:24]
    hist = [[_e(o), before["op_counts"].get(o, 0), after["op_counts"].get(o, 0)] for o in ops]
    out += charts.grouped_bars("op histogram (top 24 op types)", ops, {"before": [r[1] for r in hist],
                                                                        "after": [r[2] for r in hist]}, "nodes")
    return out + _table(["op", "before", "after"], hist, numeric=(1, 2))


def _speed(steps, bench, charts: "_Charts") -> str:
    parts = [_details(s, charts) for s in steps if s.get("kind") == "lowering" and s.get("details")]
    if bench:
        timed = {c["name"]: c["median_ms"] for c in bench.get("contenders", []) if c.get("median_ms") is not None}
        parts.append("<h3>benchmark</h3>")
        parts.append(charts.bars("benchmark: median ms per contender", timed, None, "ms"))
        parts.append(_table(["contender", "median ms", "max abs error"], [
            [_e(c["name"]), c.get("median_ms", "-"), c.get("max_abs_error", "-")] for c in bench.get("contenders", [])],
            numeric=(1, 2)))
    return "\n".join(parts)


def _fidelity(steps, charts: "_Charts") -> str:
    return "\n".join(_details(s, charts) for s in steps if s.get("kind") == "approximate" and s.get("details"))


def _details(step: Mapping[str, Any], charts: "_Charts") -> str:
    """A step's declared details (graphopt/details.py): each table with its chart, end to end
    per output against the bound, the lines and warnings. No step-specific code."""
    d = step["details"]
    name, bound = step["name"], d.get("bound")
    parts = [f"<h3>{_e(name)}</h3>"]
    for t in d.get("tables", []):
        columns = t["columns"]
        key = columns[0]["key"]
        if t.get("chart"):
            values = {str(r.get(key)): r[t["chart"]] for r in t["rows"] if isinstance(r.get(t["chart"]), (int, float))}
            label = next((c["label"] for c in columns if c["key"] == t["chart"]), t["chart"])
            chosen = "" if t.get("chosen") is None else f" (chosen: {t['chosen']})"
            parts.append(charts.bars(f"{t['title']}: {label}{chosen}", values, None if t.get("chosen") is None else str(t["chosen"]),
                                     t.get("unit") or label, line=t.get("line")))
        numeric = tuple(i for i, c in enumerate(columns) if c.get("format"))
        rows = []
        for r in t["rows"]:
            cells = [_cell(r.get(c["key"]), c.get("format", "")) for c in columns]
            if t.get("chosen") is not None and r.get(key) == t["chosen"]:
                cells[0] = f"<b>{cells[0]}</b>"
            rows.append(cells)
        parts.append(f"<p>{_e(t['title'])}</p>" + _table([c["label"] for c in columns], rows, numeric=numeric))
    e2e = d.get("end_to_end") or {}
    if e2e:
        parts.append(charts.bars(f"{name}: end-to-end mean cosine per output (bound {bound})",
                                 {k: v["mean_cosine"] for k, v in e2e.items()}, None, "mean cosine", line=bound))
        parts.append(_table(["output", "mean cosine", "min cosine", "max abs error"], [
            [_e(k), f"{v['mean_cosine']:.6f}", f"{v['min_cosine']:.6f}", f"{v['max_abs_error']:.3e}"]
            for k, v in e2e.items()], numeric=(1, 2, 3)))
    parts += [f"<p>{_e(line)}</p>" for line in d.get("lines", []) if not line.startswith("end to end ")]
    parts += [f"<p class='bad'>{_e(w)}</p>" for w in d.get("warnings", [])]
    return "\n".join(parts)


def _cell(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-" if spec else ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return _e(value)


def _validation(v: Mapping[str, Any]) -> str:
    rows = [[_e(c["name"]), f"<span class='{'ok' if c['passed'] else 'bad'}'>{'ok' if c['passed'] else 'FAILED'}</span>",
             f"{c['max_abs_error']:.3e}", f"{c['cosine']:.6f}"] for c in v.get("outputs", [])]
    return f"<p>inputs: {_e(v.get('inputs', ''))}</p>" + _table(["output", "check", "max abs error", "cosine"], rows,
                                                                    numeric=(2, 3))


def _machine(m: Mapping[str, Any]) -> str:
    if not m:
        return "<p class='muted'>not recorded in this report</p>"
    flags = [f for f in m.get("flags", []) if f in FLAGS]
    rows = [["CPU", _e(m.get("cpu", "?"))], ["cores", _e(m.get("cores", "?"))], ["flags that matter", _e(", ".join(flags) or "none")]]
    rows += [[_e(k), _e(v)] for k, v in (m.get("versions") or {}).items()]
    return _table(["", ""], rows)


class _Charts:
    """Inline SVG charts (matplotlib with the Agg backend), or nothing when it is missing."""

    def __init__(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            matplotlib.rcParams["svg.hashsalt"] = "graphopt"  # the same JSON renders the same page

            self.plt, self.missing = plt, ""
        except ImportError as exc:
            self.plt, self.missing = None, str(exc)

    def _svg(self, fig) -> str:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        self.plt.close(fig)
        text = buf.getvalue()
        return f"<div class='chart'>{text[text.index('<svg'):]}</div>"

    def bars(self, title: str, values: Mapping[str, float], chosen: str | None, unit: str, line: float | None = None) -> str:
        if self.plt is None or not values:
            return ""
        names = list(values)
        fig, ax = self.plt.subplots(figsize=(8, max(1.2, 0.32 * len(names) + 0.8)))
        colors = ["#2f6fdf" if n == chosen else "#9db4d8" for n in names]
        ax.barh(names, [float(values[n]) for n in names], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=10, loc="left")
        if line is not None:
            ax.axvline(float(line), color="#b42318", linestyle="--", linewidth=1, label=f"bound {line}")
            lo = min(min(values.values()), float(line))
            ax.set_xlim(max(0.0, lo - (1 - lo) * 0.5 - 1e-4), 1.0 + 1e-4 if max(values.values()) <= 1 else None)
            ax.legend(loc="lower right", fontsize=8)
        return self._svg(fig)

    def grouped_bars(self, title: str, names: Sequence[str], series: Mapping[str, Sequence[float]], unit: str) -> str:
        if self.plt is None or not names:
            return ""
        fig, ax = self.plt.subplots(figsize=(8, max(1.2, 0.3 * len(names) + 0.8)))
        height = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.barh([j + i * height for j in range(len(names))], values, height=height, label=label)
        ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(names))], names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=10, loc="left")
        ax.legend(fontsize=8)
        return self._svg(fig)
