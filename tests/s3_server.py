"""A real S3-compatible server for the storage tests: versitygw (tools/versitygw) over a folder.

Built from the Go module proxy by tools/build-versitygw.sh (cached), started on 127.0.0.1 with
its own access key and secret. A bucket is a directory under the root; objects are files.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY, SECRET_KEY = "AKIAMLOPTTEST", "mlopt-test-secret"


class S3ServerError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def build() -> Path:
    done = subprocess.run([str(REPO / "tools" / "build-versitygw.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        raise S3ServerError(f"tools/build-versitygw.sh failed: {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class S3Server:
    root: Path
    host: str = "127.0.0.1"  # the e2e cluster's pods reach it on the node's address instead
    endpoint: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        binary = build()
        port = _free_port(self.host)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root.parent / "versitygw.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(binary), "--port", f"{self.host}:{port}", "--access", ACCESS_KEY, "--secret", SECRET_KEY,
                 "posix", str(self.root)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.endpoint = f"http://{self.host}:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise S3ServerError(f"versitygw exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((self.host, port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise S3ServerError("versitygw did not listen within 20 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(exist_ok=True)
        return name

    def credentials(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The environment a client needs (the local CLI, or a Secret's keys in a cluster)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}

    def objects(self, bucket: str) -> dict[str, Path]:
        base = self.root / bucket
        return {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}
