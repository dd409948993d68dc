"""benchmark.serving through the whole pipeline: the rate at the SLO, its price, and what is written.

The acceptance test checks the sweep against a load that shares none of its code: plain threads,
each with its own onnxruntime.InferenceSession built from the model file in the output folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import CONV_LSTM_INPUTS, QUICK_BENCHMARK, save_user_model, write_spec

MLOPT = str(Path(sys.executable).with_name("mlopt"))
SWEEP = {"maxConcurrency": 2, "secondsPerPoint": 0.3, "variants": 1}


def mlopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MLOPT, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def small_spec(directory: Path, **extra) -> Path:
    """The miniature CRNN (conftest's ConvLstm) with one ONNX variant: a whole run in seconds."""
    weights = save_user_model(directory, "ConvLstm")
    return write_spec(directory, {
        "model": {"source": weights.name, "entrypoint": "user_models:ConvLstm", "inputs": CONV_LSTM_INPUTS},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
        "data": {"source": "random", "samples": 8},
        "acceptance": {"maxAccuracyDrop": 1.0},
        **extra,
    })


def independent_load(model: Path, shape: list[int], concurrency: int, threads: int, seconds: float,
                     warmup: float = 0.5) -> float:
    """Requests/s of `concurrency` client threads, each with its own session of `threads` intra-op
    threads, sending one call of `shape` (its batch = requests per call) back to back; a request counts
    when it completes inside the timed window."""
    import onnxruntime as ort

    sessions = []
    for _ in range(concurrency):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sessions.append(ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]))
    feed = np.random.default_rng(7).random(shape, dtype=np.float32)
    start = time.perf_counter() + warmup
    end = start + seconds
    done = [0] * concurrency

    def client(index: int) -> None:
        session = sessions[index]
        name = session.get_inputs()[0].name
        while time.perf_counter() < end:
            session.run(None, {name: feed})
            if start <= time.perf_counter() <= end:
                done[index] += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return shape[0] * sum(done) / seconds


@pytest.mark.slow  # the whole pipeline on the CRNN, then 6 to 12 s of independent load
def test_the_crnn_rate_at_the_slo_is_reproduced_by_an_independent_load(tmp_path):
    from optimizer.api.spec_loader import load_spec
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize

    spec = write_spec(tmp_path, {
        "model": {"source": "zoo:crnn"},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
        "data": {"source": "random", "samples": 8},
        "benchmark": {**QUICK_BENCHMARK, "serving": {"enabled": True, "latencySLOMs": 1000, "maxConcurrency": 2,
                                                     "secondsPerPoint": 2, "variants": 1}},
        "acceptance": {"maxAccuracyDrop": 1.0},
    })
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())
    at = results.serving.curves[0].atSLO
    assert results.serving.variant == "onnx-fp32" and at.p99Ms <= 1000
    assert at.requestsPerSecond == results.serving.requestsPerSecond
    model = tmp_path / "out" / results.variant("onnx-fp32").artifact  # the file a server would load
    # Loads of 2 s (the sweep's time per point) until three in a row agree within 10% (at most six):
    # the stability rule perf_analyzer applies, and the sweep applies to its own windows. On this shared
    # 2-core machine a neighbour that takes a core for a second halves one load's rate; a rate that
    # moves that much is no reference. Each load counts 200+ requests, so a window edge moves it by
    # under 1%; 10% leaves room for the remaining noise and for the sweep's pick of the best of its
    # points (a lucky one). At most 12 s of load.
    loads: list[float] = []
    while len(loads) < 6 and not (len(loads) >= 3 and max(loads[-3:]) <= 1.10 * min(loads[-3:])):
        loads.append(independent_load(model, [at.batch, 1, 32, 100], at.concurrency, at.threadsPerStream, 2.0))
    measured = float(np.mean(loads[-3:]))
    print(f"sweep at SLO: {at.requestsPerSecond:.1f} req/s ({at.concurrency} x {at.threadsPerStream} threads, "
          f"batch {at.batch}); independent loads: {', '.join(f'{x:.1f}' for x in loads)} req/s")
    assert max(loads[-3:]) <= 1.10 * min(loads[-3:]), f"the machine was too busy for a steady reference: {loads}"
    assert abs(measured - at.requestsPerSecond) <= 0.10 * at.requestsPerSecond, results.serving.curves[0].points


@pytest.mark.slow  # the whole pipeline, through the `mlopt` command
def test_a_price_and_a_demand_give_replicas_and_cost_per_hour_recomputable_from_results_json(tmp_path):
    from optimizer.api.results import Results
    from optimizer.api.summary import parse_summary, success_summary

    spec = small_spec(tmp_path, benchmark={**QUICK_BENCHMARK, "serving": {"latencySLOMs": 200, **SWEEP}},
                      targets=[{"name": "local-pool", "pricePerHour": 0.2}], demand=250)
    done = mlopt("optimize", str(spec), "--target", "local-pool", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "serving:" in done.stdout and "recommended: onnx-fp32 on local-pool, " in done.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["targets"]  # one target's run never overwrites another's
    folder = tmp_path / "out" / "targets" / "local-pool"
    results = json.loads((folder / "results.json").read_text())
    serving, rec = results["serving"], results["recommendation"]
    assert results["target"] == "local-pool" and serving["variant"] == "onnx-fp32"
    rps = serving["requestsPerSecond"]
    offer = next(o for o in rec["offers"] if o["variant"] == serving["variant"])
    assert offer["requestsPerSecond"] == rps and offer["pricePerHour"] == 0.2
    assert offer["replicas"] == math.ceil(250 / rps)
    assert math.isclose(offer["costPerHour"], math.ceil(250 / rps) * 0.2)
    assert math.isclose(offer["costPerMillion"], 0.2 / (rps * 3600) * 1e6)
    assert (rec["target"], rec["variant"], rec["basis"]) == ("local-pool", "onnx-fp32", "cost per hour at the demand")
    report = (folder / "report.md").read_text()
    assert "## Serving within the SLO" in report and "**Recommended: onnx-fp32 on local-pool**" in report
    assert (folder / "charts" / "serving.png").stat().st_size > 0
    # The operator's status reads these keys of the worker's summary.
    summary = parse_summary(success_summary(Results.model_validate(results), str(folder / "results.json")))
    assert summary["target"] == "local-pool"
    assert summary["serving"] == {"variant": "onnx-fp32", "requestsPerSecond": round(rps, 1),
                                  "p99Ms": round(serving["p99Ms"], 2), "latencySLOMs": 200.0, "reason": None}
    crowded = Results.model_validate(results)  # 60 failed variants with long errors: variants go, serving stays
    crowded.variants += [crowded.variants[0].model_copy(update={"name": f"v{i}", "status": "failed", "error": "x" * 900})
                         for i in range(60)]
    summary = parse_summary(success_summary(crowded, str(folder / "results.json")))
    assert summary["truncated"] and summary["serving"]["variant"] == "onnx-fp32" and summary["target"] == "local-pool"


@pytest.mark.slow  # the whole pipeline, through the `mlopt` command
def test_an_slo_below_one_request_alone_is_a_named_result_not_a_failure(tmp_path):
    from optimizer.api.results import Results
    from optimizer.api.summary import parse_summary, success_summary

    spec = small_spec(tmp_path, benchmark={**QUICK_BENCHMARK, "serving": {"enabled": True, "latencySLOMs": 0.001,
                                                                          **SWEEP}})
    done = mlopt("optimize", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    reason = results["serving"]["reason"]
    assert reason.startswith("cannot meet: one request alone takes ") and "the SLO is 0.001 ms" in reason
    assert results["serving"]["variant"] is None and results["recommendation"] is None
    assert results["serving"]["curves"][0]["points"] and results["target"] is None
    assert all((out / entry["path"]).is_file() for entry in results["outputs"])  # complete, nothing half-written
    assert not [p for p in out.iterdir() if p.name.startswith(".mlopt-partial")]
    assert "Nothing: cannot meet" in (out / "report.md").read_text()
    summary = parse_summary(success_summary(Results.model_validate(results), str(out / "results.json")))
    assert summary["phase"] == "Succeeded" and summary["serving"]["reason"].startswith("cannot meet")


@pytest.mark.slow  # the whole pipeline
def test_without_targets_or_serving_enabled_no_sweep_runs(tmp_path):
    from optimizer.api.spec_loader import load_spec
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize

    results = optimize(load_spec(small_spec(tmp_path, benchmark=QUICK_BENCHMARK)), tmp_path / "out", tmp_path,
                       QuietReporter())
    assert results.serving is None and results.recommendation is None and results.target is None
    serve = next(s for s in results.steps if s.step == "serve")
    assert serve.seconds < 0.05  # the local default run pays nothing for the sweep
    assert not (tmp_path / "out" / "charts").exists()
    assert "Serving within the SLO" not in (tmp_path / "out" / "report.md").read_text()


def test_a_target_not_in_the_spec_is_refused_before_any_work(tmp_path):
    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "targets": [{"name": "local-pool"}]})
    done = mlopt("optimize", str(spec), "--target", "amx", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert "--target: no target named 'amx' in spec.targets (known: local-pool)" in done.stderr
    assert not (tmp_path / "out").exists()
    document = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "w"},
                "spec": {"model": {"source": "zoo:digits"}, "targets": [{"name": "local-pool"}]}}
    env = {**os.environ, "MLOPT_SPEC": json.dumps(document), "MLOPT_TARGET": "amx",
           "MLOPT_OUTPUT": str(tmp_path / "out"), "MLOPT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    failed = subprocess.run([MLOPT, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert failed.returncode == 2 and (summary["phase"], summary["reason"]) == ("Failed", "InvalidSpec")
    assert summary["message"].startswith("MLOPT_TARGET: no target named 'amx'") and not (tmp_path / "out").exists()


@pytest.mark.slow  # the whole pipeline, as the operator's Job runs it
def test_a_targets_job_stores_under_its_own_folder_and_its_summary_names_the_target(tmp_path):
    (tmp_path / "claims" / "models").mkdir(parents=True)
    document = {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "w"},
                "spec": {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                         "benchmark": {**QUICK_BENCHMARK, "serving": {"latencySLOMs": 100, **SWEEP}},
                         "targets": [{"name": "avx512", "pricePerHour": 0.1}, {"name": "amx"}],
                         "output": "pvc://models/runs/w/"}}
    env = {**os.environ, "MLOPT_SPEC": json.dumps(document), "MLOPT_TARGET": "avx512",
           "MLOPT_PVC_ROOT": str(tmp_path / "claims"), "MLOPT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    done = subprocess.run([MLOPT, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "serving fp32: 1 stream(s) × 1 thread(s), batch 1: " in done.stdout  # the sweep in the Job's log
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["target"] == "avx512" and summary["serving"]["variant"] == "fp32"
    assert summary["serving"]["requestsPerSecond"] > 0 and summary["serving"]["latencySLOMs"] == 100
    assert summary["output"] == "pvc://models/runs/w/targets/avx512/"
    assert summary["results"] == "pvc://models/runs/w/targets/avx512/results.json"
    assert summary["artifacts"]["best"]["uri"].startswith("pvc://models/runs/w/targets/avx512/models/")
    results = json.loads((tmp_path / "claims/models/runs/w/targets/avx512/results.json").read_text())
    assert results["recommendation"]["offers"][0]["pricePerHour"] == 0.1
    assert "serving fp32" in (tmp_path / "claims/models/runs/w/targets/avx512/run.log").read_text()
