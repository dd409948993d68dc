"""`mlopt`: optimize a model from a spec on this machine, validate specs, list the zoo and the recipes,
run the operator.

Exit codes: 0 done; 1 the run failed (model or data cannot be loaded, or an internal error);
2 invalid spec or usage (also inputs that do not fit the model). No traceback unless --debug.
Heavy imports (torch, onnxruntime) happen inside commands, so `mlopt operator` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.text import Text

from optimizer.api import uris
from optimizer.api.spec_loader import SpecError, load_spec


def _optimize(args: argparse.Namespace, console: Console) -> int:
    from optimizer.console import LogReporter, QuietReporter, RichReporter, print_results
    from optimizer.pipeline import optimize_to
    from optimizer.api.errors import OptimizationError

    spec = load_spec(args.spec)
    output = args.output or spec.spec.output  # a folder (relative to here), pvc:// or s3://bucket/prefix/
    if args.output:  # the rules spec.output follows, with the same message (exit 2, before any work)
        try:
            uris.output(args.output)
        except uris.UriError as error:
            raise SpecError(args.spec, [f"--output: {error} (got {args.output!r})"]) from None
    if args.target is not None:
        try:
            spec.target(args.target)
        except KeyError as error:
            raise SpecError(args.spec, [f"--target: {error.args[0]}"]) from None
    if args.quiet:
        reporter = QuietReporter()
    else:  # bars for people at a terminal; plain lines for logs and pipes
        reporter = RichReporter(console) if console.is_terminal else LogReporter()
    try:
        results, results_uri = optimize_to(spec, output, Path(args.spec).resolve().parent, reporter,
                                           target=args.target)
    except OptimizationError as error:  # the model, data or inputs: the message names the field and the fix
        if args.debug:
            traceback.print_exc()
        _print_error(error)
        return error.exit_code
    if not args.quiet:
        print_results(console, results)
        where = results_uri.removesuffix("results.json")
        serving = any(entry["path"].startswith("serving/") for entry in results.outputs)
        charts = "size.png, latency.png" + (", charts/serving.png" if results.serving else "")
        console.print(f"wrote {where}: results.json, report.md, run.log, {charts}, models/"
                      + (" and serving/ (a Triton / OVMS model repository and a KServe InferenceService)" if serving else ""))
    return 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    spec = load_spec(args.spec)
    variants = ", ".join(v.name for v in spec.variants())
    console.print(f"{args.spec}: valid ModelOptimization [bold]{spec.metadata.name}[/] — variants: {variants}")
    return 0


def _models(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from optimizer.zoo import ZOO

    table = Table(title="mlopt model zoo (model.source: zoo:<name>)")
    for column in ("name", "inputs", "data", "metric", "summary"):
        table.add_column(column)
    for entry in ZOO.values():
        inputs = ", ".join(f"{i.name} {i.dtype} {list(i.shape)}" for i in entry.inputs)
        table.add_row(entry.name, inputs, entry.data, entry.metric, entry.summary)
    console.print(table)
    return 0


def recipe_rows() -> list[dict]:
    """Every recipe (the Recipe enum, in its order): engine, devices, labels, default set, what it does."""
    from optimizer.api.spec import RECOMMENDED, Recipe
    from optimizer.engines import RECIPE_INFO
    from optimizer.measure.hardware import AMX_DEFAULT_EXTRAS

    rows = []
    for recipe in Recipe:
        info = RECIPE_INFO[recipe.value]
        default = [device for device, recipes in RECOMMENDED.items() if recipe in recipes]
        if recipe.value in AMX_DEFAULT_EXTRAS:
            default.append("cpu on AMX")
        if info.labels == "required":  # joins the cpu default set when the data has labels (steps/variants.py)
            default.append("cpu with labelled data")
        rows.append({"recipe": recipe.value, "engine": info.engine, "devices": list(info.devices),
                     "labels": info.labels, "defaultSet": default, "summary": info.summary})
    return rows


def _recipes(args: argparse.Namespace, console: Console) -> int:
    rows = recipe_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="mlopt recipes (variants[].recipe; the default set is used when spec.variants is omitted)")
    for column in ("recipe", "engine", "devices", "labels", "default set", "what it does"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["recipe"], row["engine"], ", ".join(row["devices"]), row["labels"],
                      ", ".join(row["defaultSet"]) or "opt-in", row["summary"])
    console.print(table)
    return 0


def _worker(args: argparse.Namespace, console: Console) -> int:
    from optimizer.worker import main as worker_main

    return worker_main()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mlopt", description="Make PyTorch models smaller and faster.")
    commands = root.add_subparsers(dest="command", required=True)
    optimize = commands.add_parser("optimize", help="run a ModelOptimization spec on this machine")
    optimize.add_argument("spec", help="path to the YAML spec")
    optimize.add_argument("--output", "-o", help="output directory (overrides spec.output)")
    optimize.add_argument("--target", help="measure this machine as one of spec.targets (its price; results under "
                          "<output>/targets/<name>/)")
    optimize.add_argument("--quiet", "-q", action="store_true", help="no progress and no table (for scripts)")
    optimize.add_argument("--debug", action="store_true", help="print the traceback of any error (for bug reports)")
    optimize.set_defaults(handler=_optimize)
    validate = commands.add_parser("validate", help="check a spec without running it")
    validate.add_argument("spec")
    validate.set_defaults(handler=_validate)
    commands.add_parser("models", help="list the model zoo").set_defaults(handler=_models)
    recipes = commands.add_parser("recipes", help="list the recipes: what each does, where it applies, the default set")
    recipes.add_argument("--json", action="store_true", help="print the list as JSON")
    recipes.set_defaults(handler=_recipes)
    # Listed for --help only: main() hands `operator` and all its options to mlopt_operator as they are.
    commands.add_parser("operator", help="run the Kubernetes operator (kopf); options: mlopt operator --help")
    commands.add_parser("worker", help="the Kubernetes Job entrypoint (reads MLOPT_SPEC)").set_defaults(handler=_worker)
    return root


def _print_error(error: BaseException) -> None:
    """A red "error:" prefix; the message itself is printed as-is (it may hold brackets like [1, 32])."""
    # soft_wrap: no hard line breaks inside the message (a pipe or log gets it on one line, greppable)
    Console(stderr=True).print(Text("error: ", style="red") + Text(str(error)), highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        from mlopt_operator.main import main as run_operator

        return run_operator(argv[1:])
    args = parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: don't squeeze the table to 80 columns
    try:
        return args.handler(args, console)
    except SpecError as error:
        _print_error(error)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: nothing was written to the output directory")
        return 130
    except Exception as error:  # an mlopt bug: one line, the traceback only when asked for
        if getattr(args, "debug", False):
            traceback.print_exc()
        from optimizer.api.errors import internal_error

        _print_error(internal_error(error) + ("" if getattr(args, "debug", False) else "; rerun with --debug for the traceback"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
