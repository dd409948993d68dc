"""The terminal: progress while the pipeline runs, and the results table at the end.

Three reporters share one small interface: rich bars for people at a terminal, plain log lines
for Job logs (where a bar would print thousands of lines), and silence for `--quiet`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optimizer.api.results import Results, VariantResult
from optimizer.api.units import box_cells, detection_columns, format_size, metric_label

Advance = Callable[[], None]


class Reporter(Protocol):
    """What the pipeline reports progress through."""

    def log(self, message: str) -> None: ...

    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Advance]: ...


class QuietReporter:
    def log(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda: None


class LogReporter(QuietReporter):
    """One line per step and task: what a `kubectl logs` reader wants."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log(self, message: str) -> None:
        print(f"[mlopt] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        start = time.perf_counter()
        self.log(f"{description} ({total} steps)")
        yield lambda: None
        self.log(f"{description}: done in {time.perf_counter() - start:.1f} s")


class RichReporter(QuietReporter):
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )

    def log(self, message: str) -> None:
        self.console.print(f"[bold cyan]mlopt[/] {message}")

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        with self.progress:
            task_id = self.progress.add_task(description, total=total)
            yield lambda: self.progress.advance(task_id)
            self.progress.remove_task(task_id)


def format_latency(variant: VariantResult) -> str:
    lat = variant.latencyMs
    return "—" if lat is None else f"{lat.mean:.2f} ± {lat.std:.2f}"


def _cell(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def results_table(results: Results) -> Table:
    table = Table(title=f"{results.name}: {results.model['source']} on {results.environment.device} "
                        f"({results.environment.threads} thread{'s' if results.environment.threads > 1 else ''})")
    # With metric "agreement" the accuracy column would repeat the argmax-agreement one: show it once.
    accuracy_column = results.accuracyMetric not in ("agreement", "box-agreement", "map50", "map50-95")
    boxes = detection_columns(results)
    columns = ["variant", "size", "mean ± std ms", "p50 / p99", "speedup", "max |Δ|",
               *(["box mAP50 / 50-95 vs FP32"] if boxes else ["argmax agree"]),
               *(["mAP50 / 50-95 (labels)"] if boxes == 2 else []),
               *([metric_label(results.accuracyMetric)] if accuracy_column else []), "peak mem", "status"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "status") else "right")
    for variant in [results.baseline, *results.variants]:
        lat = variant.latencyMs
        status = variant.status + (" ★ best" if variant.name == results.best else "")
        if any(note.startswith("SLOWER") for note in variant.notes):
            status += " (slower than FP32)"
        style = "bold green" if variant.name == results.best else ("dim" if variant.status != "ok" else None)
        table.add_row(
            variant.name, format_size(variant.sizeBytes), format_latency(variant),
            "—" if lat is None else f"{lat.p50:.2f} / {lat.p99:.2f}",
            _cell(variant.speedup, "{:.2f}x"), _cell(variant.fidelity and variant.fidelity.maxAbsDiff, "{:.2g}"),
            *(box_cells(variant, boxes) if boxes else [_cell(variant.fidelity and variant.fidelity.argmaxAgreement, "{:.2%}")]),
            *([_cell(variant.accuracy, "{:.2%}")] if accuracy_column else []),
            format_size(variant.peakMemoryBytes), status, style=style,
        )
    return table


def print_results(console: Console, results: Results) -> None:
    console.print(results_table(results))
    for variant in results.variants:
        if variant.error:
            console.print(f"[yellow]{variant.name}[/] {variant.status}: {variant.error}")
        for note in variant.notes:
            if note.startswith("SLOWER"):
                console.print(f"[red]{variant.name}[/] {note}")
    console.print(f"[bold]best:[/] {results.best or 'none'} — {results.bestReason}")
    if results.serving:
        console.print(f"[bold]serving:[/] {serving_line(results)}")


def serving_line(results: Results) -> str:
    """The serving sweep in one line: the figure at the SLO and the recommendation, or why none."""
    serving, rec = results.serving, results.recommendation
    if not serving.variant:
        return serving.reason or "no variant meets the SLO"
    line = (f"{serving.requestsPerSecond:.1f} req/s within p99 ≤ {serving.latencySLOMs:g} ms with {serving.variant} "
            f"(p99 {serving.p99Ms:.2f} ms) on {results.target or 'this machine'}")
    offer = next((o for o in rec.offers if o.lost is None), None) if rec else None
    if offer:
        line += f"; recommended: {offer.variant} on {offer.target}"
        if offer.replicas is not None:
            line += f", {offer.replicas} replica(s) for {rec.demand:g} req/s"
            line += f" at {offer.costPerHour:.4g}/h" if offer.costPerHour is not None else ""
    return line + " (report.md: Serving within the SLO)"
