"""Every recipe, on a real miniature CRNN, through the real pipeline (one shared run)."""

from __future__ import annotations

import json

import onnx
import torch

from optimizer.api.results import Results

from .conftest import ALL_RECIPES


def test_every_recipe_is_recorded(conv_lstm_run):
    results, _ = conv_lstm_run
    by_recipe = {v.recipe: v for v in results.variants}
    assert set(by_recipe) == set(ALL_RECIPES) == {"onnx-fp32", "ort-int8-dynamic", "ort-int8-static", "ort-int8-static-dynamic",
                              "torch-int8-dynamic", "torch-int8-static", "torch-int8-static-dynamic", "onnx-fp16",
                              "ort-transformer-fp32", "ort-transformer-int8-dynamic", "ort-int4-weight-only"}
    skipped = {"onnx-fp16", "ort-transformer-fp32", "ort-transformer-int8-dynamic", "ort-int4-weight-only"}
    built = [v for v in results.variants if v.recipe not in skipped]
    assert all(v.status in ("ok", "rejected") for v in built), [(v.name, v.error) for v in built]
    assert by_recipe["onnx-fp16"].status == "skipped" and "not applicable on CPU" in by_recipe["onnx-fp16"].error
    # a convolutional LSTM: no attention to fuse, and its weights are mostly not MatMul weights
    for recipe in ("ort-transformer-fp32", "ort-transformer-int8-dynamic"):
        assert by_recipe[recipe].status == "skipped" and "not a transformer" in by_recipe[recipe].error
    int4 = by_recipe["ort-int4-weight-only"]
    assert int4.status == "skipped" and "not MatMul-heavy" in int4.error and "LSTM" in int4.error, int4.error


def test_measurements_and_lineage(conv_lstm_run):
    results, output = conv_lstm_run
    for v in [results.baseline, *[v for v in results.variants if v.status != "skipped"]]:
        assert v.latencyMs.runs == 10 and v.latencyMs.p50 <= v.latencyMs.p99
        assert v.sizeBytes > 0 and v.speedup > 0
        assert 0.9 < v.fidelity.cosine <= 1.0 + 1e-9
    for v in results.variants:
        if v.status != "skipped":
            assert (output / v.artifact).is_file() and (output / v.artifact).stat().st_size == v.sizeBytes
            assert v.lineage.recipe == v.recipe
    assert results.baseline.fidelity.maxAbsDiff == 0 and results.baseline.accuracy == 1.0


def test_onnx_fp32_matches_pytorch(conv_lstm_run):
    results, _ = conv_lstm_run
    fp32 = results.variant("onnx-fp32")
    assert fp32.fidelity.maxAbsDiff < 1e-4 and fp32.fidelity.argmaxAgreement == 1.0


def test_ort_int8_graphs_hold_the_ops_each_recipe_promises(conv_lstm_run):
    results, output = conv_lstm_run
    ops = lambda name: {n.op_type for n in onnx.load(str(output / results.variant(name).artifact)).graph.node}
    dynamic = ops("ort-int8-dynamic")
    assert "DynamicQuantizeLSTM" in dynamic and "ConvInteger" not in dynamic  # Conv left FP32 by default
    static = ops("ort-int8-static")
    assert "QuantizeLinear" in static and "DequantizeLinear" in static and "LSTM" in static
    static_dynamic = ops("ort-int8-static-dynamic")
    assert "DynamicQuantizeLSTM" in static_dynamic and "QuantizeLinear" in static_dynamic
    assert results.variant("ort-int8-static").lineage.options["calibration"] == "minmax"
    entropy = results.variant("ort-int8-static-entropy")
    assert entropy.lineage.options["calibration"] == "entropy" and "QuantizeLinear" in ops("ort-int8-static-entropy")
    # after ORT optimization on this CPU, the QDQ pairs fuse into integer kernels
    assert any(op.startswith("QLinear") or op == "QGemm" for op in results.variant("ort-int8-static").opCounts)


def test_int8_models_are_smaller(conv_lstm_run):
    results, _ = conv_lstm_run
    base = results.baseline.sizeBytes
    assert results.variant("ort-int8-static-dynamic").sizeBytes < 0.5 * base
    # TorchScript adds ~40 kB of code, which only matters for a model this small
    assert results.variant("torch-int8-static-dynamic").sizeBytes < 0.8 * base


def test_torch_variants_are_torchscript_with_quantized_kernels(conv_lstm_run):
    results, output = conv_lstm_run
    graph = lambda name: str(torch.jit.load(str(output / results.variant(name).artifact)).inlined_graph)
    assert "quantized::linear_dynamic" in graph("torch-int8-dynamic")
    static_dynamic = graph("torch-int8-static-dynamic")
    assert "quantized::conv2d_relu" in static_dynamic  # Conv+BN+ReLU fused and quantized
    # the recipe's "+ dynamic": FX static leaves the LSTM in FP32, quantize_dynamic swaps it for the INT8 kernel
    assert "aten::quantized_lstm(" in static_dynamic and "aten::lstm(" not in static_dynamic
    assert "aten::lstm(" in graph("torch-int8-static") and "aten::quantized_lstm(" not in graph("torch-int8-static")


def test_results_json_is_versioned_and_complete(conv_lstm_run):
    _, output = conv_lstm_run
    data = json.loads((output / "results.json").read_text())
    assert data["schemaVersion"] == 2
    results = Results.model_validate(data)
    assert results.environment.packages["torch"].startswith("2.13")
    assert [s.step for s in results.steps] == ["load", "inputs", "data", "export", "variants", "evaluate", "fallback", "benchmark", "select", "serve", "analyze", "report"]
    assert results.best and results.variant(results.best).status == "ok", results.bestReason  # ORT beats PyTorch ~10x here


def test_lstm_left_in_fp32_is_reported_not_hidden(tmp_path):
    """If the quantizer cannot see LSTM weights (e.g. no quant_pre_process), users are told."""
    import onnx
    from onnx import TensorProto, helper

    from optimizer.engines.ort import _left_in_fp32

    # An LSTM whose weights come from a graph input, not an initializer: nothing to quantize.
    lstm = helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="rnn", hidden_size=2)
    graph = helper.make_graph([lstm], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "xwr"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert "1 LSTM node(s) stayed FP32" in _left_in_fp32(path, ["LSTM", "MatMul"], [])[0]
    assert _left_in_fp32(path, ["LSTM"], ["rnn"]) == []  # excluded on purpose: nothing to report


def test_quantized_lstms_raise_no_note(conv_lstm_run):
    results, _ = conv_lstm_run
    for name in ("ort-int8-dynamic", "ort-int8-static-dynamic"):
        assert not any("stayed FP32" in note for note in results.variant(name).notes)


def test_ort_recipes_quantize_for_the_recorded_hardware_profile(conv_lstm_run):
    results, output = conv_lstm_run
    hardware = results.environment.hardware
    assert hardware["chosenBy"] == "detected" and hardware["isa"] == hardware["detected"]
    for name in ("ort-int8-dynamic", "ort-int8-static", "ort-int8-static-dynamic"):
        assert results.variant(name).lineage.options["reduceRange"] == hardware["reduceRange"], name
    assert f"Quantized for: **{hardware['isa']}**" in (output / "report.md").read_text()


def test_every_recipe_the_spec_accepts_has_a_builder():
    """The spec's enum (and so the CRD) and the registry name the same recipes, PT2E's included."""
    from optimizer.engines import registry
    from optimizer.api.spec import Recipe

    assert set(registry()) == {recipe.value for recipe in Recipe}
    assert {"torchao-pt2e-int8-static", "torchao-pt2e-int8-dynamic"} <= set(registry())
