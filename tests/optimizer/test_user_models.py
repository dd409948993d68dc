"""Models as users really hand them over: ONNX with external data, fixed-shape artifacts, wrong
shapes, TorchScript transformers. Each ends with results or with a message naming the field."""

from __future__ import annotations

import json
import warnings

import pytest

from .conftest import write_spec
from .test_cli import mlopt
from .test_model_matrix import ARCHITECTURES, QUICK, _example, _user_module, save_model

ONNX_RECIPES = ["onnx-fp32", "ort-int8-dynamic", "ort-int8-static", "ort-int8-static-dynamic"]


def _onnx_with_external_data(directory, one_file: bool):
    import onnx

    save_model(directory, "conv-bn-relu", "onnx")
    model = onnx.load(str(directory / "model.onnx"))
    (directory / "model.onnx").unlink()
    target = directory / "ext" / "model.onnx"
    target.parent.mkdir()
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="model.onnx.data" if one_file else None,
                    size_threshold=256)  # the weights outside, the small shape constants inline (as exporters do)
    return target


@pytest.mark.slow  # the whole pipeline
@pytest.mark.parametrize("one_file,by_uri", [(True, False), (False, True)], ids=["one-data-file-path", "file-per-tensor-uri"])
def test_onnx_with_external_data_yields_every_onnx_variant_with_its_data(tmp_path, one_file, by_uri):
    from optimizer.artifacts import onnx_files
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    model = _onnx_with_external_data(tmp_path, one_file)
    data_files = onnx_files.validate(model)
    assert (len(data_files) == 1) == one_file and data_files  # the file really keeps its weights outside
    source = model.as_uri() if by_uri else str(model.relative_to(tmp_path))
    spec = write_spec(tmp_path, {"model": {"source": source, "inputs": ARCHITECTURES["conv-bn-relu"][1]},
                                 "variants": [{"name": r, "recipe": r} for r in ONNX_RECIPES],
                                 "data": {"samples": 8}, "benchmark": QUICK})
    out = tmp_path / "out"
    results = optimize(load_spec(spec), out, tmp_path, QuietReporter())

    assert results.baseline.sizeBytes == onnx_files.total_size(model) > model.stat().st_size  # data counted
    built = ONNX_RECIPES[:-1]  # ort-int8-static-dynamic: no LSTM/GRU, the same model as ort-int8-static, skipped
    assert [v.name for v in results.variants if v.status == "ok"] == built, [v.error for v in results.variants]
    assert "same model as ort-int8-static" in results.variant("ort-int8-static-dynamic").error
    for variant in (results.variant(name) for name in built):
        assert variant.latencyMs is not None and variant.fidelity.argmaxAgreement > 0.5
        saved = out / variant.artifact
        files = onnx_files.files(saved)  # validates: every data file sits beside the model
        assert variant.sizeBytes == sum(f.stat().st_size for f in files)
        assert [f"models/{f.name}" for f in files[1:]] == variant.artifactFiles
    written = results.variant("ort-int8-static")
    assert written.artifactFiles, "a model that came with external data keeps its weights outside"

    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / written.artifact), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 5)  # runs from models/


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    import onnx

    model = _onnx_with_external_data(tmp_path, one_file=True)
    (model.parent / "model.onnx.data").rename(tmp_path / "stolen.data")
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../stolen.data"  # CVE-2024-27318: a path that climbs out of the folder
    onnx.save_model(proto, str(model))
    spec = write_spec(tmp_path, {"model": {"source": "ext/model.onnx", "inputs": ARCHITECTURES["conv-bn-relu"][1]},
                                 "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert "model.source" in done.stderr and "'../stolen.data'" in done.stderr and "outside the model's folder" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def _fixed_batch_onnx(directory):
    import torch

    torch.manual_seed(0)
    model = _user_module(directory).ConvBnRelu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(directory / "fixed.onnx"), dynamo=True,
                          input_names=["image"], external_data=False)


def _fixed_batch_pt2(directory):
    import torch

    model = _user_module(directory).ConvBnRelu().eval()
    torch.export.save(torch.export.export(model, (torch.rand(1, 3, 16, 16),)), str(directory / "fixed.pt2"))


def _conv_state_dict(directory):
    import torch

    torch.save(_user_module(directory).ConvBnRelu().state_dict(), directory / "fixed.pt")


def _uint8_input_onnx(directory):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["image"], ["out"], to=TensorProto.FLOAT)], "uint8-in",
                              [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 16, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(directory / "fixed.onnx"))


DYNAMIC_BATCH = [{"name": "image", "shape": [1, 3, 16, 16], "dynamicAxes": {0: "batch"}}]
MISMATCHES = {
    # case: (write the model, its model section, phrases the message must hold)
    "onnx-fixed-batch": (_fixed_batch_onnx, {"source": "fixed.onnx", "inputs": DYNAMIC_BATCH},
                         ["spec.model.inputs[0] (image).dynamicAxes", "fixes it at 1", "drop axis 0"]),
    "pt2-fixed-batch": (_fixed_batch_pt2, {"source": "fixed.pt2", "inputs": DYNAMIC_BATCH},
                        ["spec.model.inputs[0] (image).dynamicAxes", "re-export"]),
    "wrong-channels": (_conv_state_dict, {"source": "fixed.pt", "entrypoint": "matrix_models:ConvBnRelu",
                                          "inputs": [{"name": "image", "shape": [1, 1, 16, 16]}]},
                       ["spec.model.inputs", "image=[1, 1, 16, 16]", "expected input[1, 1, 16, 16] to have 3 channels",
                        "use the shape the model expects"]),
    "onnx-wrong-name": (_fixed_batch_onnx, {"source": "fixed.onnx", "inputs": [{"name": "pixels", "shape": [1, 3, 16, 16]}]},
                        ["spec.model.inputs[0] (pixels).name", "no input 'pixels'", "image float32 [1, 3, 16, 16]"]),
    # a dtype the spec cannot express: the fix is in the model, not "set dtype: uint8" (the spec refuses it)
    "onnx-uint8-input": (_uint8_input_onnx, {"source": "fixed.onnx", "inputs": [{"name": "image", "shape": [1, 3, 16, 16]}]},
                         ["spec.model.inputs[0] (image).dtype", "expects uint8", "re-export the model"]),
    "onnx-wrong-rank": (_fixed_batch_onnx, {"source": "fixed.onnx", "inputs": [{"name": "image", "shape": [3, 16, 16]}]},
                        ["spec.model.inputs[0] (image).shape", "has 3 axes", "expects 4"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_inputs_that_do_not_fit_the_model_exit_2_naming_the_field(tmp_path, case):
    write, model, phrases = MISMATCHES[case]
    write(tmp_path)
    spec = write_spec(tmp_path, {"model": model, "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob(".mlopt-partial-*"))  # nothing half-written


@pytest.mark.slow  # the whole pipeline
def test_fixed_batch_artifact_without_dynamic_axes_runs_at_its_shape_and_says_so(tmp_path):
    _fixed_batch_onnx(tmp_path)
    spec = write_spec(tmp_path, {"model": {"source": "fixed.onnx", "inputs": [{"name": "image", "shape": [1, 3, 16, 16]}]},
                                 "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}], "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # Not `best`: for an ONNX source the baseline is the same graph, so which is faster is a coin toss.
    (variant,) = results["variants"]
    assert variant["name"] == "onnx-fp32" and variant["status"] == "ok" and variant["latencyMs"]["mean"] > 0, variant
    assert "declared shape only" in results["model"]["inputNotes"][0]
    assert "declared shape only" in (tmp_path / "out" / "report.md").read_text()


def _encoder_script(directory, no_grad: bool):
    import contextlib

    import torch

    torch.manual_seed(0)
    model = _user_module(directory).Encoder().eval()
    with torch.no_grad() if no_grad else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, _example(ARCHITECTURES["transformer"][1]), check_trace=False),
                       str(directory / "encoder.ts"))


@pytest.mark.slow
def test_torchscript_transformer_exports_through_the_converter_at_its_declared_shape(tmp_path):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    _encoder_script(tmp_path, no_grad=False)
    spec = write_spec(tmp_path, {"model": {"source": "encoder.ts", "inputs": [{"name": "x", "shape": [1, 10, 8]}]},
                                 "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                                              {"name": "int8", "recipe": "ort-int8-dynamic"}],
                                 "data": {"samples": 8}, "benchmark": QUICK})
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())
    assert results.model["exporter"] == "torchscript-converter"
    assert results.model["exportAttempts"][0] == {
        "route": "torchscript-converter", "ok": True,
        "reason": "the TorchScript converter route (TS2EPConverter, then the dynamo exporter) passed the parity check"}
    assert results.best in ("onnx-fp32", "int8")


@pytest.mark.slow
def test_a_torchscript_transformer_with_dynamic_axes_runs_at_its_declared_shape_and_says_so(tmp_path):
    """A trace records sizes as it saw them: neither route keeps batch and sequence dynamic. The run used to
    end with exit 0 and no usable variant; now it is exported and optimized at the declared shape, with a note."""
    _encoder_script(tmp_path, no_grad=False)
    inputs = [{"name": "x", "shape": [1, 10, 8], "dynamicAxes": {0: "batch", 1: "sequence"}}]
    spec = write_spec(tmp_path, {"model": {"source": "encoder.ts", "inputs": inputs},
                                 "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                                              {"name": "int8", "recipe": "ort-int8-dynamic"}],
                                 # 4 held-out items: a loose budget, so one flipped argmax does not reject INT8
                                 "data": {"samples": 8}, "benchmark": QUICK, "acceptance": {"maxAccuracyDrop": 0.5}})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [v["status"] for v in results["variants"]] == ["ok", "ok"], [v.get("error") for v in results["variants"]]
    assert results["best"] in ("onnx-fp32", "int8")
    assert results["model"]["inputs"][0]["shape"] == [1, 10, 8] and not results["model"]["inputs"][0]["dynamicAxes"]
    attempts = results["model"]["exportAttempts"]
    assert not attempts[0]["ok"] and attempts[-1]["ok"], attempts  # the dynamic try failed, the declared shape passed
    note = " ".join(results["model"]["inputNotes"])
    assert "dynamicAxes" in note and "declared shape only" in note
    assert "dynamicAxes" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_torchscript_traced_under_no_grad_says_how_to_fix_it(tmp_path):
    _encoder_script(tmp_path, no_grad=True)
    spec = write_spec(tmp_path, {"model": {"source": "encoder.ts", "inputs": [{"name": "x", "shape": [1, 10, 8]}]},
                                 "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
                                 "data": {"samples": 8}, "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # the PyTorch baseline is still measured and reported
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr  # library notices go to run.log
    assert "torch.jit.load" in (tmp_path / "out" / "run.log").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    attempts = results["model"]["exportAttempts"]
    assert [a["route"] for a in attempts] == ["torchscript-converter", "legacy"] and not any(a["ok"] for a in attempts)
    assert "traced under torch.no_grad()" in attempts[0]["reason"]
    assert results["variants"][0]["error"].startswith("needs the ONNX export, which failed")
    assert results["best"] is None


def test_an_onnx_model_onnx_runtime_cannot_run_is_a_load_error_naming_model_source(tmp_path):
    """onnx's checker accepts an op from a domain it does not know; ONNX Runtime has no kernel for it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Sharpen", ["image"], ["out"], domain="com.example")], "custom",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "custom.onnx"))
    spec = write_spec(tmp_path, {"model": {"source": "custom.onnx", "inputs": [{"name": "image", "shape": [1, 4]}]},
                                 "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "model.source: ONNX Runtime" in done.stderr and "Sharpen" in done.stderr, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unexpected_exception_in_a_recipe_is_reported_as_an_mlopt_bug_not_a_reason(tmp_path):
    from optimizer.api.errors import RecipeFailure
    from optimizer.steps.variants import build_variant
    from optimizer.api.spec import VariantSpec

    def crashes(ctx, variant):
        return ctx.loaded  # ctx is None: an AttributeError, as a bug in a recipe would raise

    def refuses(ctx, variant):
        raise RecipeFailure("FX graph mode cannot trace this model; use the ort-int8-static recipe instead")

    variant = VariantSpec(name="v", recipe="onnx-fp32")
    result, built = build_variant(None, variant, {"onnx-fp32": crashes})
    assert built is None and result.status == "failed"
    assert result.error.startswith("internal error (an mlopt bug, please report it): AttributeError at ")
    assert "tests/optimizer/test_user_models.py:" in result.error and "in crashes" in result.error
    assert "called from optimizer/steps/variants.py:" in result.error and "in build_variant" in result.error
    result, _ = build_variant(None, variant, {"onnx-fp32": refuses})
    assert result.error == "FX graph mode cannot trace this model; use the ort-int8-static recipe instead"


def test_debug_shows_the_traceback_that_is_otherwise_kept_from_the_user(tmp_path):
    _fixed_batch_onnx(tmp_path)
    spec = write_spec(tmp_path, {"model": {"source": "fixed.onnx", "inputs": DYNAMIC_BATCH}, "benchmark": QUICK})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), "--debug", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "InputMismatchError" in done.stderr
    assert "error: spec.model.inputs[0] (image).dynamicAxes" in done.stderr
