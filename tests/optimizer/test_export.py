"""Export parity: exported models must match PyTorch, at the declared shape and a second one."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from optimizer.steps.export import ExportError, ParityError, compare_outputs, export_onnx, parity_shapes
from optimizer.engines.runners import OrtRunner, TorchRunner
from optimizer.api.spec import ExportSpec, InputSpec, Tolerance

from .conftest import save_user_model


def _user_module(tmp_path, cls):
    import sys

    import torch

    weights = save_user_model(tmp_path, cls)
    sys.path.insert(0, str(tmp_path))
    try:
        module = getattr(importlib.import_module("user_models"), cls)()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_models", None)
    module.load_state_dict(torch.load(weights, weights_only=True))
    return module.eval()


def test_second_shape_doubles_dynamic_axes_only():
    spec = InputSpec(name="image", shape=[1, 1, 32, 100], dynamicAxes={0: "batch", 3: "width"})
    assert parity_shapes([spec]) == [{"image": [1, 1, 32, 100]}, {"image": [2, 1, 32, 200]}]
    assert parity_shapes([InputSpec(name="x", shape=[1, 4])]) == [{"x": [1, 4]}]


def test_compare_outputs_reports_where_and_how_much():
    ref = np.zeros((2, 3), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = 0.5
    with pytest.raises(ParityError) as caught:
        compare_outputs([ref], [got], ["logits"], Tolerance(atol=1e-4, rtol=0), {}, "inputs x=[2, 3]")
    message = str(caught.value)
    assert "'logits'" in message and "max |Δ| = 0.5" in message and "(1, 2)" in message and "x=[2, 3]" in message
    # a per-output tolerance can accept the same difference
    assert compare_outputs([ref], [got], ["logits"], Tolerance(atol=1e-4), {"logits": Tolerance(atol=1.0)}, "") == 0.5


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_dynamic_model_exports_and_runs_at_other_shapes(tmp_path, exporter):
    """torch.export pins size-1 dims and has baked LSTM lengths (pytorch#191855): whichever exporter
    wins must pass at batch 2 and double width, and really run at a third shape."""
    module = _user_module(tmp_path, "ConvLstm")
    inputs = [InputSpec(name="image", shape=[1, 1, 8, 16], dynamicAxes={0: "batch", 3: "width"})]
    result = export_onnx(TorchRunner(module, ["image"]), inputs, ExportSpec(exporter=exporter), tmp_path)
    assert result.checked_shapes == [{"image": [1, 1, 8, 16]}, {"image": [2, 1, 8, 32]}]
    # whichever exporter won, the model really runs at a third shape and matches PyTorch
    feed = {"image": np.random.default_rng(5).random((3, 1, 8, 24), dtype=np.float32)}
    onnx_out = OrtRunner(result.path)(feed)[0]
    torch_out = TorchRunner(module, ["image"])(feed)[0]
    assert onnx_out.shape == torch_out.shape == (12, 3, 6)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=1e-3)


def test_auto_exports_recurrent_models_with_the_legacy_exporter_first_and_says_why(tmp_path):
    from optimizer.steps.export import exporter_order

    module = _user_module(tmp_path, "ConvLstm")
    inputs = [InputSpec(name="image", shape=[1, 1, 8, 16], dynamicAxes={0: "batch", 3: "width"})]
    result = export_onnx(TorchRunner(module, ["image"]), inputs, ExportSpec(exporter="auto"), tmp_path)
    assert result.exporter == "legacy"
    assert "LSTM" in result.notes[0] and "dynamo is the fallback" in result.notes[0]
    assert exporter_order(module, "dynamo") == (["dynamo"], None)
    assert exporter_order(_user_module(tmp_path, "DataBranch"), "auto") == (["dynamo", "legacy"], None)


def test_dynamo_failure_falls_back_to_legacy_and_says_why(tmp_path):
    module = _user_module(tmp_path, "DataBranch")
    inputs = [InputSpec(name="x", shape=[1, 2, 4], dynamicAxes={0: "batch", 1: "rows"})]
    with pytest.raises(ExportError, match="dynamo exporter failed"):
        export_onnx(TorchRunner(module, ["x"]), inputs, ExportSpec(exporter="dynamo"), tmp_path)
    result = export_onnx(TorchRunner(module, ["x"]), inputs, ExportSpec(exporter="auto"), tmp_path)
    assert result.exporter == "legacy"
    assert result.notes[0].startswith("exported with the legacy exporter because the dynamo exporter failed")
    assert [(a["route"], a["ok"]) for a in result.attempts] == [("dynamo", False), ("legacy", True)]
    assert "\x1b[" not in result.notes[0]


def test_model_that_breaks_at_a_second_shape_fails_with_the_difference(tmp_path):
    module = _user_module(tmp_path, "ShapeBaker")
    inputs = [InputSpec(name="x", shape=[1, 2, 4], dynamicAxes={0: "batch", 1: "rows"})]
    with pytest.raises(ExportError) as caught:
        export_onnx(TorchRunner(module, ["x"]), inputs, ExportSpec(), tmp_path)
    message = str(caught.value)
    assert "legacy exporter" in message
    assert "x=[2, 4, 4]" in message  # the second shape is where it broke
    assert "max |Δ|" in message and "ONNX Runtime failed" not in message, message  # a wrong answer, not a crash
