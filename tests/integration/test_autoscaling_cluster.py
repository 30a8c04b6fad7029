"""The default job on an autoscaling cluster shaped like the shipped `cluster.yaml`, on Ray's fake
multi-node autoscaler (`RAY_FAKE_CLUSTER=1`: worker nodes are local raylets; the GPU node type declares
a GPU, the model still runs on CPU there).

The head has no CPUs and both worker types scale from zero, as in `cluster.yaml` (scaled down to fit
this machine). The job runs the way `ray job submit` runs it: a driver on the head's machine, where
`ray up` leaves the cluster config as `~/ray_bootstrap_config.yaml`, with no pool flags.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml

from tests.helpers import REPO_ROOT
from tests.integration.conftest import free_port
from tests.integration.processes import stop_cluster
from tests.integration.test_fault_tolerance import write_input

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD = "ray.head.default"  # the fake provider tags its head with this type
LAUNCHER_LISTS = (  # the launcher's fields that a fake cluster leaves empty (the autoscaler reads them all)
    "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
    "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip
WORKER_CPUS = 2  # per worker node; the machine has 2 cores, the fake nodes share them
PROBE = """
import json, sys, ray
import ray._private.state as state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: {"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()}
actors = [
    {"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
    for a in state.state.actor_table(None).values()
]
tasks = []
if len(sys.argv) > 2:
    from ray.util.state import list_tasks
    named = [("name", "=", sys.argv[3])]
    for task in list_tasks(address=sys.argv[2], filters=named, limit=10000, detail=True):
        tasks.append({"node": task.node_id, "worker_pid": task.worker_pid, "state": task.state})
print("PROBE " + json.dumps({"nodes": nodes, "actors": actors, "tasks": tasks}))
"""


@dataclass(frozen=True)
class FakeCluster:
    """A `ray start --head --autoscaling-config` cluster of the fake provider, in its own session."""

    address: str
    dashboard: str
    config: dict[str, Any]
    env: dict[str, str]

    def probe(self, task_name: str | None = None) -> dict[str, Any]:
        """Nodes (dead ones too), actors with their nodes, and optionally the tasks of one name."""
        args = [self.address, self.dashboard, task_name] if task_name else [self.address]
        done = subprocess.run(
            [sys.executable, "-c", PROBE, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
        return json.loads(line.removeprefix("PROBE "))


def cluster_config(port: int) -> dict[str, Any]:
    """`cluster.yaml` on the fake provider: its head and worker types, sized down, idle after 6 s."""
    shipped = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    types = shipped["available_node_types"]
    gpu = {**types["gpu_worker"]["resources"], "CPU": WORKER_CPUS}
    cpu = {**types["cpu_worker"]["resources"], "CPU": WORKER_CPUS}
    assert types["head"]["resources"] == {"CPU": 0} and gpu["GPU"] == 1 and "GPU" not in cpu
    return {
        "cluster_name": "fake-rerank",
        "max_workers": 3,
        "upscaling_speed": shipped["upscaling_speed"],
        "idle_timeout_minutes": 0.1,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": f"127.0.0.1:{port}",
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            FAKE_HEAD: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": gpu, "node_config": {}, "min_workers": 0, "max_workers": 2},
            "cpu_worker": {"resources": cpu, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": FAKE_HEAD,
        **{key: [] for key in LAUNCHER_LISTS},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[FakeCluster]:
    """Start the head with the fake autoscaler; stop every process of its session after."""
    temp_dir = tempfile.mkdtemp(prefix="rfa-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard_port = free_port(), free_port()
    config = cluster_config(port)
    config_path = Path(temp_dir) / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
    env.update(RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True
    )
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
        f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]  # fmt: skip
    fake_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    starter = subprocess.Popen(
        start,
        env=fake_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, output[-3000:]
        yield FakeCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", config, env)
    finally:
        survivors = stop_cluster(starter.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, f"processes left behind: {survivors}"


def driver_home(tmp_path: Path, config: dict[str, Any]) -> Path:
    """A home like the head's after `ray up`: the cluster config, and this machine's Ray token."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(Path.home() / ".ray" / "auth_token", home / ".ray" / "auth_token")
    return home


def watch_nodes(
    cluster: FakeCluster, job: subprocess.Popen[str], timeout_s: float
) -> dict[str, dict[str, float]]:
    """Every node seen alive while the job runs, with its resources; the job is killed past the timeout."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout_s
    while job.poll() is None and time.monotonic() < deadline:
        for node, info in cluster.probe()["nodes"].items():
            if info["alive"]:
                seen[node] = info["resources"]
        time.sleep(1)
    if job.poll() is None:
        job.kill()
        job.wait()
    return seen


def test_the_default_job_grows_the_cluster_uses_its_gpu_workers_and_lets_them_go(
    fake_cluster, tmp_path, tiny_model_dir, tiny_model
):
    """No pool flags: GPU workers are added and run the scoring actors, tokenization runs on several
    worker CPUs, every row is written once with its exact score, and the workers go when idle."""
    before = fake_cluster.probe()
    assert [info["alive"] for info in before["nodes"].values()] == [True]  # the head alone
    table = write_input(tmp_path / "in", files=3, rows=400)
    env = {
        **fake_cluster.env,
        "RAY_ADDRESS": fake_cluster.address,
        "HOME": str(driver_home(tmp_path, fake_cluster.config)),
    }
    command = [
        sys.executable, "-m", "jobs.rescore", "--input", str(tmp_path / "in"),
        "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--rows-per-unit", "100",
    ]  # fmt: skip
    job = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    seen = watch_nodes(fake_cluster, job, timeout_s=300)  # the fake provider forgets a node once it is gone
    stderr = job.stderr.read() if job.stderr else ""
    assert job.returncode == 0, stderr[-4000:]
    assert "min_actors=1" in stderr and "gpus_per_actor=1.0" in stderr, stderr[-4000:]

    output = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert output.num_rows == table.num_rows
    keys = pa.table({"qid": output["qid"], "pid": output["pid"]}).to_pandas()
    assert not keys.duplicated().any()
    expected = tiny_model.score(output["query"].to_pylist(), output["passage"].to_pylist()).scores
    np.testing.assert_allclose(output["score"].to_numpy(), expected, atol=1e-5)  # raw logits

    after = fake_cluster.probe("MapBatches(tokenize_units)")
    scorers = [actor for actor in after["actors"] if "ScoreUnits" in actor["class"]]
    gpu_nodes = {node for node, resources in seen.items() if resources.get("GPU", 0) > 0}
    assert scorers and {actor["node"] for actor in scorers} <= gpu_nodes, (scorers, seen)
    workers = {(task["node"], task["worker_pid"]) for task in after["tasks"] if task["state"] == "FINISHED"}
    assert len(workers) > 1, after["tasks"]
    head = next(
        node for node, info in after["nodes"].items() if "node:__internal_head__" in info["resources"]
    )
    assert head not in {node for node, _ in workers}

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = [node for node, info in fake_cluster.probe()["nodes"].items() if info["alive"]]
        if alive == [head]:
            break
        time.sleep(3)
    assert alive == [head], "the workers were not let go"
