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
}


def metric_label(metric: str) -> str:
    """The metric's human name ("top-1"), or its raw name where none is defined."""
    return METRIC_LABELS.get(metric, metric)
