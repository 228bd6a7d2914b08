"""Shared fixtures: a real local Ray, Prefect in ephemeral mode, generated datasets, the shipped checkpoint."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.devtools.local_s3 import LocalS3, free_ports

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "pipeline" / "models" / "weights" / "unet_tiny_shapes.pt"

# The test plugin (tests/plugins: segpipe_faults.py and its dist-info, whose entry point registers the model
# faults_1x1) is found by importlib.metadata on sys.path, with no pip install. PYTHONPATH too, and now, at import:
# the Ray workers and subprocesses that the tests start later inherit it and load the plugin as the tests do.
PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
# torchvision's weights cache (torch.hub) for the session, set before any Ray worker starts: the tests place
# weight files there under the names torchvision expects, and nothing is downloaded.
TORCH_HOME = Path(tempfile.mkdtemp(prefix="segpipe-torch-home-"))
os.environ["TORCH_HOME"] = str(TORCH_HOME)
atexit.register(shutil.rmtree, TORCH_HOME, True)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' own tensors are tiny: one intra-op thread is fastest and leaves the cores to Ray's actors."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def tiny_unet():
    """A small random U-Net (3 classes) whose argmax is not one class everywhere."""
    import torch

    from pipeline.models import get_model

    torch.manual_seed(1)
    m = get_model("unet_tiny", num_classes=3, width=8).eval()
    with torch.no_grad():
        m.head.bias.zero_()
    return m


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


@pytest.fixture
def kill_run_once(ray_local, prefect_ephemeral):
    """``kill_run_once(args, folder, pattern)``: run ``segpipe run <args>`` in its own process group, joined to
    the session's Ray and Prefect API (about 20 s less than starting its own), and SIGKILL the whole group as
    soon as a file matching ``pattern`` exists in ``folder``."""
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }

    def kill(args: list[str], folder: Path, pattern: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while not list(folder.glob(pattern)):
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline, f"no {pattern} was committed in time"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return kill


@pytest.fixture
def unused_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> LocalS3:
    """A real S3 server (SeaweedFS) for the session, with a secret the tests plant and look for in outputs."""
    with LocalS3(tmp_path_factory.mktemp("seaweedfs"), key="segpipe-test-key", secret="planted-secret-9f4b2c7e") as s3:
        yield s3
