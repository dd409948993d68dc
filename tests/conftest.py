"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from .s3_server import S3Server, S3ServerError


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not slow"` must leave the e2e tests out too
def pytest_collection_modifyitems(items):
    """Every e2e test is also `slow` (it needs the cluster and the images), so the fast tier skips them."""
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (versitygw) on 127.0.0.1; fails, never skips, if it cannot start."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "root")
    error = None
    try:
        server.start()
    except S3ServerError as err:
        error = err
    if error:
        pytest.fail(f"cannot start the S3 test server: {error}", pytrace=False)
    yield server
    server.stop()
