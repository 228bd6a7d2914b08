"""The flow on a real two-node Ray cluster on this machine: actors on both nodes, the same rows and metrics as an
inline run, and an actor process SIGKILLed mid-shard replaced with its shards redone and no row lost or doubled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config

pytestmark = [pytest.mark.ray_cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LOCATION_COLUMNS = ["source_uri", "mask_uri", "label_uri"]  # name the input and output folders themselves

# Runs in its own process (and process group): a head node and a second node, each a raylet with 1 CPU, both on
# 127.0.0.1 and sharing one GCS. Prints the address and node ids as one JSON line, then holds the cluster until
# its stdin closes.
CLUSTER_SCRIPT = """
import json, sys
from ray.cluster_utils import Cluster
cluster = Cluster(
    initialize_head=True,
    head_node_args=dict(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False),
)
second = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources={"second_node": 1})
nodes = [cluster.head_node.node_id, second.node_id]
print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


def _process_tree(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root``, read from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append((int(entry), _decode_cmdline(cmdline)))
    found, stack = {}, [root]
    while stack:
        for pid, cmd in children.get(stack.pop(), []):
            found[pid] = cmd
            stack.append(pid)
    return found


def _decode_cmdline(raw: bytes) -> str:
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-node Ray cluster on this machine, on 127.0.0.1 only, private to this module.

    Why not ``ray start --head --node-ip-address=127.0.0.1`` plus ``ray start --address=...``:
    - Ray 2.x on Linux replaces a loopback ``--node-ip-address`` by the machine's outward IP (so that other
      machines could join), and its servers then listen on every interface; with multi-node mode off
      (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) the address stays 127.0.0.1 but ``ray start --address`` refuses
      to add a second node.
    - ``ray stop`` kills every Ray process on the machine, including the session's ``ray_local`` and other
      people's test runs on this shared machine.
    - ``ray start`` writes its address to /tmp/ray/ray_current_cluster, which every bare ``ray.init()`` on the
      machine then joins instead of starting its own Ray.

    So the two nodes are started by Ray's own multi-node-on-one-machine helper (``ray.cluster_utils.Cluster``,
    which takes ``node_ip_address`` as given: every server binds to 127.0.0.1) in a child process in its own
    process group, with ``RAY_TMPDIR`` set to a private folder (its sessions, sockets and address file go there,
    so no other Ray on the machine sees this cluster). The GCS and raylets bind port 0 and report the port they
    got, so no port is picked in advance and none can be taken in between. Teardown closes the child's stdin
    (it removes both nodes), SIGKILLs whatever is left of the process tree recorded by pid, and removes the
    folder. The pytest process never connects to this cluster (it may hold the session's local Ray): each job
    runs in a subprocess with ``RAY_ADDRESS`` set, and with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so that its
    driver, too, keeps 127.0.0.1 as given instead of dialling the machine's outward IP.
    """
    tmp = Path(tempfile.mkdtemp(prefix="segpipe-rc-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with open(tmp / "cluster.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    tree: dict[int, str] = {}
    try:
        line = proc.stdout.readline()
        assert line, f"the cluster did not start:\n{(tmp / 'cluster.log').read_text()[-3000:]}"
        info = json.loads(line)
        tree = _process_tree(proc.pid)
        yield {**info, "pid": proc.pid, "tmp": tmp}
    finally:
        tree.update(_process_tree(proc.pid))
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, cmd in tree.items():  # anything of its own left behind, e.g. a worker outside the group
            try:
                if _decode_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes()) == cmd:  # the same process still
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_config(dataset, checkpoint) -> dict:
    return dict(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        checkpoint_uri=str(checkpoint),
        shard_size=4,
        actors=2,
        cpus_per_actor=1,
        batch_size=4,
    )


def start_job(cluster: dict, job: dict, out: Path) -> subprocess.Popen:
    """``segpipe run`` in a subprocess (its own process group) joined to the cluster by RAY_ADDRESS; its
    Prefect API is the session's test server. Output (logs included) goes to ``out``.log."""
    import prefect.settings

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**job, "output_uri": str(out)}))
    env = dict(
        os.environ,
        RAY_ADDRESS=cluster["address"],
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1 as given: the cluster listens there only
        RAY_TMPDIR=str(cluster["tmp"]),
        RAY_USAGE_STATS_ENABLED="0",
        PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(),
    )
    with open(out.parent / f"{out.name}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, out: Path, timeout: float = 150) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (out.parent / f"{out.name}.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    return log


def shard_nodes(log: str) -> dict[str, list[str]]:
    """shard id -> the node ids it ran on, from the driver's per-shard log lines."""
    ran: dict[str, list[str]] = {}
    for line in log.splitlines():
        if "pipeline.execution.ray_pool: shard " in line and " ran on node " in line:
            words = line.split("pipeline.execution.ray_pool: shard ", 1)[1].split()
            ran.setdefault(words[0], []).append(words[4])
    return ran


def rows(out: Path) -> list[dict]:
    table = pq.read_table(sorted((out / "stats").glob("part-*.parquet"))).sort_by("image_id")
    return table.drop(LOCATION_COLUMNS).to_pylist()


@pytest.fixture(scope="module")
def inline_run(job_config, tmp_path_factory) -> Path:
    """The reference: the same job planned and run in this process without Ray, then finalized."""
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job

    out = tmp_path_factory.mktemp("inline") / "out"
    plan = plan_job(load_config(None, **job_config, output_uri=str(out)))
    start = time.perf_counter()
    summaries = run_inline(plan.cfg, plan.run_id, plan.pending)
    finalize_job(plan, summaries, time.perf_counter() - start)
    return out


def test_flow_on_two_nodes_gives_the_rows_and_metrics_of_an_inline_run(
    ray_cluster, job_config, inline_run, prefect_ephemeral, tmp_path
):
    out = tmp_path / "cluster"
    log = finish(start_job(ray_cluster, job_config, out), out)
    ran = shard_nodes(log)
    assert len(ran) == 6 and all(len(nodes) == 1 for nodes in ran.values()), log[-4000:]
    assert {nodes[0] for nodes in ran.values()} == set(ray_cluster["nodes"])  # both nodes did work
    assert "joined the Ray cluster at" in log and "started a local Ray" not in log
    assert rows(out) == rows(inline_run)
    assert len(rows(out)) == 24
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((inline_run / "metrics.json").read_text())  # run_id included: same job


def test_actor_killed_mid_shard_is_replaced_and_its_shards_redone(
    ray_cluster, job_config, inline_run, prefect_ephemeral, tmp_path
):
    out = tmp_path / "killed"
    proc = start_job(ray_cluster, job_config, out)
    try:
        deadline = time.monotonic() + 120
        busy: list[int] = []
        tree: dict[int, str] = {}
        while not (list((out / "stats").glob("part-*.parquet")) and busy):
            assert proc.poll() is None, (out.parent / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"no shard committed, or no actor busy, in time: {tree}"
            time.sleep(0.05)
            # Only this cluster's actors (processes under its raylets), found by Ray's process title, which
            # names the method an actor is running: one that is in the middle of a shard.
            tree = _process_tree(ray_cluster["pid"])
            busy = sorted(pid for pid, cmd in tree.items() if cmd.startswith("ray::ShardProcessor.__call__"))
        os.kill(busy[0], signal.SIGKILL)
        committed_at_kill = len(list((out / "stats").glob("part-*.parquet")))
    finally:
        log = finish(proc, out)
    assert committed_at_kill < 6
    redone = [line for line in log.splitlines() if " redone image by image " in line]
    assert redone, log[-4000:]
    for line in redone:
        shard_id = line.split("pipeline.execution.ray_pool: shard ", 1)[1].split()[0]
        assert shard_id in shard_nodes(log)  # redone shards ran to the end
    assert all(len(nodes) == 1 for nodes in shard_nodes(log).values())  # and each was committed once
    got = rows(out)
    assert len(got) == 24 and len({r["image_id"] for r in got}) == 24
    assert got == rows(inline_run)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((inline_run / "metrics.json").read_text())
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


LOCAL_SCRIPT = """
import json
import ray
import psutil  # Ray's own copy, importable once ray is
from pipeline.config import JobConfig
from pipeline.execution.cluster import connect

assert connect(JobConfig(input_uri="in", output_uri="out", checkpoint_uri="ckpt"))
listening = set()
for p in psutil.Process().children(recursive=True):
    try:
        listening |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "listening": sorted(listening)}))
ray.shutdown()
"""


def test_a_local_ray_started_by_the_job_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["nodes"] == ["127.0.0.1"]
    assert found["listening"] and set(found["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, found


DEAD_ACTOR_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
import ray
from pipeline.config import JobConfig
from pipeline.execution import run_shards
from pipeline.sources import Shard

# Every actor dies in __init__ (its checkpoint is gone): Ray does not restart it, the driver starts a new one.
cfg = JobConfig(input_uri="in", output_uri="out", checkpoint_uri="no-such-checkpoint.pt", shard_retries=1)
try:
    run_shards(cfg, "run", [Shard("00000-a", items=("a.png",))])
except ray.exceptions.ActorDiedError:
    print("raised ActorDiedError; ray initialized:", ray.is_initialized())
"""


def test_an_actor_dead_for_good_is_replaced_and_the_retries_bounded(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-c", DEAD_ACTOR_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("pipeline.execution.ray_pool: ")]
    assert any(line.startswith("pipeline.execution.ray_pool: actor 0 is dead for good") for line in lines), done.stdout
    # The first death makes the shard careful (image by image), which is not yet a failure; the careful
    # attempt that dies finding no image to blame is the first failure, the next one the second.
    redone = [line.split(": ")[1].split(" (")[0] for line in lines if " redone " in line]
    assert redone == ["shard 00000-a redone image by image"] * 2
    assert "pipeline.execution.ray_pool: shard 00000-a failed 2 times; giving up" in lines
    assert done.stdout.strip().endswith("raised ActorDiedError; ray initialized: False")
