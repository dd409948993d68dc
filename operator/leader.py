"""Leader election on a coordination.k8s.io Lease, so two replicas never both act.

Why a Lease and not kopf's peering: peering pauses an operator only when a peer of *higher* priority
is seen, so two replicas of one Deployment (same priority) would both pause or both run; it also
needs cluster-wide peering CRDs. A Lease is what kube-controller-manager and client-go use: the
holder renews it every RENEW seconds, a standby takes it over once it is DURATION seconds stale,
and a holder that cannot renew within DURATION - RENEW exits (its container restarts as a standby),
so at no time do two replicas hold it. Two details make that hold on a real cluster, as in
client-go: each Lease request times out after REQUEST_TIMEOUT (a stalled API server cannot keep a
leader acting past the point where it must step down), and a standby judges staleness by its own
monotonic clock, from when it last saw the lease change, never by comparing renewTime, written by
another node's clock, with its own (clock skew would hand over a live lease).
A holder cut off from the API server exits only when its renewal loop notices (a request timing
out can make that a little later than DURATION - RENEW), so the one step two replicas must never do
at once, creating a Job within the cap, is fenced as well: it runs only while `time_to_act()` says
no standby can have taken the lease yet, with a request timeout inside that time.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

import urllib3
from kubernetes.client.exceptions import ApiException

DURATION, RENEW, RETRY = 15, 5, 2  # seconds, as kube-controller-manager's defaults scaled down
REQUEST_TIMEOUT = 3  # per Lease request: a GET and a PUT fit in the time a holder has left to step down
LOG = logging.getLogger("mlopt.leader")
_held: "Lease | None" = None  # the lease this process leads by, once keep() renews it


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _micro(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity() -> str:
    """`<pod name>_<random>`, as client-go does: unique per process, so a container restarted in the
    same pod is a new candidate, never mistaken for the holder that died."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, request: Callable[..., dict[str, Any]], namespace: str, name: str, holder: str):
        self.request, self.holder = request, holder
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name = namespace, name
        self._seen, self._seen_at = None, time.monotonic()  # the lease's last (holder, renewTime), and when
        self.renewed_at: float | None = None  # when a renewal that succeeded was sent (monotonic)

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = _micro(_now())
        return {"holderIdentity": self.holder, "leaseDurationSeconds": DURATION,
                "acquireTime": acquired or now, "renewTime": now, "leaseTransitions": transitions}

    def try_acquire(self) -> bool:
        """Take the lease if it is free, stale or already ours (optimistic: a conflict means someone
        else was faster, and this try fails)."""
        sent = time.monotonic()
        try:
            current = self.request("GET", f"{self.path}/{self.name}")
        except ApiException as error:
            if error.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(0, None)}
            try:
                self.request("POST", self.path, body=body)
                self.renewed_at = sent
                return True
            except ApiException as conflict:
                if conflict.status == 409:
                    return False
                raise
        spec = current.get("spec") or {}
        seen = (spec.get("holderIdentity"), spec.get("renewTime"))
        if seen != self._seen:  # renewed (or taken) since the last look: stale only DURATION from now
            self._seen, self._seen_at = seen, time.monotonic()
        duration = spec.get("leaseDurationSeconds") or DURATION
        ours = spec.get("holderIdentity") == self.holder
        stale = time.monotonic() - self._seen_at > duration
        if not (ours or stale or not spec.get("holderIdentity")):
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        current["spec"] = self._spec(transitions, spec.get("acquireTime") if ours else None)
        try:
            self.request("PUT", f"{self.path}/{self.name}", body=current)  # resourceVersion guards the race
            self.renewed_at = sent
            return True
        except ApiException as conflict:
            if conflict.status == 409:
                return False
            raise

    def safe_for(self) -> float:
        """Seconds before a standby may take the lease: none can until DURATION after it saw our last
        renewal, which the API server applied after we sent it."""
        return 0.0 if self.renewed_at is None else self.renewed_at + DURATION - time.monotonic()

    def release(self) -> None:
        """On a clean stop: mark the lease free, so a standby takes over at once rather than after DURATION."""
        try:
            current = self.request("GET", f"{self.path}/{self.name}")
            if (current.get("spec") or {}).get("holderIdentity") == self.holder:
                current["spec"] = {**current["spec"], "holderIdentity": None, "renewTime": None,
                                   "leaseDurationSeconds": 1}
                self.request("PUT", f"{self.path}/{self.name}", body=current)
                LOG.info(f"{self.holder} released lease {self.name}")
        except ApiException as error:  # the standby takes over after DURATION anyway
            LOG.warning(f"releasing lease {self.name}: {error}")

    def holder_now(self) -> str | None:
        """Who holds the lease, for the log; None when the API server does not say (or is away: a
        standby that cannot reach it must keep waiting, not exit)."""
        try:
            return (self.request("GET", f"{self.path}/{self.name}").get("spec") or {}).get("holderIdentity")
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return None


def acquire(lease: Lease, stop: threading.Event | None = None) -> bool:
    """Block until this replica holds the lease (False if `stop` is set first)."""
    logged = False
    while not (stop and stop.is_set()):
        try:
            if lease.try_acquire():
                LOG.info(f"{lease.holder} leads (lease {lease.namespace}/{lease.name})")
                return True
        except Exception as error:  # the API server is away: keep trying
            LOG.warning(f"lease {lease.name}: {error}")
        if not logged:
            LOG.info(f"{lease.holder} is standby: {lease.holder_now()} leads")
            logged = True
        time.sleep(RETRY)
    return False


def keep(lease: Lease, on_lost: Callable[[], None]) -> threading.Thread:
    """Renew the lease every RENEW seconds in a daemon thread; call on_lost when it could not be
    renewed for DURATION - RENEW seconds (before a standby may take it: DURATION after it last saw
    a renewal)."""
    global _held
    _held = lease

    def renew() -> None:
        last = time.monotonic()
        while True:
            time.sleep(RENEW)
            try:
                if lease.try_acquire():
                    last = time.monotonic()
                    continue
                LOG.error(f"lease {lease.name} is held by {lease.holder_now()}: stepping down")
                on_lost()
                return
            except Exception as error:
                LOG.warning(f"renewing lease {lease.name}: {error}")
            if time.monotonic() - last > DURATION - RENEW:
                LOG.error(f"lease {lease.name} not renewed for {DURATION - RENEW} s: stepping down")
                on_lost()
                return

    thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    thread.start()
    return thread


def time_to_act() -> float | None:
    """Seconds this process may still act as the only leader; None when it runs without a lease (one
    replica run by hand). A step that must not be done by two leaders at once (creating a Job within
    the cap) checks it first: a leader cut off from the API server steps down only when its renewal
    loop notices, and by then a standby may have taken over and admitted Jobs of its own."""
    return None if _held is None else _held.safe_for()
