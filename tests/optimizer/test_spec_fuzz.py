"""Fuzzing the spec and storage URIs: thousands of mutated documents (wrong types, odd strings, path
tricks, huge numbers) end in a parsed spec or a SpecError whose every line names a field, never in
another exception; a URI ends in a Location inside its root or a StorageError naming the field.

A seeded mutation loop rather than hypothesis: the same examples every run (CI never meets a new
failure by chance), and thousands of them in about a second, where hypothesis spent ~5 ms of its own
per example here. A failure prints the mutations that caused it (at most four, so it reads as is).
"""

from __future__ import annotations

import copy
import random
import re

import pytest

from optimizer.api.spec_loader import SpecError, parse_spec
from optimizer.artifacts import storage

EXAMPLES = 4000

# A spec that sets nearly every field, so that every path below exists to be mutated.
BASE = {
    "apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
    "metadata": {"name": "fuzz", "namespace": "team"},
    "spec": {
        "model": {"source": "s3://models/resnet/model.onnx", "format": "auto", "sha256": "0" * 64, "maxSizeMB": 64,
                  "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32",
                              "dynamicAxes": {0: "batch"}, "valueRange": [0, 1]}]},
        "variants": [{"name": "int8", "recipe": "ort-int8-static", "calibration": "entropy", "perChannel": True,
                      "opTypes": ["Conv"], "excludeNodes": ["n1"], "qatSteps": 10, "qatLearningRate": 0.01}],
        "data": {"source": "pvc://data/calib.npz", "samples": 16, "maxSizeMB": 8},
        "benchmark": {"device": "cpu", "threads": 1, "warmup": 1, "runs": 5, "rounds": 1, "tune": False,
                      "scalingBatches": [1, 8], "scalingThreads": [1], "scalingRuns": 1, "profile": "auto"},
        "acceptance": {"metric": "agreement", "maxAccuracyDrop": 0.01, "maxRelativeAccuracyDrop": 0.02,
                       "fallback": True, "fallbackSeconds": 60},
        "export": {"opset": 18, "exporter": "auto", "tolerance": {"atol": 1e-4, "rtol": 1e-3},
                   "outputTolerances": {"logits": {"atol": 1e-3}}},
        "output": "s3://results/run/",
        "storage": {"secretRef": "creds", "endpoint": "https://minio:9000", "region": "eu-west-1",
                    "anonymous": False, "caBundle": {"name": "ca", "key": "ca.crt"}},
        "job": {"image": "mlopt/worker:1", "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                                         "limits": {"cpu": "2", "memory": "4Gi"}},
                "nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "k", "operator": "Exists"}],
                "activeDeadlineSeconds": 600, "backoffLimit": 0, "qos": "burstable", "queueName": "q",
                "imagePullSecrets": ["pull"], "priorityClassName": "high", "serviceAccountName": "sa"},
    },
}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


PATHS = [path for path in _paths(BASE) if path] + [("spec", "unknownField"), ("spec", "model", "entrypoint"),
                                                    ("spec", "model", "arguments"), ("spec", "job", "qos")]
DELETE = object()

SEGMENTS = ["..", ".", "", "etc", "passwd", "%2e%2e", "%2F", "a\x00b", "\n", "\x7f", "model.onnx", "calib.npz",
            "x/../..", "~", "\\..\\", "C:", "results.json", " ", "é", "?q=1", "#f", "@host", ":80", "zoo:crnn",
            "[::1", "Claim", "a" * 300]
SCHEMES = ["s3://", "pvc://", "https://", "http://", "file://", "", "zoo:", "S3://", "ftp://", "/", "../"]
SCALARS = [None, True, False, 0, 1, -1, 2**63, 2**64 + 1, 10**30, -10**30, 0.5, -0.0, 1e308, float("inf"),
           float("-inf"), float("nan"), "", " ", "\x00", "1e999", "1e-999", "9" * 400, "-1", "0x10", "NaN", "inf",
           "1Ei", "500m", "1.5", ".5", "random", "zoo:", "state-dict", "cuda", "guaranteed", "a" * 5000,
           "https://" + "a" * 5000, "m:M", "acme.models:torch.load", "a..b:C", "Bad_Name", "ort-int8-static"]
KEYS = ["0", "a", "name", "", "\n", "source", "1", 0, 3, -1]


def odd_text(rng: random.Random) -> str:
    """Any code points: control characters, surrogates, letters of every script."""
    return "".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0, 0x110000)]))
                   for _ in range(rng.randrange(0, 13)))


def uri_like(rng: random.Random) -> str:
    return rng.choice(SCHEMES) + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randrange(0, 6)))


def value(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(SCALARS)
    if kind == 1:
        return rng.choice([rng.randrange(-10, 10), rng.randrange(-2**70, 2**70)])
    if kind == 2:
        return odd_text(rng)
    if kind == 3:
        return uri_like(rng)
    if kind == 4:
        return [rng.choice(SCALARS) for _ in range(rng.randrange(4))]
    if kind == 5:
        return {rng.choice(KEYS): rng.choice(SCALARS) for _ in range(rng.randrange(4))}
    if kind == 6:
        return copy.deepcopy(rng.choice([BASE["spec"], BASE["spec"]["model"], [BASE["spec"]["variants"][0]] * 2]))
    return DELETE


def _at(path: tuple):
    node = BASE
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None  # a field BASE leaves out
    return node


def plausible(original, rng: random.Random):
    """A value of the original's type, often valid: most specs a user writes nearly parse."""
    if isinstance(original, bool):
        return rng.random() < 0.5
    if isinstance(original, int):
        return rng.randrange(-2, 200)
    if isinstance(original, float):
        return rng.choice([rng.random(), rng.uniform(-1, 2)])
    if isinstance(original, str):
        return rng.choice([uri_like(rng), original + rng.choice(SEGMENTS), original.upper(), original[:-1]])
    return value(rng)


def mutations(rng: random.Random) -> list[tuple[tuple, object]]:
    changes = []
    for _ in range(rng.randrange(1, 5)):
        path = rng.choice(PATHS)
        changes.append((path, plausible(_at(path), rng) if rng.random() < 0.5 else value(rng)))
    return changes


FIELD = re.compile(r"^(\(document\)|apiVersion|kind|metadata|spec|status)\b[^\n]*: ")


def _mutated(changes) -> dict:
    document = copy.deepcopy(BASE)
    for path, new in changes:
        parent = document
        try:
            for part in path[:-1]:
                parent = parent[part]
            if new is DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = new
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced a parent: nothing to change here
    return document


def test_a_mutated_spec_parses_or_every_problem_names_a_field():
    from mlopt_operator.job import build_job
    from mlopt_operator.settings import Settings

    rng, outcomes = random.Random(23), {"parsed": 0, "refused": 0}
    for _ in range(EXAMPLES):
        changes = mutations(rng)
        _check_document(changes, _mutated(changes), outcomes, build_job, Settings())
    # both ends are reached: the loop is no stream of refusals (nor of unchanged documents)
    assert min(outcomes.values()) > EXAMPLES // 20, outcomes


def _check_document(changes, document, outcomes, build_job, settings) -> None:
    try:
        spec = parse_spec(document)
    except SpecError as error:
        assert error.problems and all(FIELD.match(line) for line in error.problems), (changes, error.problems)
        outcomes["refused"] += 1
        return
    except Exception as error:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{changes} raised {type(error).__name__}: {error}") from error
    outcomes["parsed"] += 1
    # What parses is what the operator builds a Job from and what the storage layer accepts.
    assert build_job({**document, "metadata": {**document["metadata"], "uid": "u", "generation": 1}}, settings, spec)
    for uri, field in ((spec.spec.model.source, "model.source"), (spec.spec.data.source, "data.source")):
        if not uri.startswith("zoo:") and uri != "random":
            storage.parse(uri, field)
    storage.output_location(spec.spec.output)


@pytest.fixture(scope="module")
def claims(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    for name in ("claim", "data", "models"):
        (root / name).mkdir()
    return root


def test_a_uri_is_a_location_inside_its_root_or_a_message_naming_the_field(claims, monkeypatch):
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(claims))
    rng = random.Random(23)
    for _ in range(EXAMPLES):
        uri = rng.choice([uri_like, uri_like, odd_text, lambda r: str(value(r))])(rng)
        try:
            _check_uri(uri, claims)
        except AssertionError:
            raise
        except Exception as error:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{uri!r} raised {type(error).__name__}: {error}") from error


def _check_uri(uri: str, claims) -> None:
    from optimizer.api import uris

    for rule in (uris.model_source, uris.data_source, uris.output, uris.one_object):
        try:
            rule(uri)
        except uris.UriError as error:
            assert str(error), uri
    try:
        location = storage.parse(uri, "model.source")
    except storage.StorageError as error:
        assert str(error).startswith("model.source: ")
        return
    if location.scheme == "pvc":
        try:
            path = storage.pvc_path(location, "model.source")
        except storage.StorageError as error:
            assert str(error).startswith("model.source: ")
        else:
            assert path.resolve().is_relative_to((claims / location.container).resolve()), (uri, path)
    if location.scheme in ("s3", "pvc"):
        assert not location.key.startswith("/") and ".." not in location.key.split("/")
    try:
        one = uris.one_object(uri)
    except uris.UriError:
        return
    # a download is stored under this name: a plain file name, never a path
    assert one.name not in ("", ".", "..") and "/" not in one.name and "\x00" not in one.name
