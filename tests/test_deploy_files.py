"""The deployment files under deploy/: they parse, carry what their tools need, and agree with each other and
with the pinned stack (one image tag, one Ray version, one Prefect version, the same constraints file).
Fast: no servers, no Docker, no Kubernetes."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import tomllib
from importlib.metadata import requires
from pathlib import Path

import prefect
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
WORK_POOL = DEPLOY / "prefect" / "work-pool.json"
PREFECT_YAML = DEPLOY / "prefect.yaml"

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1"}
# <flow name>/<deployment name>, as the README, `segpipe serve` and `prefect deployment run` name them.
EXPECTED_DEPLOYMENTS = {"segment-dataset/nightly", "segment-dataset/adhoc", "evaluate-run/adhoc"}
RAY_CLIENT_PORT = 10001
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------------------
# Loading


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _raycluster() -> dict:
    return yaml.safe_load(RAYCLUSTER.read_text())


def _work_pool() -> dict:
    return json.loads(WORK_POOL.read_text())


def _prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    return instructions


def _docker_args(keyword: str) -> list[str]:
    return [args for kw, args in _dockerfile() if kw == keyword]


def _docker_env() -> dict[str, str]:
    env = {}
    for args in _docker_args("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"use ENV KEY=value, not the legacy form: {args!r}"
            env[key] = value
    return env


def _ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gpu_groups(cluster: dict) -> list[dict]:
    return [
        g
        for g in cluster["spec"]["workerGroupSpecs"]
        if any(
            int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) > 0 for c in g["template"]["spec"]["containers"]
        )
    ]


def _variable_defaults(pool: dict) -> dict:
    props = pool["variables"].get("properties", {})
    return {name: spec["default"] for name, spec in props.items() if spec.get("default") is not None}


def _rendered_job_configuration(pool: dict) -> dict:
    """The job configuration as a worker fills it from the variable defaults (Prefect's own templating)."""
    from prefect.utilities.templating import apply_values

    return apply_values(pool["job_configuration"], _variable_defaults(pool))


def _deployments() -> list[dict]:
    return _prefect_yaml()["deployments"]


def _flow_name_from_entrypoint(entrypoint: str) -> str:
    # How `prefect deploy -n <flow>/<deployment>` matches an entrypoint; the import test checks the real name.
    return entrypoint.split(":")[-1].replace("_", "-")


def _image_repo_tag(image: str) -> str:
    """`registry.example.com/team/segpipe:0.1.0` -> `segpipe:0.1.0` (a registry prefix is allowed)."""
    return image.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------------
# Every file parses


def test_every_yaml_and_json_under_deploy_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert {RAYCLUSTER, WORK_POOL, PREFECT_YAML} <= set(files)
    for path in files:
        text = path.read_text()
        if path.suffix == ".json":
            assert isinstance(json.loads(text), dict), path
        else:
            docs = list(yaml.safe_load_all(text))
            assert docs and all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# ---------------------------------------------------------------------------------------------------------
# One image, one version


def test_one_image_tag_everywhere_equal_to_the_package_version():
    version = _pyproject()["project"]["version"]
    images = {f"{RAYCLUSTER.name}: {c['name']}": c["image"] for c in _ray_containers(_raycluster())}
    pool_props = _work_pool()["variables"]["properties"]
    images[f"{WORK_POOL.name}: image default"] = pool_props["image"]["default"]
    for d in _deployments():
        images[f"{PREFECT_YAML.name}: {d['entrypoint']} {d['name']}"] = d["work_pool"]["job_variables"]["image"]
    assert len(set(images.values())) == 1, f"one image everywhere, got {images}"
    assert _image_repo_tag(next(iter(images.values()))) == f"segpipe:{version}"


def test_ray_version_agrees_across_raycluster_pins_and_installed_ray():
    ray_version = _raycluster()["spec"]["rayVersion"]
    assert ray_version == ray.__version__
    assert _constraints()["ray"] == ray_version
    pyproject_ray = [Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert [str(r.specifier) for r in pyproject_ray] == [f"=={ray_version}"]


def test_prefect_version_of_the_project_file_is_the_installed_and_pinned_one():
    assert str(_prefect_yaml()["prefect-version"]) == prefect.__version__ == _constraints()["prefect"]


# ---------------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_base_is_a_cuda_runtime_matching_the_pinned_torch_cuda():
    (base,) = _docker_args("FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn\d*-)?runtime-ubuntu\d+\.\d+", base)
    assert m, f"expected an nvidia/cuda *-runtime-ubuntu* base, got {base!r}"
    pins = _constraints()
    runtime = pins.get("nvidia-cuda-runtime") or pins.get("nvidia-cuda-runtime-cu12")
    assert runtime, "no nvidia-cuda-runtime pin in deploy/constraints.txt"
    # The torch wheel brings its CUDA runtime as this pip package; the image's CUDA must be the same major.minor.
    assert (m.group(1), m.group(2)) == tuple(runtime.split(".")[:2]), f"base {base} vs nvidia-cuda-runtime {runtime}"


def test_dockerfile_installs_with_the_constraints_file():
    runs = _docker_args("RUN")
    installs = [cmd.strip() for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]
    package = r'pip install -c deploy/constraints\.txt "\.\[cluster,hf\]"'
    assert any(re.fullmatch(package, cmd) for cmd in installs), installs
    unconstrained = [cmd for cmd in installs if "-c deploy/constraints.txt" not in cmd]
    assert not unconstrained, f"every pip install must use the same pins: {unconstrained}"
    assert not any("--upgrade" in cmd or " -U " in cmd for cmd in installs), installs


def test_dockerfile_copies_what_the_package_and_deployments_need():
    copied = set()
    for args in _docker_args("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        copied.update(p.rstrip("/") for p in parts[:-1])
    assert {"pyproject.toml", "README.md", "deploy/constraints.txt", "pipeline", "flows", "configs"} <= copied


def test_dockerfile_python_matches_requires_python():
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    args = dict(a.split("=", 1) for a in _docker_args("ARG") if "=" in a)
    version = args.get("PYTHON_VERSION")
    assert version, "ARG PYTHON_VERSION=<major.minor> is how the Dockerfile names its Python"
    assert requires_python.contains(version), f"Python {version} vs requires-python {requires_python}"
    text = DOCKERFILE.read_text()
    assert 'python${PYTHON_VERSION}" -m venv' in text
    named = set(re.findall(r"python(3\.\d+)", text.replace("${PYTHON_VERSION}", version)))
    assert named == {version}, f"every interpreter the Dockerfile names is Python {version}: {named}"


def test_dockerfile_runtime_settings():
    env = _docker_env()
    assert TELEMETRY_OFF.items() <= env.items()
    assert _docker_args("WORKDIR")[-1] == "/app"
    user = _docker_args("USER")[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    assert json.loads(_docker_args("CMD")[-1]) == ["segpipe", "--help"]
    assert "segpipe" in _pyproject()["project"]["scripts"]
    # KubeRay's default probes for Ray pods run wget.
    assert re.search(r"apt-get install[^&]*\bwget\b", " ".join(_docker_args("RUN")))


def test_dockerignore_next_to_the_dockerfile_keeps_local_state_out():
    ignored = {
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "outputs"} <= ignored


# ---------------------------------------------------------------------------------------------------------
# RayCluster


def test_raycluster_shape():
    cluster = _raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]
    workers = cluster["spec"]["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"] and workers
    # KubeRay's rayStartParams is map[string]string: an unquoted YAML number is rejected by the CRD.
    for group in [head, *workers]:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), params
    assert head["rayStartParams"]["num-cpus"] == "0", "no actors on the head"
    client_ports = [p for p in head["template"]["spec"]["containers"][0]["ports"] if p["name"] == "client"]
    assert [p["containerPort"] for p in client_ports] == [RAY_CLIENT_PORT]


def test_raycluster_has_a_gpu_worker_group():
    groups = _gpu_groups(_raycluster())
    assert groups, f"no worker group with a {GPU} limit"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (container,) = g["template"]["spec"]["containers"]
        limit = int(container["resources"]["limits"][GPU])
        assert int(container["resources"].get("requests", {}).get(GPU, limit)) == limit
        assert int(g["rayStartParams"].get("num-gpus", limit)) == limit


def test_raycluster_telemetry_off_in_every_container():
    for container in _ray_containers(_raycluster()):
        assert TELEMETRY_OFF.items() <= _container_env(container).items(), container["name"]


# ---------------------------------------------------------------------------------------------------------
# Prefect work pool


def test_work_pool_template_is_valid_for_prefect():
    from prefect.server.schemas.actions import validate_base_job_template

    pool = _work_pool()
    assert set(pool) == {"job_configuration", "variables"}
    validate_base_job_template(pool)  # every {{ placeholder }} is a declared variable
    assert pool["job_configuration"]["job_manifest"]["kind"] == "Job"


def test_work_pool_points_at_the_raycluster_head_service():
    cluster = _raycluster()
    config = _rendered_job_configuration(_work_pool())
    env = config["env"]
    assert env["RAY_ADDRESS"] == f"ray://{cluster['metadata']['name']}-head-svc:{RAY_CLIENT_PORT}"
    assert TELEMETRY_OFF.items() <= env.items()
    # A bare Service name resolves only inside the Service's own namespace.
    assert config["namespace"] == cluster["metadata"].get("namespace", "default")
    (container,) = config["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _ray_containers(cluster)[0]["image"]


def test_s3_credentials_come_from_the_same_secret_for_driver_and_workers():
    config = _rendered_job_configuration(_work_pool())
    (driver,) = config["job_manifest"]["spec"]["template"]["spec"]["containers"]
    secrets = {e["secretRef"]["name"] for e in driver.get("envFrom", [])}
    assert secrets, "the flow-run pod gets its S3 credentials from a Secret"
    for group in _gpu_groups(_raycluster()):
        (worker,) = group["template"]["spec"]["containers"]
        assert secrets == {e["secretRef"]["name"] for e in worker.get("envFrom", [])}
    assert not any("AWS_" in k for k in config["env"]), "no credentials in the pool's plain env"


# ---------------------------------------------------------------------------------------------------------
# prefect.yaml


def test_prefect_yaml_is_valid_for_prefect_deploy():
    from prefect.cli.deploy._models import PrefectYamlModel  # the model `prefect deploy` validates with

    raw = _prefect_yaml()
    PrefectYamlModel.model_validate(raw)
    assert raw["name"]
    assert raw["build"] is None and raw["push"] is None
    assert raw["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    assert _docker_args("WORKDIR")[-1] == "/app"


def test_prefect_yaml_deployments_and_schedules():
    from prefect.client.schemas.schedules import CronSchedule

    by_name = {f"{_flow_name_from_entrypoint(d['entrypoint'])}/{d['name']}": d for d in _deployments()}
    assert len(by_name) == len(_deployments()) and set(by_name) == EXPECTED_DEPLOYMENTS
    nightly = by_name["segment-dataset/nightly"]
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "UTC"
    assert "{date}" in nightly["parameters"]["output_uri"]
    assert nightly["parameters"]["input_uri"]
    for name, d in by_name.items():
        if name != "segment-dataset/nightly":
            assert not d.get("schedules") and not d.get("schedule"), f"{name} runs on demand only"
        assert d["work_pool"]["name"] == "segpipe-k8s"


def test_prefect_yaml_parameters_are_safe_and_resolve_in_the_image():
    copied = {"pipeline", "flows", "configs"}
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
        for g in _gpu_groups(_raycluster())
    )
    for d in _deployments():
        params = d.get("parameters") or {}
        secret_like = [k for k in params if re.search(r"key|secret|password|token|storage|credential", k, re.I)]
        assert not secret_like, f"{d['name']}: credentials never go into parameters ({secret_like})"
        for key, value in params.items():
            if (key.endswith(("_uri", "_path"))) and isinstance(value, str) and "://" not in value:
                # Relative to /app (the pull step), where the image holds the repository's copied folders.
                assert (ROOT / value).exists(), f"{d['name']}: {key}={value} does not exist"
                assert Path(value).parts[0] in copied, f"{d['name']}: {key}={value} is not copied into the image"
        if "actors" in params:
            assert params["actors"] <= gpus, f"{d['name']}: {params['actors']} actors but {gpus} GPU workers"


@pytest.mark.parametrize("index", range(len(_deployments())), ids=lambda i: _deployments()[i]["entrypoint"])
def test_prefect_yaml_entrypoints_are_real_flows(index):
    from prefect import Flow

    deployment = _deployments()[index]
    path, _, attr = deployment["entrypoint"].partition(":")
    if not (ROOT / path).is_file():
        pytest.skip(f"{path} does not exist yet (deployment {deployment['name']!r} refers to it)")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attr)
    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is not a Prefect flow"
    assert flow.name == _flow_name_from_entrypoint(deployment["entrypoint"])
    accepted = inspect.signature(flow.fn).parameters
    unknown = set(deployment.get("parameters") or {}) - set(accepted)
    assert not unknown, f"{deployment['entrypoint']} has no parameters {sorted(unknown)}"


# ---------------------------------------------------------------------------------------------------------
# Ray in the image


def _ray_extra_requirements(extra: str) -> set[str]:
    names = set()
    for spec in requires("ray") or []:
        req = Requirement(spec)
        if req.marker and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            names.add(canonicalize_name(req.name))
    return names


def test_image_can_be_a_kuberay_node_and_a_ray_client():
    """The image installs the ``cluster`` extra (and ``hf``): ray[default], whose packages (the Ray client's grpcio, the
    dashboard agent KubeRay probes) are all pinned."""
    cluster = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["cluster"]]
    (ray_req,) = [r for r in cluster if r.name == "ray"]
    assert "default" in ray_req.extras
    assert '".[cluster,hf]"' in DOCKERFILE.read_text()
    missing = sorted((_ray_extra_requirements("default") | _ray_extra_requirements("client")) - set(_constraints()))
    assert not missing, f"not pinned in deploy/constraints.txt: {missing}"
