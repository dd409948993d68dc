"""Fastest times that are stable: calls timed in interleaved rounds until their minimums settle.

A limit is what a kernel reaches, and a shared machine's noise only ever slows a run, so the
fastest run is the estimate. One short burst (the old 40 ms per shape) catches a noisy moment
as easily as a quiet one; rounds taken in turn across every call, repeated until `patience`
rounds in a row improved none of the watched totals by more than `tolerance`, do not. A cap in
seconds and rounds keeps a machine that never settles from holding the run; the record says
whether it settled.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

TOLERANCE = 0.03  # a fastest time that moved by less than 3% over `PATIENCE` rounds is settled
PATIENCE = 5
MIN_ROUNDS = 8
MAX_ROUNDS = 400
MAX_SECONDS = 30.0


class Parts(dict):
    """What a call that times its own parts returns: part -> seconds, from the runtime's own counters
    (OpenVINO's per-node profiling). Each part is then recorded as a call of its own, keyed
    (call's key, part), beside the call's wall time."""


@dataclass
class Fastest:
    """Per call: its fastest time (s), and every round's time (None once dropped); per watched
    total: its value after each round, from the fastest times so far."""

    fastest: dict[Hashable, float]
    samples: dict[Hashable, list[float | None]]
    totals_of: Callable[[dict[Hashable, float]], dict[str, float]] = field(repr=False)
    shared: tuple = ()
    totals: dict[str, list[float]] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    stable: bool = False

    def round_totals(self, name: str) -> list[float]:
        """A watched total from each round's own times (the `shared` calls at their fastest)."""
        values = []
        for index in range(self.rounds):
            times = {key: series[index] for key, series in self.samples.items() if series[index] is not None}
            times.update({key: self.fastest[key] for key in self.shared})
            values.append(self.totals_of(times)[name])
        return values

    def spread(self, name: str) -> list[float]:
        """[lowest, highest] of a watched total computed from one round's times: how much the
        machine moved it while it was measured."""
        values = self.round_totals(name)
        return [min(values), max(values)]

    def median(self, name: str) -> float:
        return statistics.median(self.round_totals(name))


def _settled(history: list[float], tolerance: float, patience: int) -> bool:
    if len(history) <= patience:
        return False
    before, now = history[-1 - patience], history[-1]
    return before <= now * (1.0 + tolerance)


def fastest_until_stable(
    calls: dict[Hashable, Callable[[], object]],
    totals: Callable[[dict[Hashable, float]], dict[str, float]],
    drop: Callable[[dict[Hashable, float]], set] | None = None, shared: tuple = (),
    tolerance: float = TOLERANCE, patience: int = PATIENCE, min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS, max_seconds: float = MAX_SECONDS, timer: Callable[[], float] = time.perf_counter,
) -> Fastest:
    """Time every call once per round, in turn, until each watched total (computed by `totals`
    from the fastest times so far) has improved by at most `tolerance` over the last `patience`
    rounds, after at least `min_rounds`; `drop` may name calls that need no more timing (slower
    than another call that does the same work). A round's own totals use the fastest time so far of
    the `shared` calls (a fixed cost the totals subtract), not that round's. A call that returns
    `Parts` has each part recorded too, keyed (its key, part). `timer` is the clock."""
    for call in calls.values():
        call()  # warm-up: first-run allocations, caches
    result = Fastest(fastest={key: float("inf") for key in calls}, samples={key: [] for key in calls},
                     totals_of=totals, shared=shared)
    active = list(calls)
    started = timer()
    while True:
        times: dict[Hashable, float] = {}
        for key in active:
            start = timer()
            value = calls[key]()
            times[key] = timer() - start
            if isinstance(value, Parts):
                times.update({(key, part): seconds for part, seconds in value.items()})
        for key, elapsed in times.items():
            result.fastest[key] = min(result.fastest.get(key, float("inf")), elapsed)
        for key in {**result.samples, **times}:  # a part first seen now has no time in earlier rounds
            result.samples.setdefault(key, [None] * result.rounds).append(times.get(key))
        result.rounds += 1
        for name, value in totals(result.fastest).items():
            result.totals.setdefault(name, []).append(value)
        if drop and result.rounds >= 3:
            dropped = drop(result.fastest)
            active = [key for key in active if key not in dropped]
        result.seconds = timer() - started
        settled = all(_settled(history, tolerance, patience) for history in result.totals.values())
        if result.rounds >= min_rounds and settled:
            result.stable = True
            break
        if result.rounds >= max_rounds or result.seconds >= max_seconds:
            break
    return result
