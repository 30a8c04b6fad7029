"""Deployment files validate against the schemas their tools use: Ray's cluster launcher, KubeRay, Serve."""

import copy
import functools
import gzip
import json
import shlex

import pytest
import yaml

from jobs.rescore import parse_args
from jobs.settings import RescoreSettings
from reranker.errors import ConfigError
from tests.helpers import REPO_ROOT, SHARED, require

pytestmark = pytest.mark.unit
jsonschema = pytest.importorskip("jsonschema")
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay-v1.7.0"


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((REPO_ROOT / relative).read_text())


def strict(schema):
    """The CRD schema with unknown fields forbidden wherever it lists the known ones (catches typos)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    open_object = "additionalProperties" in result or result.get("x-kubernetes-preserve-unknown-fields")
    if result.get("type") == "object" and "properties" in result and not open_object:
        result["additionalProperties"] = False
    return result


@functools.cache
def kuberay_schema(kind: str) -> dict:
    path = require(KUBERAY_SCHEMAS / f"{kind}.v1.schema.json.gz")
    return strict(json.loads(gzip.decompress(path.read_bytes())))


def validate_cluster_yaml(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_validates_against_ray_schema():
    """cluster.yaml passes Ray's own launcher validation: CPU head, autoscaling GPU and CPU groups."""
    config = load_yaml("cluster.yaml")
    validate_cluster_yaml(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_groups = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    cpu_groups = [
        n for n in nodes.values() if n["resources"].get("CPU", 0) > 0 and not n["resources"].get("GPU")
    ]
    assert gpu_groups and cpu_groups
    assert all(group["min_workers"] < group["max_workers"] for group in gpu_groups + cpu_groups)
    installs = " ".join(config["setup_commands"])
    assert "torch==" in installs and "-c /home/ray/ray-rerank/constraints.txt" in installs
    assert config["file_mounts"]["/home/ray/ray-rerank"] == "."
    starts = [
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ]
    assert starts and all(started_ray_env(c).get("RAY_AUTH_MODE") == "token" for c in starts)
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_cluster_yaml_check_catches_a_typo():
    """The launcher schema rejects a misspelt key, so the test above can fail."""
    config = load_yaml("cluster.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_yaml(config)


@pytest.mark.shared
@pytest.mark.parametrize(("manifest", "kind"), [("rayjob", "rayjobs"), ("rayservice", "rayservices")])
def test_kuberay_manifests_validate_against_crds(manifest, kind):
    """Both manifests validate against KubeRay v1.7.0's CRD schemas, unknown fields forbidden."""
    document = load_yaml(f"configs/kuberay/{manifest}.yaml")
    assert document["apiVersion"] == "ray.io/v1"
    jsonschema.validate(document, kuberay_schema(kind))
    broken = copy.deepcopy(document)
    cluster = broken["spec"].get("rayClusterSpec") or broken["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, kuberay_schema(kind))


def test_rayservice_embeds_serve_yaml_and_serve_accepts_it():
    """serveConfigV2 is configs/serve.yaml exactly, and Serve's deploy schema accepts it."""
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(load_yaml("configs/kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded == load_yaml("configs/serve.yaml")
    ServeDeploySchema.model_validate(embedded)


def test_the_shipped_serve_config_passes_the_service_check():
    """Its args and every user_config are what the replicas accept (a refused user_config would leave the
    replicas on their settings, reported on /health): `python -m serve check` says ok."""
    from serve.config_check import check_application, check_config_file

    check_config_file(REPO_ROOT / "configs" / "serve.yaml")
    for application in load_yaml("configs/serve.yaml")["applications"]:
        bad = {**application, "deployments": [{"name": "Reranker", "user_config": {"max_batch": 8}}]}
        with pytest.raises(ConfigError, match="deployment 'Reranker': user_config: max_batch"):
            check_application(bad)


def test_rayjob_runs_the_rescoring_job_with_its_config():
    """The RayJob runs jobs.rescore with configs/rescore.yaml, its flags parse, its runtime env is valid."""
    from ray.runtime_env import RuntimeEnv

    spec = load_yaml("configs/kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.rescore"]
    overrides = parse_args(argv[3:])
    assert overrides["config_file"].endswith("/configs/rescore.yaml")
    overrides["config_file"] = str(REPO_ROOT / "configs" / "rescore.yaml")
    settings = RescoreSettings.load(**overrides)
    assert settings.job.input and settings.job.output
    assert settings.model.model == load_yaml("configs/rescore.yaml")["model"]
    runtime_env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert "RERANK_REVISION" in runtime_env["env_vars"]


def started_ray_env(command: str) -> dict[str, str]:
    """The ``NAME=value`` assignments in front of a shell command's ``ray start``."""
    words = shlex.split(command)
    return dict(word.split("=", 1) for word in words[: words.index("ray")] if "=" in word)


def test_every_way_to_start_ray_for_serve_loads_the_proxy_middleware():
    """The launcher, cluster.yaml's head and workers and the RayService pods set the proxy callback before
    Ray starts (Serve reads it only then), and Serve can import what it names; the image does not bake it
    into the environment of every app built from it."""
    from ray.serve._private.utils import call_function_from_import_path

    from serve.__main__ import SHIPPED_RAY_SERVE_ENV
    from serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV, ReplicaLossRetry

    wanted = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
    assert SHIPPED_RAY_SERVE_ENV.items() >= wanted.items()
    cluster = load_yaml("cluster.yaml")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]]
    assert [started_ray_env(c).items() >= wanted.items() for c in starts if "ray start" in c] == [True, True]
    spec = load_yaml("configs/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        env = {item["name"]: item.get("value") for item in group["template"]["spec"]["containers"][0]["env"]}
        assert env[PROXY_CALLBACK_ENV] == PROXY_CALLBACK
    assert f"ENV {PROXY_CALLBACK_ENV}" not in (REPO_ROOT / "Dockerfile").read_text()
    assert [m.cls for m in call_function_from_import_path(PROXY_CALLBACK)] == [ReplicaLossRetry]
