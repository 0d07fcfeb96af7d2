"""The precision steps' reports as tables and lines (graphopt/details.py): int8 / int4 layer by
layer with their measured times, the bf16 / fp16 graph conversion."""

from __future__ import annotations

from typing import Any

from graphopt import details
from graphopt.details import Details, Table


def quantized(report: dict[str, Any], bound: float) -> Details:
    """int8 / int4: every layer with its precision, range, error, measured float / low time and why it was kept."""
    low = report["precision"]
    sel = report["selection"]
    table = Table(f"fidelity: {low} on {sel[f'{low}_layers']}/{sel['layers_total']} layers (bound {sel['fidelity_bound']}; "
                  f"held-out rows: {report['calibration']['held_out_rows']})",
                  details.columns(("index", "layer"), ("node", "node"), ("op", "op"), ("precision", "precision"),
                                  ("range", "range"), ("rel_error", "rel error", ".4f"), ("float_ms", "float ms", ".3f"),
                                  (f"{low}_ms", f"{low} ms", ".3f"), ("kept_because", "note")),
                  report["layers"], chart="rel_error", unit="relative error")
    lines = details.end_to_end_lines(report["end_to_end"])
    if "smoothing" in report:
        smoothing = report["smoothing"]
        migrated = [a for a in smoothing.get("activations", []) if a["alpha"]]
        lines.append(f"SmoothQuant: {len(migrated)} activation(s) migrated into the weights"
                     + (", validated equal" if smoothing.get("validated_equal") else "")
                     + (f"; {smoothing['undone']}" if "undone" in smoothing else ""))
    corrected = report.get("bias_correction", {})
    if corrected.get("layers"):
        lines.append(f"bias correction on {corrected['layers']} layer(s): held-out mean cosine "
                     f"{corrected['mean_cosine_with']:.5f} with, {corrected['mean_cosine_without']:.5f} without; "
                     + ("kept" if corrected["kept"] else "dropped"))
    if report.get("forms", {}).get("dynamic"):
        forms = report["forms"]
        lines.append(f"int8 forms kept: static QDQ on {forms['static']} layer(s), dynamic activations "
                     f"(DynamicQuantizeLinear + MatMulInteger) on {forms['dynamic']}")
    if "gain_measured_in" in report:
        lines.append(f"per-layer gains measured in {report['gain_measured_in']}")
    if "note" in report:
        lines.append(report["note"])
    return Details([table], dict(report["end_to_end"]), bound, lines, details.calibration_warnings(report))


def converted(report: dict[str, Any], bound: float) -> Details:
    """A bf16 / fp16 graph: what went to 16 bits, what stayed float32, the fidelity and where it was measured."""
    c = report["conversion"]
    kept = ", ".join(f"{op} x{n}" for op, n in c["kept_float32"].items()) or "none"
    lines = [f"{report['precision']} graph: {c['nodes_in_low_precision']} nodes in {report['precision']}, "
             f"{c['casts']} casts; kept float32: {kept}", *details.end_to_end_lines(report["end_to_end"]),
             f"measured on {report['measured_on']}"]
    if "note" in report:
        lines.append(report["note"])
    return Details([], dict(report["end_to_end"]), bound, lines, details.calibration_warnings(report))
