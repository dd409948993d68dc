"""report.md's "Serving within the SLO" section and charts/serving.png: projections of results.json's
serving curves and recommendation (optimizer/steps/serve.py measured them)."""

from __future__ import annotations

from pathlib import Path

from optimizer.api.results import Recommendation, Results, ServingCurve

CHART = "charts/serving.png"


def _fmt(value, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def _curve_table(curve: ServingCurve, slo_ms: float) -> list[str]:
    lines = [f"**{curve.variant}**" + (f": {curve.reason}" if curve.reason else ""), ""]
    if not curve.points:
        return lines
    lines += ["| streams | threads/stream | batch | req/s | p50 ms | p99 ms | p99 within SLO |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for p in curve.points:
        mark = "within" if p.p99Ms <= slo_ms else "over"
        if p == curve.atSLO:
            mark = "**within ★ at SLO**"
        if not p.stable:
            mark += " (unstable: its windows differed by over 10%)"
        lines.append(f"| {p.concurrency} | {p.threadsPerStream} | {p.batch} | {p.requestsPerSecond:.1f} | "
                     f"{p.p50Ms:.2f} | {p.p99Ms:.2f} | {mark} |")
    return lines + [""]


def _recommendation(rec: Recommendation | None) -> list[str]:
    if rec is None:
        return ["No recommendation: no (target, variant) meets the SLO.", ""]
    demand = f" for {rec.demand:g} requests/s" if rec.demand is not None else ""
    lines = [f"**Recommended: {rec.variant} on {rec.target}**{demand}, chosen by {rec.basis}.", "",
             "| target | variant | req/s per pod | p99 ms | price/h per pod | cost per million | replicas | cost/h | why not |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for o in rec.offers:
        lines.append(f"| {o.target} | {o.variant or '—'} | {_fmt(o.requestsPerSecond, '{:.1f}')} | "
                     f"{_fmt(o.p99Ms, '{:.2f}')} | {_fmt(o.pricePerHour, '{:.4g}')} | {_fmt(o.costPerMillion, '{:.4g}')} | "
                     f"{_fmt(o.replicas, '{}')} | {_fmt(o.costPerHour, '{:.4g}')} | {o.lost or '**recommended**'} |")
    return lines + [""]


def serving_section(results: Results) -> list[str]:
    serving = results.serving
    if serving is None:
        return []
    where = f"target **{results.target}**" if results.target else "this machine"
    head = (f"**{serving.requestsPerSecond:.1f} requests/s** within a p99 of {serving.latencySLOMs:g} ms with "
            f"{serving.variant} (p99 {serving.p99Ms:.2f} ms)" if serving.variant else f"Nothing: {serving.reason}")
    return [
        "## Serving within the SLO", "",
        f"On {where} ({serving.cpus} CPU(s) usable by the pod): {head}.", "",
        "Each point is a concurrency sweep step (perf_analyzer's concurrency mode): that many streams, each "
        "with its own session and thread count, send requests back to back; requests/s counts those completed "
        "in the timed window, p50/p99 are of each request's latency. A batch above 1 is a server's dynamic "
        "batching: the requests of one call all wait the whole call (the queueing before it is not included). "
        f"Chart: `{CHART}`.", "",
        *[f"- {note}" for note in serving.notes], *([""] if serving.notes else []),
        *[line for curve in serving.curves for line in _curve_table(curve, serving.latencySLOMs)],
        *_recommendation(results.recommendation),
    ]


def _frontier(curve: ServingCurve) -> list:
    best, frontier = -1.0, []
    for point in sorted(curve.points, key=lambda p: p.p99Ms):
        if point.requestsPerSecond > best:
            best = point.requestsPerSecond
            frontier.append(point)
    return frontier


def serving_chart(results: Results, directory: Path) -> Path | None:
    """Throughput against p99 per swept variant (every point, and the best at each p99 as a step line),
    the SLO as a vertical line, the point at the SLO circled."""
    serving = results.serving
    if serving is None or not any(c.points for c in serving.curves):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in serving.curves:
        if not curve.points:
            continue
        dots = ax.scatter([p.p99Ms for p in curve.points], [p.requestsPerSecond for p in curve.points], s=18,
                          alpha=0.6, label=curve.variant)
        frontier = _frontier(curve)  # the most requests/s at each p99 or less: what the SLO picks from
        ax.plot([p.p99Ms for p in frontier], [p.requestsPerSecond for p in frontier], color=dots.get_facecolor()[0],
                drawstyle="steps-post", alpha=0.9)
        if curve.atSLO:
            ax.scatter([curve.atSLO.p99Ms], [curve.atSLO.requestsPerSecond], s=140, facecolors="none",
                       edgecolors="#2a9d8f", linewidths=2)
    ax.axvline(serving.latencySLOMs, color="#e63946", linestyle="--", linewidth=1,
               label=f"SLO: p99 ≤ {serving.latencySLOMs:g} ms")
    ax.set_xlabel("p99 latency per request (ms)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("requests/s")
    ax.set_title(f"{results.name}: serving throughput vs p99 ({results.target or 'this machine'}, {serving.cpus} CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = directory / CHART
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
