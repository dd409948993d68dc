"""Benchmarks are not tests: CI only checks that they run and print their tables (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.slow
def test_seed_crnn_prints_the_notes_tables(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "seed_crnn.py"), "--runs", "2", "--warmup", "0", "--quiet",
         "--output", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for heading in ("ONNX conversion (note table 1)", "Quantization with PyTorch (note table 2)",
                    "Quantization with ONNX Runtime"):
        assert heading in done.stdout
    assert "| CPU inference (note) | 39.3 ms ± 410 µs |" in done.stdout
    assert "best:" in done.stdout and (tmp_path / "out" / "results.json").is_file()


def test_peers_without_olive_says_how_to_set_it_up(tmp_path):
    """Olive lives in its own benchmark environment, never in mlopt's; without it, say how to get it."""
    import importlib.util

    if importlib.util.find_spec("olive") is not None:
        pytest.skip("olive is installed in this environment; the full benchmark is not a test")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "peers.py"), "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "requirements-peers.txt" in done.stderr and "import olive" in done.stderr


def test_gpu_crnn_without_a_gpu_says_so_and_fails(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark runs for real there")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_crnn.py"), "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no CUDA device" in done.stderr and done.stdout == ""


@pytest.mark.slow
def test_gpu_crnn_dry_run_prints_the_notes_gpu_rows_and_every_gpu_variant(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_crnn.py"), "--device", "cpu", "--runs", "2", "--warmup", "0",
         "--rounds", "1", "--quiet", "--output", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| note: CRNN PyTorch (pth), GPU | the research note's own GPU | 10.2 ms ± 238 µs |" in done.stdout
    assert "| note: CRNN ONNX, GPU | the research note's own GPU | 8.36 ms ± 78.6 µs |" in done.stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for recipe in ("torch-fp16", "torch-bf16", "torch-autocast-fp16", "torch-compile", "torch-cudagraphs"):
        assert "skipped: not applicable on CPU" in rows[recipe]  # never a number without the GPU
    assert "| 1.00x | 100.00% | pytorch · CPU | ok |" in rows["pytorch-fp32"]
    assert "CPU dry run" in done.stdout and (tmp_path / "out" / "results.json").is_file()
