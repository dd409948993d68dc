"""The report's explanations: arithmetic counted right, time split by op, scaling rows, tuning."""

from __future__ import annotations

import json
import re

import pytest

from optimizer.measure.tuning import candidates

from .conftest import write_spec


def test_macs_match_the_layer_arithmetic(conv_lstm_run):
    results, _ = conv_lstm_run
    # ConvLstm at 1×1×8×16: conv 8·16 px × 16 ch × 9; conv2 4·8 px × 16 ch × 16·9; map 8 steps × 32 × 64;
    # bidirectional LSTM(32→32) 8 steps × 2 dirs × 4 gates × 32 × (32 + 32); dense 8 × 6 × 64
    expected = {"Conv": 8 * 16 * 16 * 9 + 4 * 8 * 16 * 16 * 9, "Linear": 8 * 32 * 64 + 8 * 6 * 64,
                "LSTM": 8 * 2 * 4 * 32 * 64}
    assert results.analysis.compute["byType"] == expected
    assert results.analysis.compute["macs"] == sum(expected.values())


def test_products_keep_each_layers_shapes_and_the_recurrence_step_by_step():
    import numpy as np
    import torch

    from optimizer.measure.compute import Product, count_products, macs_by_type

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
            self.rnn = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x):
            features = self.conv(x).mean(2).transpose(1, 2)  # batch × width × channels
            return self.head(self.rnn(features)[0])

    feed = {"x": np.zeros((3, 4, 6, 10), np.float32)}
    products = count_products(Net().eval(), feed, ["x"])
    assert products == [
        Product("Conv", 3 * 6 * 10, 2 * 9, 4, 2),  # per group: input channels/groups × kernel area
        Product("LSTM", 3 * 10, 8, 64, 2), Product("LSTM", 3, 16, 64, 10 * 2),  # layer 1: input GEMM, steps
        Product("LSTM", 3 * 10, 32, 64, 2), Product("LSTM", 3, 16, 64, 10 * 2),  # layer 2 reads both directions
        Product("Linear", 3 * 10, 32, 5),
    ]
    assert macs_by_type(products)["LSTM"] == 3 * 10 * 2 * 64 * ((8 + 16) + (32 + 16))


def test_profile_and_scaling_explain_the_best(conv_lstm_run):
    results, output = conv_lstm_run
    analysis = results.analysis
    # On the miniature CRNN every ONNX Runtime variant is ~10x faster than any TorchScript one,
    # so the best is always an ORT variant and must come with its op-level profile.
    assert results.best and results.variant(results.best).runtime == "onnxruntime", results.best
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


@pytest.mark.slow  # the whole pipeline
def test_tune_records_what_was_chosen(tmp_path):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

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


def test_layer_efficiency_against_the_limits_of_a_precision():
    from optimizer.measure.compute import layer_efficiency

    peaks = {"fp32MacsPerS": 50e9, "int8MacsPerS": 200e9}
    profile = [{"op": "QLinearConv", "ms": 1.0, "share": 0.5}, {"op": "DynamicQuantizeLSTM", "ms": 0.5, "share": 0.25},
               {"op": "MatMul", "ms": 0.25, "share": 0.125}, {"op": "Reshape", "ms": 0.25, "share": 0.125}]
    rows = {r["layer"]: r for r in layer_efficiency({"Conv": 100_000_000, "LSTM": 25_000_000, "Linear": 5_000_000,
                                                      "GRU": 1}, profile, peaks)}
    assert set(rows) == {"Conv", "LSTM", "Linear"}  # no GRU ran: no row
    assert rows["Conv"]["precision"] == "int8" and rows["Conv"]["fractionOfPeak"] == pytest.approx(0.5)
    assert rows["LSTM"]["macsPerS"] == pytest.approx(50e9) and rows["LSTM"]["fractionOfPeak"] == pytest.approx(0.25)
    assert rows["Linear"]["precision"] == "fp32" and rows["Linear"]["fractionOfPeak"] == pytest.approx(0.4)
    at_shapes = {"byType": {"Conv": {"fp32Ms": 2.0, "int8Ms": 0.8}, "Linear": {"fp32Ms": 0.2, "int8Ms": 0.1}}}
    rows = {r["layer"]: r for r in layer_efficiency({"Conv": 100_000_000, "Linear": 5_000_000}, profile, peaks, at_shapes)}
    assert rows["Conv"]["shapeLimitMs"] == 0.8 and rows["Conv"]["fractionOfShapeLimit"] == pytest.approx(0.8)
    assert rows["Linear"]["shapeLimitMs"] == 0.2  # it ran in FP32: the FP32 kernels' time is its limit
    # Against the best variant's precision, the rows add up to the headline limit of that precision.
    rows = {r["layer"]: r for r in layer_efficiency({"Conv": 100_000_000, "Linear": 5_000_000}, profile, peaks,
                                                     at_shapes, precision="int8")}
    assert rows["Linear"]["shapeLimitMs"] == 0.1 and rows["Linear"]["fractionOfPeak"] == pytest.approx(0.1)


def test_the_peak_gemms_run_in_both_precisions():
    from optimizer.measure.kernels import gemm_macs, peak_gemms

    calls = peak_gemms(threads=1)
    assert set(calls) == {"fp32", "int8"} and gemm_macs() == 128 * 1024 * 512
    assert [call()[0].shape for call in calls.values()] == [(128, 512), (128, 512)]


def test_report_explains_the_limit_per_layer_type(conv_lstm_run):
    results, output = conv_lstm_run
    compute = results.analysis.compute
    report = (output / "report.md").read_text()
    assert "| physical |" in report and "| kernels' peak |" in report and "| at this model's shapes |" in report
    assert compute["atShapes"]["int8LimitMs"] > 0 and set(compute["atShapes"]["byType"]) == set(compute["byType"])
    ort_variants = {v.name for v in results.variants if v.runtime == "onnxruntime" and v.latencyMs}
    assert set(compute["atShapes"]["variants"]) == ort_variants  # every timed ONNX Runtime variant's own kernels
    assert compute["measurement"]["rounds"] >= 1 and compute["physical"]["int8MacsPerCycle"]
    assert results.best and results.variant(results.best).runtime == "onnxruntime", results.best  # as above
    layers = {r["layer"] for r in compute["byLayer"]}
    assert {"Conv", "LSTM"} <= layers and "| everything else |" in report
    assert compute["best"]["variant"] == results.best
    section = report.split("## Compute")[1].split("\n## ")[0]
    assert not [share for share in re.findall(r"(\d+)%", section) if int(share) > 100], section
    cells = [r for r in results.analysis.scaling if r["source"] == "benchmark"]  # one number for one thing
    assert {r["variant"] for r in cells} == {"pytorch-fp32", results.best}
    means = {v.name: v.latencyMs.mean for v in [results.baseline, *results.variants] if v.latencyMs}
    assert all(r["latencyMs"] == means[r["variant"]] for r in cells)


def test_agreement_is_shown_once_when_it_is_the_metric(conv_lstm_run):
    from optimizer.console import results_table

    results, output = conv_lstm_run
    assert results.accuracyMetric == "agreement"
    header = next(line for line in (output / "report.md").read_text().splitlines() if line.startswith("| variant | recipe"))
    assert header.count("agree") == 1
    assert [c.header for c in results_table(results).columns].count("argmax agree") == 1
    assert not any("agreement" in c.header for c in results_table(results).columns)


def test_speedups_come_with_their_range_over_interleaved_rounds(conv_lstm_run):
    results, output = conv_lstm_run
    timed = [v for v in results.variants if v.latencyMs]
    assert timed and all(v.latencyMs.rounds == 5 and len(v.latencyMs.roundMeans) == 5 for v in timed)
    for v in timed:  # the overall ratio is a weighted mean of the per-round ones, so it lies in their range
        low, high = v.speedupRange
        assert low - 1e-9 <= v.speedup <= high + 1e-9
    assert "5 round(s) taken in turn" in (output / "report.md").read_text()


def test_results_json_reads_back_as_the_same_record(conv_lstm_run):
    from optimizer.api.results import load_results

    results, output = conv_lstm_run
    assert load_results(output / "results.json").model_dump(mode="json") == results.model_dump(mode="json")


def test_the_pods_qos_class_is_recorded_with_the_machine(monkeypatch):
    from optimizer.measure.environment import describe

    monkeypatch.setenv("MLOPT_QOS_CLASS", "Guaranteed")
    assert describe(1, "cpu").qosClass == "Guaranteed"  # the operator's Job sets it; numbers say how they were taken
    monkeypatch.delenv("MLOPT_QOS_CLASS")
    assert describe(1, "cpu").qosClass is None  # a local run: no pod


def test_an_encoders_attention_is_counted_even_on_its_fused_inference_path():
    import numpy as np
    import torch

    from optimizer.measure.compute import count_products, macs_by_type

    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    feed = {"x": np.zeros((2, 10, 32), np.float32)}
    tokens, embed, heads, ff = 2 * 10, 32, 4, 64
    per_layer = (4 * tokens * embed * embed  # q, k, v and output projections
                 + 2 * 2 * heads * 10 * 10 * (embed // heads)  # Q·Kᵀ and scores·V, per sample and head
                 + 2 * tokens * embed * ff)  # the feed-forward pair
    assert macs_by_type(count_products(encoder, feed, ["x"])) == {"Linear": 2 * per_layer}
    assert torch.backends.mha.get_fastpath_enabled()  # restored for everything else
