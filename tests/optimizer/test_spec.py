"""The spec is the contract: valid documents parse with defaults, invalid ones name every field."""

from __future__ import annotations

import pytest

from optimizer.api.spec import ModelOptimization, default_variants
from optimizer.api.spec_loader import SpecError, load_spec, parse_spec

from .conftest import write_spec


def document(**spec):
    return {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "crnn"},
            "spec": {"model": {"source": "zoo:crnn"}, **spec}}


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(document())
    assert spec.spec.benchmark.runs == 50 and spec.spec.benchmark.warmup == 10 and spec.spec.benchmark.threads == 1
    assert spec.spec.acceptance.maxAccuracyDrop == 0.01
    assert [v.recipe for v in spec.variants()] == [v.recipe for v in default_variants("cpu")]
    assert "onnx-fp16" in [v.recipe for v in spec.variants()]


def test_dynamic_axes_keys_arrive_as_strings_from_kubernetes():
    # YAML {0: batch} becomes {"0": "batch"} once it has passed through JSON (kubectl, the API server).
    spec = parse_spec(document(model={"source": "x.pt", "entrypoint": "m:M",
                                      "inputs": [{"name": "x", "shape": [1, 3], "dynamicAxes": {"0": "batch"}}]}))
    assert spec.spec.model.inputs[0].dynamicAxes == {0: "batch"}


@pytest.mark.parametrize("spec, field, words", [
    ({"model": {"source": "m.pt", "format": "state-dict", "inputs": [{"name": "x", "shape": [1]}]}},
     "spec.model", "entrypoint"),
    ({"model": {"source": "m.pt"}}, "spec.model", "model.inputs is required"),
    ({"model": {"source": "zoo:crnn"}, "variants": [{"name": "a", "recipe": "ort-int9"}]}, "spec.variants[0].recipe", "onnx-fp32"),
    ({"model": {"source": "zoo:crnn"}, "benchmark": {"runs": 0}}, "spec.benchmark.runs", "greater than or equal to 1"),
    ({"model": {"source": "zoo:crnn"}, "benchmark": {"device": "tpu"}}, "spec.benchmark.device", "'cpu' or 'cuda'"),
    ({"model": {"source": "zoo:crnn", "inputs": [{"name": "x", "shape": [1, 0]}]}}, "spec.model.inputs[0].shape", "positive"),
    ({"model": {"source": "zoo:crnn", "inputs": [{"name": "x", "shape": [1], "dynamicAxes": {3: "w"}}]}},
     "spec.model.inputs[0]", "axis 3"),
    ({"model": {"source": "zoo:crnn"}, "variants": [{"name": "a", "recipe": "onnx-fp32"}, {"name": "a", "recipe": "onnx-fp32"}]},
     "spec.variants", "repeated: a"),
    ({"model": {"source": "zoo:crnn"}, "acceptance": {"maxAccuracyDrop": 0.01, "maxDrop": 1}}, "spec.acceptance.maxDrop", "remove it"),
    ({"model": {"source": "zoo:crnn", "entrypoint": "not an entrypoint"}}, "spec.model", "package.module:Class"),
    ({"model": {"source": "zoo:crnn"}, "job": {"resources": {"requests": {"memory": "4Gi"}, "limits": {"memory": "1Gi"}}}},
     "spec.job.resources", "lower requests.memory or raise limits.memory"),
    ({"model": {"source": "zoo:crnn"}, "job": {"resources": {"limits": {"memory": "2 GB"}}}},
     "spec.job.resources.limits.memory", "pattern"),
    # a variant's name is its file under models/: a '/' or '..' would write outside the run
    ({"model": {"source": "zoo:crnn"}, "variants": [{"name": "../../x", "recipe": "onnx-fp32"}]},
     "spec.variants[0].name", "pattern"),
    ({"model": {"source": "zoo:crnn"}, "variants": [{"name": "resnet/int8", "recipe": "onnx-fp32"}]},
     "spec.variants[0].name", "pattern"),
    # where to serve (spec.targets): each mistake named before any Job exists
    ({"model": {"source": "zoo:crnn"}, "targets": []}, "spec.targets", "leave targets out"),
    ({"model": {"source": "zoo:crnn"}, "targets": [{"name": "avx2"}, {"name": "avx2"}]}, "spec.targets", "repeated: avx2"),
    ({"model": {"source": "zoo:crnn"}, "targets": [{"name": "amx", "pricePerHour": 0}]},
     "spec.targets[0].pricePerHour", "greater than 0"),
    ({"model": {"source": "zoo:crnn"}, "targets": [{"name": "amx", "pricePerHour": -1.5}]},
     "spec.targets[0].pricePerHour", "greater than 0"),
    ({"model": {"source": "zoo:crnn"}, "targets": [{"name": "Pool_A"}]}, "spec.targets[0].name", "lower-case"),
    ({"model": {"source": "zoo:crnn"}, "demand": 0}, "spec.demand", "greater than 0"),
    ({"model": {"source": "zoo:crnn"}, "benchmark": {"serving": {"latencySLOMs": 0}}},
     "spec.benchmark.serving.latencySLOMs", "greater than 0"),
])
def test_invalid_specs_name_the_field_and_the_fix(spec, field, words):
    with pytest.raises(SpecError) as caught:
        parse_spec({**document(), "spec": spec})
    assert any(line.startswith(field + ":") and words in line for line in caught.value.problems), caught.value.problems


def test_the_old_cer_metric_name_fails_and_names_the_new_one():
    with pytest.raises(SpecError) as caught:
        parse_spec(document(acceptance={"metric": "cer"}))
    assert any(line.startswith("spec.acceptance.metric:") and "renamed" in line and "char-accuracy" in line
               for line in caught.value.problems), caught.value.problems
    assert parse_spec(document(acceptance={"metric": "char-accuracy"})).spec.acceptance.metric == "char-accuracy"


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as caught:
        parse_spec({**document(benchmark={"runs": 0, "threads": 0}), "metadata": {"name": "Bad_Name"}})
    fields = [line.split(":")[0] for line in caught.value.problems]
    assert fields == ["metadata.name", "spec.benchmark.threads", "spec.benchmark.runs"]


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: mlopt.io/v1alpha1\nspec:\n  model: [unclosed\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert "line" in caught.value.problems[0] and "not valid YAML" in caught.value.problems[0]


def test_examples_are_valid():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert examples, "examples/ is empty"
    for path in examples:
        assert isinstance(load_spec(path), ModelOptimization)


def test_written_spec_round_trips(tmp_path):
    path = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "data": {"source": "zoo:digits", "samples": 8}})
    assert load_spec(path).spec.data.samples == 8


def test_a_limit_below_the_default_request_lowers_the_request():
    """Only limits set (the usual way to cap memory): the Job must still be valid, request <= limit."""
    resources = parse_spec(document(job={"resources": {"limits": {"memory": "48Mi", "cpu": "500m"}}})).spec.job.resources
    assert resources.requests.memory == "48Mi" and resources.requests.cpu == "500m"
    resources = parse_spec(document(job={"resources": {"limits": {"memory": "16Gi"}}})).spec.job.resources
    assert resources.requests.memory == "2Gi"  # the default request stays when it fits


def test_the_serving_sweep_is_on_with_targets_and_off_for_the_default_local_run():
    assert not parse_spec(document()).serving_enabled()
    with_targets = parse_spec(document(targets=[{"name": "avx2", "nodeSelector": {"pool": "avx2"}, "pricePerHour": 0.1}]))
    assert with_targets.serving_enabled() and with_targets.target("avx2").pricePerHour == 0.1
    assert not parse_spec(document(targets=[{"name": "a"}], benchmark={"serving": {"enabled": False}})).serving_enabled()
    assert parse_spec(document(benchmark={"serving": {"enabled": True}})).serving_enabled()
    with pytest.raises(KeyError, match="known: avx2"):
        with_targets.target("amx")
