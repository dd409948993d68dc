"""The serve step (benchmark.serving): the fastest accepted variants swept for requests/s within the
p99 SLO on this pod (optimizer/measure/serving.py), priced and recommended for this run's target.

Off unless spec.serving_enabled() (benchmark.serving.enabled, or spec.targets given): the default
local run does no extra work. The run measures one target: the operator's Job names it in
MLOPT_TARGET, `mlopt optimize --target NAME` locally; without either it is "local", unpriced.
"""

from __future__ import annotations

from optimizer.api.errors import DeviceError, internal_error
from optimizer.api.results import Serving, ServingCurve, ServingOffer, VariantStatus
from optimizer.api.serving import recommend
from optimizer.measure.environment import available_memory, usable_cpus
from optimizer.measure.scaling import batchable
from optimizer.measure.serving import SweepPlan, session_cap, sweep
from optimizer.steps.run import Run

LOCAL = "local"  # the offers' target when the run measures no named target


def candidates(run: Run, count: int) -> list[str]:
    """The `count` fastest accepted variants (status ok, by mean latency) that have a model to load."""
    ok = [v for v in run.results.values()
          if v.status == VariantStatus.ok.value and v.latencyMs and v.name in run.built]
    return [v.name for v in sorted(ok, key=lambda v: v.latencyMs.mean)[:count]]


def _point_line(variant: str, point, slo_ms: float) -> str:
    within = "within" if point.p99Ms <= slo_ms else "over"
    return (f"serving {variant}: {point.concurrency} stream(s) × {point.threadsPerStream} thread(s), batch "
            f"{point.batch}: {point.requestsPerSecond:.1f} req/s, p50 {point.p50Ms:.2f} ms, p99 {point.p99Ms:.2f} ms "
            f"({within} the {slo_ms:g} ms SLO)")


def serving_record(curves: list[ServingCurve], slo_ms: float, cpus: int, none_reason: str) -> Serving:
    """The curves, and the variant with the most requests/s within the SLO (or why none has any)."""
    met = [c for c in curves if c.atSLO]
    if not met:
        reason = next((c.reason for c in curves if c.reason), None) or none_reason
        return Serving(latencySLOMs=slo_ms, cpus=cpus, curves=curves, reason=reason)
    best = max(met, key=lambda c: c.atSLO.requestsPerSecond)
    return Serving(latencySLOMs=slo_ms, cpus=cpus, curves=curves, variant=best.variant,
                   requestsPerSecond=best.atSLO.requestsPerSecond, p99Ms=best.atSLO.p99Ms)


def offers(curves: list[ServingCurve], target: str, price: float | None) -> list[ServingOffer]:
    return [ServingOffer(target=target, variant=c.variant, requestsPerSecond=c.atSLO and c.atSLO.requestsPerSecond,
                         p99Ms=c.atSLO and c.atSLO.p99Ms, pricePerHour=price, lost=c.reason)
            for c in curves]


def serve_step(run: Run) -> None:
    if not run.spec.serving_enabled():
        return
    settings = run.spec.spec.benchmark.serving
    plan = SweepPlan.of(settings, usable_cpus(), batchable(run.loaded.inputs))
    names = candidates(run, settings.variants)
    run.reporter.log(f"serving sweep on {plan.cpus} CPU(s), p99 SLO {plan.slo_ms:g} ms: {', '.join(names) or 'none'}"
                     f" (up to {plan.max_concurrency} streams, {plan.seconds:g} s per point)")
    curves, notes = [], []
    with run.reporter.task(f"serving sweep of {len(names)} variant(s)", plan.most_points() * len(names)) as advance:
        for name in names:
            def on_point(point, name=name):
                run.reporter.log(_point_line(name, point, plan.slo_ms))
                advance()

            built = run.built[name]
            cap = session_cap(built.size_bytes, available_memory())
            if cap is not None and cap < plan.max_concurrency:
                notes.append(f"{name}: at most {cap} stream(s), not {plan.max_concurrency}: each holds a session of "
                             f"this {built.size_bytes / 1e6:.1f} MB model, and they must fit in half the memory left")
                run.reporter.log(f"serving {notes[-1]}")
            try:
                curve = sweep(name, built.runner, run.loaded.inputs, plan.capped(cap), on_point)
            except DeviceError as error:  # e.g. a CUDA session whose nodes fell back to the CPU
                curve = ServingCurve(variant=name, reason=f"not swept: {str(error).strip()[:400]}")
            except Exception as error:  # one variant's sweep never stops the others or the run; this is our bug
                curve = ServingCurve(variant=name, reason=f"not swept: {internal_error(error)}")
            at = curve.atSLO
            run.reporter.log(f"serving {name}: " + (curve.reason or f"{at.requestsPerSecond:.1f} req/s within the SLO "
                                                    f"(p99 {at.p99Ms:.2f} ms, {at.concurrency} stream(s) × "
                                                    f"{at.threadsPerStream} thread(s), batch {at.batch})"))
            curves.append(curve)
    run.serving = serving_record(curves, plan.slo_ms, plan.cpus,
                                 f"no accepted variant to serve: {run.best_reason}")
    run.serving.notes = notes
    price = run.spec.target(run.target).pricePerHour if run.target else None
    run.recommendation = recommend(offers(curves, run.target or LOCAL, price), run.spec.spec.demand)
