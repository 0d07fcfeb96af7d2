"""The `graphopt` command: a thin layer that parses, calls the public API, prints.

Its help opens with what graphopt does (SUMMARY) and examples (EXAMPLES); every subcommand's
help ends with one.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback
unless --debug); 3 numeric validation failed (nothing written); 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import graphopt
from graphopt import benchmark as bench_mod, machine
from graphopt import atomic, calibration, datasets, exporters, folders, presets, registry, runtimes
from graphopt.cli_help import EXAMPLES, SUMMARY, _examples  # noqa: F401  (EXAMPLES: read by the help test)
from graphopt.benchmark import ANCHORS, OPTIONAL
from graphopt.errors import GraphoptError, InputError
from graphopt.report import validation_table

out = Console(highlight=False, soft_wrap=True, emoji=False)  # "linear:hedgehog" is not an emoji code
EXPLAIN_LINES = 20  # near misses printed per pass; the JSON report keeps every one
err = Console(stderr=True, highlight=False, emoji=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except GraphoptError as exc:
        if args.debug:
            raise
        _fail(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
        return 130
    except Exception as exc:  # a bug in graphopt: say so, keep the traceback behind --debug
        if args.debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1


def _fail(message: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width."""
    sys.stderr.write(f"graphopt: {' '.join(message.split())}\n")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p = argparse.ArgumentParser(prog="graphopt", description=SUMMARY, epilog=_examples(None), parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", parents=[common], help="inputs, outputs, op histogram, parameters, opsets")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("optimize", parents=[common], help="rewrite a model with a preset or a list of passes")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--preset", default=presets.DEFAULT, help=f"one of {', '.join(presets.PRESETS)} (default {presets.DEFAULT})")
    s.add_argument("--passes", type=_csv, help="comma-separated pass names, in order (overrides --preset)")
    s.add_argument("--report", help="write the report here: a self-contained page for .html, else JSON")
    _add_input_args(s)
    s.add_argument("--no-validate", action="store_true", help="skip per-pass checks and the final validation")
    s.add_argument("--allow-unchecked", action="store_true", help="when no generated input runs the model (or --inputs "
                   "do not), write the output without numeric checks instead of stopping (every step still has to load)")
    s.add_argument("--explain", action="store_true", help="show why rules did not fire")
    s.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    s.add_argument("--target", choices=registry.targets(), help="ort-cpu/ort-cuda: the onnxruntime lowering measured fastest "
                   "per op kind; cpu: the runtime measured fastest on this machine (onnxruntime or OpenVINO; portable output)")
    s.add_argument("--portable", action="store_true", help="standard ONNX only: graphopt functions inlined (any ONNX consumer "
                   "loads it; contrib ops only with an ort target)")
    s.add_argument("--precision", choices=registry.choices("precision"), help="reduced precision "
                   "allowed, kept only within --fidelity: int8 (auto: int8 too) quantizes linear layers calibrated on "
                   "--calib, per layer where faster here; int4: weight-only MatMulNBits (onnxruntime targets); bf16/fp16 "
                   "convert the graph (under --target cpu: OpenVINO's hint or the converted graph, measured) "
                   "(default: fp32 only)")
    s.add_argument("--task", choices=folders.TASKS, help="for a model folder: the task to export (default: the one "
                   "its config names; sentence-embedding for a sentence-transformers folder)")
    s.add_argument("--calib-text", metavar="FILE", help="calibration from your sentences, one a line, tokenized with the "
                   "model folder's tokenizer (or --tokenizer), each batch padded to its longest; the second half of the "
                   "batches is held out, and the checks run on the last one")
    s.add_argument("--tokenizer", metavar="DIR", help="the tokenizer folder for --calib-text (default: the model folder)")
    s.add_argument("--calib-images", metavar="DIR", help="calibration from your images (a folder, subfolders too), "
                   "preprocessed by the model folder's image processor, or as --image-size / --mean / --std say")
    s.add_argument("--image-size", type=datasets.parse_size, metavar="HxW", help="with --calib-images: resize to this")
    s.add_argument("--mean", type=datasets.parse_floats, metavar="M[,M,M]", help="with --calib-images: subtracted "
                   "per channel after scaling pixels to [0, 1]")
    s.add_argument("--std", type=datasets.parse_floats, metavar="S[,S,S]", help="with --calib-images: divided by, "
                   "per channel, after --mean")
    s.add_argument("--calib-rows", type=int, default=calibration.DEFAULT_ROWS, metavar="N", help="rows of each activation kept while "
                   "calibration streams through a step (int8, prune): a seeded sample, so memory does not grow with "
                   f"the examples (default {calibration.DEFAULT_ROWS})")
    s.add_argument("--calib-batch", type=int, default=16, metavar="N", help="examples per --calib-text / "
                   "--calib-images batch (default 16)")
    s.add_argument("--approx", metavar="FAMILIES", help="approximate families under one budget, comma-separated from "
                   "prune, int8, bf16 (beside int8: with --target cpu), mixers, or auto (prune, int8): --fidelity then bounds the whole plan's end-to-end "
                   "output, each step keeping its share (default: only what --precision / --prune / --mixer ask, each "
                   "bounded on its own)")
    s.add_argument("--check-every", type=int, default=1, metavar="K", help="check the exact steps that changed the "
                   "model in groups of K (a diverging group is rolled back whole; 0: one check before any approximate "
                   "or lowering step, then the final validation). Steps that change nothing are never re-run (default: 1)")
    s.add_argument("--no-time", action="store_true", help="skip timing the result against the input (the summary's speed-up)")
    s.add_argument("--no-cache", action="store_true", help="measure the lowering again instead of reusing a cached choice")
    s.add_argument("--mixer", choices=registry.choices("mixer"), help="with --preset mixers: the token mixer that replaces attention")
    s.add_argument("--fidelity", type=float, default=0.99, help="the end-to-end cosine bound: for --layers auto, and for "
                   "a reduced --precision")
    s.add_argument("--calib", help="calibration inputs for the approximate steps (mixers, int8): .npz; rows split half "
                   "fit, half held out")
    for option in registry.approximate_options():  # approximate steps other families register (--prune ...)
        if option not in ("mixer", "precision"):
            s.add_argument(f"--{option}", dest=f"approximate_{option}", choices=registry.choices(option),
                           help=f"the approximate step '{option}' (kept only within --fidelity)")
    for owner, option in registry.step_options():  # declared by each approximate step / target (steps.StepOption)
        s.add_argument(option.flag, dest=f"step_{option.name}", type=_flag_type(option.parse), default=option.default,
                       choices=option.choices() if option.choices else None, metavar=option.metavar,
                       help=f"{option.help} ({owner}; default: {option.default})")
    s.set_defaults(func=cmd_optimize)

    s = sub.add_parser("validate", parents=[common], help="compare two models' outputs in onnxruntime")
    s.add_argument("reference")
    s.add_argument("candidate")
    _add_input_args(s)
    s.add_argument("--rtol", type=float)
    s.add_argument("--atol", type=float)
    s.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="where the candidate runs (the reference always runs in onnxruntime fp32)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("compile", parents=[common], help="compile a model to a TVM artifact (optionally tuned) or OpenVINO IR")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True, help="the artifact: model.so for TVM (its signature goes to "
                   "model.so.json), model.xml (+ model.bin) for OpenVINO")
    s.add_argument("--backend", choices=["tvm", "openvino"], default="tvm")
    s.add_argument("--target", choices=["llvm", "cuda"], default="llvm", help="TVM's target")
    s.add_argument("--precision", choices=[*registry.runtime("openvino").precisions, "default"], default="fp32",
                   help="OpenVINO's inference precision hint (default: fp32; 'default': OpenVINO's own choice on this CPU)")
    s.add_argument("--threads", type=int, help="OpenVINO inference threads (default: every core)")
    s.add_argument("--arch", help="CUDA architecture for --target cuda (default sm_90)")
    s.add_argument("--shapes", help="input sizes, e.g. input_ids=1x128,attention_mask=1x128 (needed for symbolic dims)")
    s.add_argument("--preset", default=presets.DEFAULT, help="graphopt passes to run before compiling ('none' to skip)")
    s.add_argument("--tune", action="store_true", help="tune kernels with MetaSchedule")
    s.add_argument("--trials", type=int, default=64, help="MetaSchedule trials in total (with --tune)")
    s.add_argument("--tuning-db", help="directory of the JSON tuning database, reused across runs (default OUT.tuning)")
    s.add_argument("--rpc", help="measure trials on remote devices through TVM's RPC tracker: HOST:PORT:DEVICE_KEY")
    s.add_argument("--force", action="store_true", help="allow overwriting the input file")
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("run", parents=[common], help="run an .onnx model (onnxruntime, or OpenVINO when graphopt's --target "
                       "cpu chose it), an OpenVINO .xml or a TVM artifact")
    s.add_argument("model")
    s.add_argument("--inputs", required=True, help=".npz with one array per input")
    s.add_argument("-o", "--output", required=True, help=".npz of the outputs, by output name")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("bench", parents=[common], help="time graphopt's output against the original and the anchors")
    s.add_argument("model")
    s.add_argument("--target", choices=registry.targets(), default="ort-cpu")
    s.add_argument("--against", type=_csv, default=list(ANCHORS),
                   help=f"comma-separated, from {','.join(ANCHORS + OPTIONAL)} (default {','.join(ANCHORS)})")
    s.add_argument("--precision", choices=registry.choices("precision"), help="with --target cpu: what graphopt may use")
    s.add_argument("--fidelity", type=float, default=0.99, help="with --precision: the cosine bound graphopt keeps")
    s.add_argument("--optimized", help="an already optimized model to time as graphopt's contender (else optimize here)")
    s.add_argument("--tvm", help="a compiled TVM artifact (graphopt compile) to time as one more contender")
    s.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds (after 3 warm-up rounds)")
    s.add_argument("--json", action="store_true")
    _add_input_args(s)
    s.add_argument("--report", help="write the HTML page (graphopt's optimize report with the contenders' timings) here")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("report", parents=[common], help="render a JSON report (optimize --report r.json) as an HTML page")
    s.add_argument("report_json")
    s.add_argument("-o", "--output", required=True, help="the .html page to write")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("view", parents=[common], help="open a model (or two: before and after) in Netron, on localhost")
    s.add_argument("model")
    s.add_argument("other", nargs="?", help="a second model, served beside the first (e.g. the optimized one)")
    s.add_argument("--port", type=int, default=0, help="first port (default: any free one); the second model gets the next")
    s.add_argument("--no-browser", action="store_true", help="print the addresses instead of opening a browser")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("passes", parents=[common], help="list the registered passes and presets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_passes)

    s = sub.add_parser("convert", parents=[common], help="export a torch module to ONNX: FILE.py:FACTORY")
    s.add_argument("factory", help="FILE.py:FUNCTION returning (module, example_inputs[, dynamic_shapes])")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--external-data", action="store_true")
    s.set_defaults(func=cmd_convert)
    for name, command in sub.choices.items():
        command.epilog, command.formatter_class = _examples(name), argparse.RawDescriptionHelpFormatter
    return p


def _add_input_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--inputs", help=".npz with one array per model input (default: seeded generated inputs)")
    s.add_argument("--dims", type=_dims, default=None, help="sizes of free dims for generated inputs, by name or by "
                   "input:axis (unnamed or -1 dims), e.g. batch=1,seq=128 or x:0=1,x:2=48")
    s.add_argument("--seed", type=int, default=0)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _flag_type(parse):
    """A step option's parser for argparse: its InputError becomes argparse's one-line usage error (exit 2)."""
    if parse is None:
        return None

    def parsed(text: str):
        try:
            return parse(text)
        except (InputError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc).split("\n")[0]) from None
    parsed.__name__ = getattr(parse, "__name__", "value")
    return parsed


def _step_options(args) -> dict:
    """The registered step options as the user gave them (flags dest step_<name>)."""
    given = {option.name: getattr(args, f"step_{option.name}") for _, option in registry.step_options()}
    return given | {o: getattr(args, f"approximate_{o}") for o in registry.approximate_options()
                    if o not in ("mixer", "precision") and getattr(args, f"approximate_{o}", None)}


def _dims(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in _csv(text))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=int or input:axis=int pairs like batch=1,x:2=48, got {text!r}") from None


def cmd_inspect(args) -> int:
    info = graphopt.inspect(graphopt.load(args.model))
    if args.json:
        out.print_json(data=info)
        return 0
    table = Table(title=f"{args.model}", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            table.add_row(kind[:-1], v["name"], v["dtype"], str(v["shape"]))
    out.print(table)
    in_constants = f", {info['constant_params']:,} of them in Constant nodes" if info["constant_params"] else ""
    out.print(f"nodes {info['num_nodes']}, parameters {info['num_params']:,}{in_constants} "
              f"({info['param_bytes']:,} bytes in initializers), "
              f"ir_version {info['ir_version']}, opsets {info['opsets']}")
    out.print("ops: " + ", ".join(f"{k} {v}" for k, v in info["op_counts"].items()))
    layers = info.get("attention", [])
    out.print(f"attention layers: {len(layers)}")
    for i, a in enumerate(layers):
        out.print(f"  {i}: heads {a['heads']}, kv heads {a['kv_heads']}, head size {a['head_size']}, mask {a['mask']}"
                  f"{', causal' if a['causal'] else ''}{', rope' if a['rope'] else ''}{', scale not folded' if a['scaled'] else ''}"
                  f" ({'canonical op' if a['canonical'] else 'softmax'} '{a['node']}')", markup=False)
    return 0


def cmd_optimize(args) -> int:
    output = Path(args.output)
    folder = Path(args.model) if folders.is_model_folder(Path(args.model)) else None
    if args.task and folder is None:
        raise InputError("--task is for a model folder (config.json + weights)", hint="drop --task for an .onnx file")
    with _spinner(f"loading {args.model}" + (" (exporting the folder through torch)" if folder else "")):
        model = graphopt.load(args.model, task=args.task)
    exporters.check_target(model, output, args.force)  # before any work, not after it
    inputs = args.inputs
    calib = datasets.from_files(model, folder, text=args.calib_text, images=args.calib_images, calib=args.calib,
                                tokenizer=args.tokenizer, batch=args.calib_batch, image_size=args.image_size,
                                mean=args.mean, std=args.std)
    if calib is None:
        calib = args.calib
    elif inputs is None:
        inputs = calib[-1]  # the checks run on held-out examples
    with _bar() as bar:
        task = bar.add_task("optimizing", total=None)

        inner = None

        def progress(i: int, total: int, name: str) -> None:
            bar.update(task, total=total, completed=i, description=f"pass {name}")

        def step_progress(i: int, total: int, what: str) -> None:  # a long step's own bar (a mixer's fit)
            nonlocal inner
            if inner is None:
                inner = bar.add_task(what, total=total)
            bar.update(inner, total=total, completed=i, description=what)

        result = graphopt.optimize(model, preset=args.preset, passes=args.passes, inputs=inputs,
                                   validate=not args.no_validate, explain=args.explain, seed=args.seed, dims=args.dims,
                                   progress=progress, target=args.target, use_cache=not args.no_cache,
                                   mixer=args.mixer, fidelity=args.fidelity, calib=calib, calib_rows=args.calib_rows,
                                   portable=args.portable, precision=args.precision,
                                   check_every=args.check_every, step_progress=step_progress,
                                   allow_unchecked=args.allow_unchecked, approx=args.approx, **_step_options(args))
    if result.passed and result.feeds is not None and not args.no_time:
        with _spinner("timing the result against the input"):
            try:
                result.measure()
            except Exception as exc:  # the model is checked; the headline just goes without a speed
                result.report.notes.append(f"not timed against the input: {str(exc).splitlines()[0][:200]}")
    report = result.report
    out.print(report.tables())
    if args.explain:
        for p in report.passes:
            shown = p.near_misses[:EXPLAIN_LINES]
            for line in shown:
                out.print(f"explain {p.name}: {line}", markup=False)
            if len(p.near_misses) > len(shown):
                out.print(f"explain {p.name}: ... {len(p.near_misses) - len(shown)} more (all of them in --report)", markup=False)
    if not result.passed:
        _fail("error: the optimized model failed validation; nothing was written")
        return 3
    with _spinner(f"writing {output}"):
        graphopt.save(result.model, output, external_data=True if args.external_data else None, force=args.force)
        if args.report:
            report.write(args.report)
        beside = _save_preprocessor(folder, output)
    out.print(f"wrote {output}" + (f" and {args.report}" if args.report else "") + (f"; its preprocessor in {beside}" if beside else ""))
    return 0


def _save_preprocessor(folder: Path | None, output: Path) -> Path | None:
    """A model folder's tokenizer or image processor, saved beside the output for the pipeline."""
    made = folders.preprocessor(folder) if folder is not None else None
    if made is None:
        return None
    target = output.with_name(f"{output.stem}.preprocessor")
    made.save_pretrained(str(target))
    return target


def cmd_validate(args) -> int:
    with _spinner("validating"):
        result = graphopt.validate(args.reference, args.candidate, args.inputs, rtol=args.rtol, atol=args.atol,
                                   seed=args.seed, dims=args.dims, runtime=args.runtime)
    if args.json:
        out.print(json.dumps(result.to_dict(), indent=2), markup=False)
    else:
        out.print(validation_table(result))
        out.print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 3


def cmd_compile(args) -> int:
    from graphopt.backends import tvm as tvm_backend
    from graphopt.specialize import parse_shapes

    output = Path(args.output)
    with _spinner(f"loading {args.model}"):
        model = graphopt.load(args.model)
    exporters.check_target(model, output, args.force)
    shapes = parse_shapes(args.shapes) if args.shapes else {}
    if args.preset != "none":
        with _spinner(f"optimizing with preset {args.preset}"):
            result = graphopt.optimize(model, preset=args.preset, inputs=_inputs_at(model, shapes))
        if not result.passed:
            _fail("error: the optimized model failed validation; nothing was compiled")
            return 3
        model = result.model
    if args.backend == "openvino":
        return _compile_openvino(model, output, shapes, args)
    db = Path(args.tuning_db) if args.tuning_db else output.with_name(output.name + ".tuning")
    if args.tune:
        try:
            with _bar() as bar:
                task = bar.add_task(f"tuning: records in {db}", total=None)
                compiled = tvm_backend.compile(model, target=args.target, arch=args.arch, shapes=shapes, tuning_db=db,
                                               trials=args.trials, progress=lambda n, total: bar.update(task, completed=n),
                                               runner=_rpc(args.rpc) if args.rpc else None)
        except KeyboardInterrupt:
            _fail(f"interrupted: nothing was written; the tuning records measured so far are kept in {db} "
                  "and the next --tune run with this --tuning-db starts from them")
            return 130
    else:
        with _spinner(f"compiling for {args.target}"):
            compiled = tvm_backend.compile(model, target=args.target, arch=args.arch, shapes=shapes,
                                           tuning_db=args.tuning_db, trials=0)
    tvm_backend.export(compiled, output)
    tuned = f", tuned ({compiled.tuning_records} records in {db})" if compiled.tuned else ""
    if compiled.untuned_kernels:
        tuned += f"; TVM could not search {len(compiled.untuned_kernels)} kernel(s), left at default schedules: " + \
            ", ".join(compiled.untuned_kernels)
    out.print(f"wrote {output} and {output.name}{tvm_backend.META_SUFFIX} for {compiled.signature.target}{tuned}", markup=False)
    return 0


def _compile_openvino(model, output: Path, shapes, args) -> int:
    from graphopt.backends import openvino

    precision = None if args.precision == "default" else args.precision
    with _spinner(f"compiling for OpenVINO CPU ({args.precision})"):
        compiled = openvino.compile(model, precision=precision, threads=args.threads, shapes=shapes)
        openvino.save(compiled, output)
    out.print(f"wrote {output} and {output.with_suffix('.bin').name} (OpenVINO {openvino.version().split('-')[0]}, "
              f"precision {args.precision})", markup=False)
    return 0


def _rpc(spec: str):
    from graphopt.backends import tvm as tvm_backend

    host, _, rest = spec.partition(":")
    port, _, key = rest.partition(":")
    if not host or not port.isdigit() or not key:
        raise InputError(f"--rpc wants HOST:PORT:DEVICE_KEY, got '{spec}'")
    return tvm_backend.rpc_runner(host, int(port), key)


def _inputs_at(model, shapes):
    """Generated inputs at the compile shapes, so the per-pass checks run at the shapes compiled."""
    if not shapes:
        return None
    from graphopt import feeds

    dims = {"batch": 1, "seq": 16}
    for value in model.graph.inputs:
        for dim, size in zip(value.shape or (), shapes.get(value.name, ())):
            if not isinstance(dim, int) and dim.value:
                dims[dim.value] = size
    return feeds.make_inputs(model, dims=dims)


def cmd_run(args) -> int:
    from graphopt import feeds as feeds_mod

    path = Path(args.model)
    if path.suffix == ".onnx":  # in the runtime its metadata names (--target cpu may have chosen OpenVINO)
        model = graphopt.load(path)
        outputs = runtimes.executable_for(model).run(feeds_mod.load_inputs(args.inputs, model))
    else:  # a compiled artifact: OpenVINO IR (.xml) or a TVM library
        runtime = registry.runtime("openvino" if path.suffix == ".xml" else "tvm")
        outputs = runtime.load(path).run(feeds_mod.read_npz(args.inputs))
    exporters.write_npz(outputs, args.output)
    out.print(f"wrote {args.output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()), markup=False)
    return 0


def cmd_bench(args) -> int:
    with _spinner(f"optimizing {args.model} for {args.target}, then timing every contender"):
        result = bench_mod.bench(args.model, target=args.target, against=args.against, inputs=args.inputs, dims=args.dims,
                                 rounds=args.rounds, optimized=args.optimized, tvm_artifact=args.tvm,
                                 precision=args.precision, fidelity=args.fidelity)
    if args.report:
        if result.report is None:
            raise InputError("bench --report needs graphopt to optimize here, not --optimized",
                             hint="drop --optimized, or run graphopt optimize --report page.html")
        result.report.write_html(args.report, bench=result.to_dict())
        out.print(f"wrote {args.report}", markup=False)
    if args.json:
        out.print(json.dumps(result.to_dict(), indent=2, default=str), markup=False)
        return 0
    table = Table(title=f"{args.model} on {args.target}: inputs {result.inputs}, {result.rounds} interleaved rounds",
                  title_justify="left")
    for col in ("contender", "median ms", "vs original", "max abs err", "note"):
        table.add_column(col)
    for row in bench_mod.format_rows(result):
        table.add_row(*row)
    out.print(table)
    lowering = next((c.detail.get("lowering") for c in result.contenders if c.name == "graphopt"), None)
    if lowering:
        chosen = lowering.get("choices") or lowering.get("chosen")
        out.print(f"graphopt lowering: {chosen}", markup=False)
    out.print(machine.line(), markup=False)
    out.print(f"graphopt vs best anchor: {result.graphopt_vs_best_anchor}x")
    return 0


def cmd_report(args) -> int:
    from graphopt import report_html

    path = Path(args.report_json)
    try:
        data = json.loads(path.read_text())
        page = report_html.render(data, title=f"graphopt report: {path.name}")
    except FileNotFoundError:
        raise InputError(f"report not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a graphopt JSON report ({type(exc).__name__}: {exc})",
                         hint="write one with graphopt optimize --report r.json") from None
    atomic.write_text(args.output, page)
    out.print(f"wrote {args.output}", markup=False)
    return 0


def cmd_view(args) -> int:
    try:
        import netron
    except ImportError:
        raise InputError("graphopt view needs Netron, which is not installed",
                         hint="pip install 'graphopt[view]' (the netron package)") from None
    paths = [Path(p) for p in (args.model, args.other) if p]
    for path in paths:
        if not path.is_file():
            raise InputError(f"model not found: {path}")
    for i, path in enumerate(paths):
        port = args.port + i if args.port else 0
        host, bound = netron.start(str(path), address=("localhost", port), browse=not args.no_browser)
        out.print(f"serving {path} at http://{host}:{bound}", markup=False)
    sys.stdout.flush()
    try:
        netron.wait()
    except KeyboardInterrupt:
        pass
    finally:
        netron.stop()
    return 0


def cmd_passes(args) -> int:
    rows = [{"name": p.name, "kind": str(p.kind), "doc": p.summary()} for p in registry.available()]
    if args.json:
        out.print(json.dumps({"passes": rows, "presets": {k: list(v) for k, v in presets.PRESETS.items()}}, indent=2), markup=False)
        return 0
    table = Table(title="passes", title_justify="left")
    for col in ("name", "kind", "what it does"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["doc"])
    out.print(table)
    for name, names in presets.PRESETS.items():
        out.print(f"preset {name}: {', '.join(names)}")
    return 0


def cmd_convert(args) -> int:
    module, example_inputs, dynamic_shapes = _call_factory(args.factory)
    with _spinner("exporting with torch.onnx (dynamo)"):
        model = graphopt.load(module, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes)
        graphopt.save(model, args.output, external_data=True if args.external_data else None)
    out.print(f"wrote {args.output}")
    return 0


def _call_factory(spec: str):
    file, sep, func = spec.rpartition(":")
    if not sep or not file or not func:
        raise InputError(f"expected FILE.py:FUNCTION, got '{spec}'")
    path = Path(file)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"graphopt_factory_{path.stem}", path)
    mod = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    factory = getattr(mod, func, None)
    if not callable(factory):
        raise InputError(f"{path} has no function '{func}'")
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise InputError(f"{spec} must return (module, example_inputs) or (module, example_inputs, dynamic_shapes)")
    return (*made, None) if len(made) == 2 else made


def _spinner(text: str):
    return err.status(text, spinner="dots")


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True)


if __name__ == "__main__":
    sys.exit(main())
