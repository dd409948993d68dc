"""The serving sweep's own rules, on a one-MatMul ONNX model (fast: no torch, no pipeline)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from optimizer.api.spec import InputSpec, ServingSpec
from optimizer.engines.runners import OrtRunner
from optimizer.measure.environment import usable_cpus
from optimizer.measure.serving import SweepPlan, run_load, session_cap, sweep, thread_choices

INPUTS = [InputSpec(name="x", shape=[1, 256], dynamicAxes={0: "batch"})]


@pytest.fixture(scope="module")
def matmul(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((256, 256), dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])], [weight])
    path = tmp_path_factory.mktemp("matmul") / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return OrtRunner(path)


def test_threads_per_stream_fit_the_cpus_and_one_is_always_tried():
    assert thread_choices(1, 8) == [1, 2, 4, 8] and thread_choices(3, 8) == [1, 2] and thread_choices(5, 4) == [1]
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_the_plan_defaults_to_twice_the_cpus_and_batches_only_a_dynamic_batch_axis():
    plan = SweepPlan.of(ServingSpec(), cpus=3, batchable=True)
    assert (plan.max_concurrency, plan.batches, plan.slo_ms) == (6, (1, 2, 4, 8), 100.0)
    assert SweepPlan.of(ServingSpec(maxConcurrency=2), cpus=3, batchable=False).batches == (1,)


def test_the_curve_records_every_point_and_the_best_within_the_slo(matmul):
    plan = SweepPlan.of(ServingSpec(latencySLOMs=50, secondsPerPoint=0.2, maxConcurrency=2), cpus=2, batchable=True)
    seen = []
    curve = sweep("matmul", matmul, INPUTS, plan, seen.append)
    assert curve.reason is None and curve.points == seen and len(seen) >= 2
    assert {p.batch for p in curve.points} >= {1, 2}  # dynamic batching was tried
    within = [p for p in curve.points if p.p99Ms <= 50]
    assert curve.atSLO == max(within, key=lambda p: p.requestsPerSecond)
    for p in curve.points:  # a batch of b counts b requests, each with its call's latency
        assert p.requests % p.batch == 0 and p.requestsPerSecond == pytest.approx(p.requests / 0.2)  # 3 windows
        assert p.p50Ms <= p.p90Ms <= p.p99Ms and p.meanMs > 0


def test_a_point_waits_for_three_windows_that_agree_and_says_when_they_never_did():
    calm = run_load([lambda: time.sleep(0.005)], window=0.2, warmup=0.01)  # ~37 calls a window
    assert calm.stable and calm.seconds == pytest.approx(0.6) and 60 <= calm.latencies.size <= 125
    # A neighbour takes the core after ~20 calls: from then on a call (0.12 s) outlasts two windows, so no
    # three windows in a row agree, and the point says so after MAX_WINDOWS instead of waiting forever.
    pauses = iter([0.001] * 20 + [0.12] * 1000)
    start = time.perf_counter()
    shaken = run_load([lambda: time.sleep(next(pauses))], window=0.05, warmup=0.0)
    assert not shaken.stable and time.perf_counter() - start < 0.6


def test_an_slo_below_one_request_alone_is_a_named_cannot_meet(matmul):
    plan = SweepPlan.of(ServingSpec(latencySLOMs=0.0001, secondsPerPoint=0.2), cpus=2, batchable=True)
    curve = sweep("matmul", matmul, INPUTS, plan)
    assert curve.atSLO is None and {p.concurrency for p in curve.points} == {1}  # stopped after one stream
    assert curve.reason.startswith("cannot meet: one request alone takes ")
    assert "the SLO is 0.0001 ms (raise benchmark.serving.latencySLOMs or pick a faster target)" in curve.reason


def test_a_pytorch_variant_is_swept_with_torchs_threads_and_they_are_restored():
    import torch

    from optimizer.engines.runners import TorchRunner

    runner = TorchRunner(torch.nn.Linear(256, 256).eval(), ["x"])
    before = torch.get_num_threads()
    plan = SweepPlan.of(ServingSpec(latencySLOMs=50, secondsPerPoint=0.15, maxConcurrency=2), cpus=2, batchable=False)
    curve = sweep("linear", runner, INPUTS, plan)
    assert curve.atSLO and {p.threadsPerStream for p in curve.points if p.concurrency == 1} == {1, 2}
    assert torch.get_num_threads() == before


def test_streams_are_capped_so_their_sessions_fit_in_half_the_memory_left():
    from optimizer.measure.environment import available_memory

    mb = 2**20
    assert session_cap(100 * mb, 2000 * mb) == 4  # 1000 MB / (2 x 100 + 16) MB
    assert session_cap(900 * mb, 1000 * mb) == 1 and session_cap(100 * mb, None) is None
    plan = SweepPlan.of(ServingSpec(), cpus=4, batchable=False)
    assert plan.capped(3).max_concurrency == 3 and plan.capped(64) is plan and plan.capped(None) is plan
    assert available_memory() > 0
