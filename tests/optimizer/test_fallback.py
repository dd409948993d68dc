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


def _mlp(directory, layers: int = 8):
    """An FP32 ONNX chain of `layers` Gemm + Relu (each Gemm adds quantization noise) and its static
    INT8 QDQ twin, with the feeds that calibrated it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    nodes, weights, name = [], [], "x"
    for index in range(layers):
        nodes += [helper.make_node("Gemm", [name, f"w{index}", f"b{index}"], [f"g{index}"], transB=1,
                                   name=f"gemm{index}"),
                  helper.make_node("Relu", [f"g{index}"], [f"r{index}"], name=f"relu{index}")]
        weights += [numpy_helper.from_array(rng.standard_normal((16, 16), dtype=np.float32) / 4, f"w{index}"),
                    numpy_helper.from_array(rng.standard_normal(16, dtype=np.float32), f"b{index}")]
        name = f"r{index}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32 = directory / "fp32.onnx"
    onnx.save(model, fp32)
    items = [{"x": rng.standard_normal((1, 16), dtype=np.float32)} for _ in range(4)]

    def quantize(target, excluded):
        class Reader:
            def __init__(self):
                self.items = iter(items)

            def get_next(self):
                return next(self.items, None)

        quantize_static(str(fp32), str(target), Reader(), quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(excluded))
        return target

    return fp32, quantize(directory / "int8.onnx", []), items, quantize



def _probe(tmp_path, accuracy):
    """recover() on _mlp's INT8 model with a real build per try; accuracy(excluded nodes, try number)
    stands in for the score, and 1.0 is within the budget."""
    from optimizer.api.results import VariantResult
    from optimizer.api.spec import VariantSpec
    from optimizer.engines import Built
    from optimizer.engines.runners import OrtRunner
    from optimizer.steps.fallback import Attempt, recover

    fp32, int8, items, quantize = _mlp(tmp_path)
    builds: list[list[str]] = []

    def build(spec):
        builds.append(list(spec.excludeNodes))
        path = quantize(tmp_path / f"try{len(builds)}.onnx", spec.excludeNodes)
        return VariantResult(name=spec.name, recipe=spec.recipe, status="ok"), Built(OrtRunner(path), path, "fp32")

    attempt = Attempt(build=build, accuracy=lambda built: accuracy(builds[-1], len(builds)),
                      budget_failure=lambda value: None if value >= 1.0 else "1 point below FP32")
    record, recovered, built = recover(VariantSpec(name="static", recipe="ort-int8-static"), int8, fp32, items,
                                       tmp_path / "work", seconds=600, attempt=attempt)
    noisy = [entry["node"] for entry in record.ranking if entry["addedNoise"] > 0]
    assert len(noisy) >= 3, record.ranking  # 1, 2, 4 … all: three tries or more without the probe
    return record, recovered, builds, noisy


def test_the_search_stops_when_even_every_noise_adding_node_in_fp32_misses_the_budget(tmp_path):
    """Keeping 2, 4, 8 … nodes in FP32 cannot help once keeping all of them misses the budget (zoo:yolov4
    spent 3 minutes on such tries): the second try is that ceiling, and the search stops after it."""
    record, recovered, builds, noisy = _probe(tmp_path, lambda excluded, count: 0.5)
    assert recovered is None and not record.recovered
    assert len(record.tries) == len(builds) == 2
    assert set(noisy) <= set(builds[1]) and len(builds[0]) < len(builds[1])
    assert record.reason.startswith(f"even with all {len(noisy)} noise-adding node(s) in FP32 ({len(builds[1])} with "
                                    "their feeders) it scores 0.5000, outside the budget")


def test_when_the_ceiling_meets_the_budget_the_search_goes_on_for_fewer_nodes(tmp_path):
    """The ceiling is a probe: the smallest exclusion that meets the budget is kept, and the ceiling is
    built again last, to be kept, only when nothing smaller meets it."""
    record, recovered, builds, noisy = _probe(tmp_path, lambda excluded, count: float(count >= 2))
    assert record.recovered and len(builds) == 3 and record.excludedNodes == builds[2]
    assert len(builds[2]) < len(builds[1]) and recovered is not None

    record, recovered, builds, noisy = _probe(tmp_path, lambda excluded, count: float(set(noisy) <= set(excluded)))
    assert record.recovered and record.tries[1].withinBudget and record.tries[-1].withinBudget
    assert builds[-1] == builds[1] == record.excludedNodes and len(builds) >= 4
