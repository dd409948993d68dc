"""The report's explanations: arithmetic counted right, time split by op, scaling rows, tuning."""

from __future__ import annotations

import json

import pytest

from optimizer.compute import compute_limits
from optimizer.tuning import candidates

from .conftest import write_spec


def test_macs_match_the_layer_arithmetic(conv_lstm_run):
    results, _ = conv_lstm_run
    # ConvLstm at 1×1×8×16: conv 8·16 px × 16 ch × 9; conv2 4·8 px × 16 ch × 16·9; map 8 steps × 32 × 64;
    # bidirectional LSTM(32→32) 8 steps × 2 dirs × 4 gates × 32 × (32 + 32); dense 8 × 6 × 64
    expected = {"Conv": 8 * 16 * 16 * 9 + 4 * 8 * 16 * 16 * 9, "Linear": 8 * 32 * 64 + 8 * 6 * 64,
                "LSTM": 8 * 2 * 4 * 32 * 64}
    assert results.analysis.compute["byType"] == expected
    assert results.analysis.compute["macs"] == sum(expected.values())


def test_compute_limits_follow_the_cpu_flags():
    vnni = compute_limits(64_000_000, ["avx2", "avx512f", "avx512_vnni"], 2.0)
    assert vnni["fp32LimitMs"] == pytest.approx(2.0) and vnni["int8LimitMs"] == pytest.approx(0.5)
    avx2 = compute_limits(64_000_000, ["avx2"], 2.0)
    assert avx2["int8LimitMs"] == pytest.approx(1.0)
    assert compute_limits(1, [], None)["fp32LimitMs"] is None


def test_profile_and_scaling_explain_the_best(conv_lstm_run):
    results, output = conv_lstm_run
    analysis = results.analysis
    best = results.variant(results.best) if results.best else None
    if best is not None and best.runtime == "onnxruntime":
        assert analysis.profiledVariant == results.best
        assert analysis.profile and abs(sum(r["share"] for r in analysis.profile) - 1) < 0.01
        assert "## Where the time goes" in (output / "report.md").read_text()
    cells = {(r["variant"], r["batch"], r["threads"]) for r in analysis.scaling}
    assert {("pytorch-fp32", b, t) for b in (1, 8, 32) for t in (1, 2)} <= cells
    assert all(r["throughput"] == pytest.approx(r["batch"] * 1000 / r["latencyMs"], rel=0.01) for r in analysis.scaling)


def test_tuning_candidates_stay_within_the_thread_budget():
    for threads in (1, 2, 4):
        options = candidates(threads)
        assert all(o["intraOpThreads"] * o["interOpThreads"] <= max(threads, 2) for o in options)
        assert {o["optimizationLevel"] for o in options} == {"basic", "extended", "all"}
    assert not any(o["executionMode"] == "sequential" and o["interOpThreads"] > 1 for o in candidates(4))


def test_tune_records_what_was_chosen(tmp_path):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.spec_loader import load_spec

    spec = write_spec(tmp_path, {"model": {"source": "zoo:digits"}, "variants": [{"name": "fp32", "recipe": "onnx-fp32"}],
                                 "benchmark": {"warmup": 1, "runs": 5, "tune": True, "scalingBatches": []}})
    results = optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())
    tuning = results.analysis.tuning
    assert tuning["variant"] == "fp32" == results.best
    assert tuning["chosen"] == min(tuning["tried"], key=lambda t: t["meanMs"])
    assert len(tuning["tried"]) == len(candidates(1))
    assert results.analysis.scaling == []
    assert "## Session tuning" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["analysis"]["tuning"]["chosen"]
