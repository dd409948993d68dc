"""The test node's pure functions: pod spec -> process, results -> pod status. No cluster needed."""

import pytest

from tests.e2e import testnode as tn

POD = {
    "metadata": {"name": "p1", "namespace": "ns1", "uid": "u-1", "labels": {"app": "x"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "default",
             "containers": [{"name": "main", "image": "img:1", "command": ["echo"]}]},
    "status": {"conditions": [{"type": "DisruptionTarget", "status": "True"},
                              {"type": "Ready", "status": "False"}]},
}
CONFIGMAPS = {("ns1", "cm"): {"k": b"from-cm", "other": b"o"}}
SECRETS = {("ns1", "sec"): {"password": b"s3cret"}}


def configmaps(namespace, name):
    return CONFIGMAPS.get((namespace, name))


def secrets(namespace, name):
    return SECRETS.get((namespace, name))


def test_resolve_env_all_sources_in_order():
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "plain"},
            {"name": "B", "value": "$(A)-x-$$(A)"},
            {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            {"name": "D", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
            {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}}},
        ],
    }
    env = tn.resolve_env(container, POD, configmaps, secrets)
    assert env == {"CM_k": "from-cm", "CM_other": "o", "A": "plain", "B": "plain-x-$(A)", "C": "from-cm",
                   "D": "s3cret", "E": "ns1", "F": "x"}


def test_resolve_env_missing_reference_is_a_config_error():
    container = {"env": [{"name": "C", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "missing"}}}]}
    with pytest.raises(tn.ConfigError, match="missing"):
        tn.resolve_env(container, POD, configmaps, secrets)


def test_unsupported_field_ref_is_reported():
    with pytest.raises(tn.UnsupportedError, match="spec.hostname"):
        tn.field_ref_value(POD, "spec.hostname")


def test_container_argv_expands_and_requires_command():
    container = {"name": "c", "command": ["sh", "-c"], "args": ["echo $(WHO) $(UNSET)"]}
    assert tn.container_argv(container, {"WHO": "me"}) == ["sh", "-c", "echo me $(UNSET)"]
    with pytest.raises(tn.UnsupportedError, match="no command"):
        tn.container_argv({"name": "c", "args": ["x"]}, {})


@pytest.mark.parametrize("returncode, expected", [(0, 0), (3, 3), (-15, 143), (-9, 137)])
def test_exit_code_of(returncode, expected):
    assert tn.exit_code_of(returncode) == expected


def test_termination_message_file_wins_and_is_capped():
    assert tn.termination_message(b"x" * 5000, "File", 1, b"log") == "x" * 4096


def test_termination_message_fallback_to_logs_only_on_error():
    log = b"".join(b"line %d\n" % i for i in range(200))
    message = tn.termination_message(b"", "FallbackToLogsOnError", 2, log)
    assert message.startswith("line 120\n") and message.endswith("line 199\n")
    assert tn.termination_message(b"", "FallbackToLogsOnError", 0, log) == ""
    assert tn.termination_message(b"", "File", 2, log) == ""


def test_tail_text_byte_cap():
    assert len(tn.tail_text(b"y" * 10000)) == 2048


def test_merge_conditions_keeps_foreign_types():
    merged = tn.merge_conditions(POD["status"]["conditions"], [{"type": "Ready", "status": "True"}])
    assert merged == [{"type": "DisruptionTarget", "status": "True"}, {"type": "Ready", "status": "True"}]


def test_build_status_running():
    status = tn.build_status_running(POD, "2026-01-01T00:00:00Z", {"main": "testnode://42"})
    assert status["phase"] == "Running" and status["podIP"] == "127.0.0.1"
    (cs,) = status["containerStatuses"]
    assert cs["state"] == {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    assert cs["ready"] and cs["image"] == "img:1" and cs["containerID"] == "testnode://42"
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True" and ready["DisruptionTarget"] == "True"


def test_terminated_status_phase_and_state():
    ok = tn.ContainerResult(0, "all good", "t0", "t1")
    bad = tn.ContainerResult(3, "", "t0", "t2")
    pod = {**POD, "spec": {**POD["spec"], "containers": [{"name": "a"}, {"name": "b"}]}}
    status = tn.terminated_status(pod, {"a": ok, "b": bad}, "t0")
    assert status["phase"] == "Failed"
    states = [cs["state"]["terminated"] for cs in status["containerStatuses"]]
    assert states[0] == {"exitCode": 0, "reason": "Completed", "message": "all good", "startedAt": "t0",
                         "finishedAt": "t1"}
    assert states[1]["exitCode"] == 3 and states[1]["reason"] == "Error" and "message" not in states[1]
    assert tn.terminated_status(pod, {"a": ok, "b": ok}, "t0")["phase"] == "Succeeded"


def test_volume_files_configmap_items_secret_projected():
    lookups = tn.VolumeLookups(configmaps, secrets, lambda pod, aud, exp: f"token-{aud}-{exp}")
    assert tn.volume_files({"name": "v", "emptyDir": {}}, POD, lookups) is None
    cm = {"name": "v", "configMap": {"name": "cm", "items": [{"key": "k", "path": "sub/k.txt"}]}}
    assert tn.volume_files(cm, POD, lookups) == {"sub/k.txt": (b"from-cm", 0o644)}
    sec = {"name": "v", "secret": {"secretName": "sec", "defaultMode": 0o400}}
    assert tn.volume_files(sec, POD, lookups) == {"password": (b"s3cret", 0o400)}
    projected = {"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "cm", "items": [{"key": "other", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}
    assert tn.volume_files(projected, POD, lookups) == {
        "token": (b"token--3607", 0o644), "ca.crt": (b"o", 0o644), "namespace": (b"ns1", 0o644)}


def test_volume_files_rejects_unsupported_types():
    with pytest.raises(tn.UnsupportedError, match="hostPath"):
        tn.volume_files({"name": "v", "hostPath": {"path": "/"}}, POD, tn.VolumeLookups(configmaps, secrets, None))

