"""Every rule a storage URI or path must follow, in one place.

`model.source`, `data.source` and `output` take the same URIs on a laptop and in a cluster:
`s3://bucket/key`, `pvc://claim/path`, `https://…`, `file://…` or a local path (and `zoo:` names).
The spec applies these rules when it is parsed, so `mlopt validate`, `mlopt optimize`, the worker
and the operator refuse the same URIs with the same message; `optimizer/artifacts/storage.py`
applies them again before it reads or writes anything. A message says what is wrong and how to fix
it, never which field: the caller names the field (the spec loader as `spec.model.source: …`).

Keys inside a bucket or claim, and the path of an https URL, never begin with `/`, never hold a
`..` segment, NUL or another control character: `Path(root) / claim / "/etc/x"` is `/etc/x`, and a
`..` climbs out of the claim. Local paths (the user's own machine) may be absolute or use `..`.
Torch-free and pydantic-free: the operator imports it through the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

# The zoo's names, here so that the spec can refuse `zoo:nope` without importing the zoo (which
# builds models); tests/optimizer/test_zoo.py checks they match optimizer/zoo and the data step.
ZOO_MODELS = ("crnn", "detector", "yolov4", "shapes-detector", "textlstm", "digits", "crnn-ocr")
ZOO_DATASETS = ("digits", "textlines", "shapes")

MAX_URI_LENGTH = 4096  # a presigned URL with a session token runs to ~2 KB
# S3 bucket names (AWS: 3-63 of [a-z0-9.-]); S3-compatible stores also take upper case and '_'.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
# A PersistentVolumeClaim's name is a DNS-1123 subdomain; it also becomes a mount path /mnt/pvc/<claim>.
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A ConfigMap key (the CA bundle's file name in the pod): Kubernetes' own rule, and never '.' or '..'.
CONFIGMAP_KEY = r"^[-._a-zA-Z0-9]*[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"  # RE2 and Rust regex: no look-ahead


class UriError(ValueError):
    """A URI that breaks a rule; the message says how to fix it (the caller names the field)."""


@dataclass(frozen=True)
class Location:
    scheme: str  # s3 | pvc | https | file
    container: str  # the bucket or the claim ("" for https and file)
    key: str  # the object key, the path inside the claim, the URL or the local path

    @property
    def is_prefix(self) -> bool:
        if self.scheme == "https":
            return urlsplit(self.key).path.endswith("/")
        return self.key.endswith("/") or self.key == ""

    @property
    def name(self) -> str:
        """The object's file name: the last segment of its key, of the URL's path for https (a
        presigned URL's query string is no part of it)."""
        path = urlsplit(self.key).path if self.scheme == "https" else self.key
        return path.rstrip("/").rsplit("/", 1)[-1]  # as written: %-escapes stay, so it never decodes to '/'


def _check_key(key: str, where: str) -> None:
    if key.startswith("/"):
        raise UriError(f"the path inside the {where} begins with '/'; write it relative to the {where} "
                       f"(…://<{where}>/dir/file, one '/' after the {where})")
    if ".." in key.split("/"):
        raise UriError(f"the path climbs out of the {where} with '..'; give the path inside the {where}")


def parse(uri: str) -> Location:
    """Split a storage URI and check it; a local path or file:// comes back with scheme "file"."""
    if not isinstance(uri, str):
        raise UriError("must be a string URI or path")
    if len(uri) > MAX_URI_LENGTH:
        raise UriError(f"is {len(uri)} characters long; at most {MAX_URI_LENGTH}")
    if _CONTROL.search(uri):
        raise UriError("contains a NUL or another control character; remove it")
    scheme = _SCHEME.match(uri)
    if scheme is None:
        if not uri:
            raise UriError("is empty; give a path or a URI")
        return Location("file", "", uri)
    name = scheme.group(1)
    rest = uri[scheme.end():]
    if name in ("s3", "pvc"):
        where = "bucket" if name == "s3" else "claim"
        container, _, key = rest.partition("/")
        if not container:
            raise UriError(f"names no {where}; write {name}://<{where}>/<path>")
        pattern, rule = ((_BUCKET, "letters, digits, '.', '-' and '_'") if name == "s3"
                         else (_CLAIM, "a PersistentVolumeClaim name: lower-case letters, digits, '-' and '.'"))
        if not pattern.match(container):
            raise UriError(f"{where} {container!r} is not a valid {where} name; use {rule}")
        _check_key(key, where)
        return Location(name, container, key)
    if name == "https":
        try:
            parts = urlsplit(uri)
            host = parts.hostname
        except ValueError as error:  # e.g. an unclosed [IPv6] host
            raise UriError(f"is not a valid URL ({error})") from None
        if not host:
            raise UriError("names no host; write https://<host>/<path>")
        for segment in parts.path.split("/"):
            if unquote(segment) in ("..", ".") or "/" in unquote(segment):
                raise UriError("the URL's path has a '.', '..' or an encoded '/' segment; give the object's "
                               "own path")
        return Location("https", "", uri)
    if name == "http":
        raise UriError("plain http is refused; use https://")
    if name == "file":
        if not rest:
            raise UriError("names no path; write file:///absolute/path or a relative path")
        return Location("file", "", rest)
    raise UriError(f"{name}:// is not a storage scheme mlopt reads; use s3://, pvc://, https://, file:// or a "
                   "local path")


def one_object(uri: str) -> Location:
    """A URI that names one file (an input), not a prefix or a folder."""
    location = parse(uri)
    if location.is_prefix or location.name in ("", ".", ".."):
        raise UriError("ends with '/', which means a prefix (or a folder); name one file (no trailing /)")
    return location


def _is_zoo(uri: str, names: tuple[str, ...], what: str, fix: str) -> bool:
    """Whether `uri` is a zoo: name (one of `names`, else UriError)."""
    if not (isinstance(uri, str) and uri.startswith("zoo:")):
        return False
    if uri.removeprefix("zoo:") not in names:
        raise UriError(f"{uri} is not {what}; use {fix.format(', '.join(f'zoo:{known}' for known in names))}")
    return True


def model_source(uri: str) -> Location | None:
    """model.source: a zoo model (None) or one object."""
    if _is_zoo(uri, ZOO_MODELS, "in the model zoo", "one of {} (see `mlopt models`)"):
        return None
    return one_object(uri)


def data_source(uri: str) -> Location | None:
    """data.source: random, a zoo data set (None), or one .npz object."""
    if uri == "random" or _is_zoo(uri, ZOO_DATASETS, "a zoo data set", "random, {} or a .npz file"):
        return None
    location = one_object(uri)
    if not location.name.endswith(".npz"):
        raise UriError("is not a data source: use random, zoo:<dataset> "
                       f"({', '.join(ZOO_DATASETS)}) or a .npz file (a path, file://, s3://, pvc:// or https://)")
    return location


def output(uri: str) -> Location:
    """spec.output (or --output): a folder, a claim's folder or an s3:// prefix."""
    location = parse(uri)
    if location.scheme == "https":
        raise UriError("results cannot be written to https://; use s3://bucket/prefix/, pvc://claim/path/ or a path")
    if location.scheme == "s3" and not uri.endswith("/"):
        raise UriError(f"must end with '/': results are several files under a prefix (e.g. {uri}/)")
    return location


def target_output(uri: str, target: str) -> str:
    """Where one target's run stores its results: `<output>/targets/<name>/` (a folder, a claim's folder
    or an s3:// prefix alike), so the Jobs of two targets never overwrite each other's files."""
    return f"{uri.rstrip('/')}/targets/{target}/"


def claim(uri: str) -> str | None:
    """The PersistentVolumeClaim a pvc:// URI names (None for any other URI)."""
    try:
        location = parse(uri)
    except UriError:
        return None
    return location.container if location.scheme == "pvc" else None


# --- the same rules as CEL, for the CRD ------------------------------------------------------------
# `kubectl apply` refuses what CEL can express (`self` is the string); the operator and the worker
# still apply the rules above, which also decode %-escapes and check bucket names. Each CEL rule
# refuses only what the Python rules refuse too, so the API server is never stricter than `mlopt
# validate`. RE2 syntax; the fields' maxLength keeps the regexes within the API server's cost limit.

def _cel(rule: str, message: str) -> dict[str, str]:
    return {"rule": rule, "message": message}


_CEL_EVERY = [
    _cel(r"!self.matches('[\\x00-\\x1f\\x7f]')", "contains a NUL or another control character; remove it"),
    _cel("!self.startsWith('http://')", "plain http is refused; use https://"),
    _cel(r"!self.matches('^(s3|pvc)://[^/]*//')",
         "the path inside the bucket or claim begins with '/'; write it relative to it (one '/' after the name)"),
    _cel(r"!self.matches('^(s3|pvc)://[^/]*/(.*/)?\\.\\.(/|$)') && "
         r"!self.matches('^https://[^/?#]*/([^?#]*/)?\\.\\.([/?#]|$)')",
         "the path climbs out with '..'; give the path inside the bucket, claim or host"),
    _cel(r"!self.startsWith('pvc://') || self.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/|$)')",
         "pvc://<claim>/…: the claim must be a PersistentVolumeClaim name (lower-case letters, digits, '-', '.')"),
]


def _zoo_rule(names: tuple[str, ...], what: str) -> dict[str, str]:
    listed = ", ".join(f"'zoo:{name}'" for name in names)
    return _cel(f"!self.startsWith('zoo:') || self in [{listed}]",
                f"not a zoo {what}; use one of " + ", ".join(f"zoo:{name}" for name in names))


CEL_MODEL_SOURCE = [
    *_CEL_EVERY,
    _zoo_rule(ZOO_MODELS, "model"),
    _cel(r"!(self.startsWith('https://') ? self.matches('^https://[^?#]*/([?#].*)?$') : self.endsWith('/'))",
         "ends with '/', which means a prefix (or a folder); name one file (no trailing /)"),
]
CEL_DATA_SOURCE = [
    *_CEL_EVERY,
    _zoo_rule(ZOO_DATASETS, "data set"),
    _cel(r"self == 'random' || self.startsWith('zoo:') || (self.startsWith('https://') ? "
         r"self.matches('^https://[^?#]*\\.npz([?#].*)?$') : self.endsWith('.npz'))",
         "use random, zoo:<dataset> or a .npz file (a path, file://, s3://, pvc:// or https://)"),
]
CEL_OUTPUT = [
    *_CEL_EVERY,
    _cel("!self.startsWith('https://')",
         "results cannot be written to https://; use s3://bucket/prefix/, pvc://claim/path/ or a path"),
    _cel("!self.startsWith('s3://') || self.endsWith('/')",
         "an s3:// output must end with '/': results are several files under a prefix"),
]
