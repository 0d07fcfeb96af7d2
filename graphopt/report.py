"""What a run did: one record per plan step (graphopt/steps.py), the final validation, the model
before and after.

`Report.to_dict()` is the JSON schema pipelines read (SCHEMA_VERSION 2):
{"schema_version": 2, "preset",
 "steps": [{"name", "kind", "rewrites", "seconds", "status", "check", "note", "near_misses",
            "fidelity", "measurements"}],
 "validation": {...}, "model": {"before": {...}, "after": {...}}, "notes": [...],
 "machine": {"cpu", "flags", "cores", "versions"},
 "passes": [...], "fidelity": {...} | null, "lowering": {...} | null}
The last three are views kept for readers of version 1: "passes" is "steps" again, "fidelity"
the first approximate step's fidelity, "lowering" the first lowering step's measurements.
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

from graphopt import atomic, machine
from graphopt.steps import StepKind, StepRecord
from graphopt.verify import Validation

SCHEMA_VERSION = 2
_MODEL_KEYS = ("num_nodes", "num_params", "param_bytes", "op_counts")


@dataclasses.dataclass
class Report:
    preset: str | None
    steps: list[StepRecord]
    validation: Validation | None
    before: dict[str, Any]
    after: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

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
        return {
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

    def write_json(self, path: str | os.PathLike) -> Path:
        """Atomic write: a temporary file beside `path`, then a rename."""
        text = json.dumps(_finite(self.to_dict()), indent=2, default=_json_default, allow_nan=False)
        return write_atomic(Path(path), text)

    def write_html(self, path: str | os.PathLike, *, bench: dict[str, Any] | None = None) -> Path:
        """One self-contained page (no network needed to open it), atomically."""
        from graphopt import report_html

        data = json.loads(json.dumps(_finite(self.to_dict()), default=_json_default, allow_nan=False))
        return write_atomic(Path(path), report_html.render(data, bench=bench))

    def write(self, path: str | os.PathLike) -> Path:
        """HTML for a `.html` / `.htm` path, JSON otherwise."""
        return self.write_html(path) if Path(path).suffix.lower() in (".html", ".htm") else self.write_json(path)

    def tables(self):
        """rich renderables: the passes table, the validation table, notes."""
        from rich.console import Group
        from rich.table import Table

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
        parts: list[Any] = [passes]
        summary = Table(title="model", title_justify="left")
        for col in ("", "nodes", "params", "bytes"):
            summary.add_column(col)
        for label, d in (("before", self.before), ("after", self.after)):
            summary.add_row(label, str(d["num_nodes"]), f"{d['num_params']:,}", f"{d['param_bytes']:,}")
        parts.append(summary)
        for step in self.steps:
            if step.measurements:
                parts.append(lowering_table(step.measurements))
            if step.fidelity:
                parts.append(fidelity_table(step.fidelity))
        if self.validation:
            parts.append(validation_table(self.validation))
        parts.extend(f"note: {n}" for n in self.notes)
        return Group(*parts)


def write_atomic(path: Path, text: str) -> Path:
    """Never a half-written report (graphopt/atomic.py)."""
    return atomic.write_text(path, text)


def fidelity_table(fidelity: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    if fidelity.get("precision") in ("int8", "int4"):
        return precision_table(fidelity)
    if "conversion" in fidelity:
        return conversion_lines(fidelity)
    table = Table(title=f"fidelity: {fidelity['mixer']} on {len(fidelity['layers_swapped'])}/{fidelity['layers_total']} "
                        f"attention layers (held-out rows: {fidelity['calibration']['held_out_rows']})", title_justify="left")
    for col in ("layer", "node", "swapped", "rel error", "cosine", "note"):
        table.add_column(col)
    for entry in fidelity["per_layer"]:
        table.add_row(str(entry["index"]), entry["node"], "yes" if entry["swapped"] else "no", f"{entry['rel_error']:.4f}",
                      f"{entry['cosine']:.4f}", entry.get("kept_because", entry.get("as", "")))
    lines = _end_to_end_lines(fidelity)
    if "decode" in fidelity:
        decode = fidelity["decode"]
        lines.append(f"decoding: KV caches {', '.join(decode['removed'])} replaced by states "
                     f"{', '.join(decode['state_inputs'])} -> {', '.join(decode['state_outputs'])}; {decode['how']}")
    if "warning" in fidelity["calibration"]:
        lines.append(f"WARNING: {fidelity['calibration']['warning']}")
    return Group(table, *lines)


def _end_to_end_lines(fidelity: dict[str, Any]) -> list[str]:
    return [f"end to end {name}: mean cosine {v['mean_cosine']:.5f}, min cosine {v['min_cosine']:.5f}, max abs error "
            f"{v['max_abs_error']:.3e}" + (f", KL {v['kl_divergence']:.4g}" if "kl_divergence" in v else "")
            for name, v in fidelity["end_to_end"].items()]


def conversion_lines(fidelity: dict[str, Any]):
    """A bf16 / fp16 graph conversion: what went to 16 bits, what stayed float32, the fidelity."""
    from rich.console import Group

    c = fidelity["conversion"]
    kept = ", ".join(f"{op} x{n}" for op, n in c["kept_float32"].items()) or "none"
    lines = [f"{fidelity['precision']} graph: {c['nodes_in_low_precision']} nodes in {fidelity['precision']}, "
             f"{c['casts']} casts; kept float32: {kept}", *_end_to_end_lines(fidelity),
             f"measured on {fidelity['measured_on']}"]
    if "note" in fidelity:
        lines.append(fidelity["note"])
    if "warning" in fidelity["calibration"]:
        lines.append(f"WARNING: {fidelity['calibration']['warning']}")
    return Group(*lines)


def precision_table(fidelity: dict[str, Any]):
    """An int8 / int4 step: every layer with its precision, range, error and measured float / low time."""
    from rich.console import Group
    from rich.table import Table

    low = fidelity["precision"]
    sel = fidelity["selection"]
    table = Table(title=f"fidelity: {low} on {sel[f'{low}_layers']}/{sel['layers_total']} layers "
                        f"(bound {sel['fidelity_bound']}; held-out rows: {fidelity['calibration']['held_out_rows']})",
                  title_justify="left")
    for col in ("layer", "node", "op", "precision", "range", "rel error", "float ms", f"{low} ms", "note"):
        table.add_column(col)
    for e in fidelity["layers"]:
        table.add_row(str(e["index"]), e["node"], e["op"], e["precision"], e.get("range", "-"),
                      "-" if e["rel_error"] is None else f"{e['rel_error']:.4f}",
                      "-" if e["float_ms"] is None else f"{e['float_ms']:.3f}",
                      "-" if e[f"{low}_ms"] is None else f"{e[f'{low}_ms']:.3f}", e.get("kept_because", ""))
    smoothing = fidelity.get("smoothing", {})
    migrated = [a for a in smoothing.get("activations", []) if a["alpha"]]
    lines = _end_to_end_lines(fidelity)
    if "smoothing" in fidelity:
        lines.append(f"SmoothQuant: {len(migrated)} activation(s) migrated into the weights"
                     + (", validated equal" if smoothing.get("validated_equal") else "")
                     + (f"; {smoothing['undone']}" if "undone" in smoothing else ""))
    corrected = fidelity.get("bias_correction", {})
    if corrected.get("layers"):
        lines.append(f"bias correction on {corrected['layers']} layer(s): held-out mean cosine "
                     f"{corrected['mean_cosine_with']:.5f} with, {corrected['mean_cosine_without']:.5f} without; "
                     + ("kept" if corrected["kept"] else "dropped"))
    if "note" in fidelity:
        lines.append(fidelity["note"])
    if "warning" in fidelity["calibration"]:
        lines.append(f"WARNING: {fidelity['calibration']['warning']}")
    return Group(table, *lines)


def lowering_table(lowering: dict[str, Any]):
    from rich.table import Table

    if "candidates" in lowering:
        return runtime_table(lowering)
    cached = " (cached choice)" if lowering.get("cached") else ""
    table = Table(title=f"lowering for {lowering['target']} ({lowering['provider']}){cached}", title_justify="left")
    for col in ("op kind", "chosen", "median ms per candidate"):
        table.add_column(col)
    for kind, choice in lowering["choices"].items():
        times = lowering["timings_ms"].get(kind, {})
        table.add_row(kind, choice, ", ".join(f"{n} {t:.2f}" for n, t in times.items()))
    for what, why in lowering["skipped"].items():
        table.add_row(what, "-", f"not timed: {why}")
    return table


def runtime_table(lowering: dict[str, Any]):
    """--target cpu: every runtime candidate with its latency and fidelity, the choice marked."""
    from rich.console import Group
    from rich.table import Table

    m = lowering["machine"]
    cached = " (cached choice)" if lowering.get("cached") else ""
    table = Table(title=f"runtime for {lowering['target']} on {m['cpu']} ({', '.join(m['flags']) or 'no avx512/amx'}){cached}",
                  title_justify="left")
    for col in ("candidate", "median ms", "min cosine", "note"):
        table.add_column(col)
    for name, c in lowering["candidates"].items():
        note = "chosen" if name == lowering["chosen"] else c.get("rejected") or c.get("error") or ""
        table.add_row(name, f"{c['median_ms']:.2f}" if "median_ms" in c else "-",
                      f"{c['min_cosine']:.6f}" if "min_cosine" in c else "-", note)
    for name, why in lowering.get("skipped", {}).items():
        table.add_row(name, "-", "-", f"not tried: {why}")
    allowed = ", ".join(lowering["precision_allowed"]) or "fp32 only"
    return Group(table, f"reduced precision allowed: {allowed} (bound: min cosine >= {lowering['fidelity_bound']})")


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
