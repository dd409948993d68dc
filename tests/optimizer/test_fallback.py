"""The accuracy fallback on a model whose static INT8 misses the budget because of one layer."""

from __future__ import annotations

import json

import onnx
import pytest

from optimizer.console import QuietReporter
from optimizer.api.errors import DataLoadError
from optimizer.pipeline import optimize
from optimizer.api.spec_loader import load_spec

from .conftest import OUTLIER_INPUTS, QUICK_BENCHMARK, save_user_model, write_spec


def _run(directory, acceptance, variants=None):
    weights = save_user_model(directory, "Outlier")
    spec = write_spec(directory, {
        "model": {"source": weights.name, "entrypoint": "user_models:Outlier", "inputs": OUTLIER_INPUTS},
        "variants": variants or [{"name": "static", "recipe": "ort-int8-static"}],
        "data": {"source": "random", "samples": 32},
        "benchmark": QUICK_BENCHMARK,
        "acceptance": acceptance,
    })
    output = directory / "out"
    return optimize(load_spec(spec), output, directory, QuietReporter()), output


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("outlier"), {"metric": "agreement", "maxAccuracyDrop": 0.05})


def test_static_int8_misses_the_budget_and_the_fallback_recovers_it(fallback_run):
    results, output = fallback_run
    original, recovered = results.variant("static"), results.variant("static+fallback")
    assert original.status == "rejected" and original.accuracy < 0.5, (original.accuracy, original.error)
    assert "points below FP32" in original.error
    fallback = original.fallback
    assert fallback.recovered and fallback.variant == "static+fallback"
    assert fallback.tries[-1].withinBudget and fallback.excludedNodes == fallback.tries[-1].excludedNodes
    assert recovered.status == "ok" and recovered.accuracy >= results.baseline.accuracy - 0.05
    assert recovered.latencyMs and recovered.sizeBytes and recovered.lineage.parent == "static"
    assert recovered.lineage.options["excludeNodes"] == fallback.excludedNodes
    # the culprit is the layer that reads the ruined activation: fc3, ranked first
    graph = onnx.load(str(output / recovered.artifact)).graph
    fc3 = next(n for n in graph.node if any("fc3" in i and "weight" in i for i in n.input))
    assert fallback.ranking[0]["node"] == fc3.name and fc3.name in fallback.excludedNodes
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not set(fc3.input) & dequantized  # FP32 weights and FP32 input
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # fc1 is still INT8
    assert len(fallback.excludedNodes) < len(fallback.ranking)  # not the whole model


def test_fallback_is_recorded_in_results_and_report(fallback_run):
    results, output = fallback_run
    saved = json.loads((output / "results.json").read_text())
    record = next(v for v in saved["variants"] if v["name"] == "static")["fallback"]
    assert record["recovered"] and record["tries"][0]["excludedNodes"] and record["tries"][0]["seconds"] >= 0
    assert [v["name"] for v in saved["variants"]] == ["static", "static+fallback"]
    report = (output / "report.md").read_text()
    assert "## Accuracy fallback" in report and "recovered as **static+fallback**" in report
    assert all(f"`{node}`" in report for node in record["excludedNodes"])


@pytest.mark.slow  # the whole pipeline
def test_without_fallback_every_variant_is_kept_with_the_reason(tmp_path):
    results, output = _run(tmp_path, {"metric": "agreement", "maxAccuracyDrop": 0.05, "fallback": False},
                           [{"name": "static", "recipe": "ort-int8-static"},
                            {"name": "static-dynamic", "recipe": "ort-int8-static-dynamic"}])
    assert results.best is None and "every measured variant is kept" in results.bestReason
    # No LSTM/GRU: static-dynamic would be the static model again, so it is skipped, not built, timed and rejected twice.
    assert [v.status for v in results.variants] == ["rejected", "skipped"]
    assert "same model as static" in results.variants[1].error and results.variants[1].latencyMs is None
    static = results.variants[0]
    assert static.fallback is None and static.latencyMs and static.accuracy is not None
    assert json.loads((output / "results.json").read_text())["best"] is None


def test_a_labelled_metric_without_labels_stops_the_run(tmp_path):
    with pytest.raises(DataLoadError, match="acceptance.metric top1 needs labels, but data.source random has none"):
        _run(tmp_path, {"metric": "top1"})
