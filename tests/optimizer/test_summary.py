"""The worker's summary must always fit the 4 KiB termination message and parse back."""

from __future__ import annotations

from optimizer.results import VariantResult
from optimizer.summary import MAX_BYTES, failure_summary, parse_summary, success_summary


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


def test_failure_summary_and_non_summaries():
    parsed = parse_summary(failure_summary("ModelLoadFailed", "no file at /x.pt"))
    assert parsed == {"v": 1, "phase": "Failed", "reason": "ModelLoadFailed", "message": "no file at /x.pt"}
    assert parse_summary("Traceback (most recent call last): ...") is None
    assert parse_summary('{"v": 99}') is None
