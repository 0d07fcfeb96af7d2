"""One fidelity budget for the whole plan (`optimize(approx="prune,int8")`, `--approx`).

`--fidelity F` then bounds the plan's end-to-end output, not each step: every approximate step
measures against the model as it was before the first approximate step (the `reference` the
plan records), not against its own input, so errors do not compound past F. The budget is
spent in plan order with reserved shares: of n approximate steps, step i may bring the
end-to-end worst mean cosine down to 1 - (1 - F) (i + 1) / n, so each later family keeps its
share plus whatever the earlier ones left unspent, and the last one ends at F.

Families (FAMILIES) map to the requests the steps are registered under: `prune` (every pruning
form), `int8` (static and dynamic forms), `bf16` (the graph converted, precision bf16; beside
int8 it is precision auto, whose float layers run at OpenVINO's bf16 hint where `--target cpu`
measures it faster, so it needs that target), `mixers` (with the user's `mixer`); `auto` is
every family that keeps the model's interface, needs nothing more named and is chosen by
measurement on every target (prune, int8).
Not built: choosing across families by measured gain per error (the shares are fixed by
position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from graphopt.errors import InputError

FAMILIES = ("prune", "int8", "bf16", "mixers")
AUTO = ("prune", "int8")
PRUNE_FORM = "all"


@dataclasses.dataclass
class Budget:
    """The plan's shared bound: set on every approximate step's options; `reference` is filled
    by the first approximate step that runs."""

    bound: float
    steps: int
    reference: Any = None  # graphopt.model.Model
    spent: list = dataclasses.field(default_factory=list)  # (step, worst mean cosine) in order

    def share(self, position: int) -> float:
        """The end-to-end bound step `position` (0-based, among the approximate ones) must keep."""
        return 1.0 - (1.0 - self.bound) * (position + 1) / self.steps


def families(text: str | None) -> tuple[str, ...]:
    """The allowed families from `approx` ("prune,int8", "auto"), checked."""
    if not text:
        return ()
    names = [n.strip() for n in text.split(",") if n.strip()]
    if "auto" in names:
        names = [*AUTO, *(n for n in names if n not in ("auto", *AUTO))]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise InputError(f"unknown approximate famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in --approx",
                         hint=f"choose from {', '.join(FAMILIES)}, or auto ({', '.join(AUTO)})")
    return tuple(dict.fromkeys(names))


def requests(allowed: tuple[str, ...], given: Mapping[str, Any], target: str | None = None) -> dict[str, Any]:
    """The approximate requests (`prune`, `mixer`, `precision`) the families ask for, on top of
    what the user named; a value the user gave wins. Pruning comes first (smaller matrices are
    quantized after), as optimize orders the requests it registers."""
    out = {"prune": given.get("prune"), **given}
    if "prune" in allowed and not out.get("prune"):
        out["prune"] = PRUNE_FORM
    wanted = [f for f in ("int8", "bf16") if f in allowed]
    if wanted:
        precision = "auto" if len(wanted) == 2 else wanted[0]
        if precision == "auto" and target != "cpu":
            raise InputError("--approx int8,bf16: bf16 beside int8 is OpenVINO's measured precision hint, which only --target cpu weighs",
                             hint="add --target cpu, or keep one of int8 and bf16")
        if out.get("precision") not in (None, precision):
            raise InputError(f"--approx {','.join(wanted)} with --precision {out['precision']}: "
                             f"the budget sets the precision ({precision})",
                             hint="drop --precision, or drop int8 / bf16 from --approx")
        out["precision"] = precision
    if "mixers" in allowed and not out.get("mixer"):
        raise InputError("--approx mixers needs the mixer to swap in", hint="add --mixer, e.g. --mixer linear:hedgehog")
    if "mixers" not in allowed and out.get("mixer") and allowed:
        raise InputError("--mixer given but mixers is not in --approx", hint="add mixers to --approx")
    return out
