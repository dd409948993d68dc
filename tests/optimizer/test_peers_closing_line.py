"""benchmarks/peers.py's closing line: mlopt's best against the fastest peer that is at least as accurate.

(The benchmark itself is not a test; tests/benchmarks checks that it runs. This pins the arithmetic.)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PEERS = Path(__file__).parents[2] / "benchmarks" / "peers.py"
LINE = re.compile(r"^mlopt best / fastest peer: (\d+\.\d\dx|n/a)$")


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_under_test", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _row(peers, pipeline: str, variant: str, ms: float | None, accuracy: float | None, error: str | None = None):
    latency = None if ms is None else SimpleNamespace(mean=ms, std=0.0, p50=ms)
    return peers.Row(pipeline, variant, latency=latency, accuracy=accuracy, error=error)


def test_fastest_peer_at_least_as_accurate_is_the_one_compared(peers):
    best = _row(peers, "mlopt", "ort-int8-static (best)", 5.0, 0.99)
    rows = [
        _row(peers, "PyTorch", "FP32 eager (baseline)", 30.0, 1.0),  # the baseline is not a peer
        best,
        _row(peers, "mlopt", "onnx-fp32", 2.0, 1.0),  # neither are mlopt's other variants
        _row(peers, "Olive", "dynamic quantization", 3.0, 0.95),  # faster, but less accurate: not eligible
        _row(peers, "OpenVINO", "default precision", 8.0, 0.99),  # equal accuracy counts
        _row(peers, "torchao", "PT2E static INT8 + torch.compile", 10.0, 1.0),
        _row(peers, "Olive", "static quantization", 1.0, 1.0, error="failed"),  # errors are never compared
    ]
    context, line = peers.closing_lines(rows, best, "top1")
    assert line == "mlopt best / fastest peer: 1.60x" and LINE.match(line)  # 8.0 ms / 5.0 ms
    assert "OpenVINO default precision" in context and "equal or better" in context


def test_when_no_peer_is_as_accurate_the_fastest_is_compared_and_the_context_says_so(peers):
    best = _row(peers, "mlopt", "ort-int8-static (best)", 4.0, 0.99)
    rows = [best, _row(peers, "Olive", "dynamic quantization", 5.0, 0.9),
            _row(peers, "OpenVINO", "NNCF INT8 (nncf.quantize)", 3.0, 0.5)]
    context, line = peers.closing_lines(rows, best, "agreement")
    assert line == "mlopt best / fastest peer: 0.75x"  # the peer is faster: below 1
    assert context.startswith("No peer row reaches the agreement of mlopt's best") and "NNCF INT8" in context


def test_nothing_to_compare_still_closes_with_the_line(peers):
    best = _row(peers, "mlopt", "ort-int8-static (best)", 4.0, 0.99)
    assert peers.closing_lines([best, _row(peers, "torchao", "PT2E", None, None, error="compile failed")],
                               best)[-1] == "mlopt best / fastest peer: n/a"
    assert peers.closing_lines([], None)[-1] == "mlopt best / fastest peer: n/a"
