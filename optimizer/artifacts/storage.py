"""Storage URIs: where models and data come from and where results go, the same locally and in a cluster.

One function per scheme behind two entry points, `fetch(uri, …)` for inputs and `deliver(dir, uri, …)`
for results (KServe's storage layout, plus the upload it lacks):
- `s3://bucket/key` — S3 and S3-compatible stores, through obstore (one small wheel with no
  dependencies, reads the standard AWS_* variables, multipart uploads, retries with backoff;
  boto3 would also do but brings botocore, and s3fs cannot sit beside a current boto3);
- `pvc://claim/path` — a PersistentVolumeClaim, mounted by the operator under MLOPT_PVC_ROOT;
- `https://…` — downloaded, never following a redirect to plain http;
- a local path or `file://…`.

A trailing `/` means a prefix; anything else is one exact object (`s3://b/m/resnet` never matches
`resnet50`). Inputs are streamed to disk with a size limit and the sha256 checked on the way, never
read whole into memory. Uploads put results.json last: its presence means the run is complete.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit, urlunsplit
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from optimizer.api import uris
from optimizer.api.errors import OptimizationError, is_expected
from optimizer.api.uris import Location
from optimizer.api.units import format_size

CHUNK = 1 << 20
RESULTS_FILE = "results.json"
PVC_ROOT_ENV = "MLOPT_PVC_ROOT"  # where claims are mounted: <root>/<claim>/<path>
UPLOAD_ATTEMPTS = 4


class StorageError(OptimizationError):
    """An input cannot be fetched or the results cannot be stored; the message names the field."""

    reason = "StorageFailed"


def _checked(rule, uri: str, field: str) -> Location:
    """`rule(uri)` from optimizer/api/uris.py, its refusal as a StorageError with the message the spec
    loader gives for the same URI (`mlopt validate` says it word for word)."""
    try:
        return rule(uri)
    except uris.UriError as error:
        raise StorageError(f"{field}: {error} (got {uri!r})") from None


def parse(uri: str, field: str) -> Location:
    """Split a storage URI; local paths and file:// come back with scheme "file"."""
    return _checked(uris.parse, uri, field)


def is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "https://"))


def pvc_path(location: Location, field: str) -> Path:
    """A claim is mounted by the operator at $MLOPT_PVC_ROOT/<claim>; on a laptop there is none."""
    root = os.environ.get(PVC_ROOT_ENV)
    if not root:
        raise StorageError(
            f"{field}: pvc://{location.container}/{location.key} names a PersistentVolumeClaim, which only a "
            f"cluster has; on this machine use a local path, or set {PVC_ROOT_ENV} to a folder that holds the "
            f"claim as a sub-folder ({location.container}/)")
    claim = (Path(root) / location.container).resolve()
    path = claim / location.key
    # parse() refused '/' and '..'; a symlink inside the claim may still point out of it.
    if not path.resolve().is_relative_to(claim):
        raise StorageError(f"{field}: pvc://{location.container}/{location.key} leads out of the claim (a symbolic "
                           "link inside it points elsewhere); give a path whose every part is inside the claim")
    return path


# --- S3 --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Settings:
    """spec.storage as the client needs it; credentials come from the environment (AWS_*)."""

    endpoint: str | None = None
    region: str | None = None
    anonymous: bool = False

    @classmethod
    def of(cls, storage) -> "S3Settings":
        if storage is None:
            return cls()
        return cls(endpoint=storage.endpoint, region=storage.region, anonymous=storage.anonymous)


def _store(bucket: str, settings: S3Settings):
    from obstore.store import S3Store

    config: dict = {}
    endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        # Custom endpoints (MinIO, Ceph, versitygw, …) are addressed path-style: bucket in the path.
        config.update(endpoint=endpoint, virtual_hosted_style_request=False)
    if settings.region:
        config["region"] = settings.region
    elif not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
        config["region"] = "us-east-1"  # S3-compatible stores ignore it; SigV4 needs one
    if settings.anonymous:
        config["skip_signature"] = True
    client: dict = {"timeout": "30 minutes", "connect_timeout": "10 seconds"}  # large models take a while
    if endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True
    bundle = os.environ.get("AWS_CA_BUNDLE")
    if bundle:
        client["root_certificate"] = Path(bundle).read_bytes()
    return S3Store(bucket, config=config, client_options=client,
                   retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=120)})


def _explain(error: BaseException, field: str, uri: str) -> StorageError:
    """obstore's errors, as a user can act on them."""
    from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

    text = " ".join(str(error).split())
    if "NoSuchBucket" in text:
        return StorageError(f"{field}: the bucket of {uri} does not exist; create it or correct the name")
    if isinstance(error, (NotFoundError, FileNotFoundError)) or "NoSuchKey" in text:
        return StorageError(f"{field}: no object at {uri}; check the bucket and key")
    denied = isinstance(error, (PermissionDeniedError, UnauthenticatedError)) or any(
        word in text for word in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "401"))
    if denied:
        return StorageError(
            f"{field}: access to {uri} was refused ({_short(text)}); check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (in a cluster: the Secret named by spec.storage.secretRef) and spec.storage.endpoint")
    return StorageError(f"{field}: cannot reach {uri}: {_short(text)}; check spec.storage.endpoint and the network")


def _short(text: str) -> str:
    """The S3 error code, else the HTTP status (a HEAD answer has no body), else the start of the text."""
    import re

    for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "NoSuchBucket"):
        if code in text:
            return code
    status = re.search(r"status code: (\d{3} [A-Za-z ]+?):", text)
    return f"HTTP {status.group(1)}" if status else text[:240]


class Budget:
    """The bytes one run input may take (its maxSizeMB): a model and all its external-data files
    together, checked before each file and while each one streams, so N data files can never put
    N x the limit on the scratch volume."""

    def __init__(self, max_bytes: int, field: str):
        self.max_bytes, self.field, self.used = max_bytes, field, 0

    def check(self, size: int, uri: str) -> None:
        """Refuse `size` more bytes of `uri` if they would not fit."""
        if self.used + size > self.max_bytes:
            already = f" (after {self.used / 1e6:.0f} MB of files fetched with it)" if self.used else ""
            raise StorageError(f"{self.field}: {uri} does not fit in maxSizeMB ({self.max_bytes // 2**20} MB){already}; "
                               "raise maxSizeMB to load it")

    def take(self, size: int, uri: str) -> None:
        self.check(size, uri)
        self.used += size


class _Limited:
    """Writes chunks to a file, hashing as it goes and charging each one to the input's budget."""

    def __init__(self, target: Path, uri: str, budget: Budget):
        self.handle, self.digest, self.uri, self.budget = target.open("wb"), hashlib.sha256(), uri, budget

    def write(self, chunk) -> None:
        self.budget.take(len(chunk), self.uri)
        self.digest.update(chunk)
        self.handle.write(chunk)


def _check_pin(field: str, uri: str, sha256: str | None, actual: str, pin_field: str) -> None:
    if sha256 and actual != sha256:
        raise StorageError(f"{pin_field} does not match {uri} ({field}): expected {sha256}, the object has {actual}")


def _fetch_s3(location: Location, target: Path, field: str, uri: str, budget: Budget, settings: S3Settings) -> str:
    """The object streamed to `target`; the client's own 30-minute timeout bounds the whole request."""
    import obstore

    store = _store(location.container, settings)
    try:
        budget.check(obstore.head(store, location.key)["size"], uri)
        sink = _Limited(target, uri, budget)
        with sink.handle:
            for chunk in obstore.get(store, location.key).stream(min_chunk_size=CHUNK):
                sink.write(chunk)
    except StorageError:
        raise
    except Exception as error:
        if not is_expected(error):  # an mlopt bug, reported as one by the CLI and the worker
            raise
        raise _explain(error, field, uri) from None
    return sink.digest.hexdigest()


class _NoPlainHttpRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith("https://"):
            raise urllib.error.URLError(f"refused a redirect from https to {newurl.split('://')[0]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


HTTPS_READ_SECONDS = 60  # the longest one read may wait
HTTPS_DEADLINE_SECONDS = 30 * 60  # the whole download, like the S3 client's timeout: a server that sends
                                  # one byte a minute cannot hold a run until the Job's deadline


def _declared_length(response, field: str, uri: str) -> int | None:
    """Content-Length as a number, None when absent; a malformed one is refused (a proxy or server
    that garbles it cannot be trusted with the body either)."""
    header = response.headers.get("Content-Length")
    if header is None:
        return None
    if not (header.isascii() and header.strip().isdigit()):
        raise StorageError(f"{field}: the server of {uri} sent a malformed Content-Length ({header[:40]!r}); "
                           "fix the server, or serve the file from s3:// or a claim")
    return int(header)


def _fetch_https(uri: str, target: Path, field: str, budget: Budget) -> str:
    opener = urllib.request.build_opener(_NoPlainHttpRedirect)
    deadline = time.monotonic() + HTTPS_DEADLINE_SECONDS
    try:
        with opener.open(uri, timeout=HTTPS_READ_SECONDS) as response:
            declared = _declared_length(response, field, uri)
            if declared is not None:
                budget.check(declared, uri)
            sink = _Limited(target, uri, budget)
            with sink.handle:
                # read1: whatever has arrived (read(n) would wait for all n bytes of a slow server)
                while chunk := response.read1(CHUNK):
                    sink.write(chunk)
                    if time.monotonic() > deadline:
                        raise StorageError(f"{field}: downloading {uri} took longer than {HTTPS_DEADLINE_SECONDS} s "
                                           f"({sink.budget.used / 1e6:.1f} MB arrived); serve it from a faster "
                                           "host, s3:// or a claim")
    except OSError as error:
        raise StorageError(f"{field}: cannot download {uri}: {error}") from None
    except http.client.HTTPException as error:  # a malformed response (IncompleteRead, bad status line)
        raise StorageError(f"{field}: cannot download {uri}: {type(error).__name__}: {error}") from None
    return sink.digest.hexdigest()


def _local(location: Location, field: str, base_dir: Path) -> Path:
    path = pvc_path(location, field) if location.scheme == "pvc" else Path(location.key).expanduser()
    return path if path.is_absolute() else base_dir / path


def local_path(uri: str, field: str, base_dir: Path) -> Path:
    """The path a local path, file:// or pvc:// URI names (a file or a folder; it may not exist)."""
    location = parse(uri, field)
    if location.scheme not in ("file", "pvc"):
        raise StorageError(f"{field}: {uri} is not a local path, file:// or pvc:// URI")
    return _local(location, field, base_dir)


def fetch(uri: str, field: str, base_dir: Path, *, max_bytes: int, sha256: str | None = None,
          pin_field: str = "sha256", storage=None, into: Path | None = None, budget: Budget | None = None) -> Path:
    """The local file behind `uri`: a local or pvc:// path as it is, a remote object downloaded to
    `into` (default: a folder of its own under $MLOPT_CACHE/downloads, named as the object, so files
    fetched beside it keep their names). Checks the size limit (`budget`, shared by the files of one
    input; default: `max_bytes` for this file alone) and the sha256 pin. Remote objects are downloaded
    every time: an object may change under the same key."""
    location = _checked(uris.one_object, uri, field)
    budget = budget or Budget(max_bytes, field)
    if location.scheme in ("file", "pvc"):
        path = _local(location, field, base_dir)
        if not path.is_file():
            raise StorageError(f"{field}: no file at {path}")
        budget.take(path.stat().st_size, str(path))
        if sha256:
            _check_pin(field, uri, sha256, _sha256_file(path), pin_field)
        return path
    from optimizer.artifacts.cache import cache_dir

    name = location.name  # from the URL's path: a presigned URL's query string is no part of the file name
    target = into or cache_dir("downloads", hashlib.sha256(uri.encode()).hexdigest()[:24]) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        if location.scheme == "s3":
            digest = _fetch_s3(location, partial, field, uri, budget, S3Settings.of(storage))
        else:
            digest = _fetch_https(uri, partial, field, budget)
        _check_pin(field, uri, sha256, digest, pin_field)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def fetch_folder(uri: str, field: str, wanted, *, budget: Budget, storage=None,
                 marker: str | None = None) -> tuple[Path, list[str]] | None:
    """An s3:// prefix (`uri` plus '/') as a local folder: the objects directly under it whose names
    `wanted(name)` accepts, downloaded into a folder of their own under $MLOPT_CACHE/downloads within
    `budget`; with the names of every object listed there (for the caller's refusals). None, and nothing
    downloaded, when the prefix holds no object, or not the `marker` object."""
    import shutil

    import obstore

    from optimizer.artifacts.cache import cache_dir

    location = _checked(uris.one_object, uri, field)
    if location.scheme != "s3":
        raise StorageError(f"{field}: {uri} is not an s3:// prefix")
    prefix = location.key + "/"
    try:
        listed = [meta for chunk in obstore.list(_store(location.container, S3Settings.of(storage)), prefix)
                  for meta in chunk]
    except Exception as error:
        if not is_expected(error):
            raise
        raise _explain(error, field, uri) from None
    # Only plain names directly under the prefix: a key's rest never becomes a path outside the folder.
    names = sorted(name for meta in listed if _PLAIN_NAME.match(name := meta["path"][len(prefix):]))
    if not names or (marker is not None and marker not in names):
        return None
    folder = cache_dir("downloads", hashlib.sha256(uri.encode()).hexdigest()[:24]) / location.name
    shutil.rmtree(folder, ignore_errors=True)  # an object may have changed or gone since the last run
    folder.mkdir(parents=True)
    for name in filter(wanted, names):
        fetch(f"s3://{location.container}/{prefix}{name}", field, folder, max_bytes=budget.max_bytes,
              storage=storage, into=folder / name, budget=budget)
    return folder, names


def fetch_beside(uri: str, names: list[str], field: str, local: Path, *, budget: Budget, storage=None) -> None:
    """Fetch the objects named `names` that sit beside `uri` (an ONNX model's external data) next to
    its local copy `local`, all within the model's `budget`. The names were validated by the caller
    (relative, no '..')."""
    location = parse(uri, field)
    if names and location.scheme == "https" and urlsplit(uri).query:
        raise StorageError(f"{field}: the model keeps its weights in {len(names)} external data file(s) "
                           f"({', '.join(names[:3])}), which cannot be fetched beside a presigned URL (its signature "
                           "covers one object); save the model with its weights inside (onnx.save_model(..., "
                           "save_as_external_data=False)) or use s3://")
    for name in names:
        if location.scheme == "https":  # the model URL's folder, the name %-escaped as a URL path needs
            parts = urlsplit(uri)
            beside = urlunsplit((parts.scheme, parts.netloc, parts.path[: parts.path.rfind("/") + 1] + quote(name),
                                 "", ""))
        else:  # an object key takes the name as it is
            beside = uri[: uri.rfind("/") + 1] + name
        fetch(beside, field, local.parent, max_bytes=budget.max_bytes, storage=storage, into=local.parent / name,
              budget=budget)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _run_files(directory: Path) -> list[Path]:
    """Every file of a run but results.json, in upload order (results.json goes up after them)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != RESULTS_FILE)


def describe_outputs(directory: Path) -> list[dict]:
    """Every file of a run (results.json aside) with its size and sha256, in upload order."""
    return [{"path": p.relative_to(directory).as_posix(), "sizeBytes": p.stat().st_size, "sha256": _sha256_file(p)}
            for p in _run_files(directory)]


# --- delivery --------------------------------------------------------------------------------------

def _previous_run_files(folder: Path) -> list[Path]:
    """The files the run already in `folder` wrote, as its results.json lists them (inside `folder`
    only: a results.json is data, and must not be able to name anything outside)."""
    try:
        listed = json.loads((folder / RESULTS_FILE).read_text()).get("outputs") or []
    except (OSError, ValueError, AttributeError):
        return []
    root = folder.resolve()
    paths = [(folder / str(entry.get("path") or "")).resolve() for entry in listed if isinstance(entry, dict)]
    return [path for path in paths if path != root and path.is_relative_to(root)]


def publish(staging: Path, folder: Path) -> None:
    """Move a finished run from `staging` into `folder`; the caller writes results.json after it.
    The previous run's results.json goes first (a folder with one always holds that run whole), then
    the files it lists (a variant the new run dropped must not linger); anything else is the user's
    and stays."""
    previous = _previous_run_files(folder)
    (folder / RESULTS_FILE).unlink(missing_ok=True)
    for path in previous:
        if path.is_file():
            path.unlink()
    for path in _run_files(staging):
        target = folder / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)


def output_location(uri: str, field: str = "spec.output") -> Location:
    return _checked(uris.output, uri, field)


PROBE_PREFIX = ".mlopt-probe-"


def check_output(uri: str, storage=None, field: str = "spec.output") -> None:
    """Before any work: the bucket of an s3:// output exists and these credentials may write and delete
    under its prefix, so a wrong name or key fails now, not after the whole run.

    A probe is put under the prefix, then deleted: the two calls the delivery makes (it deletes the
    previous results.json, then puts the run), so passing means the delivery is allowed. A HEAD on
    the bucket would prove neither permission, and a multipart create + abort proves PutObject but not
    DeleteObject. The probe's key is unique and named as mlopt's, so one left by a process killed
    between the two calls collides with nothing and says what it is."""
    import uuid

    import obstore

    location = output_location(uri, field)
    store = _store(location.container, S3Settings.of(storage))
    probe = f"{location.key}{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        obstore.put(store, probe, b"")
    except Exception as error:
        if not is_expected(error):
            raise
        raise StorageError(f"{_explain(error, field, uri)} (found before the run, by writing a probe object)") from None
    try:
        obstore.delete(store, probe)
    except Exception as error:
        if not is_expected(error):
            raise
        raise StorageError(f"{field}: these credentials may write to {uri} but not delete ({_short(str(error))}); "
                           f"the run deletes the previous results.json there: allow s3:DeleteObject, and delete "
                           f"the probe s3://{location.container}/{probe}") from None


def deliver(directory: Path, uri: str, storage=None, reporter=None, field: str = "spec.output") -> str:
    """Upload a finished run to an s3:// prefix, results.json last; return results.json's URI.
    Each file is retried with backoff; a file that still fails ends the delivery with StorageError
    (and with no results.json at the prefix, readers know the run is not there)."""
    import obstore

    from obstore.exceptions import NotFoundError

    location = output_location(uri, field)
    store = _store(location.container, S3Settings.of(storage))

    def retried(action, what: str, key: str) -> None:
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                return action()
            except NotFoundError:
                return None  # deleting what is not there
            except Exception as error:
                if not is_expected(error):  # a bug is not retried, nor passed off as the network
                    raise
                if attempt == UPLOAD_ATTEMPTS:
                    raise StorageError(f"{field}: {what} s3://{location.container}/{key} failed {attempt} times: "
                                       f"{_explain(error, field, uri)}") from None
                time.sleep(min(2 ** attempt, 20))

    # A previous run's results.json at this prefix would vouch for files this upload overwrites.
    old_results = location.key + RESULTS_FILE
    retried(lambda: obstore.delete(store, old_results), "deleting the previous", old_results)
    files = [*_run_files(directory), directory / RESULTS_FILE]
    for index, path in enumerate(files, 1):
        key = location.key + path.relative_to(directory).as_posix()
        if reporter:
            reporter.log(f"uploading [{index}/{len(files)}] {key} ({format_size(path.stat().st_size)})")
        retried(lambda: obstore.put(store, key, path, chunk_size=8 * CHUNK, max_concurrency=4),
                f"uploading {path.name} to", key)
    return f"s3://{location.container}/{location.key}{RESULTS_FILE}"
