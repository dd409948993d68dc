from pathlib import Path

import yaml

from optimizer.api import crd

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "modeloptimizations.mlopt.io.yaml"


def _walk(schema, path="$"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_generated_from_the_spec_model():
    assert CRD_FILE.read_text() == crd.render(), (
        "crds/ is out of sync with optimizer/api/spec.py: run "
        "`python -m optimizer.api.crd > crds/modeloptimizations.mlopt.io.yaml`"
    )


def test_names_and_columns():
    spec = crd.crd()["spec"]
    assert spec["group"] == "mlopt.io"
    assert spec["names"]["kind"] == "ModelOptimization"
    assert spec["names"]["plural"] == "modeloptimizations"
    assert spec["names"]["shortNames"] == ["mo"]
    assert spec["names"]["categories"] == ["mlopt"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Best", "Size", "Latency", "Speedup", "Recommended", "Output", "Age"
    ]


def test_schema_is_structural():
    """Every node has a type (or preserves unknown fields); no refs, unions or closed objects."""
    schema = crd.spec_schema()
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "default", "const", "$defs"):
            assert forbidden not in node, f"{path} has {forbidden}"
        assert node.get("additionalProperties") not in (True, False), path
        if "additionalProperties" in node:
            assert "properties" not in node, path
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):  # OpenAPI v3: booleans, not bounds
            assert node.get(flag, True) is True, f"{path}.{flag} = {node[flag]!r}"


def test_fields_have_descriptions_for_kubectl_explain():
    schema = crd.spec_schema()
    model = schema["properties"]["spec"]["properties"]["model"]
    assert "model to optimize" in model["description"]
    assert all(sub.get("description") for sub in model["properties"].values())
    assert model["required"] == ["source"]


def test_cel_rule_for_state_dict_names_the_field():
    model = crd.spec_schema()["properties"]["spec"]["properties"]["model"]
    rules = model["x-kubernetes-validations"]
    assert any("state-dict" in r["rule"] and "model.entrypoint" in r["message"] for r in rules)


def test_free_form_arguments_and_string_keyed_axes():
    model = crd.spec_schema()["properties"]["spec"]["properties"]["model"]["properties"]
    assert model["arguments"]["x-kubernetes-preserve-unknown-fields"] is True
    axes = model["inputs"]["items"]["properties"]["dynamicAxes"]
    assert axes == {**axes, "type": "object", "additionalProperties": {"type": "string"}}


def test_yaml_dynamic_axes_keys_arrive_as_strings_and_still_validate():
    from optimizer.api.spec_loader import parse_spec

    document = yaml.safe_load(
        """
apiVersion: mlopt.io/v1alpha1
kind: ModelOptimization
metadata: {name: m}
spec:
  model:
    source: model.pt
    format: torchscript
    inputs: [{name: x, shape: [1, 3, 8, 8], dynamicAxes: {"0": batch}}]
"""
    )
    spec = parse_spec(document)
    assert spec.spec.model.inputs[0].dynamicAxes == {0: "batch"}


def test_status_schema_lists_what_the_operator_writes():
    status = crd.spec_schema()["properties"]["status"]["properties"]
    for field in ("phase", "conditions", "observedGeneration", "jobName", "startTime", "completionTime",
                  "baseline", "variants", "best", "message", "bestSize", "bestLatency", "bestSpeedup"):
        assert field in status
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
