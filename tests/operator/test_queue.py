"""The operator's queue: caps, FIFO within a priority, Kueue left alone."""

from mlopt_operator.queue import admit
from mlopt_operator.settings import Settings


def resource(name, created, namespace="team", priority=None, status=None, queue=None, generation=1):
    job = {}
    if priority:
        job["priorityClassName"] = priority
    if queue:
        job["queueName"] = queue
    return {"metadata": {"name": name, "namespace": namespace, "generation": generation,
                         "creationTimestamp": f"2026-01-01T00:00:{created:02d}Z"},
            "spec": {"model": {"source": "zoo:digits"}, "job": job}, "status": status or {}}


def running_job(namespace="team", done=False, kueue=False, interim=None):
    labels = {"app.kubernetes.io/managed-by": "mlopt-operator"}
    if kueue:
        labels["kueue.x-k8s.io/queue-name"] = "q"
    conditions = [{"type": "Complete", "status": "True"}] if done else []
    if interim:
        conditions.insert(0, {"type": interim, "status": "True"})
    return {"metadata": {"namespace": namespace, "labels": labels}, "status": {"conditions": conditions}}


PRIORITY = {"high": 1000}.get


def priority(name):
    return PRIORITY(name, 0) if name else 0


def test_over_the_cap_waits_first_come_first_served():
    settings = Settings(max_running=2)
    queue = [resource(f"r{i}", i) for i in range(5)]
    jobs = [running_job()]  # one slot left
    places = {r["metadata"]["name"]: admit(r, queue, jobs, settings, priority) for r in queue}
    assert places["r0"].admitted and not places["r1"].admitted
    assert [places[f"r{i}"].position for i in range(1, 5)] == [1, 2, 3, 4]
    assert places["r4"].waiting == 4 and places["r4"].running == 1
    finished = [running_job(done=True), running_job(kueue=True)]  # neither holds a slot
    assert admit(queue[1], queue, finished, settings, priority).admitted


def test_priority_goes_first_then_creation_order():
    settings = Settings(max_running=1)
    queue = [resource("old", 1), resource("urgent", 9, priority="high"), resource("new", 5)]
    assert admit(queue[1], queue, [], settings, priority).admitted
    assert admit(queue[0], queue, [], settings, priority).position == 1
    assert admit(queue[2], queue, [], settings, priority).position == 2


def test_a_namespace_cap_lets_other_namespaces_pass():
    settings = Settings(max_running=4, max_running_per_namespace=1)
    queue = [resource("a1", 1, "a"), resource("a2", 2, "a"), resource("b1", 3, "b")]
    jobs = [running_job("a")]
    assert not admit(queue[0], queue, jobs, settings, priority).admitted
    assert admit(queue[2], queue, jobs, settings, priority).admitted  # b is under its cap and the cluster's


def test_no_cap_and_kueue_resources_never_wait():
    queue = [resource(f"r{i}", i) for i in range(20)]
    assert admit(queue[-1], queue, [running_job()] * 50, Settings(max_running=0), priority).admitted
    kueue = resource("k", 0, queue="team-queue")
    started = [resource("s", 0, status={"observedGeneration": 1, "phase": "Running", "jobName": "s-g1"})]
    place = admit(queue[0], [kueue, *started, queue[0]], [], Settings(max_running=1), priority)
    assert place.admitted  # neither the Kueue resource nor the running one is in the queue


def test_a_job_holds_its_slot_until_kubernetes_ends_it():
    """SuccessCriteriaMet and FailureTarget come first (after FailureTarget the pods are still being
    stopped); Complete / Failed, with completionTime, only once no pod is left. Until then it counts."""
    settings = Settings(max_running=1)
    queue = [resource("next", 1)]
    for interim in ("SuccessCriteriaMet", "FailureTarget"):
        assert not admit(queue[0], queue, [running_job(interim=interim)], settings, priority).admitted, interim
    assert admit(queue[0], queue, [running_job(interim="SuccessCriteriaMet", done=True)], settings, priority).admitted


def with_targets(name, created, *targets, status=None):
    body = resource(name, created, status=status)
    body["spec"]["targets"] = [{"name": t} for t in targets]
    return body


def target_job(name, target, generation=1, done=False):
    job = running_job(done=done)
    job["metadata"]["labels"].update({"mlopt.io/name": name, "mlopt.io/generation": str(generation),
                                      "mlopt.io/target": target})
    return job


def test_each_target_takes_a_slot_and_targets_start_one_by_one_as_slots_free():
    settings = Settings(max_running=2)
    three = with_targets("three", 1, "a", "b", "c")
    later = resource("later", 2)
    queue = [three, later]
    place = admit(three, queue, [], settings, priority)
    assert (place.admitted, place.slots) == (True, 2)  # the cap counts Jobs: two of its three targets start
    assert admit(later, queue, [], settings, priority).position == 2  # behind three's last target
    started = [target_job("three", "a"), target_job("three", "b")]
    place = admit(three, queue, started, settings, priority)
    assert (place.admitted, place.position) == (False, 1)  # its third target is first in line
    assert not admit(later, queue, started, settings, priority).admitted  # FIFO: it may not pass `three`
    started[0] = target_job("three", "a", done=True)  # a slot frees: the third target, not `later`, takes it
    place = admit(three, queue, started, settings, priority)
    assert (place.admitted, place.slots) == (True, 1)
    assert not admit(later, queue, started, settings, priority).admitted


def test_more_targets_than_the_cap_still_all_run_and_final_targets_never_start_again():
    settings = Settings(max_running=1)
    many = with_targets("many", 1, "a", "b", "c")
    assert admit(many, [many], [], settings, priority).slots == 1
    jobs = [target_job("many", "a", done=True), target_job("many", "b", done=True)]
    assert admit(many, [many], jobs, settings, priority).slots == 1  # c, when a and b have ended
    # b failed unschedulable: its Job was deleted, its final row in status keeps it from being made again
    status = {"observedGeneration": 1, "phase": "Running", "targets": [{"name": "b", "phase": "Failed"}]}
    many = with_targets("many", 1, "a", "b", "c", status=status)
    from mlopt_operator.queue import unstarted_targets

    assert unstarted_targets(many, [target_job("many", "a")]) == ["c"]
    assert unstarted_targets(many, [target_job("many", "a", generation=0)]) == ["a", "c"]  # an older generation's


def test_a_namespace_cap_counts_each_targets_job():
    settings = Settings(max_running=8, max_running_per_namespace=2)
    both = with_targets("both", 1, "a", "b", "c")
    assert admit(both, [both], [running_job()], settings, priority).slots == 1
