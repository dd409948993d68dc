"""Step 1, load: resolve `model.source` and turn it into something we can run and export."""

from __future__ import annotations

import hashlib
import importlib
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from optimizer.cache import cache_dir
from optimizer.errors import ModelLoadError
from optimizer.spec import InputSpec, ModelSpec


@dataclass
class LoadedModel:
    source: str
    format: str  # zoo | torchscript | exported-program | state-dict | onnx
    inputs: list[InputSpec]
    module: object | None = None  # torch.nn.Module (or ScriptModule); None for ONNX sources
    onnx_path: Path | None = None  # set for ONNX sources
    program: object | None = None  # torch.export.ExportedProgram, for exported-program sources
    default_data: str = "random"
    metric: str = "agreement"

    @property
    def is_eager(self) -> bool:
        """PyTorch quantization recipes need the model's Python class (an eager nn.Module)."""
        return self.format in ("zoo", "state-dict")


def _download(url: str, max_bytes: int) -> Path:
    """Fetch an https URL into the cache, refusing files over max_bytes while streaming."""
    target = cache_dir("downloads") / hashlib.sha256(url.encode()).hexdigest()[:32]
    if target.exists():
        return target
    partial = target.with_suffix(".partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise ModelLoadError(f"{url} is {declared / 1e6:.0f} MB, over model.maxSizeMB")
            received = 0
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > max_bytes:
                    raise ModelLoadError(f"{url} is over model.maxSizeMB; raise it to load this file")
                out.write(chunk)
        partial.replace(target)
    except OSError as error:
        raise ModelLoadError(f"cannot download {url}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_source(spec: ModelSpec, base_dir: Path) -> Path:
    """The local file behind model.source, checked against maxSizeMB and the sha256 pin."""
    max_bytes = spec.maxSizeMB * 1024 * 1024
    source = spec.source
    if source.startswith("https://"):
        path = _download(source, max_bytes)
    elif source.startswith("http://"):
        raise ModelLoadError("model.source: plain http is refused; use https:// or a local file")
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ModelLoadError(f"model.source: no file at {path}")
        if path.stat().st_size > max_bytes:
            raise ModelLoadError(f"model.source: {path} is larger than model.maxSizeMB ({spec.maxSizeMB})")
    if spec.sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise ModelLoadError(f"model.sha256 does not match: expected {spec.sha256}, file has {digest}")
    return path


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


def _check_onnx_files(spec: ModelSpec, path: Path) -> None:
    """External data must be beside the model and, with it, within maxSizeMB."""
    from optimizer import onnx_files

    try:
        size = onnx_files.total_size(path)
    except onnx_files.ExternalDataError as error:
        raise ModelLoadError(f"model.source: {error}") from None
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
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"model.entrypoint {entrypoint!r} cannot be imported: {error}") from None
    try:
        return target(**arguments)
    except TypeError as error:
        raise ModelLoadError(f"model.arguments do not fit {entrypoint}: {error}") from None


def _load_file(spec: ModelSpec, base_dir: Path) -> LoadedModel:
    import torch

    path = resolve_source(spec, base_dir)
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    loaded = LoadedModel(source=spec.source, format=fmt, inputs=list(spec.inputs or []))
    if fmt == "onnx":
        _check_onnx_files(spec, path)
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


def load_model(spec: ModelSpec, base_dir: Path) -> LoadedModel:
    if spec.source.startswith("zoo:"):
        return _load_zoo(spec)
    try:
        return _load_file(spec, base_dir)
    except ModelLoadError:
        raise
    except Exception as error:  # a corrupt archive, a TorchScript from a newer torch, ...
        raise ModelLoadError(f"cannot load {spec.source}: {type(error).__name__}: {error}") from None
