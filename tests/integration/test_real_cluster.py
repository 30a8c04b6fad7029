"""A real Ray cluster on 127.0.0.1, used the way the README says: `ray start --head`, `ray job submit
--working-dir .` of the rescoring job, `serve deploy configs/serve.yaml`, then stop, leaving no process.

The cluster lives in its own temp dir (so `/tmp/ray/ray_current_cluster` is never written) and its
own POSIX session, and is stopped by killing exactly that session's processes: `ray stop` would also
kill the test session's own Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from reranker.model import sigmoid
from tests.helpers import REPO_ROOT, pairs_table
from tests.integration.conftest import free_port
from tests.integration.processes import stop_cluster

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class LocalCluster:
    """A `ray start --head` cluster: its dashboard address, temp dir and client environment."""

    address: str
    temp_dir: str
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a Ray CLI command (ray, serve) from this venv against the cluster."""
        command = [str(BIN / args[0]), *args[1:]]
        return subprocess.run(
            command, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
    env.update(
        RAY_AUTH_MODE="token",  # Ray >= 2.60: clusters made by `ray start` want token auth
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
    )
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Start a one-node cluster on 127.0.0.1 with token auth; stop it and check nothing is left."""
    temp_dir = tempfile.mkdtemp(prefix="rrc-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = client_env()
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True
    )
    dashboard_port = free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    # In a session of its own: every process of the cluster inherits it, so teardown finds them all.
    starter = subprocess.Popen(
        start, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, output[-3000:]
        yield LocalCluster(f"http://127.0.0.1:{dashboard_port}", temp_dir, env)
    finally:
        survivors = stop_cluster(starter.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, f"processes left behind: {survivors}"


def wait_for_job(cluster: LocalCluster, job_id: str, timeout_s: float = 240) -> str:
    """Poll `ray job status` until the job ends; returns its final status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = cluster.cli("ray", "job", "status", job_id, "--address", cluster.address)
        status = answer.stdout + answer.stderr  # the Ray CLI logs to stderr
        ended = re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", status)
        if ended:
            return ended.group(1).upper().removeprefix("WAS ")
        time.sleep(2)
    return "TIMEOUT"


def test_job_submit_and_serve_deploy_on_a_real_cluster(cluster, tmp_path, tiny_model_dir, tiny_model):
    """`ray job submit` of the job succeeds with every row scored; `serve deploy` answers /v1/rerank."""
    (tmp_path / "in").mkdir()
    for part in range(3):
        pq.write_table(pairs_table(), tmp_path / "in" / f"part-{part}.parquet")
    job_id = f"rescore-{os.getpid()}-{time.monotonic_ns()}"
    submitted = cluster.cli(
        "ray", "job", "submit", "--address", cluster.address, "--submission-id", job_id,
        "--working-dir", ".", "--no-wait", "--",
        "python", "-m", "jobs.rescore", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
        "--model", str(tiny_model_dir),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    status = wait_for_job(cluster, job_id)
    logs = cluster.cli("ray", "job", "logs", job_id, "--address", cluster.address)
    logs = logs.stdout + logs.stderr
    assert status == "SUCCEEDED", logs[-3000:]
    assert "rows read 36, rows written 36" in logs
    output = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert output.num_rows == 36 and output.column("score").null_count == 0

    port = deploy_serve_config(cluster, tmp_path, tiny_model_dir)
    body = {
        "query": "how do solar panels work",
        "documents": ["solar panels convert sunlight", "bananas"],
        "top_n": 1,
    }
    answer = post_json(f"http://127.0.0.1:{port}/v1/rerank", body)
    relevance = sigmoid(tiny_model.score([body["query"]] * 2, body["documents"]).scores)
    best = int(np.argmax(relevance))
    assert [result["index"] for result in answer["results"]] == [best]
    assert answer["results"][0]["relevance_score"] == pytest.approx(float(relevance[best]), abs=1e-5)
    assert answer["model"] == str(tiny_model_dir) and answer["usage"]["total_tokens"] > 0


def deploy_serve_config(cluster: LocalCluster, tmp_path: Path, model_dir: Path) -> int:
    """`serve deploy` the shipped config with this test's model, port and CPU count; wait for /health."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    application["args"]["model"] = str(model_dir)  # `serve deploy` does not carry the client's env
    application["deployments"][0]["ray_actor_options"]["num_cpus"] = 1
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    deployed = cluster.cli("serve", "deploy", str(tmp_path / "serve.yaml"), "--address", cluster.address)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    status = cluster.cli("serve", "status", "--address", cluster.address).stdout
    raise AssertionError(f"Serve did not become healthy:\n{status[-3000:]}")


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())
