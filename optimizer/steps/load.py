"""The load step: resolve `model.source` and turn it into something we can run and export."""

from __future__ import annotations

import importlib
import inspect
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.api.errors import InputMismatchError, ModelLoadError, ModelRefusedError, OptimizationError
from optimizer.api.spec import DetectionSpec, InputSpec, ModelSpec
from optimizer.steps.run import Run


@dataclass
class LoadedModel:
    source: str
    format: str  # zoo | torchscript | exported-program | state-dict | onnx | huggingface
    inputs: list[InputSpec]
    module: object | None = None  # torch.nn.Module (or ScriptModule); None for ONNX sources
    onnx_path: Path | None = None  # set for ONNX sources
    program: object | None = None  # torch.export.ExportedProgram, for exported-program sources
    default_data: str = "random"
    metric: str = "agreement"
    detection: DetectionSpec | None = None  # model.detection, or the zoo detector's own
    default_samples: int | None = None  # the zoo model's data.samples when the spec sets none
    carried_files: list[Path] = field(default_factory=list)  # a Hugging Face folder's config and tokenizer files

    @property
    def is_eager(self) -> bool:
        """PyTorch quantization recipes need the model's Python class (an eager nn.Module)."""
        return self.format in ("zoo", "state-dict", "huggingface")


def resolve_source(spec: ModelSpec, base_dir: Path, storage=None, budget=None) -> Path:
    """The local file behind model.source (downloaded if remote), checked against maxSizeMB (the
    model's `budget`, which its external data share) and the pin."""
    from optimizer.artifacts.storage import StorageError, fetch

    try:
        return fetch(spec.source, "model.source", base_dir, max_bytes=spec.maxSizeMB * 1024 * 1024,
                     sha256=spec.sha256, pin_field="model.sha256", storage=storage, budget=budget)
    except StorageError as error:  # status.reason ModelLoadFailed: the message already names the field
        raise ModelLoadError(str(error)) from None


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "exported-program"
    if suffix == ".safetensors":
        return "state-dict"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in name for name in names):
            return "torchscript"
        if any(name.endswith("archive_format") for name in names):
            return "exported-program"
    return "state-dict"


def _check_onnx_files(spec: ModelSpec, path: Path, budget, storage=None) -> None:
    """External data must be beside the model and, with it, within maxSizeMB. A remote model's data
    files are fetched from beside it, once their names are known to stay inside its folder, all
    within the model's download `budget`."""
    from optimizer.artifacts import onnx_files, storage as stores

    try:
        if stores.is_remote(spec.source):
            names = onnx_files.external_locations(path)
            onnx_files.check_locations(path, names)
            stores.fetch_beside(spec.source, names, "model.source", path, budget=budget, storage=storage)
        size = onnx_files.total_size(path)
    except onnx_files.ExternalDataError as error:
        raise ModelLoadError(f"model.source: {error}") from None
    except stores.StorageError as error:
        raise ModelLoadError(str(error)) from None
    if size > spec.maxSizeMB * 1024 * 1024:
        raise ModelLoadError(f"model.source: {path.name} and its external data are {size / 1e6:.0f} MB, over "
                             f"model.maxSizeMB ({spec.maxSizeMB}); raise it to load this model")


def _load_zoo(spec: ModelSpec) -> LoadedModel:
    from optimizer.zoo import get_zoo_model

    name = spec.source.removeprefix("zoo:")
    try:
        entry = get_zoo_model(name)
    except KeyError as error:
        raise ModelLoadError(f"model.source: {error.args[0]}") from None
    return LoadedModel(
        source=spec.source,
        format="zoo",
        inputs=list(spec.inputs or entry.inputs),
        module=entry.build(),
        default_data=entry.data,
        metric=entry.metric,
        detection=spec.detection or entry.detection,
        default_samples=entry.samples,
    )


def _read_state_dict(path: Path) -> dict:
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only=True: a checkpoint is data; never let it run code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError and friends
        raise ModelLoadError(
            f"refused to load {path.name}: it is not a plain state_dict that "
            f"torch.load(weights_only=True) accepts ({str(error).splitlines()[0][:200]}). "
            "Save model.state_dict() with torch.save or safetensors, or export with torch.export.save."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # common checkpoint layout: {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name} holds a {type(state).__name__}, not a state_dict")
    return state


def _build_entrypoint(entrypoint: str, arguments: dict, base_dir: Path):
    module_name, _, attribute = entrypoint.partition(":")
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))  # user code usually sits beside the spec
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"model.entrypoint {entrypoint!r} cannot be imported: {error}") from None
    # Only a class or function defined in that very module, under that name: the entrypoint string is
    # then the object's real module and qualified name, which is what the cluster policy's
    # allowedEntrypoints patterns match (acme.models:load must not be torch.load imported there).
    defined_here = inspect.isclass(target) or inspect.isfunction(target)
    if not defined_here or target.__module__ != module_name or target.__qualname__ != attribute:
        real = (f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', '?')}" if defined_here
                else f"a {type(target).__name__}")
        raise ModelLoadError(
            f"model.entrypoint {entrypoint!r} is {real}, not a class or function defined in {module_name} as "
            f"{attribute}; name the class that builds the network where it is defined (module:Class)")
    try:
        return target(**arguments)
    except TypeError as error:
        raise ModelLoadError(f"model.arguments do not fit {entrypoint}: {error}") from None


def _huggingface_folder(spec: ModelSpec, base_dir: Path, storage, budget) -> tuple[Path, list[str] | None] | None:
    """The save_pretrained folder model.source names (a local or pvc:// folder, or an s3:// prefix fetched
    into the cache), with the names an s3:// prefix listed; None for a single model file."""
    from optimizer.api.spec import may_be_folder
    from optimizer.artifacts import huggingface
    from optimizer.artifacts.storage import StorageError, fetch_folder, local_path

    declared = spec.format == "huggingface"
    if spec.format not in ("auto", "huggingface") or not (declared or may_be_folder(spec.source)):
        return None
    try:
        if spec.source.startswith("s3://"):
            fetched = fetch_folder(spec.source, "model.source", huggingface.wanted, budget=budget, storage=storage,
                                   marker=None if declared else huggingface.CONFIG)
            if fetched is not None:
                return fetched
            if declared:
                raise ModelRefusedError(f"model.source: no object under {spec.source}/, so it is no save_pretrained "
                                        "folder; upload the folder's files there (config.json, model.safetensors)")
            return None
        path = local_path(spec.source, "model.source", base_dir)
    except StorageError as error:
        raise ModelLoadError(str(error)) from None
    return (path, None) if declared or huggingface.is_folder(path) else None


def _pin(spec: ModelSpec, weights: Path) -> None:
    """model.sha256 against a folder's model.safetensors."""
    from optimizer.artifacts.storage import StorageError, fetch

    try:
        fetch(str(weights), "model.source", weights.parent, max_bytes=spec.maxSizeMB * 1024 * 1024,
              sha256=spec.sha256, pin_field="model.sha256")
    except StorageError as error:
        raise ModelLoadError(str(error)) from None


def _load_huggingface(spec: ModelSpec, folder: Path, names: list[str] | None, budget) -> LoadedModel:
    """A save_pretrained folder: refused before transformers runs when it needs remote code or holds only
    pickles; then built from config.json with its safetensors weights. `names`: an s3:// prefix's listing
    (its wanted files were fetched within `budget`)."""
    from optimizer.artifacts import huggingface

    config = huggingface.read_config(folder, names)
    weights, carried = huggingface.weight_files(folder), huggingface.carried_files(folder)
    if names is None:  # a local folder: counted here; a fetched one was counted on the way in
        for path in [*weights, *carried]:
            budget.take(path.stat().st_size, str(path))
    if spec.sha256:
        if len(weights) != 1:
            raise ModelRefusedError(f"model.sha256 pins one file, but {folder} keeps its weights in {len(weights)} "
                                    "shards; remove model.sha256")
        _pin(spec, weights[0])
    model = huggingface.load_model(folder, config)
    inputs = list(spec.inputs or huggingface.derived_inputs(model))
    return LoadedModel(source=spec.source, format="huggingface", inputs=inputs, detection=spec.detection,
                       module=huggingface.forward_module(model, inputs), carried_files=carried)


def _load_file(spec: ModelSpec, base_dir: Path, storage=None) -> LoadedModel:
    import torch

    from optimizer.artifacts.storage import Budget

    budget = Budget(spec.maxSizeMB * 1024 * 1024, "model.source")  # the model and its external data together
    folder = _huggingface_folder(spec, base_dir, storage, budget)
    if folder is not None:
        return _load_huggingface(spec, *folder, budget)
    path = resolve_source(spec, base_dir, storage, budget)
    if not spec.inputs:  # the spec let it through as a possible folder (spec.may_be_folder)
        raise InputMismatchError(
            f"spec.model.inputs: {spec.source} is one model file, not a Hugging Face folder, so mlopt cannot tell "
            "its inputs: set model.inputs, e.g. [{name: image, shape: [1, 3, 224, 224]}]")
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    loaded = LoadedModel(source=spec.source, format=fmt, inputs=list(spec.inputs or []), detection=spec.detection)
    if fmt == "onnx":
        _check_onnx_files(spec, path, budget, storage)
        loaded.onnx_path = path
    elif fmt == "torchscript":
        loaded.module = torch.jit.load(str(path), map_location="cpu").eval()
    elif fmt == "exported-program":
        loaded.program = torch.export.load(str(path))
        loaded.module = loaded.program.module()
    else:
        if not spec.entrypoint:
            raise ModelLoadError(
                f"{path.name} is a state_dict: set model.entrypoint to the class that builds the "
                "network (package.module:Class)"
            )
        module = _build_entrypoint(spec.entrypoint, spec.arguments, base_dir)
        try:
            module.load_state_dict(_read_state_dict(path))
        except RuntimeError as error:
            raise ModelLoadError(
                f"the weights in {path.name} do not fit {spec.entrypoint}: {str(error)[:500]}"
            ) from None
        loaded.module = module.eval()
    return loaded


def load_model(spec: ModelSpec, base_dir: Path, storage=None) -> LoadedModel:
    """storage: spec.storage, for s3:// sources."""
    if spec.source.startswith("zoo:"):
        return _load_zoo(spec)
    try:
        return _load_file(spec, base_dir, storage)
    except OptimizationError:  # ModelLoadError, StorageError: they already name the field
        raise
    except Exception as error:  # a corrupt archive, a TorchScript from a newer torch, ...
        raise ModelLoadError(f"cannot load {spec.source}: {type(error).__name__}: {error}") from None


def load_step(run: Run) -> None:
    run.loaded = load_model(run.spec.spec.model, run.base_dir, run.spec.spec.storage)
