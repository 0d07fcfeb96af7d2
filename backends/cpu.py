"""`--target cpu`: the runtime measured fastest on this machine, for this model and these inputs.

Candidates, each built, checked against onnxruntime fp32 on the stage's inputs, and timed in one
process, interleaved:
    ort             onnxruntime, a default session (what a user gets loading the file)
    ort-lowered     graphopt's measured ORT lowering (backends/ort/select.py), timed in a default
                    session too: the output needs no session options to be as fast as measured
    openvino-fp32   OpenVINO, portable ONNX, INFERENCE_PRECISION_HINT f32
and, only when the user allows reduced precision (`precision` bf16 / fp16 / auto) and OpenVINO
reports the capability on this CPU:
    openvino-bf16   OpenVINO with the bf16 hint (AVX512-BF16 / AMX)
    openvino-fp16   OpenVINO with the f16 hint
    openvino-bf16-graph, openvino-fp16-graph
                    the graph itself converted (passes/precision/half.py: inputs, outputs and the
                    accumulating ops float32), compiled with the f32 hint: the file computes in 16
                    bits in any consumer, no hint needed
A reduced-precision candidate is kept only if its fidelity (the lowest cosine of any output,
per row, to ORT fp32) meets the bound. A few screening rounds come first: a candidate over PRUNE
times the fastest is reported with that median and not timed further, and ort-lowered (whose
selection times onnxruntime variants, minutes on BERT-base at batch 32) is built only when plain
onnxruntime survives the screening. The fastest kept candidate wins: an ORT win writes its
lowering; an OpenVINO win writes portable ONNX (graphopt functions inlined, then openvino.LOWERING's
exact rewrites into the forms OpenVINO fuses) with the runtime and
precision hint in the model's metadata (RUNTIME_KEY, PRECISION_KEY), which `graphopt run`,
`graphopt bench` and `graphopt compile --backend openvino` read (graphopt/runtimes.py). The
choice is cached per machine, model structure, input shapes and runtime versions (graphopt/choices.py).
"""

from __future__ import annotations

from typing import Any

from graphopt import choices, exporters, machine, registry, sessions, timing, verify
from graphopt.backends.ort import select as ort_select
from graphopt.details import Details, Table, columns
from graphopt.errors import GraphoptError, first_line
from graphopt.model import PRECISION_KEY, RUNTIME_KEY, Model
from graphopt.steps import Lowering, LoweringStep, Stage

REDUCED = {"bf16": ("bf16",), "fp16": ("fp16",), "auto": ("bf16", "fp16")}  # --precision -> OpenVINO hints tried
PRUNE = 1.5  # a candidate this many times slower than the fastest after the screening rounds is out
SCREEN_ROUNDS = 3
GRAPH_MARGIN = 0.03  # a converted graph replaces its precision hint only when this much faster
CACHE_VERSION = 5  # 2: the converted-graph candidates; 3: OpenVINO's own lowering passes; 4: screening; 5: fp names
CACHE_KIND = "cpu-select"


class CpuLowering(LoweringStep):
    """The fastest runtime on this CPU (ORT or OpenVINO, precision only if allowed and bounded)."""

    def details(self, measured: dict[str, Any]) -> Details:
        """Every runtime candidate with its latency and fidelity, the choice marked; the ORT lowering it timed."""
        m = measured["machine"]
        rows = [{"name": name, "median_ms": c.get("median_ms"), "min_cosine": c.get("min_cosine"),
                 "note": "chosen" if name == measured["chosen"] else c.get("rejected") or c.get("error") or c.get("pruned") or ""}
                for name, c in measured["candidates"].items()]
        rows += [{"name": name, "note": f"not tried: {why}"} for name, why in measured.get("skipped", {}).items()]
        cached = " (cached choice)" if measured.get("cached") else ""
        tables = [Table(f"runtime for {measured['target']} on {m['cpu']} ({', '.join(m['flags']) or 'no avx512/amx'}){cached}",
                        columns(("name", "candidate"), ("median_ms", "median ms", ".2f"), ("min_cosine", "min cosine", ".6f"),
                                ("note", "note")), rows, chosen=measured["chosen"], chart="median_ms", unit="ms")]
        if measured.get("ort_lowering"):
            tables += ort_select.details(measured["ort_lowering"])
        allowed = ", ".join(measured["precision_allowed"]) or "fp32 only"
        return Details(tables, lines=[f"reduced precision allowed: {allowed} (bound: min cosine >= {measured['fidelity_bound']})"])

    def choose(self, stage: Stage) -> Lowering:
        feeds = stage.feeds
        if feeds is None:
            raise GraphoptError(f"target '{self.target}' needs inputs to measure the candidates on")
        precisions = REDUCED.get(self.options.precision or "", ())
        key = choices.key(stage.model.ir, feeds, self._salt(precisions))
        cached = choices.read(CACHE_KIND, key) if self.options.use_cache else None
        if cached is not None and "chosen" in cached:
            return self._lowering(stage, cached | {"cached": True})
        measured = self._measure(stage.model, feeds, precisions)
        if self.options.use_cache:
            choices.write(CACHE_KIND, key, measured)
        return self._lowering(stage, measured | {"cached": False})

    def _salt(self, precisions) -> str:
        import onnxruntime

        from graphopt.backends import openvino

        return (f"cpu v{CACHE_VERSION}|{machine.line()}|onnxruntime {onnxruntime.__version__}|openvino {openvino.version()}|"
                f"{precisions}|bound {self.options.fidelity}")

    def _measure(self, model: Model, feeds, precisions) -> dict[str, Any]:
        from graphopt.backends import openvino

        reference = verify.run(model, feeds)
        read: list = []

        made: list[Model] = []

        def portable_model() -> Model:  # graphopt functions inlined once, for every OpenVINO candidate
            if not made:
                made.append(openvino.portable(model))
            return made[0]

        def portable():  # read by OpenVINO once, compiled per precision
            if not read:
                read.append(openvino.read(portable_model()))
            return read[0]

        builders = {
            "ort": lambda: sessions.session_for(exporters.to_proto(model).SerializeToString(), disabled=()),
            "openvino-fp32": lambda: openvino.compile(portable(), precision="fp32"),
        }
        skipped = {}
        for precision in precisions:
            if openvino.supports(precision):
                builders[f"openvino-{precision}"] = lambda p=precision: openvino.compile(portable(), precision=p)
                builders[f"openvino-{precision}-graph"] = lambda p=precision: openvino.compile(
                    _converted(portable_model(), p), precision="fp32")
            else:
                skipped[f"openvino-{precision}"] = f"OpenVINO reports no {openvino.CAPABILITY[precision]} on this CPU"
        candidates: dict[str, dict[str, Any]] = {}
        runners: dict[str, Any] = {}
        self._build(builders, reference, feeds, candidates, runners)
        # Screening: a few rounds of every candidate; one far behind the fastest cannot win and
        # is not timed further, and onnxruntime's lowering is selected only if plain
        # onnxruntime is within reach (the lowering's own measurement costs minutes on big models).
        screen = timing.medians(timing.interleaved({n: (lambda r=r: r.run(feeds)) for n, r in runners.items()},
                                                   rounds=SCREEN_ROUNDS, warmup=1))
        best = min(screen.values())
        for name, seconds in screen.items():
            if seconds > PRUNE * best:
                candidates[name].update(median_ms=round(seconds * 1e3, 3), pruned=(
                    f"{seconds / best:.2f}x the fastest after {SCREEN_ROUNDS} rounds (> {PRUNE}x): not timed further"))
                del runners[name]
        ort_lowering = None
        if "ort" in runners:
            ort_lowering = ort_select.select(model.ir, feeds, "ort-cpu", use_cache=self.options.use_cache)
            # timed as a user runs it: a default session, no transformers disabled
            self._build({"ort-lowered": lambda: sessions.session_for(_lowered(model, ort_lowering.passes), disabled=())},
                        reference, feeds, candidates, runners)
        else:
            ort = candidates["ort"]
            skipped["ort-lowered"] = "onnxruntime's default session " + (
                f"was {ort['pruned']}" if "pruned" in ort else f"did not run: {ort.get('error') or ort.get('rejected')}")
        medians = timing.medians(timing.interleaved({n: (lambda r=r: r.run(feeds)) for n, r in runners.items()},
                                                    rounds=15))
        for name, seconds in medians.items():
            candidates[name]["median_ms"] = round(seconds * 1e3, 3)
        chosen = min(medians, key=medians.get)
        hint = chosen.removesuffix("-graph")
        if chosen != hint and hint in medians and medians[hint] <= medians[chosen] * (1 + GRAPH_MARGIN):
            chosen = hint  # the hint keeps the file float32 (it runs in any consumer): the graph must win clearly
        return {"target": self.target, "machine": machine.describe(), "chosen": chosen, "candidates": candidates,
                "skipped": skipped, "ort_lowering": ort_lowering.to_dict() if ort_lowering else None,
                "precision_allowed": list(precisions), "fidelity_bound": self.options.fidelity,
                "versions": {"openvino": openvino.version()}}

    def _build(self, builders, reference, feeds, candidates: dict, runners: dict) -> None:
        """Build each candidate and check it against onnxruntime fp32; a reduced-precision one
        below the bound, or one that cannot run, is reported and left out."""
        for name, build in builders.items():
            try:
                runner = build()
                fidelity = verify.min_cosine(reference, runner.run(feeds))
            except Exception as exc:  # a candidate that cannot run is reported, not fatal
                candidates[name] = {"error": first_line(exc, 200)}
                continue
            candidates[name] = {"min_cosine": round(fidelity, 6)}
            exact = name in ("ort", "ort-lowered", "openvino-fp32")
            if not exact and fidelity < self.options.fidelity:
                candidates[name]["rejected"] = f"min cosine {fidelity:.5f} < bound {self.options.fidelity}"
                continue
            runners[name] = runner

    def _lowering(self, stage: Stage, measured: dict[str, Any]) -> Lowering:
        from graphopt.backends import openvino

        chosen = measured["chosen"]
        if chosen.startswith("openvino"):
            precision = chosen.split("-")[1]
            graph = chosen.endswith("-graph")

            def annotate(model: Model) -> None:
                model.ir.metadata_props[RUNTIME_KEY] = "openvino"
                model.ir.metadata_props[PRECISION_KEY] = "fp32" if graph else precision
            if not graph:
                return Lowering([registry.get(n) for n in openvino.LOWERING], measured, annotate)
            fid = {"min_cosine": measured["candidates"][chosen]["min_cosine"], "bound": self.options.fidelity,
                   "measured_in": "openvino", "conversion": chosen}
            return Lowering([registry.get(n) for n in openvino.LOWERING], measured, annotate,  # convert runs after these
                            convert_model=lambda m: _converted(m, precision), fidelity=fid)
        selection = measured["ort_lowering"]
        passes = ort_select.Selection(**{k: selection[k] for k in ("target", "provider", "choices", "timings_ms",
                                                                   "skipped")})

        def annotate_ort(model: Model) -> None:
            model.ir.metadata_props[RUNTIME_KEY] = "onnxruntime"  # measured in a default session: no hints needed
        lowering = passes.passes if chosen == "ort-lowered" else []
        return Lowering([registry.get(n) for n in [*lowering, "make-portable"]], measured, annotate_ort)


def _converted(model: Model, precision: str) -> Model:
    """`model` (already portable) as a 16-bit graph."""
    from graphopt.passes.precision import half

    return half.convert(model, precision)[0]


def _lowered(model: Model, passes) -> bytes:
    work = model.clone()
    for name in passes:
        registry.get(name)(work.ir)
    return exporters.to_proto(work).SerializeToString()


registry.register_target("cpu", CpuLowering)
