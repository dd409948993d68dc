"""The worker's summary must always fit the 4 KiB termination message and parse back."""

from __future__ import annotations

from optimizer.api.results import VariantResult
from optimizer.api.summary import MAX_BYTES, failure_summary, parse_summary, success_summary


def test_summary_fits_even_with_many_long_failures(conv_lstm_run):
    results, output = conv_lstm_run
    many = results.model_copy(deep=True)
    many.variants = [VariantResult(name=f"variant-{i}", recipe="ort-int8-static", status="failed", error="x" * 900)
                     for i in range(60)]
    many.best = None
    text = success_summary(many, str(output / "results.json"))
    assert len(text.encode()) <= MAX_BYTES
    parsed = parse_summary(text)
    assert parsed["phase"] == "Succeeded" and parsed["variants"]


def test_summary_carries_best_and_numbers(conv_lstm_run):
    results, output = conv_lstm_run
    parsed = parse_summary(success_summary(results, str(output / "results.json")))
    assert parsed["best"] == results.best
    assert parsed["baseline"]["latencyMs"]["mean"] > 0
    assert {v["name"] for v in parsed["variants"]} == {v.name for v in results.variants}


def test_the_message_names_the_real_baseline(conv_lstm_run):
    results, output = conv_lstm_run
    assert "faster than PyTorch FP32" in parse_summary(success_summary(results, str(output / "results.json")))["message"]
    from_onnx = results.model_copy(deep=True)  # the user gave ONNX: it is its own baseline, in ONNX Runtime
    from_onnx.baseline = results.baseline.model_copy(update={"name": "onnx-source-fp32", "recipe": "onnx-source"})
    message = parse_summary(success_summary(from_onnx, str(output / "results.json")))["message"]
    assert "faster than your ONNX model in ONNX Runtime (FP32)" in message and "PyTorch" not in message


def test_failure_summary_and_non_summaries():
    parsed = parse_summary(failure_summary("ModelLoadFailed", "no file at /x.pt"))
    assert parsed == {"v": 1, "phase": "Failed", "reason": "ModelLoadFailed", "message": "no file at /x.pt"}
    assert parse_summary("Traceback (most recent call last): ...") is None
    assert parse_summary('{"v": 99}') is None


def test_summary_names_the_stored_best_model_or_says_nothing_was_kept(conv_lstm_run):
    from optimizer.artifacts.storage import _sha256_file

    results, output = conv_lstm_run
    parsed = parse_summary(success_summary(results, "s3://bucket/run/results.json", "s3://bucket/run/"))
    best = results.variant(results.best)
    assert parsed["results"] == "s3://bucket/run/results.json" and parsed["output"] == "s3://bucket/run/"
    assert parsed["artifacts"]["best"] == {"uri": f"s3://bucket/run/{best.artifact}", "sizeBytes": best.sizeBytes,
                                           "sha256": _sha256_file(output / best.artifact)}
    kept_nowhere = parse_summary(success_summary(results, str(output / "results.json"), None))
    assert "nothing was kept" in kept_nowhere["message"] and "results" not in kept_nowhere
    assert "artifacts" not in kept_nowhere and kept_nowhere["output"].startswith("not kept")


def test_when_variants_must_be_dropped_the_best_one_stays(conv_lstm_run):
    results, output = conv_lstm_run
    many = results.model_copy(deep=True)
    template = results.variant(results.best)
    many.variants = [template.model_copy(update={"name": f"a-long-variant-name-number-{i:02d}"}) for i in range(64)]
    many.best = many.variants[-1].name  # the last one: the first to go if dropped from the end
    text = success_summary(many, str(output / "results.json"))
    parsed = parse_summary(text)
    assert len(text.encode()) <= MAX_BYTES and parsed["truncated"] and len(parsed["variants"]) < 64
    assert many.best in {v["name"] for v in parsed["variants"]} and parsed["best"] == many.best
