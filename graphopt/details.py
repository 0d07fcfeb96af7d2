"""The declared shape of what a step reports beyond its record: tables of rows (per layer, per
candidate, per op kind), end-to-end fidelity per output against a bound, and lines (notes,
warnings). A step builds its `Details` from its own measurements; the text and HTML renderers
(report.py, report_html.py) draw these shapes only, so a new step adds columns and lines, never
a renderer branch. In the report JSON (schema 3) each step has "details": `Details.to_dict()`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass
class Column:
    key: str  # the row field
    label: str
    format: str = ""  # a format spec for numbers ("", ".4f", ".2e"); text is shown as it is


@dataclasses.dataclass
class Table:
    """Rows of one kind. `chosen`: the value of the first column in the row that was chosen (a
    measured candidate); `chart`: a numeric column drawn as bars in the page, with `line` (a
    bound) across it."""

    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    chosen: Any = None
    chart: str | None = None
    line: float | None = None
    unit: str = ""

    def cell(self, row: Mapping[str, Any], column: Column) -> str:
        value = row.get(column.key)
        if value is None or value == "":
            return "-" if column.format else ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (int, float)) and column.format:
            return format(value, column.format)
        return str(value)


@dataclasses.dataclass
class Details:
    tables: list[Table] = dataclasses.field(default_factory=list)
    end_to_end: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # output -> metrics
    bound: float | None = None  # the fidelity bound the end-to-end numbers were held to
    lines: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Details | None:
        if not data:
            return None
        tables = [Table(**{**t, "columns": [Column(**c) for c in t["columns"]]}) for t in data.get("tables", [])]
        return cls(tables, dict(data.get("end_to_end", {})), data.get("bound"), list(data.get("lines", [])),
                   list(data.get("warnings", [])))


def columns(*spec: tuple[str, str] | tuple[str, str, str]) -> list[Column]:
    return [Column(*s) for s in spec]


def end_to_end_lines(end_to_end: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One line per output: mean and min cosine, max abs error, KL where the output is logits."""
    return [f"end to end {name}: mean cosine {v['mean_cosine']:.5f}, min cosine {v['min_cosine']:.5f}, max abs error "
            f"{v['max_abs_error']:.3e}" + (f", KL {v['kl_divergence']:.4g}" if "kl_divergence" in v else "")
            for name, v in end_to_end.items()]


def calibration_warnings(report: Mapping[str, Any]) -> list[str]:
    warning = (report.get("calibration") or {}).get("warning")
    return [warning] if warning else []


def rows(entries: Sequence[Mapping[str, Any]], **renamed: str) -> list[dict[str, Any]]:
    """Copies of `entries` with fields renamed (new=old), for a table's columns."""
    return [{**e, **{new: e.get(old) for new, old in renamed.items()}} for e in entries]
