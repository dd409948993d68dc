"""Fixtures for tests against a real control plane (see tests/e2e/control_plane.py).

- `control_plane` (session): a started ControlPlane with `.kubeconfig`, `.server`, `.bin_dir`,
  `.kubectl(*args, input=None, check=True)`, `.create_namespace()`, `.container_log(...)`.
- `namespace` (function): a fresh namespace with its `default` service account; deleted afterwards.
- `kueue` (session): Kueue's CRDs and controller manager (tests/e2e/kueue.py), started on first use,
  with a ClusterQueue that has room for one worker Job; `kueue.local_queue(namespace, name)`.
- `s3_server` (session): versitygw on the node's address (pods cannot reach 127.0.0.1 of the host).

If the binaries cannot be built (no Go toolchain, no module proxy) the tests FAIL with the reason;
they are never skipped.
"""

from __future__ import annotations

import os

import pytest

from ..s3_server import S3Server, S3ServerError
from .control_plane import ControlPlane, ControlPlaneError
from .node import NODE_IP

_planes: list[ControlPlane] = []
_figures: list[str] = []


@pytest.fixture
def figure():
    """Record a measured figure (time to drain, failover seconds, ...): repeated in a section at the
    end of the run, so CI's log shows it even though pytest hides a passing test's output."""

    def record(text: str) -> None:
        _figures.append(text)
        print(text)

    return record


def pytest_terminal_summary(terminalreporter):
    if _figures:
        terminalreporter.section("figures measured by the e2e tests")
        for text in _figures:
            terminalreporter.write_line(text)


def pytest_configure(config):
    # Registered in pyproject too; repeated here so this directory works on its own.
    config.addinivalue_line("markers", "e2e: needs the real Kubernetes control plane")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("control-plane")
    plane = ControlPlane(workdir)
    error = None
    try:
        plane.start()
    except ControlPlaneError as err:
        error = err
    if error:  # outside the except block: report only the reason, not a chained traceback
        pytest.fail(f"cannot start the test control plane: {error}", pytrace=False)
    _planes.append(plane)
    previous = os.environ.get("KUBECONFIG")
    # Clients that read the environment (kopf, kubernetes.config) talk to this cluster only.
    os.environ["KUBECONFIG"] = str(plane.kubeconfig)
    yield plane
    if previous is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = previous
    plane.stop()
    _planes.remove(plane)
    # The node must leave this machine as it found it: a leftover fails the run here.
    assert not plane.left_behind, f"the e2e node left these behind: {plane.left_behind}"


@pytest.fixture(scope="session")
def s3_server(control_plane, tmp_path_factory):
    """The real S3 server on the node's address, so pods reach it as they would a cluster's object store."""
    server = S3Server(tmp_path_factory.mktemp("s3-e2e") / "root", host=NODE_IP)
    try:
        server.start()
    except S3ServerError as err:
        pytest.fail(f"cannot start the S3 test server: {err}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kueue(control_plane):
    """The real Kueue in the cluster; only the tests that ask for it start it."""
    error = None
    try:
        started = control_plane.start_kueue()
        started.ensure_cluster_queue()
    except ControlPlaneError as err:
        error = err
    if error:
        pytest.fail(f"cannot start Kueue: {error}", pytrace=False)
    return started


@pytest.fixture
def namespace(control_plane):
    name = control_plane.create_namespace("e2e")
    yield name
    # Do not wait: namespace deletion is asserted in its own test; later tests use new names.
    control_plane.delete_namespace(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _planes:
        report.sections.append(("control plane logs (tail)", _planes[-1].log_tails()))
