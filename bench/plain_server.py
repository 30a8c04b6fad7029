"""The floor of ``bench/serve_load.py``: the service's own app and engine behind plain uvicorn, no Ray.

The same FastAPI routes, ``RerankService`` and batching engine a replica runs, with settings from
``RERANK_*`` as in a replica, in one process. What Serve adds on top of this is its per-request tax.

    RERANK_MODEL=DIR python -m bench.plain_server [--port 8000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from ray.serve import batching

from serve.api import create_api
from serve.app import build_service
from serve.settings import ServeSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = parser.parse_args()
    # serve.batch's only tie to a replica: a warning that reads the replica's max_ongoing_requests.
    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None  # type: ignore[method-assign]
    app = create_api()
    app.state.service = build_service(ServeSettings.load(), args.threads, None)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
