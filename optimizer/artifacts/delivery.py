"""Run a spec and put its results where spec.output says: a folder, a claim, or an s3:// prefix.

The CLI and the Job's worker both end here. For an object store the run is written to a local
folder first and uploaded only when it is complete (results.json last), so a failed or killed run
leaves nothing at the output prefix that a reader could mistake for results.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from optimizer.pipeline import optimize
from optimizer.api.results import Results
from optimizer.artifacts.storage import RESULTS_FILE, deliver, output_location, pvc_path


def local_output(output: str, base: Path) -> Path | None:
    """The folder for a local or pvc:// output; None for an object store."""
    location = output_location(output)
    if location.scheme == "s3":
        return None
    path = pvc_path(location, "spec.output") if location.scheme == "pvc" else Path(location.key).expanduser()
    return path if path.is_absolute() else base / path


def optimize_to(spec, output: str, base_dir: Path, reporter, cwd: Path | None = None) -> tuple[Results, str]:
    """Run `spec` and store its results at `output`; return the results and results.json's location."""
    folder = local_output(output, cwd or Path.cwd())  # checks the output URI before any work
    if folder is not None:
        results = optimize(spec, folder, base_dir, reporter)
        if output.startswith("pvc://"):  # the claim's URI, not where this pod happened to mount it
            return results, f"{output.rstrip('/')}/{RESULTS_FILE}"
        return results, str(folder / RESULTS_FILE)
    with tempfile.TemporaryDirectory(prefix="mlopt-run-") as scratch:
        results = optimize(spec, Path(scratch) / "results", base_dir, reporter)
        return results, deliver(Path(scratch) / "results", output, spec.spec.storage, reporter)
