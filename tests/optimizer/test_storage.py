"""Models and data in from S3, results out to S3, against a real S3 server (versitygw on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import yaml

from .conftest import write_spec
from .test_cli import MLOPT
from .test_model_matrix import ARCHITECTURES, QUICK
from .test_user_models import _onnx_with_external_data

INPUTS = ARCHITECTURES["conv-bn-relu"][1]
VARIANTS = [{"name": r, "recipe": r} for r in ("onnx-fp32", "ort-int8-static")]


def upload(server, bucket: str, key: str, path) -> str:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, config={"endpoint": server.endpoint, "virtual_hosted_style_request": False,
                                    "region": "us-east-1", "access_key_id": server.credentials()["AWS_ACCESS_KEY_ID"],
                                    "secret_access_key": server.credentials()["AWS_SECRET_ACCESS_KEY"]},
                    client_options={"allow_http": True})
    obstore.put(store, key, path)
    return f"s3://{bucket}/{key}"


def run_cli(tmp_path, spec, *extra, secret=None, server=None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if server:
        env.update(server.credentials(**({"secret": secret} if secret else {})))
    return subprocess.run([MLOPT, "optimize", str(spec), "--quiet", *extra], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=env)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_and_data(tmp_path, s3_server):
    """An ONNX model with external data and an .npz, locally and in the bucket `inputs`."""
    model = _onnx_with_external_data(tmp_path, one_file=True)
    rng = np.random.default_rng(3)
    data = tmp_path / "calib.npz"
    np.savez(data, image=rng.random((8, 3, 16, 16), dtype=np.float32))
    bucket = s3_server.bucket("inputs")
    prefix = f"{tmp_path.name}/"
    model_uri = upload(s3_server, bucket, prefix + "model/model.onnx", model)
    upload(s3_server, bucket, prefix + "model/model.onnx.data", model.parent / "model.onnx.data")
    data_uri = upload(s3_server, bucket, prefix + "calib.npz", data)
    return {"local": (model, data), "s3": (model_uri, data_uri)}


def _spec(tmp_path, server, model, data, output, name="spec.yaml", **model_extra):
    return write_spec(tmp_path, {"model": {"source": str(model), "inputs": INPUTS, **model_extra},
                                 "variants": VARIANTS, "data": {"source": str(data), "samples": 8},
                                 "benchmark": QUICK, "acceptance": {"maxAccuracyDrop": 0.5}, "output": output,
                                 "storage": {"endpoint": server.endpoint}}, name)


@pytest.mark.slow  # the whole pipeline
def test_s3_in_and_out_gives_the_local_results_and_verifiable_objects(tmp_path, s3_server, model_and_data):
    out_bucket = s3_server.bucket("results")
    local = _spec(tmp_path, s3_server, *model_and_data["local"], str(tmp_path / "local-out"), "local.yaml")
    remote = _spec(tmp_path, s3_server, *model_and_data["s3"], f"s3://{out_bucket}/{tmp_path.name}/run/", "s3.yaml")
    for spec in (local, remote):
        done = run_cli(tmp_path, spec, server=s3_server)
        assert done.returncode == 0, done.stderr

    stored = {key.removeprefix(f"{tmp_path.name}/run/"): path for key, path in s3_server.objects(out_bucket).items()
              if key.startswith(f"{tmp_path.name}/run/")}
    from_s3 = json.loads(stored["results.json"].read_text())
    from_local = json.loads((tmp_path / "local-out" / "results.json").read_text())

    def comparable(results):
        return [(v["name"], v["status"], v["sizeBytes"], round(v["fidelity"]["maxAbsDiff"], 6))
                for v in [results["baseline"], *results["variants"]]]

    assert comparable(from_s3) == comparable(from_local)  # same model, data and variants, wherever they lived
    assert from_s3["dataset"] == from_local["dataset"]
    assert from_s3["baseline"]["sizeBytes"] > (tmp_path / "ext" / "model.onnx").stat().st_size  # data fetched too
    listed = {o["path"]: o for o in from_s3["outputs"]}
    assert set(listed) == set(stored) - {"results.json"}
    for path, record in listed.items():  # every uploaded object is what results.json says it is
        assert _sha256(stored[path]) == record["sha256"] and stored[path].stat().st_size == record["sizeBytes"]
    assert "models/ort-int8-static.onnx.data" in listed  # external data travels with its model
    # The serving layout is stored with the run, and its InferenceService points at it (KServe's s3:// form).
    served = yaml.safe_load(stored["serving/inferenceservice.yaml"].read_text())["spec"]["predictor"]["model"]
    assert served["storageUri"] == f"s3://{out_bucket}/{tmp_path.name}/run/serving"
    version = sorted(path.removeprefix("serving/test/1/") for path in listed if path.startswith("serving/test/1/"))
    assert version[0] == "model.onnx" and version[1:] and all(name.endswith(".data") for name in version[1:])
    assert "serving/test/config.pbtxt" in listed


@pytest.mark.parametrize("case", ["wrong-secret", "missing-object", "pin-mismatch", "over-max-size"])
def test_s3_input_problems_exit_non_zero_name_the_field_and_write_nothing(tmp_path, s3_server, model_and_data, case):
    out_bucket = s3_server.bucket("results")
    model_uri, data_uri = model_and_data["s3"]
    extra, secret, phrases = {}, None, []
    if case == "wrong-secret":
        secret, phrases = "not-the-secret", ["model.source", "access to", "refused (HTTP 403 Forbidden)",
                                             "spec.storage.secretRef"]
    elif case == "missing-object":
        model_uri, phrases = model_uri.replace("model.onnx", "nope.onnx"), ["model.source", "no object at", "nope.onnx"]
    elif case == "pin-mismatch":
        extra, phrases = {"sha256": "0" * 64}, ["model.sha256 does not match", model_uri]
    else:
        extra, phrases = {"maxSizeMB": 1}, ["model.source", "maxSizeMB"]
        big = tmp_path / "big.onnx"
        big.write_bytes(b"\0" * (1024 * 1024 + 10))
        model_uri = upload(s3_server, "inputs", f"{tmp_path.name}/big.onnx", big)
    # With the wrong secret an s3:// output is refused first (test_an_s3_output_that_cannot_be_written_…):
    # a local output lets the input's own message show.
    output = str(tmp_path / "out") if case == "wrong-secret" else f"s3://{out_bucket}/{tmp_path.name}/{case}/"
    spec = _spec(tmp_path, s3_server, model_uri, data_uri, output, **extra)
    done = run_cli(tmp_path, spec, secret=secret, server=s3_server)
    assert done.returncode != 0
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not [k for k in s3_server.objects(out_bucket) if k.startswith(f"{tmp_path.name}/{case}/")]
    assert not (tmp_path / "out").exists()


def test_s3_data_pin_and_output_must_be_a_prefix(tmp_path, s3_server, model_and_data):
    model, data = model_and_data["local"]
    spec = write_spec(tmp_path, {"model": {"source": str(model), "inputs": INPUTS}, "variants": VARIANTS,
                                 "data": {"source": model_and_data["s3"][1], "sha256": "1" * 64},
                                 "benchmark": QUICK, "output": str(tmp_path / "o"),
                                 "storage": {"endpoint": s3_server.endpoint}})
    done = run_cli(tmp_path, spec, server=s3_server)
    assert done.returncode == 1 and "data.sha256 does not match" in done.stderr
    spec = _spec(tmp_path, s3_server, model, data, "s3://results/no-slash")
    done = run_cli(tmp_path, spec, server=s3_server)  # an invalid spec: refused before any work
    assert done.returncode == 2 and "spec.output: must end with '/'" in done.stderr, done.stderr


def test_pvc_uris_on_a_laptop_are_refused_or_mapped(tmp_path, s3_server, model_and_data, monkeypatch):
    model, data = model_and_data["local"]
    spec = _spec(tmp_path, s3_server, "pvc://models/ext/model.onnx", data, str(tmp_path / "o"))
    done = run_cli(tmp_path, spec)
    assert done.returncode == 1
    assert "model.source: pvc://models/ext/model.onnx names a PersistentVolumeClaim" in done.stderr
    assert "MLOPT_PVC_ROOT" in done.stderr

    from optimizer.artifacts.storage import fetch

    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "models").symlink_to(tmp_path)  # the claim "models" as the operator mounts it
    monkeypatch.setenv("MLOPT_PVC_ROOT", str(tmp_path / "claims"))
    assert fetch("pvc://models/ext/model.onnx", "model.source", tmp_path, max_bytes=2**30).samefile(model)


def test_a_failing_upload_is_retried_with_backoff_then_fails_naming_the_output(tmp_path, s3_server, monkeypatch):
    from optimizer.artifacts import storage

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "m.onnx").write_bytes(b"model")
    (run / "results.json").write_text("{}")
    delays = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)  # the waits, not the requests, are skipped
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.credentials()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.credentials()["AWS_SECRET_ACCESS_KEY"])
    settings = type("Storage", (), {"endpoint": s3_server.endpoint, "region": None, "anonymous": False})()
    with pytest.raises(storage.StorageError) as caught:
        storage.deliver(run, "s3://no-such-bucket/run/", settings)
    message = str(caught.value)
    assert message.startswith("spec.output: ") and f"{storage.UPLOAD_ATTEMPTS} times" in message, message
    assert "the bucket of s3://no-such-bucket/run/ does not exist" in message, message
    assert delays == sorted(delays) and len(delays) == storage.UPLOAD_ATTEMPTS - 1 and delays[0] > 0

    bucket = s3_server.bucket("delivered")
    uri = storage.deliver(run, f"s3://{bucket}/{tmp_path.name}/", settings)
    assert uri == f"s3://{bucket}/{tmp_path.name}/results.json"
    stored = s3_server.objects(bucket)
    assert stored[f"{tmp_path.name}/models/m.onnx"].read_bytes() == b"model"
    # results.json went up last: its modification time is the newest
    times = {k: p.stat().st_mtime_ns for k, p in stored.items() if k.startswith(tmp_path.name)}
    assert times[f"{tmp_path.name}/results.json"] >= max(times.values())


def test_an_upload_that_fails_over_an_earlier_run_leaves_no_results_json(tmp_path, s3_server, monkeypatch):
    """The earlier run's results.json would vouch for models this upload has half overwritten."""
    import obstore

    from optimizer.artifacts import storage

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "m.onnx").write_bytes(b"first model")
    (run / "results.json").write_text("{}")
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.credentials()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.credentials()["AWS_SECRET_ACCESS_KEY"])
    settings = type("Storage", (), {"endpoint": s3_server.endpoint, "region": None, "anonymous": False})()
    bucket, prefix = s3_server.bucket("rerun"), f"{tmp_path.name}/"
    storage.deliver(run, f"s3://{bucket}/{prefix}", settings)
    assert prefix + "results.json" in s3_server.objects(bucket)

    real_put = obstore.put

    def put_failing_on_results_json(store, key, *args, **kwargs):  # the network drops at the end
        if key.endswith("results.json"):
            raise OSError("connection reset by peer")
        return real_put(store, key, *args, **kwargs)

    (run / "models" / "m.onnx").write_bytes(b"second model")
    monkeypatch.setattr(obstore, "put", put_failing_on_results_json)
    with pytest.raises(storage.StorageError, match="uploading results.json"):
        storage.deliver(run, f"s3://{bucket}/{prefix}", settings)
    stored = s3_server.objects(bucket)
    assert stored[prefix + "models/m.onnx"].read_bytes() == b"second model"
    assert prefix + "results.json" not in stored


def _previous_run(folder, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "results.json").write_text(json.dumps({"outputs": [{"path": name} for name in files]}))


def test_a_rerun_into_a_folder_replaces_its_own_files_and_keeps_the_users(tmp_path):
    from optimizer.artifacts.storage import publish

    output = tmp_path / "out"
    _previous_run(output, {"models/dropped.onnx": "old", "models/kept.onnx": "old", "report.md": "old"})
    (output / "models" / "my-notes.txt").write_text("mine")  # the user's, in a folder mlopt also writes
    (output / "train.py").write_text("mine")
    (tmp_path / "outside.txt").write_text("not mlopt's")
    listed = json.loads((output / "results.json").read_text())
    listed["outputs"].append({"path": "../outside.txt"})  # a results.json must not reach outside its folder
    (output / "results.json").write_text(json.dumps(listed))
    staging = output / ".mlopt-partial-test"
    _previous_run(staging, {"models/kept.onnx": "new", "models/added.onnx": "new", "report.md": "new"})
    (staging / "results.json").unlink()

    publish(staging, output)
    assert not (output / "results.json").exists()  # the caller writes the new one last
    assert not (output / "models" / "dropped.onnx").exists()
    assert {p.name: p.read_text() for p in (output / "models").iterdir()} == {
        "kept.onnx": "new", "added.onnx": "new", "my-notes.txt": "mine"}
    assert (output / "report.md").read_text() == "new" and (output / "train.py").read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "not mlopt's"


@pytest.fixture
def https(tmp_path, monkeypatch):
    """A real https server on 127.0.0.1 (a throw-away CA, trusted through SSL_CERT_FILE as AWS_CA_BUNDLE
    would be) serving the files under `https.root`; `https.routes[path]` answers a path itself, and
    `https.requested` lists every path asked for (query strings included)."""
    import http.server
    import ssl
    import threading
    from types import SimpleNamespace

    from tests.e2e.control_plane import make_pki

    state = SimpleNamespace(root=tmp_path / "www", routes={}, requested=[])
    state.root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(state.root), **kwargs)

        def do_GET(self):  # noqa: N802 (the stdlib's name)
            state.requested.append(self.path)
            route = state.routes.get(self.path.split("?")[0])
            return route(self) if route else super().do_GET()

        def log_message(self, *args):
            pass

    pki = make_pki(tmp_path)  # a throw-away CA and a serving certificate for 127.0.0.1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    state.base = f"https://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()


def _answer(handler, status: int, headers: dict, body: bytes = b"") -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def test_https_downloads_follow_https_redirects_but_never_to_plain_http(tmp_path, https):
    from optimizer.artifacts.storage import StorageError, fetch
    from tests.e2e.control_plane import free_port

    (https.root / "model.bin").write_bytes(b"weights" * 100)
    https.routes["/to-https"] = lambda h: _answer(h, 302, {"Location": f"{https.base}/model.bin"})
    https.routes["/to-http"] = lambda h: _answer(h, 302, {"Location": f"http://127.0.0.1:{free_port()}/model.bin"})
    got = fetch(f"{https.base}/to-https", "model.source", tmp_path, max_bytes=2**20, into=tmp_path / "a" / "model.bin")
    assert got.read_bytes() == b"weights" * 100
    with pytest.raises(StorageError, match="model.source: cannot download .*refused a redirect from https to http"):
        fetch(f"{https.base}/to-http", "model.source", tmp_path, max_bytes=2**20, into=tmp_path / "b" / "model.bin")
    with pytest.raises(StorageError, match="does not fit in maxSizeMB"):
        fetch(f"{https.base}/model.bin", "model.source", tmp_path, max_bytes=100, into=tmp_path / "c" / "model.bin")
    assert not (tmp_path / "b" / "model.bin").exists() and not (tmp_path / "c" / "model.bin").exists()


def test_a_presigned_url_loads_as_the_model_its_path_names(tmp_path, https):
    """The query string used to become part of the file name: model.onnx?X-Amz-Signature=… was not ONNX."""
    import http.server

    from optimizer.api.spec import ModelSpec
    from optimizer.steps.load import load_model

    (https.root / "models").mkdir()
    _external_data_model(https.root / "models", tensors=1, floats=4, external=False)

    def signed_only(handler):  # what a bucket does with a presigned URL: no signature, no object
        if "X-Amz-Signature=" not in handler.path:
            return _answer(handler, 403, {"Content-Length": "0"})
        return http.server.SimpleHTTPRequestHandler.do_GET(handler)

    https.routes["/models/m.onnx"] = signed_only
    url = (f"{https.base}/models/m.onnx?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026%2Fs3"
           "&X-Amz-Signature=0123abcd")
    loaded = load_model(ModelSpec(source=url, inputs=[{"name": "x", "shape": [4]}]), tmp_path)
    assert loaded.format == "onnx" and loaded.onnx_path.name == "m.onnx"


def _external_data_model(directory, tensors: int, floats: int, external: bool = True):
    """An ONNX model with `tensors` weights of `floats` float32 each, in files of their own beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"w{i}" for i in range(tensors)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"s{i - 1}", name], [f"s{i}"]) for i, name in enumerate(names)]
    graph = helper.make_graph(
        nodes, "sum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [floats])],
        [helper.make_tensor_value_info(f"s{tensors - 1}", TensorProto.FLOAT, [floats])],
        [numpy_helper.from_array(np.full(floats, i, np.float32), name) for i, name in enumerate(names)])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(directory / "m.onnx"),
                    save_as_external_data=external, all_tensors_to_one_file=False, size_threshold=0)
    return names


def test_external_data_files_share_one_budget_enforced_while_downloading(tmp_path, https):
    """Three 0.6 MB data files under maxSizeMB 1: each fitted alone, so all three were downloaded and
    the total refused only afterwards (N x the limit on the scratch volume). Now the second one stops
    the download and the third is never asked for."""
    from optimizer.api.spec import ModelSpec
    from optimizer.steps.load import ModelLoadError, load_model

    names = _external_data_model(https.root, tensors=3, floats=150_000)
    spec = ModelSpec(source=f"{https.base}/m.onnx", maxSizeMB=1, inputs=[{"name": "x", "shape": [150_000]}])
    with pytest.raises(ModelLoadError, match=r"model.source: .*/w1 does not fit in maxSizeMB \(1 MB\) \(after"):
        load_model(spec, tmp_path)
    assert [path for path in https.requested if path.lstrip("/") in names] == ["/w0", "/w1"]


def test_a_malformed_content_length_is_a_clean_message(tmp_path, https):
    from optimizer.artifacts.storage import StorageError, fetch

    https.routes["/m.onnx"] = lambda h: _answer(h, 200, {"Content-Length": "12abc"}, b"0123456789ab")
    with pytest.raises(StorageError, match=r"model.source: the server of .* sent a malformed Content-Length \('12abc'\)"):
        fetch(f"{https.base}/m.onnx", "model.source", tmp_path, max_bytes=2**20, into=tmp_path / "m.onnx")


def test_a_download_that_trickles_stops_at_the_deadline(tmp_path, https, monkeypatch):
    """Each read got 60 s, the whole download none: one byte a minute held a run until the Job's deadline."""
    import time

    from optimizer.artifacts import storage

    def trickle(handler):
        _answer(handler, 200, {"Content-Length": "1000"})
        try:
            for _ in range(1000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.02)
        except OSError:  # the client gave up: what the test wants
            pass

    https.routes["/slow.onnx"] = trickle
    monkeypatch.setattr(storage, "HTTPS_DEADLINE_SECONDS", 0.5)
    with pytest.raises(storage.StorageError, match="model.source: downloading .* took longer than 0.5 s"):
        storage.fetch(f"{https.base}/slow.onnx", "model.source", tmp_path, max_bytes=2**20, into=tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize("case", ["missing-bucket", "wrong-secret"])
def test_an_s3_output_that_cannot_be_written_fails_before_any_work(tmp_path, s3_server, case):
    """It used to be found only after the whole run, at the upload."""
    import subprocess

    s3_server.bucket("results")
    output, secret, words = {"missing-bucket": ("s3://no-such-bucket/run/", None, "does not exist"),
                             "wrong-secret": ("s3://results/run/", "not-the-secret", "refused")}[case]
    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                                 "benchmark": QUICK, "output": output, "storage": {"endpoint": s3_server.endpoint}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.credentials(**({"secret": secret} if secret else {})))
    done = subprocess.run([MLOPT, "optimize", str(spec)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 1 and "spec.output: " in done.stderr and words in done.stderr, done.stderr
    assert "before the run" in done.stderr and "load…" not in done.stdout + done.stderr  # no step ran
    assert "Traceback" not in done.stderr


def test_the_output_probe_leaves_nothing_behind(tmp_path, s3_server, monkeypatch):
    import obstore

    from optimizer.artifacts import storage

    for key, value in s3_server.credentials().items():
        monkeypatch.setenv(key, value)
    settings = type("Storage", (), {"endpoint": s3_server.endpoint, "region": None, "anonymous": False})()
    bucket, prefix = s3_server.bucket("probed"), f"{tmp_path.name}/run/"
    upload(s3_server, bucket, f"{tmp_path.name}/mine.txt", __file__)  # the user's object beside the prefix
    before = s3_server.objects(bucket)
    storage.check_output(f"s3://{bucket}/{prefix}", settings)
    assert s3_server.objects(bucket) == before
    listed = [meta["path"] for batch in obstore.list(storage._store(bucket, storage.S3Settings.of(settings)))
              for meta in batch]
    assert not [key for key in listed if storage.PROBE_PREFIX in key], listed
