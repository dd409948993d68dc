"""Model loading: every supported format, and refusal of anything that would run code."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from optimizer.api.errors import OptimizationError
from optimizer.steps.load import ModelLoadError, detect_format, load_model
from optimizer.api.spec import ModelSpec

from .conftest import save_user_model

INPUTS = [{"name": "image", "shape": [1, 1, 8, 16]}]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create a file: proof that code ran


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"weight": _RunsCode(str(marker))}, handle)
    spec = ModelSpec(source=str(path), entrypoint="user_models:ConvLstm", inputs=INPUTS)
    save_user_model(tmp_path, "ConvLstm")
    with pytest.raises(ModelLoadError) as caught:
        load_model(spec, tmp_path)
    assert "weights_only=True" in str(caught.value)
    assert not marker.exists()


def test_pickled_whole_module_is_refused(tmp_path):
    save_user_model(tmp_path, "ConvLstm")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # torch.save(model), not model.state_dict()
    spec = ModelSpec(source="whole.pt", entrypoint="user_models:ConvLstm", inputs=INPUTS)
    with pytest.raises(ModelLoadError, match="state_dict"):
        load_model(spec, tmp_path)


def test_state_dict_with_entrypoint_and_sha256_pin(tmp_path):
    weights = save_user_model(tmp_path, "ConvLstm")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = load_model(ModelSpec(source=weights.name, entrypoint="user_models:ConvLstm", inputs=INPUTS, sha256=digest), tmp_path)
    assert loaded.format == "state-dict" and loaded.is_eager and not loaded.module.training
    with pytest.raises(OptimizationError, match="model.sha256 does not match"):
        load_model(ModelSpec(source=weights.name, entrypoint="user_models:ConvLstm", inputs=INPUTS, sha256="0" * 64), tmp_path)


def test_safetensors_torchscript_and_exported_program(tmp_path):
    from safetensors.torch import save_file

    weights = save_user_model(tmp_path, "ConvLstm")
    state = torch.load(weights, weights_only=True)
    save_file(state, tmp_path / "w.safetensors")
    loaded = load_model(ModelSpec(source="w.safetensors", entrypoint="user_models:ConvLstm", inputs=INPUTS), tmp_path)
    module = loaded.module
    example = torch.rand(1, 1, 8, 16)
    torch.jit.save(torch.jit.trace(module, example), tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(module, (example,)), tmp_path / "exported.pt2")
    assert detect_format(tmp_path / "scripted.pt") == "torchscript"
    assert detect_format(tmp_path / "exported.pt2") == "exported-program"
    assert detect_format(weights) == "state-dict"
    expected = module(example)
    for name, fmt in (("scripted.pt", "torchscript"), ("exported.pt2", "exported-program")):
        other = load_model(ModelSpec(source=name, inputs=INPUTS), tmp_path)
        assert other.format == fmt and not other.is_eager
        torch.testing.assert_close(other.module(example), expected)


@pytest.mark.parametrize("spec, words", [
    (dict(source="missing.pt", entrypoint="user_models:ConvLstm"), "no file at"),
    (dict(source="convlstm.pt"), "set model.entrypoint"),
    (dict(source="convlstm.pt", entrypoint="no_such_module:Net"), "cannot be imported"),
    (dict(source="convlstm.pt", entrypoint="user_models:ConvLstm", arguments={"colours": 3}), "model.arguments"),
    (dict(source="convlstm.pt", entrypoint="user_models:ShapeBaker"), "do not fit"),
])
def test_load_errors_say_what_to_do(tmp_path, spec, words):
    save_user_model(tmp_path, "ConvLstm")
    with pytest.raises(OptimizationError, match=words):  # ModelLoadError, or StorageError for the file itself
        load_model(ModelSpec(inputs=INPUTS, **spec), tmp_path)


def test_size_limit(tmp_path):
    weights = save_user_model(tmp_path, "ConvLstm")
    with weights.open("ab") as handle:
        handle.write(b"\0" * (1024 * 1024 + 1))
    with pytest.raises(OptimizationError, match="maxSizeMB"):
        load_model(ModelSpec(source=weights.name, entrypoint="user_models:ConvLstm", inputs=INPUTS, maxSizeMB=1), tmp_path)


@pytest.mark.parametrize("entrypoint", ["acme.models:torch.load", "user_models:ConvLstm.__init__", "a..b:C",
                                        "acme.:Net", "user_models:", ":Net", "user_models:Conv-Lstm"])
def test_an_entrypoint_names_one_attribute_of_a_module(entrypoint):
    """A dotted attribute let a policy pattern such as acme.*:* admit acme.models:torch.load."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="package.module:Class"):
        ModelSpec(source="convlstm.pt", entrypoint=entrypoint, inputs=INPUTS)


ACME = '''
import functools
import os

import torch
from torch import load
from user_models import ConvLstm as Reexported
from user_models import ConvLstm


def build(classes: int = 6):
    return ConvLstm(classes=classes)


class Own(ConvLstm):
    pass


Alias = Own
partial_net = functools.partial(ConvLstm, classes=6)
'''


@pytest.mark.parametrize("name, words", [
    ("load", "is torch.serialization:load"),  # a re-exported function
    ("Reexported", "is user_models:ConvLstm"),  # a re-exported class
    ("torch", "is a module"),
    ("os", "is a module"),
    ("Alias", "is acme_models:Own"),  # another name for a class defined here: name the class itself
    ("partial_net", "is a partial"),
])
def test_an_entrypoint_must_be_defined_in_its_module_and_nothing_else_runs(tmp_path, name, words):
    """acme_models:load is torch.load: with arguments {f: …, weights_only: false} it unpickled (ran) the
    user's file. Only a class or function defined in the module, under its own name, is called."""
    save_user_model(tmp_path, "ConvLstm")
    (tmp_path / "acme_models.py").write_text(ACME)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    with evil.open("wb") as handle:
        pickle.dump(_RunsCode(str(marker)), handle)
    arguments = {"f": str(evil), "weights_only": False} if name == "load" else {}
    spec = ModelSpec(source="convlstm.pt", entrypoint=f"acme_models:{name}", arguments=arguments, inputs=INPUTS)
    try:
        with pytest.raises(ModelLoadError, match="not a class or function defined in acme_models") as caught:
            load_model(spec, tmp_path)
        assert words in str(caught.value), caught.value
        assert not marker.exists()  # nothing was called
    finally:
        import sys

        sys.modules.pop("acme_models", None)


@pytest.mark.parametrize("name", ["Own", "build"])
def test_a_class_or_function_defined_in_the_module_builds_the_model(tmp_path, name):
    import sys

    save_user_model(tmp_path, "ConvLstm")
    (tmp_path / "acme_models.py").write_text(ACME)
    try:
        loaded = load_model(ModelSpec(source="convlstm.pt", entrypoint=f"acme_models:{name}", inputs=INPUTS), tmp_path)
    finally:
        sys.modules.pop("acme_models", None)
    assert loaded.format == "state-dict" and not loaded.module.training
