"""Peak memory of a stretch of work in this process: what building or running a variant needs.

Linux keeps the process's resident-set high-water mark (VmHWM in /proc/self/status) and resets it
to the current RSS when "5" is written to /proc/self/clear_refs (since Linux 4.0), so the peak of
one variant's work is VmHWM after it minus RSS before it. Where /proc cannot be written (another
OS, a locked-down kernel), the measurement is None rather than a number that means something else.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    added_bytes: int | None = None  # peak RSS during the block minus RSS before it


@contextmanager
def peak_memory() -> Iterator[Peak]:
    peak = Peak()
    before = _status_bytes("VmRSS")
    resettable = _reset_peak()
    try:
        yield peak
    finally:
        high = _status_bytes("VmHWM")
        if resettable and before is not None and high is not None:
            peak.added_bytes = max(0, high - before)
