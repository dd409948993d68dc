"""The `mlopt` command end to end, as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CONV_LSTM_INPUTS, save_user_model, write_spec

MLOPT = str(Path(sys.executable).with_name("mlopt"))


def mlopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MLOPT, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # the whole pipeline
def test_optimize_digits_end_to_end(tmp_path):
    spec = write_spec(tmp_path, {
        "model": {"source": "zoo:digits"},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"},
                     {"name": "ort-int8-static", "recipe": "ort-int8-static", "calibration": "percentile"},
                     {"name": "torch-int8-static", "recipe": "torch-int8-static"}],
        "data": {"source": "zoo:digits", "samples": 32},
        "benchmark": {"warmup": 2, "runs": 10},
        "acceptance": {"maxAccuracyDrop": 0.05},
        "output": "spec-output",
    })
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "best:" in done.stdout and "pytorch-fp32" in done.stdout  # the terminal table
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "run.log", "size.png", "latency.png", "models",
                                               "serving"}
    assert not (tmp_path / "spec-output").exists()  # --output overrides spec.output
    results = json.loads((out / "results.json").read_text())
    assert results["accuracyMetric"] == "top1"
    assert results["baseline"]["accuracy"] > 0.9  # a trained model on real held-out data
    assert all(abs(v["accuracy"] - results["baseline"]["accuracy"]) < 0.05 for v in results["variants"])
    report = (out / "report.md").read_text()
    assert "## ONNX conversion" in report and "| model file |" in report and "ort-int8-static" in report
    assert (out / "size.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.rglob(".mlopt-partial-*"))  # staging cleaned up


@pytest.mark.slow  # the whole pipeline
def test_quiet_prints_nothing_and_spec_output_is_used(tmp_path):
    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                                 "benchmark": {"warmup": 1, "runs": 3}, "output": "results-here"})
    done = mlopt("optimize", str(spec), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (tmp_path / "results-here" / "results.json").is_file()


def test_invalid_spec_exits_2_names_fields_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, {"model": {"source": "zoo:crnn"}, "benchmark": {"runs": "many"}, "extra": 1})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert "spec.benchmark.runs" in done.stderr and "spec.extra" in done.stderr and "fix:" in done.stderr
    assert done.stderr.startswith("error: ") and "[red]" not in done.stderr  # styled, not raw markup
    assert not (tmp_path / "out").exists()
    assert mlopt("validate", str(spec), cwd=tmp_path).returncode == 2


def test_unloadable_model_exits_1_with_reason(tmp_path):
    spec = write_spec(tmp_path, {"model": {"source": "missing.pt", "entrypoint": "m:Net", "inputs": CONV_LSTM_INPUTS}})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert "no file at" in done.stderr and done.stderr.startswith("error: ")
    assert not (tmp_path / "out" / "results.json").exists()


def test_validate_and_models(tmp_path):
    done = mlopt("validate", str(Path(__file__).parents[2] / "examples" / "crnn.yaml"), cwd=tmp_path)
    assert done.returncode == 0 and "valid" in done.stdout and "ort-int8-static-dynamic" in done.stdout
    listing = mlopt("models", cwd=tmp_path)
    assert listing.returncode == 0
    for name in ("crnn", "digits"):
        assert name in listing.stdout


def test_recipes_lists_every_recipe(tmp_path):
    from optimizer.api.spec import Recipe

    table = mlopt("recipes", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert all(recipe.value in table.stdout for recipe in Recipe)
    listed = mlopt("recipes", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {row["recipe"]: row for row in json.loads(listed.stdout)}
    assert list(rows) == [recipe.value for recipe in Recipe]
    assert rows["onnx-fp32"]["defaultSet"] == ["cpu", "cuda"] and rows["torchao-pt2e-int8-static"]["defaultSet"] == []
    assert rows["torch-int8-qat"]["labels"] == "required" and rows["onnx-fp16"]["devices"] == ["cuda"]


@pytest.mark.slow  # the whole pipeline
def test_one_failing_variant_does_not_stop_the_others(tmp_path):
    # Export fails (the model breaks at a second shape), so ONNX variants fail; PyTorch ones still run.
    weights = save_user_model(tmp_path, "ShapeBaker")
    spec = write_spec(tmp_path, {
        "model": {"source": weights.name, "entrypoint": "user_models:ShapeBaker",
                  "inputs": [{"name": "x", "shape": [1, 2, 4], "dynamicAxes": {0: "batch", 1: "rows"}}]},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}, {"name": "dyn", "recipe": "torch-int8-dynamic"}],
        "benchmark": {"warmup": 1, "runs": 3},
    })
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["onnx-fp32"]["status"] == "failed"
    assert "x=[2, 4, 4]" in by_name["onnx-fp32"]["error"]
    assert by_name["dyn"]["status"] == "ok" and by_name["dyn"]["latencyMs"]["mean"] > 0


def test_interrupted_run_leaves_no_results(tmp_path):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    class InterruptAtBenchmark(QuietReporter):
        def log(self, message):
            if message.startswith("benchmark"):
                raise KeyboardInterrupt

    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}]})
    with pytest.raises(KeyboardInterrupt):
        optimize(load_spec(spec), tmp_path / "out", tmp_path, InterruptAtBenchmark())
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob(".mlopt-partial-*"))


@pytest.mark.parametrize("where", ["a-file", "a-file/below-it"])
def test_an_output_that_is_a_file_fails_before_any_work_naming_spec_output(tmp_path, where):
    (tmp_path / "a-file").write_text("the user's")
    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}]})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / where), cwd=tmp_path)
    assert done.returncode == 1 and "spec.output:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert "load…" not in done.stdout + done.stderr  # refused before the first step
    assert (tmp_path / "a-file").read_text() == "the user's"


@pytest.mark.slow  # the whole pipeline
def test_worker_writes_summary_and_results(tmp_path):
    spec = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "w"},
            "spec": {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                     "benchmark": {"warmup": 1, "runs": 3}}}
    env = {**os.environ, "MLOPT_SPEC": json.dumps(spec), "MLOPT_OUTPUT": str(tmp_path / "out"),
           "MLOPT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    done = subprocess.run([MLOPT, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["phase"] == "Succeeded" and summary["variants"][0]["name"] == "fp32"
    assert (tmp_path / "out" / "results.json").is_file()
    # A zoo name that does not exist is refused with the spec (#23), before any work, naming the field.
    env["MLOPT_SPEC"] = json.dumps({**spec, "spec": {"model": {"source": "zoo:nope"}}})
    failed = subprocess.run([MLOPT, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert failed.returncode == 2
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["phase"] == "Failed" and summary["reason"] == "InvalidSpec", summary
    assert "model.source" in summary["message"] and "zoo:nope" in summary["message"], summary


@pytest.mark.slow  # starts a real run
def test_worker_stops_on_sigterm_with_143_and_leaves_nothing_half_written(tmp_path):
    """An evicted or deleted pod gets SIGTERM; the worker (PID 1 there, where an unhandled SIGTERM is
    ignored) must stop at once with 128 + 15, not run on and finish in a pod about to vanish."""
    import signal

    spec = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "w"},
            "spec": {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                     "benchmark": {"warmup": 1, "runs": 10_000}}}
    env = {**os.environ, "MLOPT_SPEC": json.dumps(spec), "MLOPT_OUTPUT": str(tmp_path / "out"),
           "MLOPT_TERMINATION_LOG": str(tmp_path / "termination-log"), "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen([MLOPT, "worker"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in worker.stdout:  # the run is under way once a step reports
        seen.append(line)
        if "benchmark" in line.lower():
            break
    worker.send_signal(signal.SIGTERM)
    rest, _ = worker.communicate(timeout=120)
    assert worker.returncode == 143, "".join(seen) + rest
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "termination-log").exists()


@pytest.mark.slow  # the whole pipeline
def test_worker_with_a_claim_output_reports_the_claim_uri_not_the_mount(tmp_path):
    """status.results must name pvc://claim/..., which a user can find again; the pod's mount path
    (/mnt/pvc/...) means nothing outside that pod."""
    (tmp_path / "claims" / "models").mkdir(parents=True)
    spec = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "w"},
            "spec": {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                     "benchmark": {"warmup": 1, "runs": 3}, "output": "pvc://models/runs/w/"}}
    env = {**os.environ, "MLOPT_SPEC": json.dumps(spec), "MLOPT_PVC_ROOT": str(tmp_path / "claims"),
           "MLOPT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    done = subprocess.run([MLOPT, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["output"] == "pvc://models/runs/w/"
    assert summary["results"] == "pvc://models/runs/w/results.json"
    assert summary["artifacts"]["best"]["uri"].startswith("pvc://models/runs/w/models/"), summary["artifacts"]
    assert (tmp_path / "claims" / "models" / "runs" / "w" / "results.json").is_file()


def test_cuda_without_a_gpu_is_refused_loudly(tmp_path):
    """A run that asks for CUDA must never quietly time the CPU instead."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal path cannot be exercised here")
    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "benchmark": {"device": "cuda"}})
    done = mlopt("optimize", str(spec), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert "benchmark.device is cuda" in done.stderr and "torch.cuda.is_available() is False" in done.stderr
    assert not (tmp_path / "out").exists()
