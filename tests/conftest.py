"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from .s3_server import S3Server, S3ServerError


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
