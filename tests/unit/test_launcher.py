"""`python -m serve`: a lean local Ray (its Serve options set first) unless a cluster is named."""

from __future__ import annotations

import os

import pytest
from ray.serve import scripts

import serve.__main__ as launcher

pytestmark = pytest.mark.unit


@pytest.fixture
def calls(monkeypatch):
    """Record what the launcher would start, instead of starting Ray and Serve."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(
        launcher, "start_local_ray", lambda: seen.setdefault("env_at_start", dict(os.environ))
    )
    monkeypatch.setattr(scripts.run, "main", lambda args, prog_name: seen.setdefault("serve_run", args))
    monkeypatch.setattr(
        launcher, "SHIPPED_RAY_SERVE_ENV", {"RAY_SERVE_OPTION_A": "1", "RAY_SERVE_OPTION_B": "1"}
    )
    for name in ("RAY_ADDRESS", "RAY_SERVE_OPTION_A", "RAY_SERVE_OPTION_B"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_a_local_run_sets_the_shipped_options_before_ray_starts(calls, monkeypatch):
    """Without a cluster: the options are in the env when Ray starts; a value the user set wins."""
    monkeypatch.setenv("RAY_SERVE_OPTION_B", "0")
    launcher.main(["configs/serve.yaml", "--non-blocking"])
    env = calls["env_at_start"]
    assert env["RAY_SERVE_OPTION_A"] == "1" and env["RAY_SERVE_OPTION_B"] == "0"
    assert calls["serve_run"] == ["configs/serve.yaml", "--non-blocking"]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["configs/serve.yaml", "--address", "ray://head:10001"], {}),
        (["configs/serve.yaml", "--address=auto"], {}),
        (["configs/serve.yaml", "-a", "auto"], {}),
        (["configs/serve.yaml"], {"RAY_ADDRESS": "auto"}),
    ],
)
def test_a_named_cluster_is_only_handed_over(calls, monkeypatch, argv, env):
    """With RAY_ADDRESS or --address: no local Ray, no options set; serve run gets the same args."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    launcher.main(argv)
    assert "env_at_start" not in calls and "RAY_SERVE_OPTION_A" not in os.environ
    assert calls["serve_run"] == argv


def test_no_arguments_run_the_shipped_config(calls):
    """`python -m serve` alone runs configs/serve.yaml."""
    launcher.main([])
    assert calls["serve_run"] == ["configs/serve.yaml"]
