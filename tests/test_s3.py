"""s3:// end to end against a real S3 server (SeaweedFS), and the storage failures that must stop a run."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli.logs import configure_logging
from pipeline.config import StorageConfig, load_config
from pipeline.devtools.local_s3 import PUBLIC_BUCKET
from pipeline.errors import InputError, SegpipeError, StorageUnavailable
from pipeline.outputs import part_sources
from pipeline.preflight import preflight

pytestmark = [pytest.mark.s3, pytest.mark.slow]

# Columns that name where things are, or the job's id (which includes the input URI).
LOCATION_COLUMNS = ["run_id", "source_uri", "mask_uri", "label_uri"]


def write_config(tmp_path, **fields) -> str:
    path = tmp_path / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def storage_fields(server, **overrides) -> dict:
    return {"storage": server.storage_config() | overrides}


def s3_job(tmp_path, server, bucket: str, out: str, **fields) -> str:
    """A job config reading the uploaded dataset and checkpoint and writing to ``s3://<out>``."""
    return write_config(
        tmp_path,
        input_uri=f"s3://{bucket}/data/images",
        labels_uri=f"s3://{bucket}/data/labels",
        output_uri=f"s3://{out}",
        checkpoint_uri=f"s3://{bucket}/models/unet_tiny_shapes.pt",
        **fields,
        **storage_fields(server),
    )


def local_run(dataset, checkpoint, out, **fields) -> dict:
    from flows.segment_dataset import segment_dataset

    return segment_dataset(
        input_uri=str(dataset / "images"),
        labels_uri=str(dataset / "labels"),
        output_uri=str(out),
        checkpoint_uri=str(checkpoint),
        **fields,
    )


def stats_table(fs, prefix: str):
    return pq.read_table(sorted(fs.glob(f"{prefix}/stats/part-*.parquet")), filesystem=fs).sort_by("image_id")


@pytest.fixture(scope="module")
def bucket(s3_server, dataset, checkpoint) -> str:
    fs = s3_server.fs()
    name = f"segpipe-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.put(str(dataset / "images"), f"{name}/data/images", recursive=True)
    fs.put(str(dataset / "labels"), f"{name}/data/labels", recursive=True)
    fs.put(str(checkpoint), f"{name}/models/unet_tiny_shapes.pt")
    return name


def test_s3_run_equals_local_run_and_leaks_no_secret(
    s3_server, bucket, dataset, checkpoint, tmp_path, ray_local, prefect_ephemeral, caplog
):
    from flows.segment_dataset import segment_dataset

    configure_logging(verbose=True)  # what `segpipe -v run` sets up
    caplog.set_level(logging.DEBUG)
    shape = dict(shard_size=8, actors=2, batch_size=4)
    remote = segment_dataset(config_path=s3_job(tmp_path, s3_server, bucket, f"{bucket}/out"), **shape)
    local = local_run(dataset, checkpoint, tmp_path / "local", **shape)

    fs = s3_server.fs()
    assert len(fs.glob(f"{bucket}/out/stats/part-*.parquet")) == 3
    remote_rows = stats_table(fs, f"{bucket}/out")
    local_rows = stats_table(fsspec.filesystem("file"), str(tmp_path / "local"))
    assert remote_rows.drop(LOCATION_COLUMNS).equals(local_rows.drop(LOCATION_COLUMNS))
    assert all(u.startswith(f"s3://{bucket}/out/masks/") for u in remote_rows["mask_uri"].to_pylist())
    assert len(fs.glob(f"{bucket}/out/masks/**/*.png")) == 24
    remote_metrics = json.loads(fs.cat_file(f"{bucket}/out/metrics.json"))
    local_metrics = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert remote_metrics.pop("run_id") != local_metrics.pop("run_id")
    assert remote_metrics == local_metrics
    assert remote["manifest"]["counts"] == local["manifest"]["counts"]

    manifest = json.loads(fs.cat_file(f"{bucket}/out/manifest.json"))
    assert manifest["config"]["storage"]["secret"] == "**********"
    assert manifest["config"]["storage"]["key"] == "**********"
    seen = [fs.cat_file(p) for p in fs.find(f"{bucket}/out")]
    seen.append(caplog.text.encode())
    for blob in seen:
        assert s3_server.secret.encode() not in blob
        assert s3_server.key.encode() not in blob


def test_an_increment_on_s3_knows_changed_objects_by_their_etag(
    s3_server, bucket, dataset, checkpoint, tmp_path, ray_local, prefect_ephemeral
):
    from flows.segment_dataset import segment_dataset

    fs = s3_server.fs()
    prefix = f"{bucket}/growing-{uuid.uuid4().hex[:6]}"
    fs.put(str(dataset / "images"), f"{prefix}/images", recursive=True)
    job = s3_job(tmp_path, s3_server, bucket, f"{prefix}/out", mode="incremental", shard_size=8)
    job_fields = {"input_uri": f"s3://{prefix}/images", "outputs": {"report": False}}
    first = segment_dataset(config_path=job, **job_fields)["manifest"]
    assert first["increments"][-1]["processed"] == 24

    ids = sorted(str(p.relative_to(dataset / "images")) for p in (dataset / "images").rglob("*.*"))
    fs.pipe(f"{prefix}/images/{ids[0]}", (dataset / "images" / ids[0]).read_bytes())  # the same bytes again
    fs.pipe(f"{prefix}/images/{ids[1]}", (dataset / "images" / ids[2]).read_bytes())  # other bytes
    fs.pipe(f"{prefix}/images/arrived/{ids[3]}", (dataset / "images" / ids[3]).read_bytes())
    second = segment_dataset(config_path=job, **job_fields)["manifest"]
    latest = second["increments"][-1]
    assert (latest["processed"], latest["new_files"], latest["changed_files"]) == (2, 1, 1)
    assert second["counts"]["images"] == 25

    fs.invalidate_cache()
    parts = fs.glob(f"{prefix}/out/stats/part-*.parquet")
    assert len(parts) == len(second["shards"])
    versions = {}
    for part in parts:
        with fs.open(part, "rb") as f:
            versions |= part_sources(pq.read_schema(f).metadata)
    assert len(versions) == 25 and all(v.startswith("etag:") for v in versions.values())
    assert versions[ids[1]] == "etag:" + fs.info(f"{prefix}/images/{ids[1]}")["ETag"].strip('"')


def preflight_error(tmp_path, checkpoint, input_uri: str, output_uri: str, storage: dict) -> InputError:
    """The InputError that preflight raises for a job reading ``input_uri`` and writing ``output_uri``."""
    cfg = load_config(
        write_config(
            tmp_path, input_uri=input_uri, output_uri=output_uri, checkpoint_uri=str(checkpoint), storage=storage
        )
    )
    with pytest.raises(InputError) as err:
        preflight(cfg)
    return err.value


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("no-such-bucket-{u}/images", "does not exist"),
        ("{bucket}/nothing-here-{u}", "does not exist"),
    ],
)
def test_missing_bucket_or_prefix_stops_before_any_work(s3_server, bucket, checkpoint, tmp_path, where, needle):
    uri = "s3://" + where.format(u=uuid.uuid4().hex[:6], bucket=bucket)
    out = f"s3://{bucket}/never-written-{uuid.uuid4().hex[:6]}"
    err = preflight_error(tmp_path, checkpoint, uri, out, storage_fields(s3_server)["storage"])
    assert f"input {uri} {needle}" in str(err)
    assert not s3_server.fs().exists(out.removeprefix("s3://"))


def test_output_bucket_that_does_not_exist_stops_before_any_work(s3_server, bucket, checkpoint, tmp_path):
    out = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/out"
    err = preflight_error(tmp_path, checkpoint, f"s3://{bucket}/data/images", out, storage_fields(s3_server)["storage"])
    assert re.fullmatch(f"output {out}: bucket no-such-bucket-.* does not exist", str(err))


def test_wrong_credentials_name_the_uri_and_hide_the_secret(s3_server, bucket, checkpoint, tmp_path):
    uri = f"s3://{bucket}/data/images"
    wrong = "not-the-secret-0000"
    storage = storage_fields(s3_server, key="nobody", secret=wrong)["storage"]
    err = preflight_error(tmp_path, checkpoint, uri, str(tmp_path / "out"), storage)
    assert f"input {uri} cannot be read" in str(err)
    assert wrong not in str(err)
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_names_the_uri_and_is_retried_not_refused(tmp_path, checkpoint, unused_port):
    """Nothing listens: an outage, not a wrong config. Not a SegpipeError, so the plan step retries it."""
    from flows.common import transient

    uri = "s3://any-bucket/images"
    storage = {"endpoint_url": f"http://127.0.0.1:{unused_port}", "key": "k", "secret": "s"}
    cfg = load_config(input_uri=uri, checkpoint_uri=str(checkpoint), output_uri=str(tmp_path / "out"), storage=storage)
    with pytest.raises(StorageUnavailable, match=f"input {uri} cannot be read") as err:
        preflight(cfg)
    assert not isinstance(err.value, SegpipeError)
    assert transient(None, None, _FailedWith(err.value))
    assert not transient(None, None, _FailedWith(InputError("input s3://x does not exist")))
    assert not (tmp_path / "out").exists()


class _FailedWith:
    """A task run state whose result raises ``error``, as Prefect hands it to a retry condition."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self):
        raise self.error


class _SeenShardRetry(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self.seen.set()


def test_obstore_client_writes_what_s3fs_writes(s3_server, bucket, tmp_path):
    """storage.client: obstore (whole-object GETs and PUTs in Rust) gives the s3fs run's rows, metrics and
    masks byte for byte; a missing image is still its error row."""
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job

    fs = s3_server.fs()
    data = f"{bucket}/obstore-{uuid.uuid4().hex[:6]}"
    fs.copy(f"{bucket}/data/images", f"{data}/images", recursive=True)
    gone = sorted(fs.find(f"{data}/images"))[5]
    runs = {}
    for client in ("s3fs", "obstore"):
        cfg = load_config(
            s3_job(tmp_path, s3_server, bucket, f"{data}/out-{client}", shard_size=12),
            input_uri=f"s3://{data}/images",
            storage={"client": client},
        )
        plan = plan_job(cfg)
        if client == "obstore":
            assert type(plan.cfg.resolve(plan.cfg.input_uri)[0]).__name__ == "ObstoreS3FileSystem"
        fs.rm(gone)  # listed by the plan, gone when its shard reads it
        runs[client] = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)
        fs.pipe(gone, b"")  # back, for the other client's plan (an empty file: not a decodable image)
        fs.invalidate_cache()

    assert runs["obstore"]["metrics"] == runs["s3fs"]["metrics"]
    rows = {c: stats_table(fs, f"{data}/out-{c}") for c in runs}
    assert rows["obstore"].drop(LOCATION_COLUMNS).equals(rows["s3fs"].drop(LOCATION_COLUMNS))
    errors = [e for e in rows["obstore"]["error"].to_pylist() if e]
    assert errors == ["missing file: the image was listed but could not be read"]
    masks = {c: sorted(fs.find(f"{data}/out-{c}/masks")) for c in runs}
    assert len(masks["obstore"]) == 23
    for a, b in zip(masks["s3fs"], masks["obstore"], strict=True):
        assert fs.cat_file(a) == fs.cat_file(b)


def test_obstore_client_errors_are_the_builtin_ones(s3_server, bucket, unused_port):
    from pipeline.obstore_s3 import ObstoreS3FileSystem

    fs = ObstoreS3FileSystem(**StorageConfig(**s3_server.storage_config()).options("s3://"))
    fs.pipe_file(f"{bucket}/obstore-put", b"written by obstore")
    assert s3_server.fs().cat_file(f"{bucket}/obstore-put") == b"written by obstore"
    assert s3_server.fs().info(f"{bucket}/obstore-put")["ETag"]  # incremental runs still list versions
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{bucket}/no-such-object")
    down = ObstoreS3FileSystem(endpoint_url=f"http://127.0.0.1:{unused_port}", key="k", secret="s")
    start = time.monotonic()
    with pytest.raises(OSError) as refused:
        down.cat_file(f"{bucket}/anything")
    assert not isinstance(refused.value, FileNotFoundError)  # an outage fails the shard, it is no missing image
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("outage", ["short", "past_client_retries"])
def test_server_crash_mid_run_loses_and_duplicates_nothing(
    s3_server, bucket, dataset, checkpoint, tmp_path, ray_local, prefect_ephemeral, outage
):
    """SIGKILL the S3 server while shards are being written, keep it down, restart it: the run completes
    with exactly the rows of a run that saw no outage. A short outage is absorbed by the S3 client's
    retries; a long one (the server stays down until a shard has failed) by rerunning the shard."""
    from flows.segment_dataset import segment_dataset

    out = f"{bucket}/crash-{uuid.uuid4().hex[:6]}"
    shape = dict(shard_size=2, actors=1, batch_size=2)
    cfg = s3_job(tmp_path, s3_server, bucket, out, **shape)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = segment_dataset(config_path=cfg, outputs={"report": False})  # rows, not pages
        except BaseException as e:  # handed to the test thread below
            outcome["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    watcher = s3_server.fs()
    deadline = time.monotonic() + 180
    while not watcher.glob(f"{out}/stats/part-*.parquet"):
        assert runner.is_alive() and time.monotonic() < deadline, outcome
        watcher.invalidate_cache()
        time.sleep(0.1)
    committed_before = len(watcher.glob(f"{out}/stats/part-*.parquet"))
    assert committed_before < 12 and not watcher.exists(f"{out}/manifest.json")
    watch = _SeenShardRetry()
    logging.getLogger("pipeline.execution").addHandler(watch)
    try:
        s3_server.crash()
        if outage == "short":
            time.sleep(3)
        else:
            assert watch.seen.wait(timeout=120), "no shard failed and was retried"
        s3_server.restart()
        assert runner.is_alive()  # the run spanned the outage
    finally:
        logging.getLogger("pipeline.execution").removeHandler(watch)
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["manifest"]["counts"]["shards"] == 12

    reference = local_run(dataset, checkpoint, tmp_path / "local", **shape)
    remote = stats_table(s3_server.fs(), out)
    local = stats_table(fsspec.filesystem("file"), str(tmp_path / "local"))
    assert remote.num_rows == 24 and len(set(remote["image_id"].to_pylist())) == 24
    assert remote.drop(LOCATION_COLUMNS).equals(local.drop(LOCATION_COLUMNS))
    assert outcome["result"]["metrics"]["mean_iou"] == reference["metrics"]["mean_iou"]


@pytest.fixture(scope="module")
def public_bucket(s3_server, dataset, checkpoint) -> str:
    """The server's bucket that anonymous requests may read and list, holding the dataset and checkpoint."""
    fs = s3_server.fs()
    if not fs.exists(PUBLIC_BUCKET):
        fs.mkdir(PUBLIC_BUCKET)
    fs.put(str(dataset / "images"), f"{PUBLIC_BUCKET}/data/images", recursive=True)
    fs.put(str(checkpoint), f"{PUBLIC_BUCKET}/models/unet_tiny_shapes.pt")
    return PUBLIC_BUCKET


def test_anonymous_access_reads_a_public_bucket(s3_server, public_bucket, bucket, checkpoint, tmp_path):
    from pipeline.execution import run_inline
    from pipeline.job import finalize_job, plan_job

    anon = {"endpoint_url": s3_server.endpoint, "anon": True}
    cfg = load_config(
        input_uri=f"s3://{public_bucket}/data/images",
        checkpoint_uri=f"s3://{public_bucket}/models/unet_tiny_shapes.pt",
        output_uri=str(tmp_path / "out"),
        shard_size=12,
        storage=anon,
    )
    plan = plan_job(cfg)
    result = finalize_job(plan, run_inline(plan.cfg, plan.run_id, plan.pending), 1.0)
    assert result["manifest"]["counts"] == {
        "images": 24,
        "errors": 0,
        "labeled": 0,
        "shards": 2,
        "shards_skipped": 0,
        "error_kinds": {},
    }
    # The same anonymous client is refused by a private bucket, with the clear message.
    err = preflight_error(tmp_path, checkpoint, f"s3://{bucket}/data/images", str(tmp_path / "o2"), anon)
    assert f"input s3://{bucket}/data/images cannot be read" in str(err)


def test_credentials_from_a_named_profile(s3_server, bucket, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[segpipe-test]\naws_access_key_id = {s3_server.key}\naws_secret_access_key = {s3_server.secret}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    storage = {"endpoint_url": s3_server.endpoint, "profile": "segpipe-test"}
    assert_plans(s3_job_fields(bucket, storage))
    storage["profile"] = "no-such-profile"
    with pytest.raises(InputError, match="could not be found|cannot be read"):
        preflight(load_config(**s3_job_fields(bucket, storage)))


def test_credentials_and_endpoint_from_the_aws_environment(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert_plans(s3_job_fields(bucket, {}))


def s3_job_fields(bucket: str, storage: dict) -> dict:
    return {
        "input_uri": f"s3://{bucket}/data/images",
        "labels_uri": f"s3://{bucket}/data/labels",
        "output_uri": f"s3://{bucket}/never-{uuid.uuid4().hex[:6]}",
        "checkpoint_uri": f"s3://{bucket}/models/unet_tiny_shapes.pt",
        "storage": storage,
    }


def assert_plans(fields: dict) -> None:
    """The job's storage settings reach every location: preflight passes and the input lists fully."""
    from pipeline.job import plan_job

    plan = plan_job(load_config(**fields))
    assert sum(s.images for s in plan.shards) == 24


class _SeenPlanRetry(logging.Handler):
    """Set once Prefect schedules a retry of the plan task."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Retry 1/" in message:
            self.messages.append(message)
            self.seen.set()


def test_a_storage_outage_while_planning_is_retried_by_the_plan_task(
    s3_server, bucket, dataset, checkpoint, tmp_path, ray_local, prefect_ephemeral
):
    """The S3 server is down when the run starts and comes back only once planning has failed: the plan task
    retries (a StorageUnavailable is not a configuration error) and the run completes."""
    from flows.segment_dataset import segment_dataset

    out = f"{bucket}/plan-outage-{uuid.uuid4().hex[:6]}"
    cfg = s3_job(tmp_path, s3_server, bucket, out, shard_size=12, actors=1)
    watch = _SeenPlanRetry()
    logging.getLogger("prefect").addHandler(watch)

    def restart_once_planning_failed() -> None:
        watch.seen.wait(timeout=180)
        s3_server.restart()

    s3_server.crash()
    restarter = threading.Thread(target=restart_once_planning_failed)
    restarter.start()
    try:
        result = segment_dataset(config_path=cfg, outputs={"report": False})  # the plan's retry is the point
    finally:
        watch.seen.set()  # never leave the server down for the tests after this one
        restarter.join()
        logging.getLogger("prefect").removeHandler(watch)
    assert watch.messages and "StorageUnavailable" in watch.messages[0], watch.messages
    assert result["manifest"]["status"] == "complete" and result["manifest"]["counts"]["images"] == 24


def test_import_weights_and_programs_on_s3(s3_server, bucket, tiny_unet, tmp_path, monkeypatch):
    """import-weights reads and writes s3:// (settings from the AWS environment); a program there runs with its
    metadata inside, or beside it as <uri>.json."""
    import hashlib

    from test_model_sources import export

    from pipeline.cli import main
    from pipeline.models.loading import load_model

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    fs = s3_server.fs()
    fs.put(str(export(tiny_unet, tmp_path / "p.pt2", dynamic=True)), f"{bucket}/models/p.pt2")
    fs.pipe(f"{bucket}/models/p.pt2.json", json.dumps({"class_names": ["a", "b", "c"]}).encode())
    embedded = f"s3://{bucket}/models/embedded.pt2"
    assert main(["import-weights", f"s3://{bucket}/models/p.pt2", "--classes", "x,y,z", "--out", embedded]) == 0

    job = {"input_uri": f"s3://{bucket}/data/images", "output_uri": f"s3://{bucket}/never"}
    beside = load_model(load_config(**job, checkpoint_uri=f"s3://{bucket}/models/p.pt2"))
    inside = load_model(load_config(**job, checkpoint_uri=embedded))
    assert (beside.meta.class_names, inside.meta.class_names) == (("a", "b", "c"), ("x", "y", "z"))
    assert inside.sha256 == hashlib.sha256(fs.cat(embedded.removeprefix("s3://"))).hexdigest()
