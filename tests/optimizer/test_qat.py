"""torch-int8-qat: fake-quantized fine-tuning on labelled data, then real INT8 kernels."""

from __future__ import annotations

import pytest
import torch

from optimizer.console import QuietReporter
from optimizer.pipeline import optimize
from optimizer.api.spec_loader import load_spec

from .conftest import QUICK_BENCHMARK, write_spec

pytestmark = pytest.mark.slow  # every test here runs the whole pipeline


def test_qat_runs_end_to_end_on_digits(digits_run):
    results, output = digits_run
    qat = results.variant("qat")
    assert qat.status in ("ok", "rejected"), qat.error
    assert qat.runtime == "pytorch" and qat.accuracy > 0.85 and qat.latencyMs.mean > 0
    assert qat.sizeBytes < results.baseline.sizeBytes  # INT8 weights
    options = qat.lineage.options
    assert options["mode"] == "fx-qat" and options["steps"] == 20 and options["loss"] == "cross-entropy"
    module = torch.jit.load(str(output / qat.artifact))
    assert "quantized::conv2d_relu" in str(module.inlined_graph)  # real INT8 kernels, not fake quantization
    row = next(line for line in (output / "report.md").read_text().splitlines() if line.startswith("| qat |"))
    assert "ms" in row and "kB" in row and "%" in row  # accuracy, size and latency in the same table


def test_qat_without_labels_is_skipped_with_the_reason(tmp_path):
    spec = write_spec(tmp_path, {
        "model": {"source": "zoo:digits"},
        "variants": [{"name": "qat", "recipe": "torch-int8-qat", "qatSteps": 2}],
        "data": {"source": "random", "samples": 4},
        "benchmark": QUICK_BENCHMARK,
    })
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())
    qat = results.variant("qat")
    assert qat.status == "skipped"
    assert "torch-int8-qat needs labelled data: data.source random" in qat.error
