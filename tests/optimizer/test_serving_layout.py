"""The serving layout (optimizer/artifacts/serving_layout.py): a model repository that servers read as
it is, and a KServe InferenceService checked against KServe's own CRD schema.

No Triton or OpenVINO Model Server installs here (neither is on PyPI for this platform: the
`tritonserver` wheels are the in-process API for Triton's container, and OVMS ships as a container
image), so the repository is loaded the way each server does it: ONNX Runtime from exactly
`serving/<model>/1/model.onnx` (its external data beside it), OpenVINO from `model.xml`, fed the
inputs `config.pbtxt` declares. config.pbtxt is parsed as protobuf text format against the fields of
Triton's `inference.ModelConfig` (triton-inference-server/common protobuf/model_config.proto), so a
misspelt field or type name fails the parse as it fails Triton's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from optimizer.api.results import Latency, VariantResult
from optimizer.api.spec import JobSpec
from optimizer.artifacts import serving_layout
from optimizer.artifacts.serving_layout import ServingLayoutError, served_variant, write_serving_layout

REPO = Path(__file__).resolve().parents[2]
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP16": np.float16}


# --- Triton's ModelConfig, the fields a layout uses ---------------------------------------------------

DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
              "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]


def _model_config_class():
    """inference.ModelConfig with the field names, numbers and types of model_config.proto (a subset:
    what a CPU layout writes, plus neighbours a typo could land on); unknown fields fail the parse."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="mlopt_tests/model_config.proto", package="inference",
                                               syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        data_type.value.add(name=name, number=number)

    def message(name, fields, enums=()):
        described = proto.message_type.add(name=name)
        for enum_name, values in enums:
            enum = described.enum_type.add(name=enum_name)
            for number, value in enumerate(values):
                enum.value.add(name=value, number=number)
        for field_name, number, kind, repeated, type_name in fields:
            described.field.add(name=field_name, number=number, type=kind, type_name=type_name,
                                label=field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL)

    string, int32, int64, uint64 = field.TYPE_STRING, field.TYPE_INT32, field.TYPE_INT64, field.TYPE_UINT64
    enum, sub = field.TYPE_ENUM, field.TYPE_MESSAGE
    message("ModelTensorReshape", [("shape", 1, int64, True, None)])
    message("ModelInput", [("name", 1, string, False, None), ("data_type", 2, enum, False, ".inference.DataType"),
                           ("dims", 4, int64, True, None), ("reshape", 5, sub, False, ".inference.ModelTensorReshape")])
    message("ModelOutput", [("name", 1, string, False, None), ("data_type", 2, enum, False, ".inference.DataType"),
                            ("dims", 3, int64, True, None), ("reshape", 5, sub, False, ".inference.ModelTensorReshape"),
                            ("label_filename", 4, string, False, None)])
    message("ModelInstanceGroup", [("name", 1, string, False, None),
                                   ("kind", 4, enum, False, ".inference.ModelInstanceGroup.Kind"),
                                   ("count", 2, int32, False, None), ("gpus", 3, int32, True, None)],
            enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])])
    message("ModelDynamicBatching", [("preferred_batch_size", 1, int32, True, None),
                                     ("max_queue_delay_microseconds", 2, uint64, False, None)])
    message("ModelConfig", [
        ("name", 1, string, False, None), ("platform", 2, string, False, None), ("backend", 17, string, False, None),
        ("max_batch_size", 4, int32, False, None), ("input", 5, sub, True, ".inference.ModelInput"),
        ("output", 6, sub, True, ".inference.ModelOutput"),
        ("instance_group", 7, sub, True, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, string, False, None),
        ("dynamic_batching", 11, sub, False, ".inference.ModelDynamicBatching")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def read_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _model_config_class()())


def test_the_config_parser_refuses_what_triton_refuses():
    """The checker itself: a misspelt field and an unknown type name fail, as in Triton's parse."""
    from google.protobuf import text_format

    assert read_config_text('name: "m"\nmax_batch_size: 4\n').max_batch_size == 4
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        read_config_text("max_batch_sise: 4\n")
    with pytest.raises(text_format.ParseError, match="TYPE_FLOAT32"):
        read_config_text('input [ { name: "x" data_type: TYPE_FLOAT32 dims: [ 4 ] } ]\n')


def read_config_text(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, _model_config_class()())


# --- small real models ----------------------------------------------------------------------------------

def write_tiny_onnx(path: Path, batch: int | str = "batch", external_data: bool = True) -> Path:
    """x[batch, 4] -> logits = x @ W + b [batch, 3] and label = argmax(logits) [batch] (int64), its weights
    in external data (as a model past 2 GB keeps them), at a location relative to the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [batch])],
        initializer=[weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def config_inputs(config, batch: int = 3) -> dict[str, np.ndarray]:
    """Inputs shaped as config.pbtxt declares them: a batch in front when batching, 2 for a -1 axis."""
    rng = np.random.default_rng(1)
    feeds = {}
    for tensor in config.input:
        dims = [2 if d == -1 else d for d in (tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)]
        shape = ([batch] if config.max_batch_size > 0 else []) + dims
        dtype = NUMPY_TYPES[DATA_TYPES[tensor.data_type]]
        feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def layout(tmp_path: Path, model_file: Path, output: str = "s3://models/runs/tiny/", **options) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    write_serving_layout(staging, model_file, variant=model_file.stem, name="tiny", output=output, **options)
    return staging / "serving"


# --- the model repository ---------------------------------------------------------------------------------

def test_an_onnx_variant_is_served_from_exactly_the_repository_files(tmp_path):
    """serving/tiny/1/model.onnx with its external data beside it under the graph's own location; a
    config.pbtxt that declares the batch axis, dtypes and the instance count; ONNX Runtime on exactly
    those files (the variant's own folder gone) gives the variant's outputs for the declared inputs."""
    source = write_tiny_onnx(tmp_path / "models" / "ort-int8-dynamic.onnx")
    serving = layout(tmp_path, source, instance_count=3)

    version = serving / "tiny" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "ort-int8-dynamic.onnx.data"]
    from optimizer.artifacts import onnx_files
    assert onnx_files.external_locations(version / "model.onnx") == ["ort-int8-dynamic.onnx.data"]

    config = read_config(serving / "tiny" / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("tiny", "onnxruntime_onnx", 4)
    assert [(t.name, DATA_TYPES[t.data_type], list(t.dims)) for t in config.input] == [("x", "TYPE_FP32", [4])]
    assert [(t.name, DATA_TYPES[t.data_type], list(t.dims)) for t in config.output] == [
        ("logits", "TYPE_FP32", [3]), ("label", "TYPE_INT64", [1])]
    label = config.output[1]
    assert label.HasField("reshape") and list(label.reshape.shape) == []  # [batch] is dims [1], reshaped to []
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, 2)]  # KIND_CPU

    feeds = config_inputs(config)
    expected = ort_outputs(source, feeds)
    shutil.rmtree(tmp_path / "models")  # the server has only the repository
    served = ort_outputs(version / "model.onnx", feeds)
    assert served.keys() == {t.name for t in config.output}
    for name, value in expected.items():
        np.testing.assert_array_equal(served[name], value)


@pytest.mark.parametrize("inputs, outputs, batching", [
    ([("batch", 4)], [("batch", 3), ("batch",)], True),
    ([("batch", 4)], [(None, 3)], False),  # unnamed: not provably the batch
    ([("batch", 1, "width")], [("seq", "batch", 6)], False),  # a CRNN's sequence-first output
    ([(1, 4)], [(1, 3)], False),
    ([("batch", 4), ()], [("batch", 3)], False),  # a scalar input has no batch axis
])
def test_only_a_shared_named_first_axis_is_a_batch_axis(inputs, outputs, batching):
    tensors = lambda shapes: tuple(serving_layout.Tensor(f"t{i}", "TYPE_FP32", shape) for i, shape in enumerate(shapes))
    assert serving_layout.Signature(tensors(inputs), tensors(outputs)).batches_on_first_axis is batching


def test_a_fixed_batch_axis_means_max_batch_size_0_and_full_dims(tmp_path):
    """Triton batches only along a dynamic first axis: a model exported at batch 1 gets
    max_batch_size 0, its full dims (the 1 included), and no dynamic batcher."""
    source = write_tiny_onnx(tmp_path / "models" / "onnx-fp32.onnx", batch=1, external_data=False)
    serving = layout(tmp_path, source)
    config = read_config(serving / "tiny" / "config.pbtxt")
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[1, 4]]
    assert [list(t.dims) for t in config.output] == [[1, 3], [1]]
    assert not config.HasField("dynamic_batching")
    feeds = config_inputs(config)
    np.testing.assert_array_equal(ort_outputs(serving / "tiny" / "1" / "model.onnx", feeds)["logits"],
                                  ort_outputs(source, feeds)["logits"])


def test_an_openvino_variant_is_served_as_model_xml_and_bin(tmp_path):
    """An OpenVINO IR winner: 1/model.xml + model.bin (OVMS's layout, and the names Triton's openvino
    backend loads), `backend: "openvino"`, served by KServe's OVMS runtime from the model's folder."""
    import openvino as ov

    onnx_model = write_tiny_onnx(tmp_path / "scratch" / "tiny.onnx", external_data=False)
    source = tmp_path / "models" / "openvino-fp32.xml"
    ov.save_model(ov.convert_model(str(onnx_model)), str(source), compress_to_fp16=False)
    serving = layout(tmp_path, source, output="pvc://results/runs/tiny/")

    version = serving / "tiny" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.bin", "model.xml"]
    config = read_config(serving / "tiny" / "config.pbtxt")
    # OpenVINO keeps no names for dynamic axes, so the batch axis is not provable: full dims, -1 dynamic
    assert (config.backend, config.platform, config.max_batch_size) == ("openvino", "", 0)
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [-1, 4])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [-1, 3]), ("label", [-1])]
    assert not config.HasField("dynamic_batching")

    feeds = config_inputs(config)
    core = ov.Core()
    expected = core.compile_model(str(source), "CPU")(feeds)
    shutil.rmtree(tmp_path / "models")
    served = core.compile_model(str(version / "model.xml"), "CPU")(feeds)
    for output in config.output:
        np.testing.assert_array_equal(served[output.name], expected[output.name])

    manifest = yaml.safe_load((serving / "inferenceservice.yaml").read_text())
    model = manifest["spec"]["predictor"]["model"]
    assert (model["modelFormat"], model["runtime"]) == ({"name": "openvino"}, "kserve-openvino")
    assert model["storageUri"] == "pvc://results/runs/tiny/serving/tiny"  # OVMS's --model_path: the version folders


@pytest.mark.parametrize("output, expected", [
    ("s3://models/runs/tiny/", "s3://models/runs/tiny/serving"),
    ("pvc://results/runs/tiny/", "pvc://results/runs/tiny/serving"),
    ("pvc://results", "pvc://results/serving"),
    ("mlopt-results", None),
])
def test_storage_uri_is_where_the_output_keeps_the_repository(output, expected):
    """KServe's Triton runtime reads the repository (--model-store=/mnt/models): storageUri is serving/
    under spec.output, in KServe's own s3:// and pvc://<claim>/<path> forms; a local folder has none."""
    assert serving_layout.storage_uri(output, "tiny", serving_layout.SERVERS[".onnx"]) == expected


def test_a_local_run_says_where_the_repository_must_go(tmp_path):
    serving = layout(tmp_path, write_tiny_onnx(tmp_path / "models" / "onnx-fp32.onnx"), output=str(tmp_path / "out"))
    manifest = yaml.safe_load((serving / "inferenceservice.yaml").read_text())
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == "s3://REPLACE-WITH-YOUR-BUCKET/tiny/serving"
    readme = (serving / "README.md").read_text()
    assert "is a local folder, which no cluster can read" in readme and "kubectl apply -f inferenceservice.yaml" in readme


def test_what_no_server_loads_is_refused_with_the_reason(tmp_path):
    state_dict = tmp_path / "models" / "pytorch-fp32.pt"
    state_dict.parent.mkdir()
    state_dict.write_bytes(b"not served")
    with pytest.raises(ServingLayoutError, match="neither ONNX .* nor OpenVINO IR"):
        layout(tmp_path, state_dict)
    garbled = tmp_path / "models" / "onnx-fp32.onnx"
    garbled.write_bytes(b"not a protobuf")
    with pytest.raises(ServingLayoutError, match="onnx-fp32.onnx cannot be read for its inputs and outputs"):
        layout(tmp_path, garbled)
    garbled.unlink()
    with pytest.raises(ServingLayoutError, match="cannot name an InferenceService"):
        serving_layout.serving_name("Tiny_Model")
    assert serving_layout.serving_name("1tiny") == "model-1tiny"  # KServe wants a letter first
    with pytest.raises(ServingLayoutError, match="instance count must be at least 1"):
        layout(tmp_path, write_tiny_onnx(tmp_path / "models" / "onnx-fp32.onnx"), instance_count=0)
    assert list((tmp_path / "staging").iterdir()) == []  # nothing half-written


def _variant(name: str, artifact: str | None, mean_ms: float, status: str = "ok") -> VariantResult:
    latency = Latency(mean=mean_ms, std=0.1, p50=mean_ms, p90=mean_ms, p99=mean_ms, runs=10)
    return VariantResult(name=name, recipe=name, status=status, artifact=artifact, latencyMs=latency)


def test_the_served_variant_is_the_best_one_a_server_loads():
    """The best variant when it is ONNX or OpenVINO IR; else the fastest such variant within the budget,
    and the reason says why; a rejected variant is never served."""
    variants = [_variant("onnx-fp32", "models/onnx-fp32.onnx", 9.0),
                _variant("openvino-int8", "models/openvino-int8.xml", 4.0),
                _variant("ort-int8-static", "models/ort-int8-static.onnx", 2.0, status="rejected"),
                _variant("torch-int8-static", "models/torch-int8-static.pt", 3.0)]
    assert served_variant(variants, "onnx-fp32") == (variants[0], "the best variant")
    chosen, why = served_variant(variants, "torch-int8-static")
    assert chosen is variants[1] and "torch-int8-static, is a PyTorch file" in why
    chosen, why = served_variant(variants, None)
    assert chosen is variants[1] and why.startswith("no variant beats the baseline")
    assert served_variant(variants[2:], None) == (
        None, "no variant within the accuracy budget is an ONNX or OpenVINO model, which is what servers load")


# --- the InferenceService against KServe's CRD ---------------------------------------------------------------

@pytest.fixture(scope="module")
def kserve_schema() -> dict:
    """The v1beta1 openAPIV3Schema of KServe's InferenceService CRD, from KServe's Go module (fetched and
    cached by tools/fetch-kserve-crd.sh, which scripts/test runs first)."""
    done = subprocess.run([str(REPO / "tools" / "fetch-kserve-crd.sh")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"tools/fetch-kserve-crd.sh failed: {done.stderr.strip()[-2000:]}"
    crd = yaml.safe_load(Path(done.stdout.strip().splitlines()[-1]).read_text())
    assert crd["spec"]["names"]["kind"] == "InferenceService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """The schema as the API server applies it with strict field validation (kubectl's default since
    Kubernetes 1.27): an object that lists its properties refuses any other field, unless it is marked
    x-kubernetes-preserve-unknown-fields. JSON Schema alone would let a misspelt field through."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(child) for name, child in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(child) for child in out[key]]
    return out


def errors(schema: dict, manifest: dict) -> list[str]:
    import jsonschema

    return ["/".join(str(p) for p in error.absolute_path) + ": " + error.message
            for error in jsonschema.Draft4Validator(schema).iter_errors(manifest)]


@pytest.fixture
def manifest(tmp_path) -> dict:
    """The InferenceService as written for a run with a node pool's selector, toleration and resources."""
    job = JobSpec(nodeSelector={"pool": "inference", "kubernetes.io/arch": "amd64"},
                  tolerations=[{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
                  resources={"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}})
    serving = layout(tmp_path, write_tiny_onnx(tmp_path / "models" / "onnx-fp32.onnx"), namespace="ml",
                     node_selector=job.nodeSelector, tolerations=[t.model_dump(exclude_none=True) for t in job.tolerations],
                     resources=job.resources.model_dump(exclude_none=True), min_replicas=2)
    return yaml.safe_load((serving / "inferenceservice.yaml").read_text())


def test_the_inference_service_passes_kserves_own_schema(kserve_schema, manifest):
    assert errors(kserve_schema, manifest) == []
    assert errors(strict(kserve_schema), manifest) == []
    predictor = manifest["spec"]["predictor"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert manifest["metadata"] == {"name": "tiny", "namespace": "ml"}
    assert predictor["model"] == {
        "modelFormat": {"name": "onnx"}, "runtime": "kserve-tritonserver", "protocolVersion": "v2",
        "storageUri": "s3://models/runs/tiny/serving",
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}}
    assert predictor["nodeSelector"] == {"pool": "inference", "kubernetes.io/arch": "amd64"}
    assert predictor["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "inference",
                                         "effect": "NoSchedule"}]
    assert predictor["minReplicas"] == 2


def test_kserves_schema_refuses_a_misspelt_or_mistyped_manifest(kserve_schema, manifest):
    """The check can fail: KServe's schema refuses a wrong type and a missing required field as it stands,
    and a misspelt field under strict field validation (predictor.model lists its properties and does
    not preserve unknown ones)."""
    model = manifest["spec"]["predictor"]["model"]
    misspelt = yaml.safe_load(yaml.safe_dump(manifest))
    misspelt["spec"]["predictor"]["model"]["storageURI"] = misspelt["spec"]["predictor"]["model"].pop("storageUri")
    assert errors(kserve_schema, misspelt) == []  # JSON Schema alone lets it through ...
    assert errors(strict(kserve_schema), misspelt) == [
        "spec/predictor/model: Additional properties are not allowed ('storageURI' was unexpected)"]  # ... the API server does not

    mistyped = yaml.safe_load(yaml.safe_dump(manifest))
    mistyped["spec"]["predictor"]["model"]["storageUri"] = [model["storageUri"]]
    assert any(e.startswith("spec/predictor/model/storageUri:") and "is not of type 'string'" in e
               for e in errors(kserve_schema, mistyped))

    nameless = yaml.safe_load(yaml.safe_dump(manifest))
    nameless["spec"]["predictor"]["model"]["modelFormat"] = {"version": "1"}
    assert any("'name' is a required property" in e for e in errors(kserve_schema, nameless))

    bad_quantity = yaml.safe_load(yaml.safe_dump(manifest))
    bad_quantity["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"] = "two"
    assert errors(kserve_schema, bad_quantity)


# --- in a run ----------------------------------------------------------------------------------------------------

def test_a_run_hands_its_served_variant_to_a_server(digits_run):
    """The report step writes serving/ for the variant served_variant picks, lists its files in
    results.json's outputs, and the served model.onnx answers as the variant's own file does."""
    results, output = digits_run
    variant, why = served_variant(results.variants, results.best)
    assert variant is not None
    serving = output / "serving"
    name = results.name
    assert {entry["path"] for entry in results.outputs} >= {
        "serving/README.md", "serving/inferenceservice.yaml", f"serving/{name}/config.pbtxt", f"serving/{name}/1/model.onnx"}
    assert f"**{variant.name}**" in (serving / "README.md").read_text() and why in (serving / "README.md").read_text()
    config = read_config(serving / name / "config.pbtxt")
    feeds = config_inputs(config, batch=2)
    served = ort_outputs(serving / name / "1" / "model.onnx", feeds)
    for key, value in ort_outputs(output / variant.artifact, feeds).items():
        np.testing.assert_array_equal(served[key], value)
    manifest = yaml.safe_load((serving / "inferenceservice.yaml").read_text())
    assert manifest["spec"]["predictor"]["model"]["storageUri"] == f"s3://REPLACE-WITH-YOUR-BUCKET/{name}/serving"


@pytest.mark.parametrize("job, device", [
    ({}, "cpu"),
    ({"qos": "guaranteed", "resources": {"limits": {"cpu": "4", "memory": "8Gi"}},
      "tolerations": [{"key": "pool", "operator": "Exists"}]}, "cuda"),
])
def test_the_served_pods_get_what_the_operator_gave_the_worker(job, device):
    """The report step places the InferenceService like the operator's Job (same requests, limits,
    GPU and tolerations), so the model is served where it was measured; a drift fails here."""
    from mlopt_operator.job import build_job
    from mlopt_operator.settings import Settings
    from optimizer.api.spec_loader import parse_spec
    from optimizer.steps.report import job_placement

    document = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
                "metadata": {"name": "tiny", "namespace": "ml", "uid": "u", "generation": 1},
                "spec": {"model": {"source": "zoo:digits"}, "benchmark": {"device": device}, "job": job}}
    pod = build_job(document, Settings())["spec"]["template"]["spec"]
    resources, tolerations = job_placement(parse_spec(document, "test"))
    worker = {kind: {name: value for name, value in values.items() if name != "ephemeral-storage"}
              for kind, values in pod["containers"][0]["resources"].items()}  # the worker's scratch, not the server's
    assert resources == worker
    assert tolerations == pod.get("tolerations", [])


@pytest.mark.parametrize("target", [
    {"name": "amx", "nodeSelector": {"pool": "amx", "zone": "b"}, "pricePerHour": 0.4,
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
     "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "4", "memory": "8Gi"}}},
    {"name": "bare"},  # no resources of its own: spec.job's
    {"name": "gpu", "device": "cuda", "resources": {"limits": {"cpu": "8"}}},
])
def test_a_target_s_served_pods_go_where_its_job_measured(target):
    """With spec.targets, the InferenceService of a target's run goes on that target's nodes, with its
    resources and tolerations, exactly as the operator placed that target's Job."""
    from mlopt_operator.job import build_jobs
    from mlopt_operator.settings import Settings
    from optimizer.api.spec_loader import parse_spec
    from optimizer.steps.report import placement

    document = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
                "metadata": {"name": "tiny", "namespace": "ml", "uid": "u", "generation": 1},
                "spec": {"model": {"source": "zoo:digits"}, "targets": [{"name": "other"}, target],
                         "job": {"nodeSelector": {"zone": "a", "arch": "x86"}, "resources": {"limits": {"cpu": "2"}},
                                 "tolerations": [{"key": "spot", "operator": "Exists"}]}}}
    jobs = build_jobs(document, Settings())
    pod = next(j for j in jobs if j["metadata"]["labels"]["mlopt.io/target"] == target["name"])["spec"]["template"]["spec"]
    node_selector, resources, tolerations, device = placement(parse_spec(document, "test"), target["name"])
    worker = {kind: {name: value for name, value in values.items() if name != "ephemeral-storage"}
              for kind, values in pod["containers"][0]["resources"].items()}
    assert node_selector == pod.get("nodeSelector", {})
    assert {kind: values for kind, values in resources.items() if values} == {k: v for k, v in worker.items() if v}
    assert sorted(map(str, tolerations)) == sorted(map(str, pod.get("tolerations", [])))
    assert device == target.get("device", "cpu")
