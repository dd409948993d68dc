"""The limits the report prints: the physical formula per ISA class, the clock chain, the rounds
that settle the fastest times, the kernels timed alone, and a report that never says ">100%"."""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest

from optimizer.measure.compute import PHYSICAL_MACS_PER_CYCLE, physical_limits
from optimizer.measure.fastest import fastest_until_stable
from optimizer.measure.hardware import ISA_CLASSES, isa_class
from optimizer.steps.report import _best_against_limits, _compute_section, of_limit

from .test_hardware import ALDER_LAKE, AVX2_EPYC, SAPPHIRE_RAPIDS, SKYLAKE_SP, ZEN4


@pytest.mark.parametrize("flags, isa, fp32_ms, int8_ms", [
    # 64 M MACs on one core at 2 GHz: ms = 64e6 / (MACs per cycle × 2e9) × 1000
    (AVX2_EPYC, "avx2", 2.0, 1.0),  # 2 FMA × 8 lanes; vpmaddubsw+vpmaddwd: 32 u8×s8 per 2 uops, 2 pipes
    (SKYLAKE_SP, "avx512", 1.0, 0.5),  # 2 FMA × 16 lanes; the same pair on zmm: 64 per 2 uops
    (ALDER_LAKE, "avx-vnni", 2.0, 0.5),  # vpdpbusd ymm: 32 per instruction, 2 per cycle
    (ZEN4, "avx512-vnni", 1.0, 0.25),  # vpdpbusd zmm: 64 per instruction, 2 per cycle
    (SAPPHIRE_RAPIDS, "amx", 1.0, 0.0625 / 2),  # tdpbusd: 16×16×64 per 16 cycles = 1024 per cycle
])
def test_the_physical_limit_per_isa_class(flags, isa, fp32_ms, int8_ms):
    assert isa_class(flags) == isa
    limits = physical_limits(64_000_000, isa, 2.0, threads=1)
    assert limits["fp32LimitMs"] == pytest.approx(fp32_ms) and limits["int8LimitMs"] == pytest.approx(int8_ms)
    two = physical_limits(64_000_000, isa, 2.0, threads=2)  # per core: two threads, two cores' pipes
    assert two["int8LimitMs"] == pytest.approx(int8_ms / 2) and two["fp32MacsPerS"] == pytest.approx(2 * limits["fp32MacsPerS"])


def test_every_isa_class_has_a_physical_rate_and_int8_is_never_slower():
    assert set(PHYSICAL_MACS_PER_CYCLE) == set(ISA_CLASSES)
    assert all(int8 >= 2 * fp32 for fp32, int8 in PHYSICAL_MACS_PER_CYCLE.values())


def test_without_a_measured_clock_there_is_no_physical_line():
    limits = physical_limits(64_000_000, "avx2", None, threads=1)
    assert limits["fp32LimitMs"] is None and limits["int8LimitMs"] is None and limits["int8MacsPerCycle"] == 32


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the chain is x86-64 code")
def test_the_clock_chain_runs_its_dependent_adds():
    from optimizer.measure import clock

    call = clock.chain_call()
    assert call is not None and call() == clock.chain_adds()  # rax counted every add of the chain
    assert clock.ghz_from_seconds(clock.chain_adds() / 3e9) == pytest.approx(3.0)  # one add per cycle


class ScriptedCalls:
    """Calls whose durations are scripted per round, and the clock they advance: the stop rules are
    tested without timing anything."""

    def __init__(self, durations: dict[str, list[float]]):
        self.now, self.durations, self.count = 0.0, durations, dict.fromkeys(durations, 0)

    def timer(self) -> float:
        return self.now

    def calls(self):
        def make(key):
            def call():
                series = self.durations[key]
                self.now += series[min(self.count[key], len(series) - 1)]
                self.count[key] += 1
            return call
        return {key: make(key) for key in self.durations}


def test_rounds_stop_once_the_fastest_time_settles():
    # warm-up, then 0.010, 0.009, 0.008 and flat: settled once 5 rounds improved it by < 3%
    script = ScriptedCalls({"a": [1.0, 0.010, 0.009, 0.008, 0.008]})
    result = fastest_until_stable(script.calls(), lambda times: {"a": times.get("a", 0.0)}, timer=script.timer,
                                  min_rounds=4, patience=5, tolerance=0.03)
    assert result.stable and result.fastest["a"] == pytest.approx(0.008)
    assert result.rounds == 8  # round 3 reached 0.008; rounds 4..8 kept it
    assert result.spread("a") == pytest.approx([0.008, 0.010])


def test_rounds_that_never_settle_stop_at_the_cap_and_say_so():
    script = ScriptedCalls({"a": [1.0, *[0.9 ** i for i in range(1, 200)]]})  # 10% faster every round
    result = fastest_until_stable(script.calls(), lambda times: {"a": times.get("a", 0.0)}, timer=script.timer,
                                  max_rounds=30)
    assert not result.stable and result.rounds == 30


def test_a_slower_duplicate_stops_being_timed():
    script = ScriptedCalls({"fast": [0.001], "slow": [0.002]})
    result = fastest_until_stable(script.calls(), lambda times: {"fast": times.get("fast", 0.0)},
                                  drop=lambda fastest: {"slow"}, timer=script.timer)
    assert result.samples["slow"][:3] == pytest.approx([0.002] * 3) and set(result.samples["slow"][3:]) == {None}
    assert result.samples["fast"] == pytest.approx([0.001] * result.rounds)


@pytest.mark.parametrize("limit, time", [(7.37, 7.95), (7.95, 7.95), (10.28, 8.72), (8.58, 7.95), (1.0, 0.5)])
def test_a_share_of_a_limit_never_exceeds_100_percent(limit, time):
    text = of_limit(limit, time)
    shares = [int(value) for value in re.findall(r"(\d+)%", text)]
    assert all(share <= 100 for share in shares)
    assert ("disturbed" in text) == (limit > time)


def _compute_record(best_ms: float) -> dict:
    """A compute record as limits.py writes it, with the issue's figures (Zen 3, avx2 fma f16c)."""
    at_shapes = {"threads": 1, "fp32LimitMs": 18.68, "int8LimitMs": 10.28, "fp32SpreadMs": [18.68, 20.0],
                 "int8SpreadMs": [10.28, 11.0], "fp32MedianRoundMs": 19.0, "int8MedianRoundMs": 10.5,
                 "byType": {"Conv": {"fp32Ms": 16.0, "fp32From": "onnx-fp32", "int8Ms": 9.0, "int8From": "static"}},
                 "variants": {"onnx-fp32": {"precision": "fp32", "kernels": {"Conv": 7}, "kernelsMs": 16.0},
                              "static": {"precision": "int8", "kernels": {"QLinearConv": 7}, "kernelsMs": 9.0}}}
    peak = {"gemm": "128x1024x512", "threads": 1, "fp32MacsPerS": 41e9, "int8MacsPerS": 88e9, "fp32From": "the GEMM",
            "int8From": "the GEMM", "fp32LimitMs": 16.4, "int8LimitMs": 9.63}
    physical = {"isa": "avx2", "clockGHz": 3.05, "threads": 1, "fp32MacsPerCycle": 16, "int8MacsPerCycle": 32,
                "fp32LimitMs": 13.8, "int8LimitMs": 8.58, "reportedClockGHz": 2.45, "clockSpreadGHz": [2.9, 3.05]}
    lines = {name: {"limitMs": record["int8LimitMs"], "beaten": record["int8LimitMs"] > best_ms,
                    "fraction": None if record["int8LimitMs"] > best_ms else record["int8LimitMs"] / best_ms}
             for name, record in (("atShapes", at_shapes), ("peak", peak), ("physical", physical))}
    return {"macs": 671_600_000, "byType": {"Conv": 618_000_000}, "atShapes": at_shapes, "peak": peak,
            "physical": physical, "notes": [],
            "measurement": {"rounds": 12, "seconds": 1.0, "setupSeconds": 0.5, "attempts": 2, "stable": True,
                            "tolerance": 0.03, "patience": 5},
            "best": {"variant": "static", "precision": "int8", "onnxruntime": True, "meanMs": best_ms, "lines": lines,
                     "disturbed": any(line["beaten"] for line in lines.values())},
            "byLayer": [{"layer": "Conv", "macs": 618_000_000, "ranAs": ["QLinearConv"], "precision": "int8",
                         "limitPrecision": "int8", "ms": 7.0, "macsPerS": 618e6 / 7e-3, "shapeLimitMs": 9.0}]}


def test_the_report_never_prints_a_share_above_100_percent():
    # The second run: 8.72 ms best against a 10.28 ms "limit" was printed as 118%.
    text = "\n".join(_compute_section(_compute_record(best_ms=8.72)))
    assert not [share for share in re.findall(r"(\d+)%", text) if int(share) > 100], text
    assert "disturbed" in text and "measured twice" in text
    quiet = "\n".join(_compute_section(_compute_record(best_ms=12.0)))
    assert "86% of the INT8 limit at the model's shapes" in quiet and "disturbed" not in quiet.split("How close")[0]


def _conv_gemm_onnx(path, channels: tuple[int, int] = (4, 8), size: int = 8, classes: int = 10):
    """An FP32 ONNX model, Conv (3×3) → Relu → Flatten → Gemm, saved at `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    (inputs, outputs), flat = channels, channels[1] * size * size
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "g", "h"], ["y"], transB=1)],
        "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(rng.standard_normal((outputs, inputs, 3, 3), dtype=np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(outputs, dtype=np.float32), "b"),
         numpy_helper.from_array(rng.standard_normal((classes, flat), dtype=np.float32) * 0.01, "g"),
         numpy_helper.from_array(rng.standard_normal(classes, dtype=np.float32), "h")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _conv_gemm_model(directory):
    """An FP32 ONNX model (Conv → Relu → Flatten → Gemm) and its static INT8 QDQ twin."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    fp32, int8 = _conv_gemm_onnx(directory / "fp32.onnx"), directory / "int8.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": rng.random((1, 4, 8, 8), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8)
    return fp32, int8


def test_the_kernels_timed_are_the_variants_own_with_constant_weights(tmp_path):
    from optimizer.engines.runners import OrtRunner, op_counts
    from optimizer.measure.kernels import LAYER_OF_OP, kernel_graphs

    fp32, int8 = _conv_gemm_model(tmp_path)
    feed = {"x": np.random.default_rng(1).random((1, 4, 8, 8), dtype=np.float32)}
    for path in (fp32, int8):
        optimized = tmp_path / f"{path.stem}.opt.onnx"
        OrtRunner(path, optimized_path=optimized)  # as a variant is loaded: ORT writes the graph it runs
        graphs = kernel_graphs(path.stem, optimized, feed, threads=1)
        ran = {op: n for op, n in op_counts(optimized).items() if op in LAYER_OF_OP}
        timed: dict[str, int] = {}
        for graph in graphs:
            for op in graph.ops:
                timed[op] = timed.get(op, 0) + 1
            for inputs in graph.node_inputs:  # weights stay constants (ORT prepacks them); activations are fed
                assert all(name in graph.constants or name in graph.fed for name in inputs if name)
                assert not {name for name in inputs[1:] if name} <= graph.fed  # not every operand fed: weights are constant
            assert graph.constants, "the weights must be initializers, or ORT would not prepack them"
            graph.run()
        assert timed == ran and {g.layer for g in graphs} == {"Conv", "Linear"}
    assert {op for g in kernel_graphs("int8", tmp_path / "int8.opt.onnx", feed, 1) for op in g.ops} <= {
        "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}


def test_the_limit_lines_are_ordered_and_the_best_is_never_over_100_percent(tmp_path):
    from optimizer.engines.runners import OrtRunner
    from optimizer.measure.limits import Best, Candidate, measure_limits

    fp32, int8 = _conv_gemm_model(tmp_path)
    feed = {"x": np.random.default_rng(1).random((1, 4, 8, 8), dtype=np.float32)}
    candidates = []
    for path in (fp32, int8):
        OrtRunner(path, optimized_path=tmp_path / f"{path.stem}.opt.onnx")
        candidates.append(Candidate(path.stem, tmp_path / f"{path.stem}.opt.onnx"))
    best_runner = OrtRunner(int8)
    by_type = {"Conv": 64 * 8 * 36, "Linear": 512 * 10}
    record = measure_limits(sum(by_type.values()), by_type, candidates, feed, 1, "avx2",
                            Best("int8", "fp32", True, 10.0, best_runner.bind(feed)), max_rounds=10)
    assert record["best"]["precision"] == "int8"  # read from its kernels, not the name given
    at_shapes, peak = record["atShapes"], record["peak"]
    assert set(at_shapes["byType"]) == {"Conv", "Linear"} and at_shapes["variants"]["int8"]["precision"] == "int8"
    for precision in ("fp32", "int8"):
        # By construction, not by timing: the peak is the fastest rate seen, a layer's at its shapes included.
        assert peak[f"{precision}LimitMs"] <= at_shapes[f"{precision}LimitMs"] * (1 + 1e-9)
        low, high = at_shapes[f"{precision}SpreadMs"]
        assert at_shapes[f"{precision}LimitMs"] <= low * (1 + 1e-9) and low <= high
    assert record["measurement"]["rounds"] <= 20 and record["measurement"]["attempts"] in (1, 2)
    for line in record["best"]["lines"].values():
        assert (line["fraction"] is None) == line["beaten"] and (line["fraction"] or 0) <= 1.0


def test_a_bf16_variant_is_held_to_the_int8_physical_line():
    from optimizer.measure.fastest import Fastest
    from optimizer.measure.limits import Best, _best

    lines = {"atShapes": {}, "peak": {}, "physical": physical_limits(64_000_000, "amx", 2.0, 1)}
    measured = Fastest(fastest={}, samples={}, totals_of=lambda times: {})
    record = _best(Best("openvino-default", "bf16", False, 1.0), lines, measured)
    # AMX: BF16 tiles do 512 MACs a cycle, so the FP32 line (32) would be beaten; the INT8 one (1024) is not.
    assert list(record["lines"]) == ["physical"] and record["lines"]["physical"]["limitMs"] == pytest.approx(0.03125)
    assert "INT8 physical limit (the INT8 rate bounds BF16 too)" in _best_against_limits(record)


def test_a_call_that_times_its_own_parts_has_each_part_recorded():
    from optimizer.measure.fastest import Parts

    parts = iter([Parts(conv=0.001, fc=0.001), Parts(conv=0.003, fc=0.003), *[Parts(conv=0.005, fc=0.002)] * 50])
    result = fastest_until_stable({"model": lambda: next(parts)},
                                  lambda times: {"nodes": times.get(("model", "conv"), 0) + times.get(("model", "fc"), 0)},
                                  min_rounds=3, max_rounds=6)
    # The first (warm-up) call's parts are not recorded; then each part's fastest over the rounds.
    assert result.fastest[("model", "conv")] == pytest.approx(0.003) and result.fastest[("model", "fc")] == pytest.approx(0.002)
    assert result.spread("nodes") == pytest.approx([0.006, 0.007])  # per round: 0.003+0.003, then 0.005+0.002


def _openvino_conv_model(directory):
    """Conv (16→32 channels, 3×3 over 32×32) → Relu → Flatten → Gemm as OpenVINO IR: big enough that
    each node takes microseconds (OpenVINO's counters count whole microseconds), small enough to be quick."""
    import openvino as ov

    onnx_path = _conv_gemm_onnx(directory / "conv.onnx", channels=(16, 32), size=32, classes=64)
    ov.save_model(ov.convert_model(str(onnx_path)), str(directory / "conv.xml"), compress_to_fp16=False)
    rng = np.random.default_rng(1)
    return directory / "conv.xml", {"x": rng.random((1, 16, 32, 32), dtype=np.float32)}


def test_an_openvino_best_is_held_to_its_own_kernels_at_its_shapes(tmp_path):
    import time

    pytest.importorskip("openvino")
    from optimizer.engines.runners import OpenVinoRunner
    from optimizer.measure.limits import Best, measure_limits
    from optimizer.measure.openvino_kernels import openvino_kernels

    path, feed = _openvino_conv_model(tmp_path)
    runner = OpenVinoRunner(path, threads=1, precision=None)  # openvino-default: bf16 where the CPU has it
    call = runner.bind(feed)
    for _ in range(5):
        call()
    started = time.perf_counter()
    for _ in range(50):
        call()
    mean_ms = (time.perf_counter() - started) / 50 * 1000.0
    kernels = openvino_kernels("openvino-default", runner, feed, mean_ms)
    assert set(kernels.layer_of.values()) >= {"Convolution", "FullyConnected"} and all(kernels.exec_type.values())
    record = measure_limits(32 * 32 * 32 * 16 * 9 + 32 * 32 * 32 * 64, {"Conv": 4_718_592, "Linear": 2_097_152}, [],
                            feed, 1, "avx2", Best("openvino-default", kernels.precision, False, mean_ms, call), kernels,
                            max_rounds=20)
    own = record["openvinoAtShapes"]
    assert own["variant"] == "openvino-default" and own["kernels"] == "OpenVINO's"
    assert sum(own["execTypes"].values()) == len(kernels.layer_of)  # which kernels ran, recorded per node
    # The limit sums each node's fastest time and a round's total sums one round's: the first is never
    # more, but the two sums add the same microseconds in different orders, so allow float rounding
    # (CI once saw 0.17210000000000003 against 0.1721).
    rounding = 1 + 1e-9
    assert 0 < own["limitMs"] <= own["profiledMeanMs"] * rounding  # its nodes are part of the same inferences
    assert own["limitMs"] <= own["spreadMs"][0] * rounding and own["spreadMs"][0] <= own["spreadMs"][1]
    line = record["best"]["lines"]["atShapes"]
    assert line["kernels"] == "OpenVINO's" and line["limitMs"] == own["limitMs"]
    assert not line["beaten"] and 0 < line["fraction"] <= 1.0, (own, mean_ms)
    assert "peak" not in record["best"]["lines"]  # ONNX Runtime's peak says nothing about OpenVINO
    text = "\n".join(_compute_section({"macs": 1, "byType": {"Conv": 1}, **record}))
    assert "OpenVINO's kernels (openvino-default)" in text and "its own OpenVINO kernels" in text
    assert not [share for share in re.findall(r"(\d+)%", text) if int(share) > 100], text
    # A best that beats its own kernels' line (here a made-up 1 µs mean) had it measured at a disturbed moment:
    # measured again, never given a share.
    again = measure_limits(1, {"Conv": 1}, [], feed, 1, "avx2", Best("openvino-default", kernels.precision, False, 0.001),
                           kernels, max_rounds=8)
    assert again["measurement"]["attempts"] == 2 and again["best"]["disturbed"]
    assert again["best"]["lines"]["atShapes"]["beaten"] and again["best"]["lines"]["atShapes"]["fraction"] is None


def test_an_openvino_variant_s_precision_is_what_it_runs_not_its_name(tmp_path):
    pytest.importorskip("openvino")
    import openvino as ov

    from optimizer.engines.runners import OpenVinoRunner
    from optimizer.measure.openvino_kernels import runtime_precision

    fp32, int8 = _conv_gemm_model(tmp_path)
    for onnx_path in (fp32, int8):  # as openvino-ort-qdq builds it: ORT's QDQ model, IR, FP32 pinned
        ov.save_model(ov.convert_model(str(onnx_path)), str(tmp_path / f"{onnx_path.stem}.xml"), compress_to_fp16=False)
    assert runtime_precision(OpenVinoRunner(tmp_path / "int8.xml", precision="f32").compiled) == "int8"
    assert runtime_precision(OpenVinoRunner(tmp_path / "fp32.xml", precision="f32").compiled) == "fp32"
    default = OpenVinoRunner(tmp_path / "fp32.xml", precision=None)
    assert runtime_precision(default.compiled) == ("bf16" if "bf16" in default.provider else "fp32")


def test_an_openvino_line_the_best_beats_is_never_given_a_share():
    from optimizer.measure.fastest import Fastest
    from optimizer.measure.limits import Best, _best

    own = {"variant": "openvino-ort-qdq", "kernels": "OpenVINO's", "precision": "int8", "limitMs": 3.0,
           "byType": {"Convolution": {"ms": 3.0, "nodes": 7, "execTypes": {"brgconv_avx512_amx_I8": 7}}}}
    lines = {"atShapes": {"int8LimitMs": 9.0}, "peak": {"int8LimitMs": 8.0},
             "physical": physical_limits(640_000_000, "amx", 3.5, 1), "openvinoAtShapes": own}
    measured = Fastest(fastest={}, samples={}, totals_of=lambda times: {})
    record = _best(Best("openvino-ort-qdq", "int8", False, 2.8), lines, measured)
    # Its own kernels' line, not ONNX Runtime's 9 ms; INT8's physical line (0.18 ms), not FP32's (5.7 ms).
    assert record["lines"]["atShapes"] == {"limitMs": 3.0, "kernels": "OpenVINO's", "beaten": True, "fraction": None}
    assert record["lines"]["physical"]["limitMs"] == pytest.approx(640e6 / (1024 * 3.5e9) * 1000)
    assert "peak" not in record["lines"]
    text = _best_against_limits(record)
    assert "disturbed" in text and not [s for s in re.findall(r"(\d+)%", text) if int(s) > 100], text
