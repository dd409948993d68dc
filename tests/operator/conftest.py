"""Unit tests of the operator's pure parts: no cluster, no kopf event loop."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# `pip install -e .` maps operator/ to the import name mlopt_operator; without an install
# (a bare checkout), map it here the same way so these tests still run.
if importlib.util.find_spec("mlopt_operator") is None:
    spec = importlib.machinery.ModuleSpec("mlopt_operator", None, is_package=True)
    spec.submodule_search_locations = [str(Path(__file__).resolve().parents[2] / "operator")]
    sys.modules["mlopt_operator"] = importlib.util.module_from_spec(spec)
