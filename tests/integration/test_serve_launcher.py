"""`python -m serve` as a user runs it, in a process (and a local Ray) of its own: the runtime env options
reach the replicas, and a laptop run of a config that names every interface listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.helpers import REPO_ROOT
from tests.integration.conftest import free_port
from tests.integration.processes import stop_cluster

pytestmark = pytest.mark.integration


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp, IPv4)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return addresses


def test_an_api_key_passed_as_runtime_env_reaches_the_replicas(tmp_path, tiny_model_dir):
    """--runtime-env-json '{"env_vars": {"RERANK_API_KEY": ...}}' is applied (it used to be parsed and
    dropped, so the service answered without a key), and the shipped config's 0.0.0.0 becomes 127.0.0.1."""
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    application = config["applications"][0]
    application["args"]["model"] = str(tiny_model_dir)
    deployment = application["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RERANK_"))}
    runtime_env = json.dumps({"env_vars": {"RERANK_API_KEY": "from-runtime-env"}})
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve", str(tmp_path / "serve.yaml"), "--runtime-env-json", runtime_env],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the service did not come up"
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app not deployed yet
                pass
            time.sleep(0.5)
        body = {"query": "how do solar panels work", "documents": ["solar panels", "bananas"]}
        assert requests.post(url + "/v1/rerank", json=body, timeout=30).status_code == 401
        keyed = {"Authorization": "Bearer from-runtime-env"}
        assert requests.post(url + "/v1/rerank", json=body, headers=keyed, timeout=30).status_code == 200
        assert listening_addresses(port) == {"127.0.0.1"}
        assert "listening on http://127.0.0.1" in (tmp_path / "serve.log").read_text()
    finally:
        stop_cluster(process.pid)
