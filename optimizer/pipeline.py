"""The pipeline: load → inputs → data → export → variants → evaluate → fallback → benchmark →
select → serve → analyze → report.

Each step is a function in optimizer/steps/ that reads the typed `Run` earlier steps filled and
fills its own fields; `optimize` runs them in order and times each. Everything is written to a
staging folder inside the output folder and moved into place at the end, results.json last, so an
interrupted run leaves no half-written results. `optimize_to` is where the CLI and the Job's worker
enter: it runs `optimize` and puts the results where spec.output says (a folder, a claim, or an
s3:// prefix, uploaded only once complete).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from optimizer.api import uris
from optimizer.api.results import Results, StepTiming, write_json_atomically
from optimizer.artifacts.storage import (RESULTS_FILE, StorageError, check_output, deliver, describe_outputs,
                                         output_location, publish, pvc_path)
from optimizer.api.spec import ModelOptimization
from optimizer.console import Reporter
from optimizer.engines.runners import check_device
from optimizer.measure import environment, hardware
from optimizer.run_log import RecordingReporter, collected_warnings
from optimizer.steps.analyze import analyze_step
from optimizer.steps.benchmark import benchmark_step
from optimizer.steps.data import data_step
from optimizer.steps.evaluate import evaluate_step
from optimizer.steps.export import export_step
from optimizer.steps.fallback import fallback_step
from optimizer.steps.inputs import inputs_step
from optimizer.steps.load import load_step
from optimizer.steps.report import report_step
from optimizer.steps.run import Run
from optimizer.steps.select import select_step
from optimizer.steps.serve import serve_step
from optimizer.steps.variants import variants_step

# The pipeline, in order; each step reads and fills the Run.
STEPS = [
    ("load", load_step),
    ("inputs", inputs_step),
    ("data", data_step),
    ("export", export_step),
    ("variants", variants_step),
    ("evaluate", evaluate_step),
    ("fallback", fallback_step),
    ("benchmark", benchmark_step),
    ("select", select_step),
    ("serve", serve_step),  # only with benchmark.serving (on when spec.targets is given)
    ("analyze", analyze_step),
    ("report", report_step),
]


@contextmanager
def _timed(run: Run, step: str):
    start = time.perf_counter()
    run.reporter.log(f"{step}…")
    yield
    run.steps.append(StepTiming(step=step, seconds=round(time.perf_counter() - start, 3)))


def _publish(staging: Path, output: Path, results: Results) -> None:
    """Move everything into the output folder; results.json goes last, atomically."""
    shutil.rmtree(staging / "scratch", ignore_errors=True)
    results.outputs = describe_outputs(staging)  # so a reader can verify every file it downloads
    publish(staging, output)
    write_json_atomically(output / RESULTS_FILE, results.model_dump(mode="json"))


def _missing_folders(path: Path) -> list[Path]:
    """`path` and the ancestors of it that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _staging_in(output: Path) -> Path:
    """The run's staging folder, inside the output folder: the one place a run may write (a claim's
    mount point sits on the pod's read-only root filesystem, so nothing can go beside it)."""
    if output.exists() and not output.is_dir():
        raise StorageError(f"spec.output: {output} is a file; give a folder for the results (spec.output or --output)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".mlopt-partial-", dir=output))
    except OSError as error:
        raise StorageError(f"spec.output: cannot write the results to {output}: {error.strerror or error}; give a "
                           f"folder this user (uid {os.getuid()}) can write (spec.output or --output)") from None


def optimize(spec: ModelOptimization, output: Path, base_dir: Path, reporter: Reporter,
             target: str | None = None, output_uri: str | None = None) -> Results:
    """target: the spec.targets name this run measures (its price goes into the recommendation);
    output_uri: where the results will be stored (the serving manifest's storageUri)."""
    if target is not None:
        spec.target(target)  # KeyError naming the known targets, before any work
    output = Path(output).resolve()
    created = _missing_folders(output)  # removed again if the run fails: nothing half-written
    staging = _staging_in(output)
    published = False
    reporter = RecordingReporter(reporter)
    bench = spec.spec.benchmark
    try:
        check_device(bench.device)
        env = environment.describe(bench.threads, bench.device)
        profile = hardware.resolve(bench.profile, env.cpuFlags, bench.device)
        env.hardware = profile.record()
        reporter.log(f"hardware profile: {profile.isa} ({profile.chosen_by}); {profile.reasons[-1]}")
        _configure_threads(bench.threads)
        with collected_warnings() as library_warnings:
            run = Run(spec=spec, base_dir=base_dir, staging=staging, reporter=reporter, env=env, hardware=profile,
                      warnings=library_warnings, target=target, output_uri=output_uri)
            run.scratch.mkdir()
            for name, step in STEPS:
                with _timed(run, name):
                    step(run)
        results = run.record
        results.steps, results.warnings = run.steps, library_warnings.lines()  # the report's own included
        if results.warnings:
            reporter.log(f"{len(results.warnings)} distinct warning(s) from the libraries: see report.md or run.log")
        (staging / "run.log").write_text("\n".join([*reporter.lines, "", "warnings from the libraries:",
                                                    *(results.warnings or ["none"])]) + "\n")
        _publish(staging, output, results)
        published = True
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in [] if published else created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break


def local_output(output: str, base: Path) -> Path | None:
    """The folder for a local or pvc:// output; None for an object store."""
    location = output_location(output)
    if location.scheme == "s3":
        return None
    path = pvc_path(location, "spec.output") if location.scheme == "pvc" else Path(location.key).expanduser()
    return path if path.is_absolute() else base / path


def optimize_to(spec: ModelOptimization, output: str, base_dir: Path, reporter: Reporter,
                cwd: Path | None = None, target: str | None = None) -> tuple[Results, str]:
    """Run `spec` and store its results at `output`; return the results and results.json's location.
    A target's run stores under `<output>/targets/<name>/` (uris.target_output)."""
    if target is not None:
        output = uris.target_output(output, target)
    folder = local_output(output, cwd or Path.cwd())  # checks the output URI before any work
    if folder is not None:
        results = optimize(spec, folder, base_dir, reporter, target, output)
        if output.startswith("pvc://"):  # the claim's URI, not where this pod happened to mount it
            return results, f"{output.rstrip('/')}/{RESULTS_FILE}"
        return results, str(folder / RESULTS_FILE)
    # An object store gets the run only once it is complete (results.json last); a bucket that is
    # missing or not writable is found now, before any work.
    check_output(output, spec.spec.storage)
    with tempfile.TemporaryDirectory(prefix="mlopt-run-") as scratch:
        results = optimize(spec, Path(scratch) / "results", base_dir, reporter, target, output)
        return results, deliver(Path(scratch) / "results", output, spec.spec.storage, reporter)


def _configure_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
