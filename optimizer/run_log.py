"""The run's log: every progress line, plus what the libraries warned about along the way.

PyTorch's exporters and ONNX Runtime's quantizer print deprecation notices and warnings through
`warnings` and `logging`; on a terminal they tear through the progress bars and bury the table.
Here they are collected (deduplicated, with counts) into results.json, report.md and run.log.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class RecordingReporter:
    """Passes every call to the reporter it wraps and keeps the log lines for run.log."""

    def __init__(self, inner):
        self.inner = inner
        self.lines: list[str] = []
        self._start = time.perf_counter()

    def log(self, message: str) -> None:
        self.lines.append(f"{time.perf_counter() - self._start:8.1f}s  {message}")
        self.inner.log(message)

    def task(self, description: str, total: int):
        self.lines.append(f"{time.perf_counter() - self._start:8.1f}s  {description} ({total} steps)")
        return self.inner.task(description, total)


def _where(filename: str, lineno: int) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages", "optimizer"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + (anchor != "optimizer"):]
            break
    return f"{'/'.join(parts[-4:])}:{lineno}"


class _Collect(logging.Handler):
    def __init__(self, counts: Counter):
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        first = (record.getMessage().strip().splitlines() or [""])[0][:300]
        self.counts[f"{record.levelname.lower()} from {record.name}: {first}"] += 1


class LibraryWarnings:
    """Warnings and library log records counted so far, one line per distinct message ("3× …")."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def lines(self) -> list[str]:
        return [f"{count}× {text}" if count > 1 else text for text, count in self.counts.most_common()]


@contextlib.contextmanager
def collected_warnings() -> Iterator[LibraryWarnings]:
    """Inside the block, warnings and library log records (WARNING and up) are counted, not printed."""
    collected = LibraryWarnings()
    counts = collected.counts

    def record(message, category, filename, lineno, file=None, line=None):
        first = (str(message).strip().splitlines() or [""])[0][:300]
        counts[f"{category.__name__} at {_where(filename, lineno)}: {first}"] += 1

    handler, root = _Collect(counts), logging.getLogger()
    # With a handler on the root logger, logging's last-resort stderr printer stays quiet.
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield collected
    finally:
        root.removeHandler(handler)
