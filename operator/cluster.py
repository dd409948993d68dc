"""The few Kubernetes API calls the operator makes, as plain JSON dicts in and out.

Raw REST through the kubernetes client's ApiClient (auth, TLS, kubeconfig / in-cluster config):
the Job is built as a dict, and typed client models would only convert it back and forth.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from optimizer.api.crd import CRD_NAME, GROUP, PLURAL, VERSION

from .job import FINALIZER, LABEL_GENERATION, LABEL_NAME, MANAGED_BY, kueue_workload_names, name_label


class JobRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
        self.permanent = status != 403


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"HTTP {error.status} {error.reason}"


class Cluster:
    def __init__(self) -> None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        self.client = kubernetes.client.ApiClient()
        self._priorities: dict[str, int] = {}

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> dict[str, Any]:
        request = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*request, _request_timeout=timeout)
        response.read()
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(text) if text else {}

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def crd_established(self) -> bool:
        """Whether the ModelOptimization CRD exists and the API server serves it."""
        found = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}") or {}
        return any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in found.get("status", {}).get("conditions") or [])

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """A JSON merge patch: None values remove fields left from an older generation."""
        self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def _list(self, prefix: str, plural: str, namespaces: list[str] | None,
              query: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Every `plural` object under the API `prefix`: cluster-wide, or in each of `namespaces`."""
        paths = ([f"{prefix}/{plural}"] if not namespaces
                 else [f"{prefix}/namespaces/{ns}/{plural}" for ns in namespaces])
        return [item for path in paths for item in self.request("GET", path, query=query)["items"]]

    def resources(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every ModelOptimization the operator serves (all namespaces, or the given ones)."""
        return self._list(f"/apis/{GROUP}/{VERSION}", PLURAL, namespaces)

    def worker_jobs(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """Every Job the operator made (all namespaces, or the given ones), selected by label on the server."""
        return self._list("/apis/batch/v1", "jobs", namespaces, [("labelSelector", MANAGED_BY)])

    def job_events(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The Job's events (FailedCreate says why the Job controller made no pod)."""
        selector = f"involvedObject.kind=Job,involvedObject.name={job_name}"
        return self.request("GET", f"/api/v1/namespaces/{namespace}/events",
                             query=[("fieldSelector", selector)])["items"]

    def workload_events(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of the Kueue Workload that Kueue made for `job` (its "Pending" event says why it is
        not admitted). Read as events, which the operator may list already: no access to Kueue's API."""
        meta = job["metadata"]
        names = kueue_workload_names(meta["name"], meta.get("uid", ""))
        found = self.request("GET", f"/api/v1/namespaces/{meta['namespace']}/events",
                             query=[("fieldSelector", "involvedObject.kind=Workload")])["items"]
        return [e for e in found if e.get("involvedObject", {}).get("name") in names]

    def priority(self, class_name: str | None) -> int:
        """A PriorityClass's value (0 for none or an unknown class), cached: classes rarely change."""
        if not class_name:
            return 0
        if class_name not in self._priorities:
            try:
                found = self.request("GET", f"/apis/scheduling.k8s.io/v1/priorityclasses/{class_name}")
                self._priorities[class_name] = int(found.get("value", 0))
            except ApiException:
                return 0
        return self._priorities[class_name]

    def jobs(self, namespace: str, name: str, generation: int | None = None) -> list[dict[str, Any]]:
        selector = f"{LABEL_NAME}={name_label(name)}"
        if generation is not None:
            selector += f",{LABEL_GENERATION}={generation}"
        found = self.request(
            "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs", query=[("labelSelector", selector)]
        )
        return found["items"]

    def pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        found = self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            query=[("labelSelector", f"batch.kubernetes.io/job-name={job_name}")],
        )
        return found["items"]

    def release_pod(self, namespace: str, name: str) -> None:
        """Remove the operator's finalizer from a worker pod, and only that one (a strategic merge patch
        deletes it from the list by value: no index that the Job controller's own removal could shift)."""
        try:
            self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
                         body={"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}},
                         content_type="application/strategic-merge-patch+json")
        except ApiException as error:
            if error.status != 404:
                raise

    def create_job(self, job: dict[str, Any], timeout: float = 30) -> dict[str, Any] | None:
        """The created Job, or None when a Job of that name exists already. JobRefused when the API
        server says no: `permanent` for an invalid Job (400/422: retrying sends the same Job), not for
        403 (a quota or an admission policy may change)."""
        namespace = job["metadata"]["namespace"]
        try:
            return self.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=job, timeout=timeout)
        except ApiException as error:
            if error.status == 409:
                return None
            if error.status in (400, 403, 422):
                raise JobRefused(error.status, _api_message(error)) from None
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Background propagation: the garbage collector then removes the Job's pods."""
        try:
            self.request(
                "DELETE",
                f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                body={"propagationPolicy": "Background"},
            )
        except ApiException as error:
            if error.status != 404:
                raise
