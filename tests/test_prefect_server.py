"""Deployments on a real Prefect server: served by ``segpipe serve``, triggered from the CLI and the API.

A Prefect server (``prefect server start --host 127.0.0.1``, a free port, its own database) and the
serve process run for this module; flow runs execute in processes the serve runner starts, joining the
session's local Ray through RAY_ADDRESS. Everything is checked through the server's REST API.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.devtools.local_s3 import free_ports
from pipeline.synthetic import make_dataset

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_ports(1)[0]
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 180, "the Prefect server", proc)
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client_env(prefect_api, tmp_path_factory) -> dict:
    """The environment of a Prefect client of that server: the CLI, the serve process."""
    home = tmp_path_factory.mktemp("prefect-client")
    return os.environ | {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }


@pytest.fixture(scope="module")
def served(prefect_api, client_env, dataset, checkpoint, ray_local, tmp_path_factory) -> Path:
    """``segpipe serve`` with the three deployments; returns the folder the nightly runs write under."""
    work = tmp_path_factory.mktemp("served")
    job = {"checkpoint_uri": str(checkpoint), "shard_size": 8, "actors": 1, "batch_size": 4}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    spec = {
        "nightly": {
            "cron": "0 3 1 1 *",  # never during the test: its run is created through the API instead
            "parameters": {
                "config_path": str(work / "job.yaml"),
                "input_uri": str(dataset / "images"),
                "labels_uri": str(dataset / "labels"),
                "output_uri": str(work / "nightly" / "{date}"),
            },
        },
        "adhoc": {"parameters": {"config_path": str(work / "job.yaml")}},
        "evaluate": {},
    }
    (work / "deployments.yaml").write_text(yaml.safe_dump(spec))
    env = client_env | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(BIN / "segpipe"), "serve", "--deployments", str(work / "deployments.yaml")],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for name in ("segment-dataset/nightly", "segment-dataset/adhoc", "evaluate-run/adhoc"):
            wait_until(lambda n=name: deployment(prefect_api, n), 120, f"deployment {name}", proc)
        yield work
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def deployment(api: str, name: str) -> dict | None:
    r = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    return r.json() if r.status_code == 200 else None


def run_deployment_cli(env: dict, deployment_name: str, /, **params) -> str:
    """``prefect deployment run <name> -p k=v ...``; returns the flow run id it prints."""
    args = [str(BIN / "prefect"), "deployment", "run", deployment_name]
    for key, value in params.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


def create_flow_run(api: str, deployment: dict, body: dict) -> dict:
    """A flow run of ``deployment``, created through the REST API. A busy SQLite server may answer 5xx (seen
    once in CI under load); Prefect's own client retries those, and so does this."""
    for attempt in range(5):
        response = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json=body, timeout=30)
        if response.status_code not in (429, 500, 502, 503):
            break
        time.sleep(1 + attempt)
    assert response.status_code == 201, (response.status_code, response.text)
    return response.json()


def finished(api: str, flow_run_id: str, timeout: float = 300) -> dict:
    def state():
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
        return run if run["state"]["type"] in TERMINAL else None

    return wait_until(state, timeout, f"flow run {flow_run_id}")


def artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    found = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    return {a["key"]: a for a in found}


def test_adhoc_run_from_the_cli_writes_outputs_and_three_artifacts(prefect_api, client_env, served, dataset, tmp_path):
    out = tmp_path / "adhoc"
    run_id = run_deployment_cli(
        client_env,
        "segment-dataset/adhoc",
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(out),
    )
    run = finished(prefect_api, run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]

    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 24
    assert metrics["labeled_images"] == 24

    found = artifacts(prefect_api, run_id)
    assert {k: found[k]["type"] for k in found} == {
        "segpipe-metrics": "table",
        "segpipe-summary": "markdown",
        "segpipe-progress": "progress",
        "segpipe-report": "markdown",  # a link artifact: its data is a markdown link
    }
    assert (out / "report.html").as_uri() in found["segpipe-report"]["data"]
    summary = found["segpipe-summary"]["data"]
    assert "](data:image/png;base64," in summary and f"{100 * metrics['mean_iou']:.2f}%" in summary
    table = json.loads(found["segpipe-metrics"]["data"])
    assert {"metric": "mean_iou", "class": "(dataset)", "value": round(metrics["mean_iou"], 6)} in table
    assert {"metric": "iou", "class": "circle", "value": round(metrics["per_class"]["circle"]["iou"], 6)} in table
    assert (
        f"`{out}`" in found["segpipe-summary"]["data"]
        and "24 (0 errors, 24 labeled)" in found["segpipe-summary"]["data"]
    )
    assert found["segpipe-progress"]["data"] == 100.0

    # The evaluate-run deployment over that output: a new metrics file, masks untouched.
    masks = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "masks").rglob("*.png")}
    eval_id = run_deployment_cli(
        client_env,
        "evaluate-run/adhoc",
        output_uri=str(out),
        labels_uri=str(dataset / "labels"),
        ignore_classes=[4],
        name="no-stars",
    )
    assert finished(prefect_api, eval_id)["state"]["type"] == "COMPLETED"
    evaluation = json.loads((out / "evaluations" / "no-stars" / "metrics.json").read_text())
    assert evaluation["per_class"]["star"]["gt_pixels"] == 0 < metrics["per_class"]["star"]["gt_pixels"]
    assert evaluation["per_class"]["circle"]["gt_pixels"] == metrics["per_class"]["circle"]["gt_pixels"]
    assert masks == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "masks").rglob("*.png")}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "segpipe-evaluation" in artifacts(prefect_api, eval_id)


def test_a_bad_parameter_fails_the_run_at_once_naming_it(prefect_api, client_env, served, dataset, tmp_path):
    out = tmp_path / "never"
    run_id = run_deployment_cli(
        client_env, "segment-dataset/adhoc", input_uri=str(dataset / "images"), output_uri=str(out), shard_size=0
    )
    run = finished(prefect_api, run_id, timeout=120)
    assert run["state"]["type"] == "FAILED"
    assert "shard_size" in run["state"]["message"]
    assert not out.exists()


def test_a_scheduled_run_writes_under_its_date_and_a_rerun_of_that_date_resumes(prefect_api, served):
    nightly = deployment(prefect_api, "segment-dataset/nightly")
    when = datetime.now(UTC) + timedelta(seconds=2)
    body = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}}
    created = create_flow_run(prefect_api, nightly, body)
    run = finished(prefect_api, created["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    out = served / "nightly" / when.strftime("%Y-%m-%d")
    first = json.loads((out / "manifest.json").read_text())
    assert first["counts"] == {
        "images": 24,
        "errors": 0,
        "labeled": 24,
        "shards": 3,
        "shards_skipped": 0,
        "error_kinds": {},
    }

    # Re-running that date (as after a failure, or by hand) resumes the same output instead of duplicating it.
    body = {"parameters": {"run_date": when.strftime("%Y-%m-%d")}}
    again = create_flow_run(prefect_api, nightly, body)
    assert finished(prefect_api, again["id"])["state"]["type"] == "COMPLETED"
    second = json.loads((out / "manifest.json").read_text())
    assert second["run_id"] == first["run_id"] and second["counts"]["shards_skipped"] == 3
    assert len(list((out / "stats").glob("part-*.parquet"))) == 3

    # The next night is compared with this one: same data, so no drift, and the run is not tagged.
    body = {"parameters": {"run_date": (when + timedelta(days=1)).strftime("%Y-%m-%d")}}
    night = create_flow_run(prefect_api, nightly, body)
    run = finished(prefect_api, night["id"])
    assert run["state"]["type"] == "COMPLETED" and "drifted" not in run["tags"]
    drift = artifacts(prefect_api, night["id"])["segpipe-drift"]
    assert f"against `{out.as_uri()}`" in drift["data"]
    assert "population stability index of the class shares: **0.0000** — stable" in drift["data"]
    next_report = served / "nightly" / (when + timedelta(days=1)).strftime("%Y-%m-%d") / "report.html"
    assert "Drift against the baseline" in next_report.read_text()  # the comparison ends that night's report


def test_a_nightly_incremental_deployment_segments_each_new_image_once(prefect_api, served, dataset, tmp_path):
    """One output for a folder that keeps growing: each night's run segments what arrived since."""
    data = Path(shutil.copytree(dataset, tmp_path / "growing"))
    out = tmp_path / "one-result-set"
    nightly = deployment(prefect_api, "segment-dataset/nightly")
    params = {"input_uri": str(data / "images"), "labels_uri": str(data / "labels"), "output_uri": str(out)}
    params |= {"mode": "incremental", "prune_deleted": True}

    def night(day) -> dict:
        when = datetime.now(UTC) + timedelta(seconds=2)
        state = {"type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}
        body = {"state": state, "parameters": params | {"run_date": day.strftime("%Y-%m-%d")}}
        run = finished(prefect_api, create_flow_run(prefect_api, nightly, body)["id"])
        assert run["state"]["type"] == "COMPLETED", run["state"]
        return run

    today = datetime.now(UTC)
    night(today)
    first = json.loads((out / "manifest.json").read_text())
    assert first["increments"][-1]["processed"] == 24

    more = make_dataset(tmp_path / "arrived", 6, seed=41)  # new files land under the same prefix
    shutil.copytree(more / "images", data / "images" / "arrived")
    shutil.copytree(more / "labels", data / "labels" / "arrived")
    (data / "images" / "000" / "sample_00003.png").unlink()
    run = night(today + timedelta(days=1))
    second = json.loads((out / "manifest.json").read_text())
    latest = second["increments"][-1]
    assert (latest["number"], latest["processed"], latest["new_files"], latest["pruned_files"]) == (2, 6, 6, 1)
    assert second["counts"]["images"] == 29 and second["run_id"] == first["run_id"]
    rows = pq.read_table(sorted((out / "stats").glob("part-*.parquet")), columns=["image_id"])
    assert sorted(rows["image_id"].to_pylist()) == sorted(
        str(p.relative_to(data / "images")) for p in (data / "images").rglob("*.*")
    )
    summary = artifacts(prefect_api, run["id"])["segpipe-summary"]["data"]
    assert "increment 2: 6 images segmented (6 new, 0 changed, 1 deleted files, 1 pruned)" in summary


def start(args: list[str], env: dict, cwd: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - the process owns it; closed with the file table at exit
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def completed(api: str, env: dict, name: str, log: Path, **params) -> None:
    """Run deployment ``name`` with ``params`` from the CLI and wait: it must complete (else: its process log)."""
    run = finished(api, run_deployment_cli(env, name, **params))
    assert run["state"]["type"] == "COMPLETED", (run["state"], log.read_text()[-3000:])


def check_run_output(out: Path, images: int = 24) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == images
    assert manifest["counts"]["labeled"] == images
    return manifest


USER_SCRIPT = """
from flows.segment_dataset import segment_dataset

if __name__ == "__main__":
    segment_dataset.serve(name="from-a-user-script")
"""


def test_a_users_own_script_serving_the_flow_runs_what_it_receives(
    prefect_api, client_env, ray_local, dataset, checkpoint, tmp_path
):
    """Prefect's documented way to serve a flow, from a script in the user's own folder: every parameter,
    a section among them, arrives validated and the run completes."""
    (tmp_path / "serve_it.py").write_text(USER_SCRIPT)
    env = client_env | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = start([sys.executable, "serve_it.py"], env, tmp_path, tmp_path / "serve.log")
    try:
        wait_until(lambda: deployment(prefect_api, "segment-dataset/from-a-user-script"), 120, "the served", proc)
        completed(
            prefect_api,
            client_env,
            "segment-dataset/from-a-user-script",
            tmp_path / "serve.log",
            input_uri=str(dataset / "images"),
            labels_uri=str(dataset / "labels"),
            output_uri=str(tmp_path / "out"),
            checkpoint_uri=str(checkpoint),
            shard_size=8,
            actors=1,
            labels={"format": "index_png"},
            input={"layout": "files"},
        )
    finally:
        stop(proc)
    manifest = check_run_output(tmp_path / "out")
    assert manifest["config"]["shard_size"] == 8 and manifest["counts"]["shards"] == 3


def process_pool_project(tmp_path: Path, pool: str) -> Path:
    """deploy/prefect.yaml for a ``process`` work pool on this machine: the same entrypoints and parameters,
    pulled into this checkout instead of the image's /app, each deployment renamed so as not to replace the
    served ones."""
    spec = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    for d in spec["deployments"]:
        d["name"] += "-process"
        d["work_pool"] = {"name": pool}
        d.pop("schedules", None)  # nothing may start on its own during the test
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_prefect_deploy_to_a_process_work_pool_runs_on_a_worker(prefect_api, client_env, ray_local, dataset, tmp_path):
    """``prefect deploy`` of deploy/prefect.yaml's entrypoints to a process pool, a worker, and a run triggered
    with ``prefect deployment run ... -p``: the path the Kubernetes pool takes, on this machine."""
    prefect = str(BIN / "prefect")
    pool = "segpipe-process"
    created = subprocess.run(
        [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    project = process_pool_project(tmp_path, pool)
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(project)],
        env=client_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    env = client_env | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker = start([prefect, "worker", "start", "--pool", pool], env, tmp_path, tmp_path / "worker.log")
    try:
        completed(
            prefect_api,
            client_env,
            "segment-dataset/adhoc-process",
            tmp_path / "worker.log",
            input_uri=str(dataset / "images"),
            labels_uri=str(dataset / "labels"),
            output_uri=str(tmp_path / "out"),
            shard_size=12,
        )
    finally:
        stop(worker)
    manifest = check_run_output(tmp_path / "out")
    assert manifest["model"]["checkpoint_uri"] == str(REPO / "pipeline/models/weights/unet_tiny_shapes.pt")
    assert manifest["counts"]["shards"] == 2


# Counts the HTTP requests a flow run's process makes to the API (httpx logs each one at INFO), then runs the flow.
COUNTED_RUN = """
import json, logging, sys
calls = []
class Count(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("HTTP Request:"):
            calls.append(record.getMessage().split()[2])
httpx_log = logging.getLogger("httpx")
httpx_log.setLevel(logging.INFO)
httpx_log.addHandler(Count())
from flows.segment_dataset import segment_dataset
result = segment_dataset(**json.loads(sys.argv[1]))
print(json.dumps({"calls": calls, "shards": len(result["manifest"]["shards"])}))
"""


def test_a_run_of_2000_shards_makes_api_calls_bounded_by_its_duration(
    prefect_api, client_env, ray_local, checkpoint, tmp_path
):
    """Progress reaches Prefect at most once a second: API calls and log records grow with the run's duration,
    not with its shards (before, every shard was a log line and a progress-artifact update)."""
    from PIL import Image

    images = tmp_path / "images"
    for i in range(2000):
        folder = images / f"{i // 500:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i % 256, 40, 90)).save(folder / f"{i:05d}.png")
    job = {
        "input_uri": str(images),
        "output_uri": str(tmp_path / "out"),
        "checkpoint_uri": str(checkpoint),
        "shard_size": 1,
        "actors": 2,
        "batch_size": 1,
        "outputs": {"report": False},
    }
    env = client_env | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", COUNTED_RUN, json.dumps(job)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    counted = json.loads(done.stdout.strip().splitlines()[-1])
    assert counted["shards"] == 2000
    calls = counted["calls"]
    # A few dozen calls set the run up and report it; progress adds at most an update and a log batch a second.
    assert len(calls) <= 80 + 2 * seconds, (len(calls), seconds)
    assert len(calls) < 1000, (len(calls), seconds)  # against >= 2 x 2,000 when each shard was reported
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}).json()
    body = {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200}
    logs = httpx.post(f"{prefect_api}/logs/filter", json=body, timeout=10).json()
    assert len(logs) <= 30 + seconds, (len(logs), seconds)
    print(f"2,000 shards in {seconds:.0f} s: {len(calls)} API calls, {len(logs)} log records")
    progress = [entry["message"] for entry in logs if "shards committed" in entry["message"]]
    assert progress and progress[-1].startswith("2000/2000 shards committed (100.0 %)")
