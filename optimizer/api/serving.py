"""Pricing and recommending: which (target, variant) serves the demand within the SLO for least.

Torch-free: the worker prices its own target, the operator combines every target's summary with the
same functions, so a local run and a cluster run decide the same way.

Convention: a target's pricePerHour is the price of one pod of its shape (a node's price divided by
the pods that fit on it), so replicas x pricePerHour is what the demand costs per hour.
"""

from __future__ import annotations

import math

from optimizer.api.results import Recommendation, ServingOffer

BY_COST_PER_HOUR = "cost per hour at the demand"
BY_COST_PER_MILLION = "cost per million inferences"
BY_THROUGHPUT = "requests/s per pod within the SLO"


def replicas_for(demand: float, requests_per_second: float) -> int:
    """Pods needed to serve `demand` requests/s when each sustains `requests_per_second` within the SLO."""
    # The small slack keeps 100 / 50 at 2 pods when float division gives 2.0000000000000004.
    return max(1, math.ceil(demand / requests_per_second - 1e-9))


def price(offer: ServingOffer, demand: float | None) -> ServingOffer:
    """The offer with its cost per million inferences, replicas and cost per hour filled where known."""
    rps, hourly = offer.requestsPerSecond, offer.pricePerHour
    update: dict = {}
    if rps and rps > 0:
        if hourly is not None:
            update["costPerMillion"] = hourly / (rps * 3600.0) * 1e6
        if demand is not None:
            update["replicas"] = replicas_for(demand, rps)
            if hourly is not None:
                update["costPerHour"] = update["replicas"] * hourly
    return offer.model_copy(update=update)


def recommend(offers: list[ServingOffer], demand: float | None = None) -> Recommendation | None:
    """The cheapest offer that meets the SLO: by cost per hour for the demand when every candidate has
    a price and a demand is given, else by cost per million inferences when they have prices, else by
    requests/s per pod. Every other offer says why it lost. None when no offer meets the SLO."""
    priced = [price(offer, demand) for offer in offers]
    meeting = [o for o in priced if o.requestsPerSecond and o.requestsPerSecond > 0 and o.variant]
    if not meeting:
        return None
    with_price = [o for o in meeting if o.pricePerHour is not None]
    if with_price and demand is not None:
        basis, candidates = BY_COST_PER_HOUR, with_price
        # Rounded: 3 x 0.3 is 0.8999999999999999, which must tie with 0.9, not beat it.
        key = lambda o: (round(o.costPerHour, 9), o.replicas, o.p99Ms or 0.0)  # noqa: E731
    elif with_price:
        basis, candidates = BY_COST_PER_MILLION, with_price
        key = lambda o: (round(o.costPerMillion, 9), o.p99Ms or 0.0)  # noqa: E731
    else:
        basis, candidates = BY_THROUGHPUT, meeting
        key = lambda o: (-o.requestsPerSecond, o.p99Ms or 0.0)  # noqa: E731
    winner = min(candidates, key=key)
    rows = [_with_reason(o, winner, basis, candidates) for o in priced]
    return Recommendation(target=winner.target, variant=winner.variant, basis=basis, demand=demand, offers=rows)


_FIRST_KEY = {BY_COST_PER_HOUR: "costPerHour", BY_COST_PER_MILLION: "costPerMillion", BY_THROUGHPUT: "requestsPerSecond"}


def _tie(offer: ServingOffer, winner: ServingOffer, basis: str) -> str | None:
    """Why `offer` lost when it equals the winner on the basis itself (the tie-breaks decided), else None."""
    if not math.isclose(getattr(offer, _FIRST_KEY[basis]), getattr(winner, _FIRST_KEY[basis]), rel_tol=1e-9):
        return None
    if basis == BY_COST_PER_HOUR and offer.replicas != winner.replicas:
        return (f"the same cost per hour ({winner.costPerHour:.4g}/h) in {offer.replicas} replica(s) against "
                f"{winner.replicas}")
    return f"the same {basis}; the lower p99 wins: {offer.p99Ms or 0.0:.2f} ms against {winner.p99Ms or 0.0:.2f} ms"


def _with_reason(offer: ServingOffer, winner: ServingOffer, basis: str, candidates: list[ServingOffer]) -> ServingOffer:
    if offer is winner:
        return offer
    if not offer.requestsPerSecond or not offer.variant:
        return offer.model_copy(update={"lost": offer.lost or "cannot meet the latency SLO"})
    if offer not in candidates:
        return offer.model_copy(update={"lost": "no pricePerHour, so its cost cannot be compared"})
    tie = _tie(offer, winner, basis)
    if tie:
        return offer.model_copy(update={"lost": tie})
    if basis == BY_COST_PER_HOUR:
        why = (f"{offer.replicas} replica(s) cost {offer.costPerHour:.4g}/h against {winner.replicas} "
               f"at {winner.costPerHour:.4g}/h")
    elif basis == BY_COST_PER_MILLION:
        why = f"{offer.costPerMillion:.4g} per million inferences against {winner.costPerMillion:.4g}"
    else:
        why = f"{offer.requestsPerSecond:.1f} requests/s per pod against {winner.requestsPerSecond:.1f}"
    return offer.model_copy(update={"lost": why})
