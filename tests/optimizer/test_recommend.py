"""Which (target, variant) to serve: the cost arithmetic a platform team checks by hand."""

from __future__ import annotations

import math

from optimizer.api.results import ServingOffer
from optimizer.api.serving import BY_COST_PER_HOUR, BY_COST_PER_MILLION, BY_THROUGHPUT, recommend


def offer(target, rps, price=None, variant="ort-int8-static", p99=20.0):
    return ServingOffer(target=target, variant=variant, requestsPerSecond=rps, p99Ms=p99, pricePerHour=price)


def test_with_prices_and_a_demand_the_cheapest_fleet_wins_not_the_fastest_pod():
    # A fast expensive pool needs 4 pods, a slow cheap one 10: 4 x 0.50 = 2.00/h against 10 x 0.17 = 1.70/h.
    fast, slow = offer("amx", 260.0, 0.50), offer("avx2", 100.0, 0.17)
    pick = recommend([fast, slow], demand=1000.0)
    assert (pick.target, pick.basis) == ("avx2", BY_COST_PER_HOUR)
    rows = {o.target: o for o in pick.offers}
    assert rows["amx"].replicas == math.ceil(1000 / 260) == 4 and rows["avx2"].replicas == 10
    assert math.isclose(rows["amx"].costPerHour, 2.0) and math.isclose(rows["avx2"].costPerHour, 1.7)
    assert math.isclose(rows["avx2"].costPerMillion, 0.17 / (100 * 3600) * 1e6)
    assert rows["avx2"].lost is None and "4 replica(s) cost 2/h against 10 at 1.7/h" in rows["amx"].lost


def test_an_exact_multiple_needs_no_extra_replica():
    pick = recommend([offer("a", 50.0, 1.0)], demand=100.0)
    assert pick.offers[0].replicas == 2 and pick.offers[0].costPerHour == 2.0


def test_without_a_demand_prices_compare_by_cost_per_million_and_without_prices_by_throughput():
    pick = recommend([offer("a", 100.0, 0.40), offer("b", 60.0, 0.20)])
    assert (pick.target, pick.basis) == ("b", BY_COST_PER_MILLION)
    pick = recommend([offer("a", 100.0), offer("b", 60.0)], demand=500.0)
    assert (pick.target, pick.basis) == ("a", BY_THROUGHPUT) and pick.offers[1].replicas == 9


def test_a_target_that_cannot_meet_the_slo_or_has_no_price_loses_with_its_reason():
    cannot = ServingOffer(target="slow", variant=None, requestsPerSecond=None, pricePerHour=0.01,
                          lost="cannot meet: one request alone takes 140 ms at p99, the SLO is 100 ms")
    pick = recommend([cannot, offer("a", 100.0, 0.40), offer("unpriced", 900.0)], demand=200.0)
    rows = {o.target: o for o in pick.offers}
    assert pick.target == "a" and rows["slow"].lost.startswith("cannot meet: one request")
    assert "no pricePerHour" in rows["unpriced"].lost
    assert recommend([cannot]) is None


def test_a_tie_on_cost_says_which_tie_break_decided():
    # Both fit 250 requests/s in one pod at 0.2/h: the lower p99 wins, and the loser says so.
    pick = recommend([offer("a", 1000.0, 0.2, variant="fp32", p99=1.4), offer("a", 900.0, 0.2, variant="int8", p99=1.2)],
                     demand=250.0)
    rows = {o.variant: o for o in pick.offers}
    assert pick.variant == "int8" and rows["int8"].lost is None
    assert rows["fp32"].lost == "the same cost per hour at the demand; the lower p99 wins: 1.40 ms against 1.20 ms"
    fewer = recommend([offer("a", 100.0, 0.3, variant="many"), offer("b", 300.0, 0.9, variant="one")], demand=250.0)
    assert fewer.variant == "one" and "in 3 replica(s) against 1" in fewer.offers[0].lost
