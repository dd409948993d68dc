"""The import rules of the layout (issue #15), checked on the source, no torch imported.

1. The operator (operator/, installed as `mlopt_operator`) takes from `optimizer` only the
   torch-free contract: `optimizer.api` / `optimizer.api.*` (and `optimizer.__version__`).
2. `optimizer.api` imports no heavy engine (torch, onnx, onnxruntime, onnxscript, openvino, nncf,
   torchao, numpy) and no other optimizer subpackage, neither at module level nor inside a function:
   the operator image has none of them, so a lazy import there would fail only in the cluster.

Every import statement is read with `ast` (module level, functions, `if TYPE_CHECKING:` blocks
alike), plus `importlib.import_module("...")` / `__import__("...")` calls with a constant name.
A subprocess then imports the operator's modules and checks that none of the engines came along.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "operator"
API = ROOT / "optimizer" / "api"

# What the operator image does not have (Dockerfile `--target operator`: kopf, kubernetes, pydantic, yaml).
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "torchao", "numpy")


def _package_of(path: Path) -> str:
    """The dotted package a file lives in, by its import name (operator/ is `mlopt_operator`)."""
    parts = path.relative_to(ROOT).with_suffix("").parts[:-1]
    if parts and parts[0] == "operator":
        parts = ("mlopt_operator", *parts[1:])
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every module the file imports, anywhere in it.

    `from X import a, b` yields `X.a` and `X.b` (a name may be a submodule: `from optimizer import
    engines`); relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module
            found += [(node.lineno, module if alias.name == "*" else f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (name in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.append((node.lineno, node.args[0].value))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _allowed_from_optimizer(module: str) -> bool:
    """`import optimizer` (import-light), `from optimizer import __version__`, optimizer.api and below."""
    return module in ("optimizer", "optimizer.__version__", "optimizer.api") or module.startswith("optimizer.api.")


def _sources(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_operator_imports_only_the_api_from_optimizer():
    bad = [f"{_where(path, line)} imports {module}" for path in _sources(OPERATOR) for line, module in imports(path)
           if _top(module) == "optimizer" and not _allowed_from_optimizer(module)]
    assert not bad, "the operator may import only optimizer.api (and optimizer.__version__):\n" + "\n".join(bad)


def test_operator_imports_no_engine():
    bad = [f"{_where(path, line)} imports {module}"
           for path in _sources(OPERATOR) for line, module in imports(path) if _top(module) in HEAVY]
    assert not bad, "the operator image has no torch/onnx/openvino/numpy:\n" + "\n".join(bad)


def test_api_imports_no_engine_and_no_other_optimizer_package():
    bad = []
    for path in _sources(API):
        for line, module in imports(path):
            if _top(module) in HEAVY:
                bad.append(f"{_where(path, line)} imports {module}")
            elif _top(module) == "optimizer" and not _allowed_from_optimizer(module):
                bad.append(f"{_where(path, line)} imports {module} (outside optimizer.api)")
    assert not bad, "optimizer.api must stay torch-free and self-contained:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("import torch", ["torch"]),
    ("def f():\n    from onnxruntime.quantization import quantize_dynamic", ["onnxruntime.quantization.quantize_dynamic"]),
    ("from optimizer import engines", ["optimizer.engines"]),
    ("from ..engines import registry", ["optimizer.engines.registry"]),
    ("from . import spec", ["optimizer.api.spec"]),
    ("import importlib\nimportlib.import_module('openvino')", ["openvino"]),
])
def test_the_scan_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    """The scanner itself: lazy, relative and dynamic imports are all found (else the rules above pass vacuously)."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "optimizer" / "api" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    found = {module for _, module in imports(path)}
    assert set(expected) <= found, found


_IMPORT_OPERATOR = """
import importlib.util, sys
from pathlib import Path
if importlib.util.find_spec("mlopt_operator") is None:  # a bare checkout: map operator/ as the install does
    spec = importlib.machinery.ModuleSpec("mlopt_operator", None, is_package=True)
    spec.submodule_search_locations = [str(Path(sys.argv[1]) / "operator")]
    sys.modules["mlopt_operator"] = importlib.util.module_from_spec(spec)
    sys.path.append(sys.argv[1])
import mlopt_operator.handlers, mlopt_operator.job, mlopt_operator.status, mlopt_operator.cluster
import mlopt_operator.settings, mlopt_operator.main
print(" ".join(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))
"""


def test_importing_the_operator_imports_no_engine(tmp_path):
    """What the operator image would load: none of the engines (numpy included: kopf and the
    kubernetes client do not need it). Run from a scratch folder, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_OPERATOR, str(ROOT), *HEAVY],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert not loaded, f"importing the operator loaded {loaded}"
