"""URI and path rules (optimizer/api/uris.py): refused when the spec is parsed, with one message
naming the field, by `mlopt validate`, `mlopt optimize`, the worker and the operator alike; and
refused again by the storage layer before it touches anything."""

from __future__ import annotations

import json
import signal

import pytest

from optimizer.api import uris
from optimizer.api.spec_loader import SpecError, parse_spec
from optimizer.artifacts import storage

from .conftest import write_spec
from .test_cli import mlopt

INPUTS = [{"name": "x", "shape": [1, 4]}]


def document(**spec):
    return {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "uris"},
            "spec": {"model": {"source": "zoo:digits"}, **spec}}


# (spec section, the field the message must name, words the message must hold)
REFUSED = [
    # a key that begins with '/': Path(root) / claim / "/etc/x" is /etc/x, outside the claim
    ({"model": {"source": "pvc://claim//etc/x", "format": "onnx", "inputs": INPUTS}}, "spec.model.source",
     "begins with '/'"),
    ({"model": {"source": "s3://bucket//etc/x.onnx", "inputs": INPUTS}}, "spec.model.source", "begins with '/'"),
    ({"output": "pvc://c//scratch/o/"}, "spec.output", "begins with '/'"),
    ({"output": "pvc://runs/../../tmp/x/"}, "spec.output", "climbs out of the claim with '..'"),
    ({"data": {"source": "s3://b/a/../../c.npz"}}, "spec.data.source", "'..'"),
    ({"model": {"source": "https://host/a/%2e%2e/m.onnx", "inputs": INPUTS}}, "spec.model.source", "'..'"),
    ({"model": {"source": "s3://b/m\x00.onnx", "inputs": INPUTS}}, "spec.model.source", "NUL"),
    ({"data": {"source": "calib\n.npz"}}, "spec.data.source", "control character"),
    ({"output": "https://host/x/"}, "spec.output", "cannot be written to https://"),
    ({"output": "s3://bucket/run"}, "spec.output", "must end with '/'"),
    ({"model": {"source": "zoo:nope"}}, "spec.model.source", "zoo:nope is not in the model zoo"),
    ({"data": {"source": "zoo:nope"}}, "spec.data.source", "zoo:nope is not a zoo data set"),
    ({"data": {"source": "calibration.csv"}}, "spec.data.source", ".npz"),
    ({"model": {"source": "s3://bucket/models/", "inputs": INPUTS}}, "spec.model.source", "prefix"),
    ({"model": {"source": "http://host/m.onnx", "inputs": INPUTS}}, "spec.model.source", "plain http"),
    ({"model": {"source": "ftp://host/m.onnx", "inputs": INPUTS}}, "spec.model.source", "not a storage scheme"),
    ({"model": {"source": "pvc://Claim_1/m.onnx", "inputs": INPUTS}}, "spec.model.source", "PersistentVolumeClaim"),
    ({"storage": {"caBundle": {"name": "ca", "key": ".."}}}, "spec.storage.caBundle.key", "pattern"),
]


@pytest.mark.parametrize("spec, field, words", REFUSED, ids=[f"{f}:{w}" for _, f, w in REFUSED])
def test_a_uri_that_breaks_a_rule_is_refused_at_parse_time_naming_the_field(spec, field, words):
    with pytest.raises(SpecError) as caught:
        parse_spec({**document(), "spec": {"model": {"source": "zoo:digits"}, **spec}})
    assert any(line.startswith(field + ":") and words in line for line in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("spec", [
    {"model": {"source": "s3://team-models/resnet/model.onnx", "inputs": INPUTS}},
    {"model": {"source": "https://host/m.onnx?X-Amz-Signature=abc&X-Amz-Credential=AKIA/2026/x", "inputs": INPUTS}},
    {"model": {"source": "../models/model.pt2", "inputs": INPUTS}},  # a laptop path may climb: it is the user's
    {"model": {"source": "/abs/model.onnx", "inputs": INPUTS}},
    {"data": {"source": "https://host/calib.npz?X-Amz-Signature=abc"}},
    {"data": {"source": "pvc://data/calib.npz"}},
    {"output": "pvc://runs"}, {"output": "pvc://runs/team/a/"}, {"output": "s3://bucket/"}, {"output": "../out"},
])
def test_uris_that_follow_the_rules_parse(spec):
    parse_spec(document(**spec))


CLI_CASES = {
    "output-https": ({"output": "https://host/x/"}, "spec.output: results cannot be written to https://"),
    "output-climbs": ({"output": "pvc://runs/../../tmp/x/"}, "spec.output: the path climbs out of the claim"),
    "zoo-nope": ({"model": {"source": "zoo:nope"}}, "spec.model.source: zoo:nope is not in the model zoo"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_validate_optimize_worker_and_operator_refuse_with_the_same_message(tmp_path, monkeypatch, case):
    from mlopt_operator.job import build_job
    from mlopt_operator.settings import Settings

    from optimizer import worker

    spec, line = CLI_CASES[case]
    path = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, **spec})
    validated = mlopt("validate", str(path), cwd=tmp_path)
    optimized = mlopt("optimize", str(path), cwd=tmp_path)
    for done in (validated, optimized):
        assert done.returncode == 2 and line in done.stderr, done.stderr
    assert "load…" not in optimized.stdout + optimized.stderr and sorted(p.name for p in tmp_path.iterdir()) == [
        "spec.yaml"]  # refused before any work, nothing written
    message = next(text for text in validated.stderr.splitlines() if line in text).strip()

    document = json.loads(json.dumps({"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
                                      "metadata": {"name": "test", "namespace": "team", "uid": "u", "generation": 1},
                                      "spec": {"model": {"source": "zoo:digits"}, **spec}}))
    with pytest.raises(SpecError) as caught:  # what the operator does with the resource (status InvalidSpec)
        build_job(document, Settings())
    assert message.removeprefix("- ") in caught.value.problems

    monkeypatch.setenv("MLOPT_SPEC", json.dumps(document))
    monkeypatch.setenv("MLOPT_TERMINATION_LOG", str(tmp_path / "termination-log"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert worker.main() == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["reason"] == "InvalidSpec" and message.removeprefix("- ") in summary["message"]


def test_an_output_option_that_breaks_a_rule_exits_2_naming_it(tmp_path):
    path = write_spec(tmp_path, {"model": {"source": "zoo:digits"}})
    done = mlopt("optimize", str(path), "--output", "pvc://runs/../../tmp/x/", cwd=tmp_path)
    assert done.returncode == 2 and "--output: the path climbs out of the claim with '..'" in done.stderr, done.stderr


@pytest.mark.parametrize("uri", ["pvc://claim//etc/hostname", "pvc://claim/../../etc/hostname",
                                 "pvc://claim/a/\x00", "s3://bucket//etc/x"])
def test_the_storage_layer_refuses_a_path_out_of_its_claim_before_reading(tmp_path, monkeypatch, uri):
    """A reader that bypasses the spec (or a spec from an older operator) still cannot leave the claim:
    fetch() on `pvc://claim//etc/hostname` used to return /etc/hostname itself."""
    (tmp_path / "claim").mkdir()
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    with pytest.raises(storage.StorageError) as caught:
        storage.fetch(uri, "model.source", tmp_path, max_bytes=2**20)
    assert str(caught.value).startswith("model.source: "), caught.value


def test_a_symbolic_link_inside_a_claim_cannot_lead_out_of_it(tmp_path, monkeypatch):
    (tmp_path / "claims" / "models").mkdir(parents=True)
    (tmp_path / "outside.onnx").write_bytes(b"not the claim's")
    (tmp_path / "claims" / "models" / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    (tmp_path / "claims" / "models" / "inside.onnx").write_bytes(b"the claim's")
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path / "claims"))
    assert storage.fetch("pvc://models/inside.onnx", "model.source", tmp_path, max_bytes=2**20).read_bytes() == \
        b"the claim's"
    with pytest.raises(storage.StorageError, match="model.source: pvc://models/link.onnx leads out of the claim"):
        storage.fetch("pvc://models/link.onnx", "model.source", tmp_path, max_bytes=2**20)


def test_a_presigned_url_is_named_by_its_path_not_its_query():
    location = uris.one_object("https://bucket.s3.amazonaws.com/models/resnet.onnx?X-Amz-Signature=ab%2Fcd"
                               "&X-Amz-Credential=AKIA/2026/us-east-1/s3/aws4_request")
    assert location.name == "resnet.onnx"
    assert uris.data_source("https://host/calib.npz?sig=1").name == "calib.npz"


def test_the_zoo_names_the_spec_accepts_are_the_zoo():
    from optimizer.steps.data import ZOO_DATASETS
    from optimizer.zoo import ZOO

    assert set(uris.ZOO_MODELS) == set(ZOO)
    assert set(uris.ZOO_DATASETS) == set(ZOO_DATASETS)


def test_the_crd_carries_the_rules_cel_can_express():
    from optimizer.api import crd

    spec = crd.spec_schema()["properties"]["spec"]["properties"]
    for node, rules in ((spec["model"]["properties"]["source"], uris.CEL_MODEL_SOURCE),
                        (spec["data"]["properties"]["source"], uris.CEL_DATA_SOURCE),
                        (spec["output"], uris.CEL_OUTPUT)):
        assert node["x-kubernetes-validations"] == rules and node["maxLength"] == uris.MAX_URI_LENGTH


@pytest.mark.parametrize("output, expected", [
    ("s3://bucket/runs/crnn/", "s3://bucket/runs/crnn/targets/amx/"),
    ("pvc://models/runs/crnn", "pvc://models/runs/crnn/targets/amx/"),
    ("mlopt-results/crnn", "mlopt-results/crnn/targets/amx/"),
])
def test_a_targets_output_is_its_own_folder_under_the_output(output, expected):
    assert uris.target_output(output, "amx") == expected
    uris.output(expected)  # still a valid output (an s3:// prefix ends with '/')
