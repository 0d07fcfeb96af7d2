"""What a run did: one record per plan step (graphopt/steps.py), the final validation, the model
before and after.

`Report.to_dict()` is the JSON schema pipelines read (SCHEMA_VERSION 3):
{"schema_version": 3, "preset",
 "steps": [{"name", "kind", "rewrites", "seconds", "status", "check", "note", "near_misses",
            "fidelity", "measurements",
            "details": {"tables": [{"title", "columns": [{"key", "label", "format"}], "rows": [{...}],
                                    "chosen", "chart", "line", "unit"}],
                        "end_to_end": {output: {"mean_cosine", "min_cosine", "max_abs_error", ...}},
                        "bound", "lines": [...], "warnings": [...]} | null}],
 "validation": {...}, "model": {"before": {...}, "after": {...}}, "notes": [...],
 "machine": {"cpu", "flags", "cores", "versions"},
 "passes": [...], "fidelity": {...} | null, "lowering": {...} | null,
 "result": {"runtime", "precision", "bytes_before", "bytes_after", "fidelity": {...},
            and once timed "speedup", "before_ms", "after_ms", "measured_in", "inputs", "rounds"}}
"result" is the headline (graphopt/headline.py) the CLI's summary and the page open with.
"details" (version 3) is what the renderers draw: each step declares its tables and lines. A
step's "fidelity" and "measurements" dicts are kept for readers of version 2; the last three
keys are views kept for readers of version 1: "passes" is "steps" again, "fidelity" the first
approximate step's fidelity, "lowering" the first lowering step's measurements.
`Report.tables()` renders the same for people (rich); `Report.write_html()` writes one
self-contained page (graphopt/report_html.py) from the JSON alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from graphopt import atomic, headline, machine
from graphopt.details import Details, end_to_end_lines
from graphopt.steps import StepKind, StepRecord
from graphopt.verify import Validation

SCHEMA_VERSION = 3
_MODEL_KEYS = ("num_nodes", "num_params", "param_bytes", "op_counts")


@dataclasses.dataclass
class Report:
    preset: str | None
    steps: list[StepRecord]
    validation: Validation | None
    before: dict[str, Any]
    after: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)
    runtime: str = "onnxruntime"  # where the optimized model is meant to run, and at what precision
    precision: str = "fp32"
    timing: dict[str, Any] | None = None  # headline.measure's, once OptimizeResult.measure() ran

    @property
    def passes(self) -> list[StepRecord]:
        """The step records (the name of version 1)."""
        return self.steps

    @property
    def fidelity(self) -> dict[str, Any] | None:
        """The first approximate step's fidelity report (the mixer swap's), or None."""
        return next((s.fidelity for s in self.steps if s.kind == str(StepKind.APPROXIMATE) and s.fidelity), None)

    @property
    def lowering(self) -> dict[str, Any] | None:
        """The first lowering step's measured selection (optimize --target), or None."""
        return next((s.measurements for s in self.steps if s.kind == str(StepKind.LOWERING) and s.measurements), None)

    @property
    def total_rewrites(self) -> int:
        return sum(p.total_rewrites for p in self.steps if p.status == "applied")

    def rewrites(self) -> dict[str, int]:
        """{rule: count} over applied passes, the form golden tests compare."""
        counts: dict[str, int] = {}
        for p in self.steps:
            if p.status == "applied":
                for rule, n in p.rewrites.items():
                    if n:
                        counts[rule] = counts.get(rule, 0) + n
        return counts

    def to_dict(self) -> dict[str, Any]:
        steps = [p.to_dict() for p in self.steps]
        out = {
            "schema_version": SCHEMA_VERSION,
            "preset": self.preset,
            "steps": steps,
            "validation": self.validation.to_dict() if self.validation else None,
            "model": {"before": {k: self.before[k] for k in _MODEL_KEYS}, "after": {k: self.after[k] for k in _MODEL_KEYS}},
            "notes": list(self.notes),
            "machine": {**machine.describe(), "versions": machine.versions()},
            "passes": steps,
            "lowering": self.lowering,
            "fidelity": self.fidelity,
        }
        out["result"] = headline.build(out, self.timing, self.runtime, self.precision)
        return out

    def headline(self) -> str:
        """The result in one sentence: speed-up (once timed), fidelity, runtime and precision, size."""
        return headline.line(self.to_dict()["result"])

    def write_json(self, path: str | os.PathLike) -> Path:
        """Atomic write: a temporary file beside `path`, then a rename."""
        text = json.dumps(_finite(self.to_dict()), indent=2, default=_json_default, allow_nan=False)
        return atomic.write_text(path, text)

    def write_html(self, path: str | os.PathLike, *, bench: dict[str, Any] | None = None) -> Path:
        """One self-contained page (no network needed to open it), atomically."""
        from graphopt import report_html

        data = json.loads(json.dumps(_finite(self.to_dict()), default=_json_default, allow_nan=False))
        return atomic.write_text(path, report_html.render(data, bench=bench))

    def write(self, path: str | os.PathLike) -> Path:
        """HTML for a `.html` / `.htm` path, JSON otherwise."""
        return self.write_html(path) if Path(path).suffix.lower() in (".html", ".htm") else self.write_json(path)

    def tables(self):
        """rich renderables: the passes table, the validation table, notes."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        passes = Table(title="steps", title_justify="left")
        for col in ("step", "kind", "rewrites", "status", "check", "ms"):
            passes.add_column(col, justify="right" if col in ("ms",) else "left")
        for p in self.steps:
            fired = ", ".join(f"{r}={n}" for r, n in p.rewrites.items() if n) or "-"
            check = "-" if not p.check else "skipped (unchanged)" if "skipped" in p.check else (
                "ok" if p.check.get("passed") else "FAILED") + (
                f" (max abs {p.check['max_abs_error']:.2e})" if "max_abs_error" in p.check else
                f" (cosine {p.check['min_cosine']:.4f} vs bound {p.check['bound']})" if "bound" in p.check else "") + (
                f" [group of {len(p.check['group'])}]" if len(p.check.get("group", ())) > 1 else "")
            passes.add_row(p.name, p.kind, fired, p.status + (f": {p.note}" if p.note else ""), check, f"{p.seconds * 1e3:.1f}")
        parts: list[Any] = [Text(f"result: {self.headline()}", style="bold"), passes]
        summary = Table(title="model", title_justify="left")
        for col in ("", "nodes", "params", "bytes"):
            summary.add_column(col)
        for label, d in (("before", self.before), ("after", self.after)):
            summary.add_row(label, str(d["num_nodes"]), f"{d['num_params']:,}", f"{d['param_bytes']:,}")
        parts.append(summary)
        for step in self.steps:
            if step.details is not None:
                parts += details_renderables(step.details)
        if self.validation:
            parts.append(validation_table(self.validation))
        parts.extend(f"note: {n}" for n in self.notes)
        return Group(*parts)


def details_renderables(details: Details) -> list[Any]:
    """A step's details (graphopt/details.py) as rich tables and lines: the shapes, no step-specific code."""
    from rich.table import Table

    parts: list[Any] = []
    for t in details.tables:
        table = Table(title=t.title, title_justify="left")
        for column in t.columns:
            table.add_column(column.label, justify="right" if column.format else "left")
        for row in t.rows:
            cells = [t.cell(row, c) for c in t.columns]
            if t.chosen is not None and row.get(t.columns[0].key) == t.chosen:
                cells[0] = f"[bold]{cells[0]}[/bold]"
            table.add_row(*cells)
        parts.append(table)
    parts += details.lines or end_to_end_lines(details.end_to_end)
    parts += [f"WARNING: {w}" for w in details.warnings]
    return parts


def validation_table(validation: Validation):
    from rich.table import Table

    table = Table(title=f"validation on {validation.input_source} inputs", title_justify="left")
    for col in ("output", "dtype", "shape", "max abs", "max rel", "cosine", "rtol/atol", "result"):
        table.add_column(col)
    for o in validation.outputs:
        table.add_row(o.name, o.dtype, str(o.shape), f"{o.max_abs_error:.2e}", f"{o.max_rel_error:.2e}", f"{o.cosine:.6f}",
                      f"{o.rtol:g}/{o.atol:g}", ("pass" if o.passed else "FAIL") + (f" ({o.note})" if o.note else ""))
    return table


def _finite(obj: Any) -> Any:
    """Strict JSON for pipelines: non-finite metrics (a missing output's error) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
