"""Hugging Face `save_pretrained` folders: what makes one, why one is refused, and loading one safely.

A folder is config.json plus model.safetensors (or its shards with model.safetensors.index.json),
usually with tokenizer or image-processor files. The rules (transformers 5.x):
- the architecture comes from config.json through transformers' own classes, never from the
  folder's code: a config with `auto_map`, or a model_type or architecture transformers does not
  know, needs remote code (trust_remote_code) and is refused;
- weights only from safetensors: a pickle-only folder (pytorch_model.bin) is refused, never unpickled;
- local_files_only: nothing is fetched from the Hub.
The folder's config and tokenizer files travel with the optimized models (`carried_files`).

Inputs come from a small table per main input (Optimum's exporters keep one such config per family):
a text model takes input_ids / attention_mask / token_type_ids (as its forward and config have them),
an image model pixel_values; batch and sequence are dynamic. model.inputs overrides the table.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from optimizer.api.errors import InputMismatchError, ModelRefusedError
from optimizer.api.spec import InputSpec

CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".onnx", ".pkl")
# Config, tokenizer, image processor, generation and chat-template files: what a server needs beside the model.
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")
DEFAULT_SEQUENCE = 128  # tokens per example when model.inputs is not given (bounded by the position table)


def is_folder(path: Path) -> bool:
    """Whether `path` is a save_pretrained folder (a directory with config.json)."""
    return path.is_dir() and (path / CONFIG).is_file()


def _refuse(folder: Path, why: str) -> ModelRefusedError:
    return ModelRefusedError(f"model.source: {folder} is refused: {why}")


def wanted(name: str) -> bool:
    """The files of a folder the loader reads or carries: never a pickle, nor another format's weights."""
    return name.endswith(".safetensors") or (Path(name).suffix in CARRIED_SUFFIXES and name not in PICKLES)


def read_config(folder: Path, names: list[str] | None = None) -> dict:
    """config.json as data (no transformers yet), after the rules that need only the folder; `names`: every
    file the folder holds, when only the wanted ones were fetched (an s3:// prefix)."""
    if not folder.is_dir():
        raise _refuse(folder, "format huggingface needs a folder saved with save_pretrained (config.json, "
                              "model.safetensors); give the folder, or set model.format for a single model file")
    if not (folder / CONFIG).is_file():
        raise _refuse(folder, "the folder has no config.json, so it is not a Hugging Face save_pretrained folder; "
                              "save the model with model.save_pretrained(folder), or give one model file")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise _refuse(folder, f"config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _refuse(folder, "config.json is not a JSON object")
    if config.get("auto_map"):
        classes = ", ".join(sorted(str(v) for v in _flat(config["auto_map"])))[:200]
        raise _refuse(folder, f"config.json has auto_map ({classes}): the model needs its own Python code "
                              "(trust_remote_code), which mlopt never runs; use an architecture built into "
                              "transformers, or export the model to ONNX yourself and give the .onnx file")
    present = set(names) if names is not None else {path.name for path in folder.iterdir() if path.is_file()}
    if not present & set(SAFETENSORS):
        pickles = [name for name in PICKLES if name in present]
        if pickles:
            raise _refuse(folder, f"its weights are only a pickle ({pickles[0]}), which can run code when loaded; "
                                  "mlopt loads safetensors only: save the folder again with model.save_pretrained"
                                  "(folder) (safetensors is its default)")
        raise _refuse(folder, "the folder has no model.safetensors; save the weights with model.save_pretrained(folder)")
    return config


def _flat(value) -> list:
    if isinstance(value, dict):
        return [item for inner in value.values() for item in _flat(inner)]
    if isinstance(value, (list, tuple)):
        return [item for inner in value for item in _flat(inner)]
    return [value]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the model loads: the one file, or every shard its index names."""
    single = folder / SAFETENSORS[0]
    if single.is_file():
        return [single]
    index = json.loads((folder / SAFETENSORS[1]).read_text())
    shards = sorted({str(name) for name in (index.get("weight_map") or {}).values()})
    paths = [folder / name for name in shards]
    for name, path in zip(shards, paths):
        if "/" in name or "\\" in name or not path.is_file():
            raise _refuse(folder, f"model.safetensors.index.json names the shard {name!r}, which is not a file in "
                                  "the folder")
    return paths


def carried_files(folder: Path) -> list[Path]:
    """The folder's config, tokenizer and processor files (plain files, not links): they go beside the models."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.is_symlink() and path.suffix in CARRIED_SUFFIXES
                  and path.name not in (SAFETENSORS[1], PICKLES[1]) and not path.name.startswith("."))


def _architecture(folder: Path, config: dict):
    """The transformers class that config.json names; refused when transformers does not know it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise _refuse(folder, f"config.json's model_type {model_type!r} is not an architecture transformers "
                              f"{transformers.__version__} knows: it would need the folder's own code "
                              "(trust_remote_code), which mlopt never runs")
    architectures = config.get("architectures") or []
    if not architectures:
        return transformers.AutoModel  # a base model: its last hidden state is the output
    name = str(architectures[0])
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise _refuse(folder, f"config.json's architecture {name!r} is not a model class of transformers "
                              f"{transformers.__version__}: it would need the folder's own code (trust_remote_code), "
                              "which mlopt never runs")
    return cls


def load_model(folder: Path, config: dict):
    """The model in eval mode, built by transformers from config.json and the safetensors weights only."""
    cls = _architecture(folder, config)
    model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True,
                                attn_implementation="eager")  # plain ops: every exporter and quantizer sees them
    return model.eval()


def derived_inputs(model) -> list[InputSpec]:
    """The model's inputs from its forward signature and config (see the module's docstring)."""
    import inspect

    config = model.config
    accepted = inspect.signature(model.forward).parameters
    if model.main_input_name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        return [InputSpec(name="pixel_values", shape=[1, getattr(config, "num_channels", 3), size, size],
                          dynamicAxes={0: "batch"}, valueRange=[-1.0, 1.0])]
    if model.main_input_name != "input_ids":
        raise _refuse(Path(getattr(config, "_name_or_path", "") or "."),
                      f"its main input is {model.main_input_name!r}; mlopt derives inputs for text (input_ids) and "
                      "image (pixel_values) models: set model.inputs to the model's inputs")
    positions = getattr(config, "max_position_embeddings", None) or 2 * DEFAULT_SEQUENCE
    sequence = max(1, min(DEFAULT_SEQUENCE, positions // 2))  # the parity check doubles it
    axes = {0: "batch", 1: "sequence"}
    inputs = [InputSpec(name="input_ids", dtype="int64", shape=[1, sequence], dynamicAxes=axes,
                        valueRange=[0, config.vocab_size - 1])]
    if "attention_mask" in accepted:
        inputs.append(InputSpec(name="attention_mask", dtype="int64", shape=[1, sequence], dynamicAxes=axes,
                                valueRange=[1, 1]))  # unpadded examples
    if "token_type_ids" in accepted and getattr(config, "type_vocab_size", 0):
        inputs.append(InputSpec(name="token_type_ids", dtype="int64", shape=[1, sequence], dynamicAxes=axes,
                                valueRange=[0, 0]))  # one segment
    return inputs


MAX_INPUTS = 6


@functools.cache
def _forward_class(count: int):
    """A module whose forward takes exactly `count` positional tensors: torch.export matches dynamic_shapes to
    the forward's parameters, which a `*tensors` signature would hide."""
    import torch

    class HuggingFaceForward(torch.nn.Module):
        """The model called with its inputs by name (positional tensors, in model.inputs' order), giving its
        first output as a tensor: the logits, or the last hidden state of a base model. No KV cache."""

        def __init__(self, model, names: list[str]):
            super().__init__()
            self.model, self.names = model, tuple(names)
            self.extra = {"use_cache": False} if "use_cache" in _parameters(model) else {}

        def run(self, tensors):
            outputs = self.model(**dict(zip(self.names, tensors)), **self.extra, return_dict=True)
            logits = getattr(outputs, "logits", None)
            return logits if logits is not None else outputs[0]

    forwards = {
        1: lambda self, a: self.run((a,)),
        2: lambda self, a, b: self.run((a, b)),
        3: lambda self, a, b, c: self.run((a, b, c)),
        4: lambda self, a, b, c, d: self.run((a, b, c, d)),
        5: lambda self, a, b, c, d, e: self.run((a, b, c, d, e)),
        6: lambda self, a, b, c, d, e, f: self.run((a, b, c, d, e, f)),
    }
    return type(f"HuggingFaceForward{count}", (HuggingFaceForward,), {"forward": forwards[count]})


def _parameters(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def forward_module(model, inputs: list[InputSpec]):
    """A torch.nn.Module the pipeline runs like any other: positional inputs, one output."""
    unknown = [spec.name for spec in inputs if spec.name not in _parameters(model)]
    if unknown:
        raise InputMismatchError(
            f"spec.model.inputs: {', '.join(unknown)} is not an input of {type(model).__name__}; its forward takes "
            f"{', '.join(sorted(_parameters(model) & {'input_ids', 'attention_mask', 'token_type_ids', 'pixel_values', 'position_ids', 'inputs_embeds'}))}")
    if len(inputs) > MAX_INPUTS:
        raise InputMismatchError(f"spec.model.inputs: {len(inputs)} inputs; a Hugging Face model takes at most "
                                 f"{MAX_INPUTS} here: list the ones the model needs")
    return _forward_class(len(inputs))(model, [spec.name for spec in inputs]).eval()
