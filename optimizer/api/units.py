"""How numbers and names are written for people: one way, wherever they are shown.

The terminal table, report.md, the worker's status message and `kubectl get` (the operator's
bestSize column) all print sizes and metric names through this module, so they read the same.
Plain Python only: the operator imports it without torch.
"""

from __future__ import annotations

# SI units (1 kB = 1000 B, as the `/ 1e6` everywhere else in mlopt) with one decimal, each unit up
# to 1000 of it: every size is 1.0–999.9 of one unit, short enough for a `kubectl get` column, and a
# size reads the same in the terminal, report.md and the resource's status.
_SIZE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def format_size(size_bytes: int | float | None) -> str:
    """'7.9 MB', '34.2 kB', '512 B'; '—' when unknown."""
    if size_bytes is None:
        return "—"
    for scale, unit in _SIZE_UNITS:
        # Rounded first, so 999_960 B reads '1.0 MB', not '1000.0 kB'.
        if round(size_bytes / scale, 1) >= 1.0:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{int(size_bytes)} B"


# The accuracy metrics' human names (acceptance.metric values, optimizer/api/spec.py ACCURACY_METRICS).
METRIC_LABELS = {
    "top1": "top-1",
    "char-accuracy": "char accuracy (1−CER)",
    "exact-match": "exact match",
    "agreement": "argmax agreement",
    "box-agreement": "box mAP@0.5 vs FP32",
    "map50": "mAP@0.5",
    "map50-95": "mAP@0.5:0.95",
}


def metric_label(metric: str) -> str:
    """The metric's human name ("top-1"), or its raw name where none is defined."""
    return METRIC_LABELS.get(metric, metric)


def detection_columns(results) -> int:
    """Box mAP columns for a Results: 0 (not a detector), 1 (against FP32's boxes) or 2 (and against labels)."""
    records = [v.detection for v in [results.baseline, *results.variants] if v.detection]
    return 0 if not records else (2 if any(r.vsLabels for r in records) else 1)


def box_cells(variant, columns: int) -> list[str]:
    """A VariantResult's box mAP cells, '@0.5 / @0.5:0.95' as percentages."""
    record = variant.detection

    def pair(scores) -> str:
        return "—" if scores is None else f"{scores.map50:.2%} / {scores.map50_95:.2%}"

    return [pair(record and record.vsFp32), *([pair(record and record.vsLabels)] if columns == 2 else [])]
