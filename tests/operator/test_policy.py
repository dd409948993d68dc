"""The policy: what a ModelOptimization may ask of the cluster, and the rule named when it asks more."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlopt_operator.policy import Policy, PolicySource, PolicyUnreadable, parse, violations
from mlopt_operator.settings import Settings
from optimizer.api.spec_loader import parse_spec

SETTINGS = Settings(worker_image="mlopt/worker:0.1.0", gpu_worker_image="mlopt/worker-gpu:0.1.0")


def spec(**job):
    model = job.pop("model", {"source": "zoo:digits"})
    return parse_spec({"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "m"},
                       "spec": {"model": model, "job": job}}, "test")


def test_the_default_policy_allows_every_example_and_the_worker_images():
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        document = yaml.safe_load(path.read_text())
        assert violations(parse_spec(document, str(path)), Policy(), SETTINGS) == [], path
    assert violations(spec(image="mlopt/worker-gpu:0.1.0"), Policy(), SETTINGS) == []


def test_each_rule_names_itself_and_what_the_spec_asked():
    asked = spec(
        image="docker.io/someone/anything:latest",
        tolerations=[{"operator": "Exists"}, {"key": "dedicated", "operator": "Equal", "value": "x"}],
        resources={"requests": {"memory": "1Ti"}, "limits": {"cpu": "64", "memory": "1Ti"}},
        activeDeadlineSeconds=604800,
    )
    broken = violations(asked, Policy(), SETTINGS)
    assert [rule.split(":")[0] for rule in broken] == [
        "allowedImages", "allowedTolerationKeys", "allowedTolerationKeys", "maxMemory", "maxCPU", "maxMemory",
        "maxDeadlineSeconds"]
    assert "docker.io/someone/anything:latest" in broken[0] and "mlopt/worker:0.1.0" in broken[0]
    assert "tolerations[0]" in broken[1] and "every taint" in broken[1]
    assert "spec.job.resources.requests.memory 1Ti is over 64Gi" in broken[3]


def test_entrypoints_priority_classes_and_node_selectors_follow_their_rules():
    state_dict = spec(model={"source": "s3://b/m.pt", "format": "state-dict", "entrypoint": "acme.nets:Net",
                             "inputs": [{"name": "x", "shape": [1, 4]}]})
    assert violations(state_dict, Policy(), SETTINGS)[0].startswith("allowedEntrypoints: model.entrypoint acme.nets:Net")
    assert violations(state_dict, Policy(allowedEntrypoints=["acme.*:*"]), SETTINGS) == []
    assert violations(state_dict, Policy(allowedEntrypoints=["other.*:*"]), SETTINGS) != []

    critical = spec(priorityClassName="system-cluster-critical", nodeSelector={"pool": "bench"})
    assert violations(critical, Policy(), SETTINGS) == []  # defaults: any class, node selectors allowed
    strict = Policy(allowedPriorityClasses=["batch-*"], allowNodeSelector=False)
    assert [r.split(":")[0] for r in violations(critical, strict, SETTINGS)] == ["allowNodeSelector", "allowedPriorityClasses"]


def test_toleration_keys_are_globs_and_only_star_allows_a_blanket_toleration():
    keyed = spec(tolerations=[{"key": "pool.example.com/bench", "operator": "Exists"}])
    blanket = spec(tolerations=[{"operator": "Exists"}])
    pools = Policy(allowedTolerationKeys=["pool.example.com/*"])
    assert violations(keyed, pools, SETTINGS) == []
    assert violations(blanket, pools, SETTINGS) != []
    assert violations(blanket, Policy(allowedTolerationKeys=["*"]), SETTINGS) == []


def test_the_configmap_is_parsed_strictly_and_re_read_after_the_cache_expires():
    assert parse(None) == Policy() and parse("") == Policy()
    assert parse("maxMemory: 8Gi").maxMemory == "8Gi"
    for text, field in (("maxMemory: lots", "maxMemory"), ("allowedImage: [x]", "allowedImage"), ("- a", "mapping"),
                        ("a: [", "not YAML")):
        with pytest.raises(PolicyUnreadable, match=field):
            parse(text)

    now, reads, text = [0.0], [], ["maxCPU: '2'"]
    source = PolicySource(lambda: reads.append(1) or {"data": {"policy.yaml": text[0]}}, clock=lambda: now[0])
    assert source.current().maxCPU == "2"
    text[0] = "maxCPU: '4'"
    assert source.current().maxCPU == "2" and len(reads) == 1  # cached
    now[0] = 10.0
    assert source.current().maxCPU == "4" and len(reads) == 2
    assert PolicySource(lambda: None).current() == Policy()  # no ConfigMap: the defaults


def test_each_targets_pod_is_checked_as_it_will_be_placed():
    """A target places its own pod: its tolerations, nodeSelector and resources meet the same rules."""
    asked = parse_spec({"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "metadata": {"name": "m"},
                        "spec": {"model": {"source": "zoo:digits"}, "targets": [
                            {"name": "small"},  # spec.job's resources (the defaults) apply: nothing of its own
                            {"name": "big", "nodeSelector": {"pool": "big"},
                             "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                             "resources": {"requests": {"cpu": "32"}, "limits": {"cpu": "32", "memory": "8Gi"}}}]}},
                       "test")
    broken = violations(asked, Policy(), SETTINGS)
    assert broken == ["allowedTolerationKeys: spec.targets[1].tolerations[0] (key dedicated) is not allowed "
                      "(no user tolerations are allowed)",
                      "maxCPU: spec.targets[1].resources.requests.cpu 32 is over 16",
                      "maxCPU: spec.targets[1].resources.limits.cpu 32 is over 16"]
    fenced = Policy(allowedTolerationKeys=["dedicated"], maxCPU="32", allowNodeSelector=False)
    assert violations(asked, fenced, SETTINGS) == ["allowNodeSelector: spec.targets[1].nodeSelector is not allowed"]
    assert violations(asked, Policy(allowedTolerationKeys=["dedicated"], maxCPU="32"), SETTINGS) == []
