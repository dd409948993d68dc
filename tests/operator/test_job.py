import json

import pytest

from mlopt_operator.job import build_job, job_name
from mlopt_operator.settings import Settings
from optimizer.api.spec_loader import SpecError, parse_spec

SETTINGS = Settings(worker_image="mlopt/worker:test", gpu_worker_image="mlopt/worker-gpu:test")


def resource(**spec):
    return {
        "apiVersion": "mlopt.io/v1alpha1",
        "kind": "ModelOptimization",
        "metadata": {"name": "digits", "namespace": "team", "uid": "u-1", "generation": 3,
                     "resourceVersion": "42", "annotations": {"a": "b"}},
        "spec": {"model": {"source": "zoo:digits"}, **spec},
        "status": {"phase": "Running"},
    }


def pod(job):
    return job["spec"]["template"]["spec"]


def worker(job):
    (container,) = pod(job)["containers"]
    return container


def env(job):
    return {e["name"]: e["value"] for e in worker(job)["env"]}


def test_one_job_per_generation_owned_and_labelled():
    job = build_job(resource(), SETTINGS)
    assert job["metadata"]["name"] == "digits-g3"
    assert job["metadata"]["namespace"] == "team"
    labels = {"mlopt.io/name": "digits", "mlopt.io/generation": "3"}
    assert labels.items() <= job["metadata"]["labels"].items()
    assert labels.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization", "name": "digits",
                     "uid": "u-1", "controller": True, "blockOwnerDeletion": True}


def test_every_pod_keeps_its_summary_until_the_operator_releases_it():
    """The Job controller copies the template's finalizers onto each pod (with its own job-tracking one)."""
    template = build_job(resource(), SETTINGS)["spec"]["template"]["metadata"]
    assert template["finalizers"] == ["mlopt.io/summary"]
    assert template["annotations"]["mlopt.io/resource-uid"] == "u-1"  # a namesake's pods are told apart


def test_worker_gets_the_spec_snapshot_of_this_generation():
    job = build_job(resource(benchmark={"runs": 5}), SETTINGS)
    assert worker(job)["command"] == ["mlopt", "worker"]
    snapshot = json.loads(env(job)["MLOPT_SPEC"])
    assert snapshot == {
        "apiVersion": "mlopt.io/v1alpha1", "kind": "ModelOptimization",
        "metadata": {"name": "digits", "namespace": "team", "generation": 3},
        "spec": {"model": {"source": "zoo:digits"}, "benchmark": {"runs": 5}},
    }
    parse_spec(snapshot)  # what the worker will do with it
    assert env(job)["MLOPT_OUTPUT"] == "/scratch/results"


def test_locked_down_pod():
    job = build_job(resource(), SETTINGS)
    spec = pod(job)
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = worker(job)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # default maxSizeMB 2048: room for ten copies of the largest model, evicted beyond that
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "21504Mi"}} in spec["volumes"]
    assert {"name": "scratch", "mountPath": "/scratch"} in worker(job)["volumeMounts"]
    # Everything that writes points into the scratch volume.
    for name in ("HOME", "TMPDIR", "MLOPT_CACHE", "MPLCONFIGDIR", "MLOPT_OUTPUT"):
        assert env(job)[name].startswith("/scratch")
    assert worker(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_job_settings_and_resources_from_the_spec():
    job = build_job(
        resource(job={
            "image": "registry.example/worker:1",
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}},
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
            "activeDeadlineSeconds": 600,
            "backoffLimit": 2,
        }),
        SETTINGS,
    )
    assert worker(job)["image"] == "registry.example/worker:1"
    assert worker(job)["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "5120Mi"},
                                        "limits": {"memory": "3Gi"}}
    assert pod(job)["nodeSelector"] == {"pool": "batch"}
    assert pod(job)["tolerations"] == [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["backoffLimit"] == 2


def test_defaults_cpu_image_and_spec_defaults():
    job = build_job(resource(), SETTINGS)
    assert worker(job)["image"] == "mlopt/worker:test"
    assert worker(job)["resources"] == {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "5120Mi"},
                                        "limits": {"cpu": "2", "memory": "8Gi"}}
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert "nvidia.com/gpu" not in worker(job)["resources"]["limits"]
    assert "ttlSecondsAfterFinished" not in job["spec"]


def test_cuda_uses_the_gpu_image_and_asks_for_a_gpu():
    job = build_job(resource(benchmark={"device": "cuda"}), SETTINGS)
    assert worker(job)["image"] == "mlopt/worker-gpu:test"
    assert worker(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(job)["tolerations"]
    assert "runtimeClassName" not in pod(job)
    job = build_job(resource(benchmark={"device": "cuda"}), Settings(gpu_runtime_class="nvidia"))
    assert pod(job)["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod(build_job(resource(), Settings(gpu_runtime_class="nvidia")))


def test_deterministic_exit_codes_fail_the_job_without_retries():
    job = build_job(resource(job={"backoffLimit": 3}), SETTINGS)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob",
                        "onExitCodes": {"containerName": "worker", "operator": "In", "values": [1, 2]}}


def test_ttl_from_settings():
    job = build_job(resource(), Settings(job_ttl_seconds=3600))
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_invalid_spec_builds_no_job():
    with pytest.raises(SpecError, match="dynamicAxes"):
        build_job(resource(model={"source": "m.pt", "inputs": [{"name": "x", "shape": [1], "dynamicAxes": {"4": "b"}}]}),
                  SETTINGS)


def test_long_names_stay_within_63_characters_and_unique():
    a, b = "a" * 60 + "x", "a" * 60 + "y"
    assert len(job_name(a, 12)) <= 63 and job_name(a, 12).endswith("-g12")
    assert job_name(a, 12) != job_name(b, 12)


def test_settings_from_env():
    settings = Settings.from_env({"MLOPT_WORKER_IMAGE": "w:1", "MLOPT_GPU_WORKER_IMAGE": "g:1",
                                  "MLOPT_JOB_TTL_SECONDS": "60"})
    assert (settings.worker_image, settings.gpu_worker_image, settings.job_ttl_seconds) == ("w:1", "g:1", 60)
    assert Settings.from_env({}).image_pull_policy == "IfNotPresent"


def test_storage_credentials_come_from_the_secret_by_envfrom_and_never_through_the_operator():
    job = build_job(resource(model={"source": "s3://models/resnet.onnx", "inputs": [{"name": "x", "shape": [1, 3]}]},
                             output="s3://results/run/",
                             storage={"secretRef": "s3-creds", "endpoint": "https://minio.storage:9000",
                                      "caBundle": {"name": "minio-ca"}}), SETTINGS)
    assert worker(job)["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not any("AWS_ACCESS" in name or "AWS_SECRET" in name for name in env(job))
    assert env(job)["AWS_CA_BUNDLE"] == "/etc/mlopt/ca/ca.crt"
    assert {"name": "ca-bundle", "configMap": {"name": "minio-ca"}} in pod(job)["volumes"]
    assert {"name": "ca-bundle", "mountPath": "/etc/mlopt/ca", "readOnly": True} in worker(job)["volumeMounts"]
    assert pod(job)["automountServiceAccountToken"] is False and "serviceAccountName" not in pod(job)
    assert json.loads(env(job)["MLOPT_SPEC"])["spec"]["output"] == "s3://results/run/"  # as the user wrote it


def test_workload_identity_mounts_the_service_account_token():
    job = build_job(resource(job={"serviceAccountName": "mlopt-s3-reader"}), SETTINGS)
    assert pod(job)["serviceAccountName"] == "mlopt-s3-reader" and pod(job)["automountServiceAccountToken"] is True


def test_pvc_sources_are_mounted_read_only_and_the_output_claim_read_write():
    job = build_job(resource(model={"source": "pvc://models/team/resnet.pt2", "inputs": [{"name": "x", "shape": [1, 3]}],
                                    "maxSizeMB": 500},
                             data={"source": "pvc://datasets/calib.npz"}, output="pvc://results/resnet/"), SETTINGS)
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in worker(job)["volumeMounts"]}
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in volumes.values() if "persistentVolumeClaim" in v}
    assert {name: v["persistentVolumeClaim"]["readOnly"] for name, v in claims.items()} == {
        "datasets": True, "models": True, "results": False}
    for name, volume in claims.items():
        mount = mounts[f"/mnt/pvc/{name}"]
        assert mount["name"] == volume["name"] and mount["readOnly"] == volume["persistentVolumeClaim"]["readOnly"]
    assert env(job)["MLOPT_PVC_ROOT"] == "/mnt/pvc"
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "6024Mi"}  # 10 x 500 MiB + 1 GiB
    assert worker(job)["resources"]["requests"]["ephemeral-storage"] == "2024Mi"


def test_one_claim_for_input_and_output_is_mounted_once_read_write():
    job = build_job(resource(model={"source": "pvc://shared/in/m.onnx", "inputs": [{"name": "x", "shape": [1, 3]}]},
                             output="pvc://shared/out/"), SETTINGS)
    claims = [v for v in pod(job)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "shared", "readOnly": False}}]


def test_the_longest_name_gets_a_job_name_and_labels_that_fit():
    import re

    from mlopt_operator.job import job_name, name_label

    longest = "a" * 40 + "-" + "b" * 22  # 63 characters: the most a name may have (the spec and the CRD say so)
    body = resource()
    body["metadata"]["name"] = longest
    body["metadata"]["generation"] = 12345
    job = build_job(body, SETTINGS)
    label_value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert all(len(v) <= 63 and label_value.match(v) for v in labels.values()), labels
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].endswith("-g12345")
    assert job["metadata"]["annotations"]["mlopt.io/resource"] == longest  # the operator finds it back
    other = "a" * 40 + "-" + "c" * 22
    assert job_name(other, 12345) != job["metadata"]["name"]  # the hash keeps two long names apart
    assert name_label(longest) == longest
    too_long = resource()
    too_long["metadata"]["name"] = "a" * 64
    with pytest.raises(SpecError, match="metadata.name"):
        build_job(too_long, SETTINGS)


def test_priority_pull_secrets_guaranteed_qos_and_kueue():
    job = build_job(resource(job={"priorityClassName": "batch-high", "imagePullSecrets": ["registry"],
                                  "qos": "guaranteed", "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
                                  "queueName": "team-queue"}), SETTINGS)
    assert pod(job)["priorityClassName"] == "batch-high"
    assert pod(job)["imagePullSecrets"] == [{"name": "registry"}]
    resources = worker(job)["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "4Gi"
    assert env(job)["MLOPT_QOS_CLASS"] == "Guaranteed"
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    plain = build_job(resource(), SETTINGS)
    assert "suspend" not in plain["spec"] and env(plain)["MLOPT_QOS_CLASS"] == "Burstable"
    assert plain["spec"]["template"]["spec"].get("priorityClassName") is None


def test_guaranteed_qos_needs_whole_cpus():
    with pytest.raises(SpecError, match="whole CPUs"):
        build_job(resource(job={"qos": "guaranteed", "resources": {"limits": {"cpu": "1500m", "memory": "4Gi"}}}),
                  SETTINGS)


def test_counts_and_sizes_have_upper_bounds():
    for field, value in (("benchmark", {"runs": 1_000_000_000}), ("benchmark", {"warmup": 100_000}),
                         ("data", {"samples": 10_000_000}), ("job", {"activeDeadlineSeconds": 10**9})):
        with pytest.raises(SpecError, match=f"spec.{field}"):
            build_job(resource(**{field: value}), SETTINGS)


def test_kueue_workload_names_follow_kueues_scheme_and_fit_a_label():
    from mlopt_operator.job import kueue_workload_names

    (short,) = kueue_workload_names("kueued-g1", "0b6f3f4e-1111-2222-3333-444455556666")  # no cut: one name
    assert short.startswith("job-kueued-g1-") and len(short) == len("job-kueued-g1-") + 5
    name = "n" * 60 + "-g1"  # a Job name of 63 characters
    names = kueue_workload_names(name, "uid")
    assert sorted(len(n) for n in names) == [63, len(f"job-{name}") + 6]
    assert len({n[-5:] for n in names}) == 1  # the same hash, whichever length Kueue cuts to


# --------------------------------------------------------------------------------------------------
# spec.targets: one Job per target, each placed on its pool

TARGETS = [
    {"name": "amx", "nodeSelector": {"pool": "amx", "zone": "b"}, "pricePerHour": 0.4,
     "tolerations": [{"key": "amx", "operator": "Exists", "effect": "NoSchedule"}],
     "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}},
    {"name": "t4", "device": "cuda", "nodeSelector": {"pool": "t4"}},
    {"name": "plain"},
]


def test_without_targets_the_one_job_is_unchanged():
    from mlopt_operator.job import build_jobs

    body = resource(job={"nodeSelector": {"pool": "batch"}})
    (job,) = build_jobs(body, SETTINGS)
    assert job == build_job(body, SETTINGS) and job["metadata"]["name"] == "digits-g3"
    assert "mlopt.io/target" not in job["metadata"]["labels"] and "MLOPT_TARGET" not in env(job)


def test_one_job_per_target_placed_on_its_pool_and_told_its_name():
    from mlopt_operator.job import build_jobs

    body = resource(targets=TARGETS, job={"nodeSelector": {"zone": "a", "disk": "ssd"},
                                          "tolerations": [{"key": "batch", "operator": "Exists"}]})
    amx, t4, plain = build_jobs(body, SETTINGS)
    assert [j["metadata"]["name"] for j in (amx, t4, plain)] == ["digits-g3-amx", "digits-g3-t4", "digits-g3-plain"]
    for job, target in zip((amx, t4, plain), ("amx", "t4", "plain")):
        assert job["metadata"]["labels"]["mlopt.io/target"] == target
        assert job["spec"]["template"]["metadata"]["labels"]["mlopt.io/target"] == target  # on its pods too
        assert job["metadata"]["labels"]["mlopt.io/generation"] == "3" and env(job)["MLOPT_TARGET"] == target
    # the target's nodeSelector over spec.job's (the target wins a key both name); tolerations added up
    assert pod(amx)["nodeSelector"] == {"zone": "b", "disk": "ssd", "pool": "amx"}
    assert pod(amx)["tolerations"] == [{"key": "batch", "operator": "Exists"},
                                       {"key": "amx", "operator": "Exists", "effect": "NoSchedule"}]
    assert worker(amx)["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert worker(amx)["image"] == "mlopt/worker:test" and "nvidia.com/gpu" not in worker(amx)["resources"]["limits"]
    # a cuda target: a GPU, its taint tolerated, the GPU image; spec.job.resources when it gives none
    assert worker(t4)["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(t4)["tolerations"]
    assert worker(t4)["image"] == "mlopt/worker-gpu:test"
    assert pod(plain)["nodeSelector"] == {"zone": "a", "disk": "ssd"}
    assert worker(plain)["resources"] == worker(build_job(resource(), SETTINGS))["resources"]
    # every target's Job carries the whole spec: the worker finds its target in it by MLOPT_TARGET
    assert json.loads(env(amx)["MLOPT_SPEC"])["spec"]["targets"] == TARGETS


def test_target_job_names_fit_63_characters_and_stay_unique():
    from mlopt_operator.job import build_jobs

    body = resource(targets=[{"name": "a" * 20}, {"name": "a" * 19 + "b"}])
    body["metadata"]["name"] = "n" * 63
    body["metadata"]["generation"] = 12345
    first, second = (j["metadata"]["name"] for j in build_jobs(body, SETTINGS))
    assert len(first) <= 63 and len(second) <= 63 and first != second
    assert first.endswith("-g12345-" + "a" * 20) and second.endswith("b")
