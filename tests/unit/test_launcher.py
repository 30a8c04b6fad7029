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

    def start_local_ray(runtime_env=None):
        seen.setdefault("env_at_start", dict(os.environ))
        seen.setdefault("runtime_env", runtime_env)

    monkeypatch.setattr(launcher, "start_local_ray", start_local_ray)
    monkeypatch.setattr(
        launcher, "start_serve_on_this_machine", lambda config, http: seen.setdefault("http", http)
    )
    monkeypatch.setattr(scripts.run, "main", lambda args, prog_name: seen.setdefault("serve_run", args))
    monkeypatch.setattr(
        launcher, "SHIPPED_RAY_SERVE_ENV", {"RAY_SERVE_OPTION_A": "1", "RAY_SERVE_OPTION_B": "1"}
    )
    for name in ("RAY_ADDRESS", "RAY_SERVE_OPTION_A", "RAY_SERVE_OPTION_B", "RERANK_PROXY_BUFFER_BYTES"):
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


def test_runtime_env_options_reach_the_local_ray(calls, tmp_path):
    """--runtime-env-json and --working-dir (parsed as serve run parses them) become the local Ray's
    runtime env, so an API key passed that way reaches the replicas."""
    launcher.main(
        ["configs/serve.yaml", "--runtime-env-json", '{"env_vars": {"RERANK_API_KEY": "k"}}',
         "--working-dir", str(tmp_path)]
    )  # fmt: skip
    assert calls["runtime_env"] == {"env_vars": {"RERANK_API_KEY": "k"}, "working_dir": str(tmp_path)}


def test_a_laptop_run_of_the_shipped_config_listens_on_this_machine_only(calls):
    """The shipped config says host 0.0.0.0 (for clusters); python -m serve binds 127.0.0.1, same port."""
    launcher.main(["configs/serve.yaml"])
    assert calls["http"] == {"host": "127.0.0.1", "port": 8000}


def test_a_bad_user_config_is_one_line_before_anything_starts(calls, tmp_path, capsys):
    """A config whose user_config would be refused by every replica fails the launch: one line, exit 2."""
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: rerank\n    import_path: serve.app:build_app\n    args: {model: m}\n"
        "    deployments:\n      - name: Reranker\n        user_config: {max_batch_pairs: 0}\n"
    )
    with pytest.raises(SystemExit) as exited:
        launcher.main([str(config)])
    assert exited.value.code == 2 and "env_at_start" not in calls
    error = capsys.readouterr().err.strip()
    assert "deployment 'Reranker': user_config: max_batch_pairs" in error and "\n" not in error


def test_a_small_max_body_bytes_caps_the_proxys_retry_buffer(calls, tmp_path, capsys):
    """The proxy reads its buffer cap from Ray's env, never from the config's args: a laptop run sets it to
    the service's max_body_bytes; `check` warns for clusters, where it is the operator's to set."""
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: rerank\n    import_path: serve.app:build_app\n"
        "    args: {model: m, max_body_bytes: 4096}\n"
    )
    launcher.main(["check", str(config)])
    assert "below the proxy's retry buffer" in capsys.readouterr().err
    launcher.main([str(config)])
    assert calls["env_at_start"]["RERANK_PROXY_BUFFER_BYTES"] == "4096"
