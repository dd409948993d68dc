"""Timing: every variant gets its runs, in rounds taken in turn, with its warm-ups before the timed runs."""

from __future__ import annotations

import pytest

from optimizer.measure.benchmark import measure, measure_interleaved, round_sizes, steps


def _recorder(log: list[str], name: str):
    return lambda: log.append(name)


def test_rounds_split_the_runs_without_empty_rounds():
    assert round_sizes(50, 5) == [10] * 5
    assert round_sizes(7, 3) == [3, 2, 2]
    assert round_sizes(2, 5) == [1, 1]  # never more rounds than runs
    assert round_sizes(4, 1) == [4]


def test_variants_are_timed_in_turn_and_each_gets_every_run():
    log: list[str] = []
    ticks: list[None] = []
    calls = {name: _recorder(log, name) for name in ("baseline", "int8")}
    latencies = measure_interleaved(calls, warmup=2, runs=6, rounds=3, on_run=lambda: ticks.append(None))
    assert {name: latency.runs for name, latency in latencies.items()} == {"baseline": 6, "int8": 6}
    assert all(latency.rounds == 3 for latency in latencies.values())
    # round 1: 2 warm-ups + 2 timed each; rounds 2 and 3: 1 re-warm + 2 timed each, alternating
    expected = (["baseline"] * 4 + ["int8"] * 4) + (["baseline"] * 3 + ["int8"] * 3) * 2
    assert log == expected
    assert len(ticks) == steps(2, warmup=2, runs=6, rounds=3) == len(log)


def test_no_warmup_means_no_rewarm_and_one_round_is_back_to_back():
    log: list[str] = []
    measure_interleaved({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, warmup=0, runs=4, rounds=2)
    assert log == ["a", "a", "b", "b", "a", "a", "b", "b"]
    single: list[str] = []
    latency = measure(_recorder(single, "x"), warmup=1, runs=3)
    assert single == ["x"] * 4 and latency.runs == 3 and latency.rounds == 1


def test_round_means_give_the_speedup_range():
    import numpy as np

    from optimizer.measure.benchmark import speedup_range, summarize

    baseline = summarize(np.array([10.0, 10.0, 12.0, 12.0]), [2, 2])
    candidate = summarize(np.array([2.0, 2.0, 3.0, 3.0]), [2, 2])
    assert baseline.roundMeans == [10.0, 12.0] and candidate.rounds == 2
    assert speedup_range(baseline, candidate) == [4.0, 5.0]
    assert speedup_range(summarize(np.array([1.0, 2.0])), summarize(np.array([1.0, 1.0]))) is None  # one round


def test_a_time_budget_stops_a_slow_variant_and_says_so():
    import time as clock

    from optimizer.measure.benchmark import Budget, measure_interleaved

    latencies = measure_interleaved({"slow": lambda: clock.sleep(0.02), "fast": lambda: None}, warmup=2, runs=100,
                                    rounds=4, budget=Budget(seconds=0.2))
    slow, fast = latencies["slow"], latencies["fast"]
    assert slow.stoppedBy == "timeBudget" and slow.rounds == 4 and 4 <= slow.runs < 100
    assert fast.stoppedBy == "runs" and fast.runs == 100
    assert slow.precision is not None and slow.precision > 0


def test_a_target_precision_stops_once_the_mean_is_known():
    from optimizer.measure.benchmark import Budget, measure_interleaved

    def steady():
        sum(range(2000))

    latency = measure_interleaved({"steady": steady}, warmup=1, runs=400, rounds=4,
                                  budget=Budget(precision=0.5))["steady"]
    assert latency.stoppedBy == "targetPrecision"
    assert latency.runs < 400 and latency.rounds == 4  # every round keeps a mean
    assert latency.precision <= 0.5 or latency.runs >= 8


def test_peak_memory_sees_what_a_block_allocated():
    import numpy as np

    from optimizer.measure.memory import peak_memory

    with peak_memory() as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    if peak.added_bytes is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert peak.added_bytes >= 48 * 2**20
