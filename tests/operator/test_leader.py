"""Leader election: one holder at a time, takeover only of a stale lease, conflicts lose."""

import copy
import datetime

import pytest
from kubernetes.client.exceptions import ApiException

from mlopt_operator import leader


class LeaseStore:
    """The Lease API's semantics that matter here (create conflicts, resourceVersion on update),
    in memory: a stand-in for the API server, which tests/e2e exercises for real."""

    def __init__(self):
        self.lease = None
        self.version = 0

    def request(self, method, path, body=None):
        if method == "GET":
            if self.lease is None:
                raise ApiException(status=404)
            return copy.deepcopy(self.lease)
        if method == "POST":
            if self.lease is not None:
                raise ApiException(status=409)
        if method == "PUT" and body["metadata"].get("resourceVersion") != str(self.version):
            raise ApiException(status=409)
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    def age(self, seconds):
        moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
        self.lease["spec"]["renewTime"] = leader._micro(moment)


class Clock:
    """time.monotonic for the leader module, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(leader.time, "monotonic", clock)
    return clock


def test_one_holder_until_its_lease_goes_stale(clock):
    store = LeaseStore()
    first = leader.Lease(store.request, "mlopt-system", "mlopt-operator", "pod-a")
    second = leader.Lease(store.request, "mlopt-system", "mlopt-operator", "pod-b")
    assert first.try_acquire() and not second.try_acquire()
    clock.now += leader.DURATION - 1
    assert first.try_acquire()  # renewing keeps it, and the standby's count starts again when it sees that
    assert not second.try_acquire()
    clock.now += leader.DURATION - 1
    assert not second.try_acquire()
    clock.now += 2  # no renewal seen for more than DURATION
    assert second.try_acquire() and store.lease["spec"]["holderIdentity"] == "pod-b"
    assert store.lease["spec"]["leaseTransitions"] == 1 and not first.try_acquire()


def test_staleness_is_judged_by_the_standbys_clock_not_the_writers(clock):
    """Nodes' clocks differ: a renewTime an hour old by this node's clock, just written by a live
    leader whose clock is behind, is not stale; one in the future does not block a takeover."""
    store = LeaseStore()
    assert leader.Lease(store.request, "ns", "l", "pod-a").try_acquire()
    store.age(3600)  # the leader's clock is an hour behind ours
    standby = leader.Lease(store.request, "ns", "l", "pod-b")
    assert not standby.try_acquire()
    clock.now += leader.DURATION - 1
    assert not standby.try_acquire()
    store.age(-3600)  # a renewal stamped an hour ahead, then the leader dies
    assert not standby.try_acquire()
    clock.now += leader.DURATION + 1
    assert standby.try_acquire() and store.lease["spec"]["holderIdentity"] == "pod-b"


def test_a_lost_race_is_a_failed_try_not_an_error():
    store = LeaseStore()
    lease = leader.Lease(store.request, "ns", "l", "pod-a")
    assert lease.try_acquire()
    stale_read = store.request

    def racing(method, path, body=None):
        if method == "PUT":  # someone else wrote in between: our resourceVersion is old
            store.version += 1
        return stale_read(method, path, body)

    assert not leader.Lease(racing, "ns", "l", "pod-a").try_acquire()


def test_keep_steps_down_when_someone_else_holds_it(monkeypatch):
    store = LeaseStore()
    monkeypatch.setattr(leader, "RENEW", 0.01)
    lease = leader.Lease(store.request, "ns", "l", "pod-a")
    assert lease.try_acquire()
    store.lease["spec"]["holderIdentity"] = "pod-b"  # taken over (our renewals had stopped)
    lost = []
    leader.keep(lease, on_lost=lambda: lost.append(True)).join(5)
    assert lost == [True]


def test_a_released_lease_is_taken_at_once_and_identities_are_per_process(monkeypatch):
    store = LeaseStore()
    first = leader.Lease(store.request, "ns", "l", "pod-a_1")
    second = leader.Lease(store.request, "ns", "l", "pod-b_2")
    assert first.try_acquire() and not second.try_acquire()
    second.release()  # not the holder: changes nothing
    assert store.lease["spec"]["holderIdentity"] == "pod-a_1"
    first.release()
    assert second.try_acquire() and store.lease["spec"]["holderIdentity"] == "pod-b_2"

    monkeypatch.setenv("POD_NAME", "mlopt-operator-abc")
    one, two = leader.identity(), leader.identity()
    assert one.startswith("mlopt-operator-abc_") and one != two  # a restarted container is a new candidate
