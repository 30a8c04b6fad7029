"""``python -m serve CONFIG [serve run options]``: ``serve run`` on a lean local Ray, for one machine.

``serve run`` starts a local Ray with the full dashboard: a web UI and its head processes, about
1.1 GiB RSS and 11 processes on a laptop, whose CPU use also slows the requests on a small machine
(``docs/performance.md``). Nothing of the service uses them. This launcher starts that local Ray
without them, then hands over to ``serve run`` itself, so the config file, its options and Ctrl-C
behave exactly as there. Since the local Ray is started here, the options ``serve run`` would have
passed to it are applied here: ``--runtime-env``, ``--runtime-env-json`` and ``--working-dir`` become
the job's runtime environment (every replica's default), as with ``serve run``.

A laptop run listens on 127.0.0.1 only, whatever host the config names (the shipped config says
0.0.0.0, which a cluster needs): a quick start never opens an unauthenticated service to the network.
``serve run`` itself binds where the config says. With ``RAY_ADDRESS`` or ``--address`` (a running
cluster) the launcher only hands over: the cluster's own settings apply.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

# Ray Serve options that must be in the environment before Ray starts (the processes it starts read
# them); the launcher sets these (a value already in the environment wins). None of Serve's
# request-path options measured a gain here beyond noise once the dashboard is off
# (bench/serve_load.py, docs/performance.md); the one option set is the proxy middleware that retries
# a request whose replica died (serve/proxy.py).
SHIPPED_RAY_SERVE_ENV: dict[str, str] = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
LOCAL_HOST = "127.0.0.1"
_ANY_HOST = {"0.0.0.0", "::", ""}
logger = logging.getLogger("serve")


def serve_run_options(args: Sequence[str]) -> dict[str, Any]:
    """``serve run``'s own reading of ``args`` (its click parser): config path, address, runtime env."""
    from ray.serve.scripts import run

    context = run.make_context("serve run", list(args), resilient_parsing=True)
    return dict(context.params)


def runtime_env_of(options: dict[str, Any]) -> dict[str, Any]:
    """The runtime environment ``serve run`` would start Ray with (its own parser of the three options).

    Raises:
        SystemExit: The options can't be read (e.g. both a file and JSON): one line, status 2.
    """
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    try:
        return dict(
            parse_runtime_env_args(
                runtime_env=options.get("runtime_env"),
                runtime_env_json=options.get("runtime_env_json"),
                working_dir=options.get("working_dir"),
            )
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"python -m serve: cannot read the runtime env options: {exc}") from None


def start_local_ray(runtime_env: dict[str, Any] | None = None) -> None:
    """Start a local Ray for Serve without the dashboard's web UI and head modules."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False, runtime_env=runtime_env or None)


def read_config(path: str | None) -> dict[str, Any] | None:
    """The Serve config file ``serve run`` was given, or None for an import path."""
    if not path or not Path(path).is_file():
        return None
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def local_http_options(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config's HTTP options with the host narrowed to 127.0.0.1, when it names any interface."""
    http = dict((config or {}).get("http_options") or {})
    if config is None or str(http.get("host", LOCAL_HOST)) not in _ANY_HOST:
        return None
    return {**http, "host": LOCAL_HOST}


def start_serve_on_this_machine(config: dict[str, Any], http_options: dict[str, Any]) -> None:
    """Start Serve on 127.0.0.1 with the config's other options, before ``serve run`` (which keeps them)."""
    from ray import serve

    port = http_options.get("port", 8000)
    print(
        f"python -m serve: listening on http://{LOCAL_HOST}:{port} only (this machine), not on the "
        "config's host (every interface, for clusters). To serve the network: `serve run CONFIG`, "
        "with an API key (RERANK_API_KEY).",
        file=sys.stderr,
    )
    options = {
        key: config[key] for key in ("grpc_options", "logging_config", "controller_options") if key in config
    }
    serve.start(
        http_options=http_options, proxy_location=config.get("proxy_location") or "EveryNode", **options
    )


def proxy_buffer_for(config: dict[str, Any] | None) -> None:
    """Keep the proxy's retry buffer within the service's ``max_body_bytes`` (both run on this machine)."""
    from serve.config_check import smallest_max_body_bytes
    from serve.settings import DEFAULT_BUFFER_BYTES, PROXY_BUFFER_ENV

    limit = smallest_max_body_bytes(config or {})
    if limit is not None and limit < DEFAULT_BUFFER_BYTES:
        os.environ.setdefault(PROXY_BUFFER_ENV, str(limit))


def connects_to_cluster(options: dict[str, Any]) -> bool:
    """Whether ``serve run`` with these options would attach to a running cluster rather than start one."""
    return bool(os.environ.get("RAY_ADDRESS")) or bool(options.get("address"))


def check(paths: Sequence[str]) -> None:
    """``python -m serve check CONFIG...``: check each Serve config (args, every user_config); exit 0 or 2."""
    from reranker.errors import ConfigError
    from serve.config_check import check_config_file, proxy_buffer_warning

    for path in paths or ["configs/serve.yaml"]:
        try:
            config = check_config_file(path)
        except ConfigError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        warning = proxy_buffer_warning(config)
        if warning:
            print(f"warning: {path}: {warning}", file=sys.stderr)
        print(f"{path}: ok")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``serve run ARGV`` (default: the shipped config), on a lean local Ray unless one is named.

    ``check CONFIG...`` checks configs instead; a local run checks its config before starting Ray.
    """
    args = list(sys.argv[1:] if argv is None else argv) or ["configs/serve.yaml"]
    if args[0] == "check":
        check(args[1:])
        return
    options = serve_run_options(args)
    if not connects_to_cluster(options):
        config_path = options.get("config_or_import_path")
        config = read_config(config_path)
        if config is not None:
            check([str(config_path)])
        for name, value in SHIPPED_RAY_SERVE_ENV.items():
            os.environ.setdefault(name, value)
        proxy_buffer_for(config)
        start_local_ray(runtime_env_of(options))
        http_options = local_http_options(config)
        if config is not None and http_options is not None:
            start_serve_on_this_machine(config, http_options)
    from ray.serve.scripts import run

    run.main(args, prog_name="python -m serve")


if __name__ == "__main__":
    main()
