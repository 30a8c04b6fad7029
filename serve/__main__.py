"""``python -m serve CONFIG [serve run options]``: ``serve run`` on a lean local Ray, for one machine.

``serve run`` starts a local Ray with the full dashboard: a web UI and its head processes, about
1.1 GiB RSS and 11 processes on a laptop, whose CPU use also slows the requests on a small machine
(``docs/performance.md``). Nothing of the service uses them. This launcher starts that local Ray
without them, then hands over to ``serve run`` itself, so the config file, its options and Ctrl-C
behave exactly as there. With ``RAY_ADDRESS`` or ``--address`` (a running cluster) it only hands over:
the cluster's own settings apply.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

# Ray Serve options that must be in the environment before Ray starts; the launcher sets these (a
# value already in the environment wins). None of Serve's request-path options measured a gain here
# beyond noise once the dashboard is off (bench/serve_load.py, docs/performance.md); the one option
# set is the proxy middleware that retries a request whose replica died (serve/proxy.py).
SHIPPED_RAY_SERVE_ENV: dict[str, str] = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}


def start_local_ray() -> None:
    """Start a local Ray for Serve without the dashboard's web UI and head modules."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    ray.init(namespace=SERVE_NAMESPACE, include_dashboard=False)


def connects_to_cluster(args: Sequence[str]) -> bool:
    """Whether ``serve run ARGS`` would attach to a running cluster rather than start one."""
    return bool(os.environ.get("RAY_ADDRESS")) or any(
        arg in ("--address", "-a") or arg.startswith("--address=") for arg in args
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``serve run ARGV`` (default: the shipped config), on a lean local Ray unless one is named."""
    args = list(sys.argv[1:] if argv is None else argv) or ["configs/serve.yaml"]
    if not connects_to_cluster(args):
        for name, value in SHIPPED_RAY_SERVE_ENV.items():
            os.environ.setdefault(name, value)
        start_local_ray()
    from ray.serve.scripts import run  # after the env: Serve reads its options when imported

    run.main(args, prog_name="python -m serve")


if __name__ == "__main__":
    main()
