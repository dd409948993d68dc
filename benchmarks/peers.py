"""mlopt's default pipeline next to its peers, on the same model and inputs, in one process.

    ~/.cache/mlopt/venv-peers/bin/python benchmarks/peers.py [--model crnn] [--runs 50] [--warmup 10]
    .venv/bin/python benchmarks/peers.py --skip-olive ...   # OpenVINO and torchao only, no Olive venv

Runs mlopt's default pipeline (`optimize`) and what a user would write instead of it, with each
tool's default options:
- Microsoft Olive: OnnxConversion; OnnxConversion → OnnxStaticQuantization with the same
  calibration samples; OnnxConversion → OnnxDynamicQuantization;
- OpenVINO: the PyTorch model converted by `ov.convert_model` and saved with `ov.save_model`,
  compiled at OpenVINO's default precision; and that model quantized by `nncf.quantize` on the same
  calibration samples;
- torchao: the PT2E tutorial's static INT8 (torch.export, X86InductorQuantizer calibrated on the
  same samples, convert_pt2e), run through torch.compile with inductor's freezing on.
Then it times every resulting model with the same code mlopt times its own variants with: the same
runners (ONNX Runtime with 1 intra-op and 1 inter-op thread and ORT_ENABLE_ALL; OpenVINO's CPU
plugin; PyTorch), the same input array, `--warmup` untimed and `--runs` timed runs in interleaved
rounds; PyTorch FP32 eager is the common baseline. Every row's accuracy is measured the same way
(mlopt's metric for the model's data, on the same held-out items). Sizes are the files on disk.
Prints a markdown table (stdout; progress and the tools' logs go to stderr) ready to paste, and
closes with `mlopt best / fastest peer: X.XXx` against the fastest peer within the accuracy budget
mlopt applies to its own variants (the same maxAccuracyDrop below the same FP32 baseline; closing_lines).

Olive is a benchmark-only dependency, never one of mlopt's: it lives in its own venv
(benchmarks/requirements-peers.txt; the command is in benchmarks/README.md). OpenVINO, NNCF and
torchao come with mlopt's optimizer extra.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # nothing leaves the machine from a benchmark

SETUP = """\
benchmarks/peers.py needs Microsoft Olive (olive-ai), which is not a dependency of mlopt.
Create the benchmark environment once, from the repository root:

    python3.11 -m venv ~/.cache/mlopt/venv-peers
    ~/.cache/mlopt/venv-peers/bin/pip install -e '.[optimizer]' -r benchmarks/requirements-peers.txt

then run:

    ~/.cache/mlopt/venv-peers/bin/python benchmarks/peers.py

(or pass --skip-olive to compare with OpenVINO and torchao only, from mlopt's own venv)
"""

# Olive loads the model and the calibration data through a user script: this one builds the very
# module the benchmark times (its state dict is saved beside it) and serves mlopt's calibration set.
OLIVE_USER_SCRIPT = '''\
import numpy as np
import torch
from olive.data.registry import Registry

ZOO_MODEL = {zoo!r}


def load_model(model_path):
    from optimizer.zoo import get_zoo_model

    module = get_zoo_model(ZOO_MODEL).build()
    module.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return module.eval()


class _Samples(torch.utils.data.Dataset):
    """mlopt's calibration samples, one per item without its batch axis (the DataLoader adds it)."""

    def __init__(self, path, names):
        data = np.load(path)
        count = sum(1 for key in data.files if key.startswith(names[0] + "__"))
        self.items = [{{name: torch.from_numpy(data[f"{{name}}__{{i}}"][0]) for name in names}} for i in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index], 0


@Registry.register_dataset()
def mlopt_calibration(path, names):
    return _Samples(path, names)
'''


@dataclass
class Row:
    pipeline: str
    variant: str
    path: Path | None = None  # an ONNX model, timed with OrtRunner
    torch_module: object = None  # or a PyTorch module, timed with TorchRunner
    runner: object = None  # or a runner built already (OpenVINO, a torch.compile'd program)
    size: int | None = None
    latency: object = None  # optimizer.api.results.Latency
    agreement: float | None = None  # argmax agreement with PyTorch FP32 on the evaluation set
    accuracy: float | None = None  # the run's metric (evaluate.accuracy), the same for every row
    error: str | None = None


# Rows of these pipelines are not peers: mlopt itself and the common baseline.
NOT_PEERS = ("mlopt", "PyTorch")


def one_line(error: BaseException | str, limit: int = 240) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def onnx_size(path: Path) -> int:
    """The model file plus any external-data files it points to, as they are on disk."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# --- mlopt ------------------------------------------------------------------------------------

def run_mlopt(zoo: str, args, output: Path) -> tuple[list[Row], object]:
    from optimizer.console import LogReporter, QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import parse_spec

    spec = parse_spec({
        "apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "peers"},
        "spec": {"model": {"source": f"zoo:{zoo}"},
                 # No scaling table: the comparison below times every model itself.
                 "benchmark": {"threads": args.threads, "warmup": args.warmup, "runs": args.runs,
                               "scalingBatches": []}},
    })
    reporter = QuietReporter() if args.quiet else LogReporter(sys.stderr)
    results = optimize(spec, output, Path.cwd(), reporter)
    rows = []
    if results.best is None:
        rows.append(Row("mlopt", "best", error=one_line(f"no variant within the budget: {results.bestReason}")))
        return rows, results
    # The best variant, then mlopt's own counterparts of Olive's three outputs (when not the best).
    names = [results.best] + [n for n in ("onnx-fp32", "ort-int8-static", "ort-int8-dynamic") if n != results.best]
    for name in names:
        try:
            variant = results.variant(name)
        except KeyError:
            continue
        label = f"{name} (best)" if name == results.best else name
        if variant.status not in ("ok", "rejected") or not variant.artifact:
            rows.append(Row("mlopt", label, error=one_line(variant.error or variant.status)))
            continue
        rows.append(mlopt_row(label, variant, output, args.threads, [spec["name"] for spec in results.model["inputs"]]))
    return rows, results


def mlopt_row(label: str, variant, output: Path, threads: int, input_names: list[str]) -> Row:
    """One of mlopt's variants, loaded from what the run saved and timed by the runner its runtime uses."""
    from optimizer.engines import artifact_files

    artifact = output / variant.artifact
    size = sum(path.stat().st_size for path in artifact_files(artifact))
    if variant.runtime == "onnxruntime":
        return Row("mlopt", label, path=artifact, size=size)
    if variant.runtime == "openvino":
        from optimizer.engines.runners import OpenVinoRunner

        precision = variant.lineage.options.get("precision", "f32")
        precision = None if precision == "OpenVINO's default" else precision
        return Row("mlopt", label, runner=OpenVinoRunner(artifact, threads=threads, precision=precision), size=size)
    import torch

    if variant.runtime == "pytorch-inductor":  # a PT2E .pt2, compiled as the recipe compiled it
        import torchao  # noqa: F401  (registers the quantized ops the program calls)

        from optimizer.engines.torchao_pt2e import INDUCTOR_CONFIG
        from optimizer.engines.runners import CompiledTorchRunner

        module = torch.compile(torch.export.load(str(artifact)).module())
        return Row("mlopt", label, runner=CompiledTorchRunner(module, input_names, inductor_config=INDUCTOR_CONFIG),
                   size=size)
    # A torch.ao variant: its saved TorchScript module, timed with the same TorchRunner as the baseline.
    return Row("mlopt", label, torch_module=torch.jit.load(str(artifact)), size=size)


# --- Olive ------------------------------------------------------------------------------------

OLIVE_FLOWS = {
    "ONNX conversion": {"conversion": {"type": "OnnxConversion"}},
    "static quantization": {"conversion": {"type": "OnnxConversion"},
                            "quantization": {"type": "OnnxStaticQuantization", "data_config": "calibration"}},
    "dynamic quantization": {"conversion": {"type": "OnnxConversion"},
                             "quantization": {"type": "OnnxDynamicQuantization"}},
}


def quiet_olive_logging() -> None:
    """Olive logs to stdout; the table owns stdout, so its logs go to stderr."""
    for handler in logging.getLogger("olive").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def olive_io_config(entry, output_count: int) -> dict:
    return {
        "input_names": [spec.name for spec in entry.inputs],
        "input_shapes": [list(spec.shape) for spec in entry.inputs],
        "input_types": [str(getattr(spec.dtype, "value", spec.dtype)) for spec in entry.inputs],
        "output_names": ["output"] if output_count == 1 else [f"output_{i}" for i in range(output_count)],
        # The same dynamic axes mlopt exports with, so neither side gets a more static graph.
        "dynamic_axes": {spec.name: {str(k): v for k, v in (spec.dynamicAxes or {}).items()}
                         for spec in entry.inputs if spec.dynamicAxes},
    }


def run_olive(zoo: str, entry, module, dataset, output_count: int, workdir: Path, quiet: bool) -> list[Row]:
    import numpy as np
    import torch
    from olive.workflows import run as olive_run

    quiet_olive_logging()
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / "model.pt"
    torch.save(module.state_dict(), weights)
    calibration = workdir / "calibration.npz"
    np.savez(calibration, **{f"{name}__{i}": array for i, sample in enumerate(dataset.calibration)
                             for name, array in sample.items()})
    script = workdir / "olive_user_script.py"
    script.write_text(OLIVE_USER_SCRIPT.format(zoo=zoo))
    names = [spec.name for spec in entry.inputs]

    rows = []
    for label, passes in OLIVE_FLOWS.items():
        config = {
            "input_model": {"type": "PyTorchModel", "model_path": str(weights), "model_script": str(script),
                            "model_loader": "load_model", "io_config": olive_io_config(entry, output_count)},
            "data_configs": [{
                "name": "calibration", "type": "DataContainer", "user_script": str(script),
                "load_dataset_config": {"type": "mlopt_calibration",
                                        "params": {"path": str(calibration), "names": names}},
                "dataloader_config": {"batch_size": 1},
            }],
            "passes": passes,
            "cache_dir": str(workdir / "cache"),  # shared: the conversion is run once, as a user's cache would
            "output_dir": str(workdir / label.replace(" ", "-")),
            "log_severity_level": 1 if not quiet else 3,
            "evaluate_input_model": False,
        }
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                output = olive_run(config)
            best = output.get_best_candidate() if output is not None else None
            if best is None or not best.model_path:
                raise RuntimeError("the workflow produced no output model")
            path = Path(best.model_path)
            if path.is_dir():
                found = sorted(path.glob("*.onnx"))
                if not found:
                    raise RuntimeError(f"no .onnx file in {path}")
                path = found[0]
            rows.append(Row("Olive", label, path=path, size=onnx_size(path)))
            print(f"olive: {label} in {time.perf_counter() - started:.0f} s → {path}", file=sys.stderr)
        except BaseException as error:  # noqa: BLE001 — a failed pass is a row of the table, not a crash
            if isinstance(error, KeyboardInterrupt):
                raise
            traceback.print_exc(file=sys.stderr)
            rows.append(Row("Olive", label, error=one_line(error)))
    return rows


# --- OpenVINO ---------------------------------------------------------------------------------

OPENVINO_ROWS = ("default precision", "NNCF INT8 (nncf.quantize)")


def ir_size(path: Path) -> int:
    from optimizer.engines import artifact_files

    return sum(part.stat().st_size for part in artifact_files(path))  # model.xml + model.bin


def run_openvino(module, dataset, input_names: list[str], workdir: Path, threads: int) -> list[Row]:
    """OpenVINO as its documentation shows: convert the PyTorch model, save the IR (save_model's
    defaults), compile at the default precision; and NNCF's post-training INT8 of the same model."""
    import copy

    import torch

    from optimizer.engines.runners import OpenVinoRunner

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        return [Row("OpenVINO", label, error=f"not installed: {error.name}") for label in OPENVINO_ROWS]
    example = tuple(torch.from_numpy(dataset.calibration[0][name]) for name in input_names)
    rows, model = [], None
    try:
        model = ov.convert_model(copy.deepcopy(module).eval(), example_input=example)
        for port, name in zip(model.inputs, input_names):
            port.get_tensor().set_names({name})  # the runner feeds inputs by the spec's names
        path = workdir / "openvino-default.xml"
        ov.save_model(model, str(path))
        rows.append(Row("OpenVINO", OPENVINO_ROWS[0], runner=OpenVinoRunner(path, threads=threads, precision=None),
                        size=ir_size(path)))
    except Exception as error:  # noqa: BLE001 — a failed conversion is a row of the table, not a crash
        traceback.print_exc(file=sys.stderr)
        rows.append(Row("OpenVINO", OPENVINO_ROWS[0], error=one_line(error)))
    if model is None:
        return rows + [Row("OpenVINO", OPENVINO_ROWS[1], error="no converted model to quantize")]
    try:
        nncf.set_log_level(logging.ERROR)
        calibration = nncf.Dataset(dataset.calibration, lambda item: {name: item[name] for name in input_names})
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
            quantized = nncf.quantize(model, calibration, subset_size=len(dataset.calibration))
        path = workdir / "openvino-nncf-int8.xml"
        ov.save_model(quantized, str(path))
        rows.append(Row("OpenVINO", OPENVINO_ROWS[1], runner=OpenVinoRunner(path, threads=threads, precision=None),
                        size=ir_size(path)))
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        rows.append(Row("OpenVINO", OPENVINO_ROWS[1], error=one_line(error)))
    return rows


# --- torchao ----------------------------------------------------------------------------------

TORCHAO_ROW = "PT2E static INT8 + torch.compile"


def run_torchao(module, dataset, input_names: list[str], workdir: Path) -> list[Row]:
    """torchao's PT2E tutorial for x86 as a user would follow it: export, X86InductorQuantizer with
    its default config, calibrate on the same samples, convert, torch.compile with freezing on."""
    import copy

    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        from optimizer.engines.torchao_pt2e import drop_unused_weights
        from optimizer.engines.runners import CompiledTorchRunner

        example = tuple(torch.from_numpy(dataset.calibration[0][name]) for name in input_names)
        captured = torch.export.export(copy.deepcopy(module).eval(), example).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for item in dataset.calibration:
                prepared(*(torch.from_numpy(item[name]) for name in input_names))
        converted = convert_pt2e(prepared)
        # Sized as mlopt sizes its own PT2E variants: the replaced FP32 weights are not counted.
        drop_unused_weights(converted)
        path = workdir / "torchao-pt2e-int8.pt2"  # what is sized: the converted program
        torch.export.save(torch.export.export(converted, example), str(path))
        runner = CompiledTorchRunner(torch.compile(converted), input_names, inductor_config={"freezing": True})
        started = time.perf_counter()
        runner(dataset.calibration[0])  # inductor compiles here, before anything is timed
        print(f"torchao: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return [Row("torchao", TORCHAO_ROW, runner=runner, size=path.stat().st_size)]
    except Exception as error:  # noqa: BLE001 — e.g. a model torch.export or inductor cannot take
        traceback.print_exc(file=sys.stderr)
        return [Row("torchao", TORCHAO_ROW, error=one_line(error))]


# --- timing and table -------------------------------------------------------------------------

def time_rows(rows: list[Row], feed: dict, dataset, reference, input_names, metric: str, args) -> None:
    """Every model: same feed, same runner settings, timed in interleaved rounds like the pipeline
    does; and the same accuracy measure (`metric` on the held-out items) for every row."""
    from optimizer.measure.benchmark import measure_interleaved
    from optimizer.steps.evaluate import accuracy, fidelity, run_all
    from optimizer.engines.runners import OrtRunner, TorchRunner

    runners = {}
    for row in rows:
        if row.error:
            continue
        try:
            if row.runner is not None:
                runners[id(row)] = row.runner
            elif row.path is not None:
                runners[id(row)] = OrtRunner(row.path, threads=args.threads)
            elif row.torch_module is not None:
                runners[id(row)] = TorchRunner(row.torch_module, input_names)
            else:
                row.error = "no model to time"
                continue
            outputs = run_all(runners[id(row)], dataset.evaluation)
            measured = fidelity(reference, outputs)
            row.agreement = measured.argmaxAgreement
            row.accuracy = accuracy(metric, outputs, dataset.labels, measured)
        except Exception as error:  # noqa: BLE001
            row.error = one_line(error)
            runners.pop(id(row), None)
    print(f"timing {len(runners)} models in {args.rounds} interleaved round(s)…", file=sys.stderr)
    calls = {key: runner.bind(feed) for key, runner in runners.items()}
    latencies = measure_interleaved(calls, args.warmup, args.runs, args.rounds)
    for row in rows:
        row.latency = latencies.get(id(row), row.latency)


def fmt_ms(value: float) -> str:
    return f"{value:.2f}"


def table(rows: list[Row], baseline: Row, best: Row | None, metric: str = "agreement") -> str:
    accuracy_column = metric != "agreement"  # else it repeats the agreement column
    lines = [
        "| pipeline | variant | size MB | mean ± std ms | p50 ms | speedup vs PyTorch FP32 "
        "| latency ÷ mlopt best | size ÷ mlopt best | argmax agreement vs FP32 |"
        + (f" {metric} |" if accuracy_column else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if accuracy_column else ""),
    ]
    best_ok = best is not None and best.latency is not None and best.size
    for row in rows:
        size = f"{row.size / 1e6:.1f}" if row.size else "—"
        if row.error or row.latency is None:
            lines.append(f"| {row.pipeline} | {row.variant} | {size} | error: {row.error or 'not timed'} "
                         "| — | — | — | — | —" + (" | — |" if accuracy_column else " |"))
            continue
        lat = row.latency
        speedup = f"{baseline.latency.mean / lat.mean:.2f}x" if baseline.latency else "—"
        lat_ratio = f"{lat.mean / best.latency.mean:.2f}" if best_ok else "—"
        size_ratio = f"{row.size / best.size:.2f}" if best_ok and row.size else "—"
        agreement = f"{row.agreement:.1%}" if row.agreement is not None else "—"
        accuracy = (f" {row.accuracy:.2%} |" if row.accuracy is not None else " — |") if accuracy_column else ""
        lines.append(f"| {row.pipeline} | {row.variant} | {size} | {fmt_ms(lat.mean)} ± {fmt_ms(lat.std)} "
                     f"| {fmt_ms(lat.p50)} | {speedup} | {lat_ratio} | {size_ratio} | {agreement} |{accuracy}")
    return "\n".join(lines)


def closing_lines(rows: list[Row], best: Row | None, metric: str = "agreement", baseline_accuracy: float | None = None,
                  budget: dict | None = None) -> list[str]:
    """The comparison the benchmark exists for, as two lines: what was compared with what, then
    `mlopt best / fastest peer: X.XXx` (the peer's mean latency over mlopt's best's: above 1,
    mlopt's best is that many times faster). The peer is the fastest row outside mlopt and the
    baseline that meets the accuracy budget mlopt applies to its own variants (results.json's
    accuracyBudget: maxAccuracyDrop / maxRelativeAccuracyDrop below the same FP32 baseline, judged by
    the same budget_failure), so a peer one decision behind mlopt's best but within the budget is
    compared; when none is within it, the fastest peer row regardless, and the first line says so."""
    from optimizer.api.spec import AcceptanceSpec
    from optimizer.steps.select import budget_failure

    if best is None or best.latency is None or best.accuracy is None:
        return [f"mlopt has no timed best variant ({best.error if best and best.error else 'nothing picked'}), "
                "so there is nothing to compare.", "mlopt best / fastest peer: n/a"]
    peers = [row for row in rows if row.pipeline not in NOT_PEERS and not row.error and row.latency is not None
             and row.accuracy is not None]
    if not peers:
        return ["No peer row was timed (see the errors in the table).", "mlopt best / fastest peer: n/a"]
    defaults = AcceptanceSpec()
    budget = budget or {}
    max_drop = budget.get("maxAccuracyDrop", defaults.maxAccuracyDrop)
    max_relative = budget.get("maxRelativeAccuracyDrop", defaults.maxRelativeAccuracyDrop)
    if baseline_accuracy is None:
        baseline_accuracy = next((row.accuracy for row in rows if row.pipeline == "PyTorch" and row.accuracy is not None),
                                 best.accuracy)
    qualified = [row for row in peers
                 if budget_failure(row.accuracy, baseline_accuracy, max_drop, max_relative, metric) is None]
    fastest = min(qualified or peers, key=lambda row: row.latency.mean)
    ours = f"mlopt's {best.variant.removesuffix(' (best)')} ({best.latency.mean:.2f} ms, {metric} {best.accuracy:.2%})"
    theirs = f"{fastest.pipeline} {fastest.variant} ({fastest.latency.mean:.2f} ms, {metric} {fastest.accuracy:.2%})"
    limits = [f"{max_drop * 100:.2f} points" if max_drop is not None else "",
              f"{max_relative:.2%} relative" if max_relative is not None else ""]
    rule = (f"within mlopt's accuracy budget ({metric} at most {' and '.join(filter(None, limits)) or 'any amount'} "
            f"below FP32's {baseline_accuracy:.2%})")
    if qualified:
        context = f"Fastest peer {rule}: {theirs}, against {ours}."
    else:
        context = (f"No peer row is {rule}; compared with the fastest peer row regardless of accuracy: {theirs}, "
                   f"against {ours}.")
    return [context + " Above 1.00x, mlopt's best is faster.",
            f"mlopt best / fastest peer: {fastest.latency.mean / best.latency.mean:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crnn", help="zoo model (default: crnn)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5,
                        help="split the timed runs into this many rounds taken in turn across models, as the "
                             "pipeline's benchmark.rounds does (default 5)")
    parser.add_argument("--output", default=None, help="keep every model here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--skip-olive", action="store_true",
                        help="compare with OpenVINO and torchao only (no Olive venv needed)")
    args = parser.parse_args(argv)

    if not args.skip_olive:
        try:
            import olive  # noqa: F401
        except ImportError as error:
            print(SETUP, file=sys.stderr)
            print(f"(import olive: {type(error).__name__}: {error})", file=sys.stderr)
            return 2

    import torch

    from optimizer.steps.data import load_dataset
    from optimizer.measure.environment import cpu_info
    from optimizer.engines.runners import TorchRunner
    from optimizer.zoo import get_zoo_model

    output = Path(args.output or tempfile.mkdtemp(prefix="mlopt-peers-")).resolve()
    output.mkdir(parents=True, exist_ok=True)

    # mlopt first: it also sets torch's thread count for the whole process, as for its own runs.
    print("mlopt: running the default pipeline…", file=sys.stderr)
    mlopt_rows, results = [], None
    try:
        mlopt_rows, results = run_mlopt(args.model, args, output / "mlopt")
    except Exception as error:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        mlopt_rows = [Row("mlopt", "default pipeline", error=one_line(error))]
    torch.set_num_threads(args.threads)

    entry = get_zoo_model(args.model)
    module = entry.build()
    # Same samples as mlopt's own run (random data is seeded): calibration for Olive's static pass,
    # evaluation for agreement, and one fixed input for every timing.
    dataset = load_dataset(entry.data, 64, entry.inputs, Path.cwd())
    input_names = [spec.name for spec in entry.inputs]
    feed = dataset.evaluation[0]
    baseline_runner = TorchRunner(module, input_names)
    reference = [baseline_runner(item) for item in dataset.evaluation]
    output_count = len(reference[0])

    olive_rows = []
    if not args.skip_olive:
        print("olive: running the workflows…", file=sys.stderr)
        olive_rows = run_olive(args.model, entry, module, dataset, output_count, output / "olive", args.quiet)
    print("openvino: converting and quantizing…", file=sys.stderr)
    openvino_rows = run_openvino(module, dataset, input_names, output / "openvino", args.threads)
    print("torchao: PT2E quantization and torch.compile…", file=sys.stderr)
    torchao_rows = run_torchao(module, dataset, input_names, output / "torchao")

    weights = output / "pytorch-fp32.pt"
    torch.save(module.state_dict(), weights)
    baseline = Row("PyTorch", "FP32 eager (baseline)", torch_module=module, size=weights.stat().st_size)
    rows = [baseline, *mlopt_rows, *olive_rows, *openvino_rows, *torchao_rows]
    # mlopt's own metric for this data (agreement with FP32 without labels), for every row alike.
    metric = results.accuracyMetric if results is not None else "agreement"
    time_rows(rows, feed, dataset, reference, input_names, metric, args)
    best = next((row for row in mlopt_rows if row.variant.endswith("(best)")), None)

    cpu, flags = cpu_info()
    shape = ", ".join(f"{name} {list(array.shape)} {array.dtype}" for name, array in feed.items())
    peers = ("OpenVINO, NNCF and torchao" if args.skip_olive
             else "Microsoft Olive, OpenVINO, NNCF and torchao")
    print(f"### mlopt vs {peers} on zoo:{args.model}\n")
    print(f"{cpu} ({', '.join(flags) or 'no INT8 flags'}); Python {platform.python_version()}, "
          f"torch {version('torch')}, onnxruntime {version('onnxruntime')}, olive-ai {version('olive-ai')}, "
          f"openvino {version('openvino')}, nncf {version('nncf')}, torchao {version('torchao')}, "
          f"mlopt {version('mlopt')}. One process, same input ({shape}), {args.threads} thread(s), "
          f"{args.warmup} warm-ups + {args.runs} timed runs per model"
          f"{f' in {args.rounds} interleaved rounds' if args.rounds > 1 else ''}; "
          f"ONNX models in ONNX Runtime (CPUExecutionProvider, ORT_ENABLE_ALL), IR in OpenVINO's CPU plugin at "
          f"its default precision, PT2E through torch.compile (inductor, freezing). Peers: default options, "
          f"static calibration on mlopt's {len(dataset.calibration)} calibration samples; accuracy is {metric} "
          f"on the same {len(dataset.evaluation)} held-out items for every row.\n")
    print(table(rows, baseline, best, metric))
    if results is not None:
        print(f"\nmlopt picked {results.best}: {results.bestReason}.")
    print(f"\nModels: {output}\n")
    budget = results.accuracyBudget if results is not None else None  # the budget mlopt's own pick met
    for line in closing_lines(rows, best, metric, baseline.accuracy, budget):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
