"""The hand-off to a server: the chosen variant as a model repository that Triton and OpenVINO Model
Server read unchanged, and a KServe InferenceService that points at where the run stored it.

    serving/
      README.md                  how to apply it
      inferenceservice.yaml      serving.kserve.io/v1beta1 InferenceService
      <model>/config.pbtxt       Triton's model configuration (OVMS ignores it)
      <model>/1/model.onnx       an ONNX variant, its external data beside it at the locations the
                                 graph names; Triton's onnxruntime backend
      <model>/1/model.xml, .bin  an OpenVINO IR variant; OVMS, or Triton's openvino backend

serving/ is itself the repository: Triton takes each sub-folder as a model and passes over files (its
model repository manager lists sub-directories only), so the README and the manifest may sit there.
Plain files, no code: the interface between an optimizer and a server is a folder and a manifest
(Triton's docs/user_guide/model_repository.md and model_configuration.md; KServe's
config/runtimes/kserve-tritonserver.yaml and kserve-openvino.yaml). Inputs, outputs, dtypes and
dynamic axes are read from the model file itself, so the configuration says what the server will
actually load.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from optimizer.api import uris
from optimizer.api.errors import OptimizationError, is_expected
from optimizer.api.results import VariantResult, VariantStatus

SERVING_DIR = "serving"
VERSION = "1"  # Triton and OVMS serve the highest numeric version folder; there is one
MANIFEST_FILE = "inferenceservice.yaml"
# What Triton itself uses when it completes a batching model's configuration (--backend-config=
# default-max-batch-size); a caller with a measured batch size passes that instead.
DEFAULT_MAX_BATCH_SIZE = 4
# KServe's admission webhook (pkg/apis/serving/v1beta1/inference_service_validation.go, IsvcNameFmt):
# a DNS-1035 label, so a name may not start with a digit.
_ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Local output: no cluster can read it, so the manifest says where the folder has to go.
LOCAL_STORAGE_URI = "s3://REPLACE-WITH-YOUR-BUCKET/{name}/serving"


class ServingLayoutError(OptimizationError):
    """The chosen variant cannot be written as a serving layout; the message says why and what to do."""

    reason = "ServingLayoutFailed"


@dataclass(frozen=True)
class Server:
    """How one model format is served: the files in the version folder, Triton's config line, and the
    KServe runtime that reads them (by name, so KServe never picks another runtime for the format)."""

    model_format: str  # KServe's modelFormat.name
    kserve_runtime: str  # a ClusterServingRuntime KServe ships (config/runtimes/)
    config_line: str  # Triton's platform or backend
    model_file: str  # the name Triton's backend looks for in <model>/<version>/
    storage_is_repository: bool  # storageUri is the repository (Triton) or the model folder (OVMS)


SERVERS = {
    # kserve-tritonserver: tritonserver --model-store=/mnt/models, so storageUri is the repository.
    ".onnx": Server("onnx", "kserve-tritonserver", 'platform: "onnxruntime_onnx"', "model.onnx", True),
    # kserve-openvino: OVMS with --model_name=<InferenceService name> --model_path=/mnt/models, which
    # holds the version folders: storageUri is the model's folder. Triton's openvino backend reads
    # the same model.xml + model.bin.
    ".xml": Server("openvino", "kserve-openvino", 'backend: "openvino"', "model.xml", False),
}

# Element types, by the name each library gives them, as Triton's model configuration names them
# (model_configuration.md, "Datatypes").
_ONNX_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64", "BFLOAT16": "TYPE_BF16",
               "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
               "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
               "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING"}
_OPENVINO_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "f64": "TYPE_FP64", "bf16": "TYPE_BF16",
                   "i8": "TYPE_INT8", "i16": "TYPE_INT16", "i32": "TYPE_INT32", "i64": "TYPE_INT64",
                   "u8": "TYPE_UINT8", "u16": "TYPE_UINT16", "u32": "TYPE_UINT32", "u64": "TYPE_UINT64",
                   "boolean": "TYPE_BOOL", "string": "TYPE_STRING"}


@dataclass(frozen=True)
class Tensor:
    """One input or output as the model file declares it."""

    name: str
    data_type: str  # Triton's TYPE_* name
    shape: tuple[int | str | None, ...]  # a size, a named dynamic axis, or None (dynamic, unnamed)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def batches_on_first_axis(self) -> bool:
        """Whether every input and output has the same named dynamic axis first: the only batching
        Triton's dynamic batcher can do (max_batch_size > 0). An unnamed dynamic axis proves nothing (a
        sequence-first output such as a CRNN's [T, batch, classes] also starts with one), so it is not
        taken for the batch: such a model is declared with max_batch_size 0 and -1 dims, which is
        always right."""
        firsts = {tensor.shape[0] if tensor.shape else None for tensor in (*self.inputs, *self.outputs)}
        return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def _element_type(table: dict[str, str], name: str, tensor: str, path: Path) -> str:
    if name not in table:
        raise ServingLayoutError(f"{path.name}: {tensor} has element type {name}, which Triton's model configuration "
                                 "cannot declare; serve a variant with standard tensor types")
    return table[name]


def onnx_signature(path: Path) -> Signature:
    """Inputs (initializers aside) and outputs of an ONNX graph, without loading its weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}

    def tensor(value) -> Tensor:
        kind = value.type.tensor_type
        if not kind.HasField("shape"):
            raise ServingLayoutError(f"{path.name}: {value.name} has no declared rank, which a server's configuration "
                                     "needs; export the model with shapes (mlopt's export always writes them)")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim)
        data_type = _element_type(_ONNX_TYPES, onnx.TensorProto.DataType.Name(kind.elem_type), value.name, path)
        return Tensor(value.name, data_type, shape)

    return Signature(tuple(tensor(v) for v in graph.input if v.name not in weights),
                     tuple(tensor(v) for v in graph.output))


def openvino_signature(path: Path) -> Signature:
    """Inputs and outputs of an OpenVINO IR (model.xml with its .bin beside it)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))

    def tensor(port) -> Tensor:
        names = port.get_names()
        name = port.get_any_name() if names else port.get_node().get_friendly_name()
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic:
            raise ServingLayoutError(f"{path.name}: {name} has a dynamic rank, which a server's configuration cannot "
                                     "declare; convert the model with a fixed rank")
        dims = tuple(dim.get_length() if dim.is_static else None for dim in shape)
        return Tensor(name, _element_type(_OPENVINO_TYPES, port.get_element_type().get_type_name(), name, path), dims)

    return Signature(tuple(tensor(port) for port in model.inputs), tuple(tensor(port) for port in model.outputs))


def server_for(model_file: Path) -> Server:
    if model_file.suffix not in SERVERS:
        raise ServingLayoutError(
            f"{model_file.name} is neither ONNX (.onnx) nor OpenVINO IR (.xml), the two formats Triton and OpenVINO Model "
            "Server load as files; serve an ONNX Runtime or OpenVINO variant")
    return SERVERS[model_file.suffix]


def _dims(shape: tuple, batching: bool) -> tuple[list[int], bool]:
    """Triton's dims (the batch axis left out when batching; -1 for a dynamic axis), and whether the
    tensor needs `reshape: { shape: [ ] }` (Triton refuses empty dims: a scalar is declared [1])."""
    dims = [dim if isinstance(dim, int) else -1 for dim in (shape[1:] if batching else shape)]
    return (dims, False) if dims else ([1], True)


def _tensor_block(tensor: Tensor, batching: bool) -> str:
    dims, scalar = _dims(tensor.shape, batching)
    lines = ["  {", f"    name: {_quoted(tensor.name)}", f"    data_type: {tensor.data_type}",
             f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
    if scalar:
        lines.append("    reshape: { shape: [ ] }")
    return "\n".join([*lines, "  }"])


def _quoted(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def model_config(name: str, server: Server, signature: Signature, instance_count: int = 1,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, device: str = "cpu") -> str:
    """Triton's config.pbtxt (protobuf text format of inference.ModelConfig).

    A model whose every input and output has a dynamic first axis is declared batching (that axis
    left out of dims, dynamic batching on); any other model gets max_batch_size 0 and its full dims,
    which Triton then matches exactly. Instances on the CPU (or, for a cuda run, on each GPU): as many
    as the serving sweep found best."""
    batching = signature.batches_on_first_axis and max_batch_size > 0
    lines = [f"name: {_quoted(name)}", server.config_line, f"max_batch_size: {max_batch_size if batching else 0}"]
    for field, tensors in (("input", signature.inputs), ("output", signature.outputs)):
        lines += [f"{field} [", ",\n".join(_tensor_block(tensor, batching) for tensor in tensors), "]"]
    if batching:
        lines.append("dynamic_batching { }")
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    lines += ["instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _copy_model(model_file: Path, server: Server, version_dir: Path) -> list[Path]:
    """The model under the server's file name, with the files it refers to at the same relative places."""
    version_dir.mkdir(parents=True)
    target = version_dir / server.model_file
    if model_file.suffix == ".onnx":
        from optimizer.artifacts import onnx_files

        try:
            onnx_files.validate(model_file)  # every location inside the model's folder, and there
        except onnx_files.ExternalDataError as error:
            raise ServingLayoutError(str(error)) from None
        companions = [(model_file.parent / location, version_dir / location)
                      for location in onnx_files.external_locations(model_file)]
    else:
        weights = model_file.with_suffix(".bin")
        if not weights.is_file():
            raise ServingLayoutError(f"{model_file.name}: its weights {weights.name} are not beside it; an OpenVINO IR "
                                     "is the .xml and the .bin of the same name")
        companions = [(weights, target.with_suffix(".bin"))]
    if any(copy == target for _, copy in companions):
        raise ServingLayoutError(f"{model_file.name} keeps tensor data in a file named {server.model_file}, the name the "
                                 "server loads the graph from; re-save it with another data location")
    shutil.copyfile(model_file, target)
    for source, copy in companions:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return [target, *(copy for _, copy in companions)]


@dataclass(frozen=True)
class ModelRepository:
    """What write_model_repository wrote."""

    root: Path  # the repository: serving/
    model_name: str
    server: Server
    signature: Signature
    config: Path
    files: list[Path]  # the model file first, then what it refers to


def write_model_repository(repository: Path, model_name: str, model_file: Path, instance_count: int = 1,
                           max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, device: str = "cpu") -> ModelRepository:
    """<repository>/<model_name>/config.pbtxt and <model_name>/1/ with `model_file` (ONNX with its external
    data, or OpenVINO IR) under the name the server looks for."""
    server = server_for(model_file)
    if instance_count < 1:
        raise ServingLayoutError(f"instance count must be at least 1 (got {instance_count}): the serving sweep's "
                                 "best number of model instances")
    try:
        signature = onnx_signature(model_file) if server.model_format == "onnx" else openvino_signature(model_file)
    except ServingLayoutError:
        raise
    except Exception as error:  # onnx or OpenVINO cannot read the file: a reason, not an mlopt bug
        if not is_expected(error):
            raise
        raise ServingLayoutError(f"{model_file.name} cannot be read for its inputs and outputs: {error}") from None
    model_dir = repository / model_name
    if model_dir.exists():
        raise ServingLayoutError(f"{model_dir} exists already; the serving layout is written once, into a new folder")
    files = _copy_model(model_file, server, model_dir / VERSION)
    config = model_dir / "config.pbtxt"
    config.write_text(model_config(model_name, server, signature, instance_count, max_batch_size, device))
    return ModelRepository(repository, model_name, server, signature, config, files)


def served_variant(variants: list[VariantResult], best: str | None) -> tuple[VariantResult | None, str]:
    """The variant to hand to a server, and why: the best one when a server loads its file (ONNX or
    OpenVINO IR), else the fastest such variant within the budget (a PyTorch file is no server's)."""
    servable = [v for v in variants
                if v.status == VariantStatus.ok.value and v.artifact and Path(v.artifact).suffix in SERVERS]
    chosen = next((v for v in servable if v.name == best), None)
    if chosen is not None:
        return chosen, "the best variant"
    if not servable:
        return None, "no variant within the accuracy budget is an ONNX or OpenVINO model, which is what servers load"
    fastest = min(servable, key=lambda v: v.latencyMs.mean if v.latencyMs else float("inf"))
    reason = (f"the best variant, {best}, is a PyTorch file, which Triton and OVMS do not load"
              if best else "no variant beats the baseline")
    return fastest, f"{reason}; this is the fastest ONNX or OpenVINO variant within the accuracy budget"


def serving_name(name: str) -> str:
    """The run's name as an InferenceService (and Triton model) name: KServe wants a letter first."""
    candidate = name if name[:1].isalpha() else f"model-{name}"
    if not _ISVC_NAME.match(candidate) or len(candidate) > 63:
        raise ServingLayoutError(f"{name!r} cannot name an InferenceService: use lower-case letters, digits and '-', "
                                 "a letter first, at most 63 characters (metadata.name)")
    return candidate


def storage_uri(output: str, model_name: str, server: Server) -> str | None:
    """Where KServe finds the served files once the run's output is stored: under spec.output, the
    repository (Triton) or the model's folder (OVMS); None for a local folder no cluster can read.
    pvc://<claim>/<path> and s3://<bucket>/<key> as KServe's storage initializer reads them."""
    location = uris.output(output)
    if location.scheme not in ("s3", "pvc"):
        return None
    parts = [location.key.strip("/"), SERVING_DIR, *([] if server.storage_is_repository else [model_name])]
    return f"{location.scheme}://{location.container}/" + "/".join(part for part in parts if part)


def inference_service_manifest(name: str, storage: str, server: Server, namespace: str | None = None,
                               node_selector: dict[str, str] | None = None,
                               tolerations: list[dict[str, Any]] | None = None,
                               resources: dict[str, dict[str, str]] | None = None,
                               min_replicas: int | None = None) -> dict[str, Any]:
    """A KServe serving.kserve.io/v1beta1 InferenceService for the layout: the model's format, the runtime
    that reads this layout, the Open Inference Protocol (v2), and where the pods go and what they get."""
    metadata = {"name": serving_name(name), **({"namespace": namespace} if namespace else {})}
    model = {"modelFormat": {"name": server.model_format}, "runtime": server.kserve_runtime,
             "protocolVersion": "v2", "storageUri": storage}
    if resources:
        model["resources"] = {kind: dict(values) for kind, values in resources.items() if values}
    predictor: dict[str, Any] = {"model": model}
    if node_selector:
        predictor["nodeSelector"] = dict(node_selector)
    if tolerations:
        predictor["tolerations"] = [dict(toleration) for toleration in tolerations]
    if min_replicas is not None:
        predictor["minReplicas"] = min_replicas
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def _readme(repository: ModelRepository, manifest: dict, variant: str, why: str, storage: str | None,
            output: str) -> str:
    name, server = repository.model_name, repository.server
    served = "the repository (serving/)" if server.storage_is_repository else f"the model's folder (serving/{name}/)"
    where = (f"`storageUri` is {storage}: {served} where this run stored it."
             if storage else
             f"This run's output ({output}) is a local folder, which no cluster can read: copy {served} to a bucket "
             f"or a claim and set `storageUri` in {MANIFEST_FILE} to it (s3://<bucket>/<path> or pvc://<claim>/<path>).")
    files = "\n".join(f"- `{path.relative_to(repository.root).as_posix()}`"
                      for path in [repository.config, *repository.files])
    return f"""# Serving {variant}

The variant **{variant}** as a model repository that Triton Inference Server and OpenVINO Model Server read
as it is, and a KServe InferenceService for it.{f" Why this variant: {why}." if why else ""}

{files}

Apply it where KServe runs (its `{server.kserve_runtime}` ClusterServingRuntime serves `{server.model_format}`):

    kubectl apply -f {MANIFEST_FILE}{'' if manifest['metadata'].get('namespace') else ' -n <namespace>'}
    kubectl get inferenceservice {manifest['metadata']['name']}

{where} Requests use the Open Inference Protocol: `POST /v2/models/{name}/infer`.

Without Kubernetes: `tritonserver --model-repository=serving` (Triton), or
`ovms --model_name {name} --model_path serving/{name}` (OpenVINO Model Server).
"""


def write_serving_layout(staging: Path, model_file: Path, variant: str, name: str, output: str,
                         namespace: str | None = None, node_selector: dict[str, str] | None = None,
                         tolerations: list[dict[str, Any]] | None = None,
                         resources: dict[str, dict[str, str]] | None = None, instance_count: int = 1,
                         max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, min_replicas: int | None = None,
                         device: str = "cpu", why: str = "") -> list[Path]:
    """The one entry point: <staging>/serving/ with the model repository of `model_file` (the variant's
    saved model), the InferenceService for where `output` (spec.output) stores it, and a README.
    Written beside it first and renamed when complete, so a failure leaves no serving/ at all.
    Returns the files written."""
    root = staging / SERVING_DIR
    if root.exists():
        raise ServingLayoutError(f"{root} exists already; the serving layout is written once, into a new folder")
    partial = staging / f".{SERVING_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model_name = serving_name(name)
        repository = write_model_repository(partial, model_name, model_file, instance_count, max_batch_size, device)
        storage = storage_uri(output, model_name, repository.server)
        manifest = inference_service_manifest(model_name, storage or LOCAL_STORAGE_URI.format(name=model_name),
                                              repository.server, namespace, node_selector, tolerations, resources,
                                              min_replicas)
        (partial / MANIFEST_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
        (partial / "README.md").write_text(_readme(repository, manifest, variant, why, storage, output))
        written = [repository.config, *repository.files, partial / MANIFEST_FILE, partial / "README.md"]
        partial.rename(root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return [root / path.relative_to(partial) for path in written]
