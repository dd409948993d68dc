"""Exceptions are classified once (optimizer/api/errors.py `is_expected`): a library's documented
error for a model or object it cannot handle is a reason the user can act on; anything else is
recorded as an mlopt bug with its class and place, never passed off as the model, the data or the
network. Stand-ins for a bug are named as such; the expected failures are the libraries' own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from optimizer.api.errors import internal_error
from optimizer.api.results import VariantResult, VariantStatus

BUG = "internal error (an mlopt bug"


def _raised(action) -> BaseException:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the error itself is what is tested
        return error
    raise AssertionError("nothing was raised")


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_library_errors_are_reasons_and_everything_else_is_a_bug(tmp_path):
    import onnxruntime as ort
    import torch

    from optimizer.api.errors import is_expected

    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    assert is_expected(_raised(lambda: ort.InferenceSession(str(tmp_path / "garbage.onnx"))))  # ORT's own class
    # a RuntimeError raised inside torch (a model that does not fit its input, as a runner meets it)
    assert is_expected(_raised(lambda: torch.nn.Linear(3, 2)(torch.zeros(1, 4))))
    assert is_expected(_raised(lambda: open(tmp_path / "missing")))  # the machine: OSError
    assert not is_expected(_raised(lambda: {}["image"]))  # KeyError: a bug wherever it happens
    assert not is_expected(_raised(lambda: torch.zeros(2).reshape("x")))  # TypeError inside torch: we called it wrong

    def ours():
        raise RuntimeError("an invariant of mlopt's own code broke")

    assert not is_expected(_raised(ours))  # a RuntimeError raised outside a library is ours


def _evaluation_run(items):
    return SimpleNamespace(dataset=SimpleNamespace(evaluation=items, labels=None), reference=None, metric="agreement")


def test_inference_that_onnxruntime_refuses_is_a_reason_and_a_bug_is_an_internal_error(tmp_path):
    from optimizer.engines.runners import OrtRunner
    from optimizer.steps.evaluate import evaluate_variant

    runner = OrtRunner(_tiny_onnx(tmp_path / "relu.onnx"))
    refused = VariantResult(name="v", recipe="onnx-fp32", status=VariantStatus.ok)
    evaluate_variant(_evaluation_run([{"x": np.zeros((1, 5), np.float32)}]), refused, runner)  # wrong width
    assert refused.status == "failed" and refused.error.startswith("inference failed: InvalidArgument:"), refused.error

    def buggy_runner(item):  # stands in for a bug in a runner: it looks up an input name it never had
        return [item["image"]]

    bug = VariantResult(name="v", recipe="onnx-fp32", status=VariantStatus.ok)
    evaluate_variant(_evaluation_run([{"x": np.zeros((1, 4), np.float32)}]), bug, buggy_runner)
    assert bug.status == "failed" and bug.error.startswith(BUG) and "KeyError at " in bug.error, bug.error
    assert "test_failures.py" in bug.error  # where it was raised


def _fallback_run(tmp_path):
    from optimizer.api.spec import VariantSpec
    from optimizer.api.spec_loader import parse_spec
    from optimizer.console import QuietReporter

    spec = parse_spec({"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "f"},
                       "spec": {"model": {"source": "zoo:digits"}, "acceptance": {"maxAccuracyDrop": 0.01}}})
    (tmp_path / "static.onnx").write_bytes(b"not a model")  # what the ranking reads: onnx refuses it
    result = VariantResult(name="static", recipe="ort-int8-static", status=VariantStatus.ok, accuracy=0.5)
    return SimpleNamespace(
        spec=spec, results={"static": result}, built={"static": SimpleNamespace(artifact=tmp_path / "static.onnx")},
        planned={"static": VariantSpec(name="static", recipe="ort-int8-static")}, context=None,
        dataset=SimpleNamespace(calibration=[{"x": np.zeros((1, 4), np.float32)}]), staging=tmp_path,
        scratch=tmp_path, reporter=QuietReporter(), baseline=SimpleNamespace(accuracy=1.0), metric="agreement")


def test_the_fallback_records_a_library_failure_as_a_reason_and_a_bug_as_an_internal_error(tmp_path, monkeypatch):
    from optimizer.engines import ort
    from optimizer.steps import fallback

    monkeypatch.setattr(ort, "preprocessed", lambda context: tmp_path / "static.onnx")  # no FP32 model to prepare
    run = _fallback_run(tmp_path)
    fallback.fallback_step(run)
    reason = run.results["static"].fallback.reason
    # onnx refuses the bytes (DecodeError or ValidationError, depending on which of its readers meets them
    # first): a library's own error for a model it cannot read, so a reason, not an mlopt bug.
    assert reason.startswith(("sensitivity analysis failed: ValidationError: Unable to parse proto",
                              "sensitivity analysis failed: DecodeError: Error parsing message")), reason

    def ranking_with_a_bug(*args, **kwargs):  # stands in for a bug in mlopt's own ranking code
        return {}["fc3"]

    monkeypatch.setattr(fallback, "rank_nodes", ranking_with_a_bug)
    monkeypatch.setattr(fallback, "sensitivity_items", lambda float_model: 8)  # sizing reads the (unreadable) model
    run = _fallback_run(tmp_path)
    fallback.fallback_step(run)
    reason = run.results["static"].fallback.reason
    assert reason.startswith(BUG) and "KeyError" in reason and "ranking_with_a_bug" in reason, reason


def test_a_bug_on_the_s3_path_is_raised_as_a_bug_not_blamed_on_the_endpoint(tmp_path, monkeypatch):
    """obstore.head answering without 'size' stands in for an API change of the client: the download
    used to report it as "cannot reach …; check spec.storage.endpoint and the network"."""
    import obstore

    from optimizer.artifacts import storage

    monkeypatch.setattr(obstore, "head", lambda store, key: {})
    with pytest.raises(KeyError):
        storage.fetch("s3://bucket/model.onnx", "model.source", tmp_path, max_bytes=2**20,
                      into=tmp_path / "model.onnx")
    assert internal_error(_raised(lambda: {}["size"])).startswith(BUG)


def test_an_upload_bug_is_not_retried_nor_blamed_on_the_network(tmp_path, monkeypatch):
    import obstore

    from optimizer.artifacts import storage

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    monkeypatch.setattr(obstore, "delete", lambda store, key: None)

    def put_called_wrongly(store, key, path, **options):  # stands in for a wrong call into the client
        raise TypeError(f"put() got an unexpected keyword argument {next(iter(options))!r}")

    monkeypatch.setattr(obstore, "put", put_called_wrongly)
    with pytest.raises(TypeError):
        storage.deliver(tmp_path / "run", "s3://bucket/run/")
    assert sleeps == []  # raised at once, not retried four times as if the network had dropped
