"""compareCalibration: one static INT8 variant measured once per calibration method (digits, real labels)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # every test here runs the whole pipeline


def test_one_variant_per_calibration_method_each_measured(digits_run):
    results, _ = digits_run
    expanded = [v for v in results.variants if v.calibrationOf == "int8" and "+fallback" not in v.name]
    assert [v.name for v in expanded] == ["int8-minmax", "int8-entropy", "int8-percentile"]
    for v in expanded:
        assert v.status in ("ok", "rejected"), (v.name, v.error)
        assert v.lineage.options["calibration"] == v.name.removeprefix("int8-")
        assert 0.5 < v.accuracy <= 1.0 and v.latencyMs.mean > 0 and v.sizeBytes > 0
    assert results.accuracyMetric == "top1" and results.baseline.accuracy > 0.9


def test_report_has_the_calibration_table(digits_run):
    results, output = digits_run
    report = (output / "report.md").read_text()
    assert "## Calibration methods: int8" in report
    table = report[report.index("## Calibration methods: int8"):].split("\n\n")[1].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["minmax", "entropy", "percentile"]
    saved = json.loads((output / "results.json").read_text())
    assert {v["calibrationOf"] for v in saved["variants"] if v["name"].startswith("int8-")} == {"int8"}
