"""What the steps hand to each other: one typed record of a run in progress.

Each step reads the fields earlier steps filled and fills its own (the order is
optimizer/pipeline.py's STEPS). The types are imported for checking only, so this module stays
light and every step module can name `Run` without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.api.results import Analysis, Recommendation, Results, Serving, StepTiming, VariantResult
from optimizer.api.spec import ModelOptimization, VariantSpec

if TYPE_CHECKING:
    from optimizer.api.results import Environment
    from optimizer.console import Reporter
    from optimizer.engines import BuildContext, Built
    from optimizer.engines.runners import Runner
    from optimizer.measure.hardware import HardwareProfile
    from optimizer.run_log import LibraryWarnings
    from optimizer.steps.data import Dataset
    from optimizer.steps.export import ExportResult
    from optimizer.steps.load import LoadedModel


@dataclass
class Run:
    spec: ModelOptimization
    base_dir: Path
    staging: Path  # everything is written here, then moved into the output at the end
    reporter: Reporter
    env: Environment  # this machine, recorded before any step
    hardware: HardwareProfile  # the ISA class the quantization choices are for
    warnings: LibraryWarnings  # what the libraries warned about, collected while the steps run
    target: str | None = None  # the spec.targets name this run measures (MLOPT_TARGET, --target)
    # load, inputs
    loaded: LoadedModel | None = None
    input_notes: list[str] = field(default_factory=list)  # what the input check decided, e.g. one shape only
    # data
    dataset: Dataset | None = None
    data_source: str = "random"
    metric: str = "agreement"  # acceptance.metric, resolved against the data
    # export
    export: ExportResult | None = None
    export_error: str | None = None
    export_attempts: list[dict] = field(default_factory=list)  # [{route, ok, reason}] in the order tried
    baseline_runner: Runner | None = None
    # variants
    context: BuildContext | None = None
    planned: dict[str, VariantSpec] = field(default_factory=dict)  # by name, compareCalibration expanded
    calibration_of: dict[str, str] = field(default_factory=dict)  # expanded name -> the spec's variant
    built: dict[str, Built] = field(default_factory=dict)
    results: dict[str, VariantResult] = field(default_factory=dict)
    # evaluate
    reference: list | None = None  # FP32 outputs on the evaluation items
    baseline: VariantResult | None = None
    # select, analyze, report
    best: str | None = None
    best_reason: str = ""
    # serve (benchmark.serving)
    serving: Serving | None = None
    recommendation: Recommendation | None = None
    analysis: Analysis | None = None
    record: Results | None = None  # results.json, assembled by the report step
    output_uri: str | None = None  # where optimize_to stores the run (spec.output or --output): serving/'s storageUri
    steps: list[StepTiming] = field(default_factory=list)

    @property
    def scratch(self) -> Path:
        return self.staging / "scratch"
