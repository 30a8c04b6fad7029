"""Property-based fuzzing of the live service against its own OpenAPI document (schemathesis).

Starts `serve run configs/serve.yaml` (the twin model, an API key), then lets schemathesis generate
valid and invalid requests for every operation the service's `/openapi.json` lists, twice: with the
key and without it. Every answer must be documented: no 5xx, no status the operation does not
declare, every body matching its declared schema. Bounded by --max-time per pass. Prints JSON.

    python bench/openapi_fuzz.py [--max-time 90] [--url http://127.0.0.1:8000 --api-key KEY]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import start_server  # noqa: E402
from tests.helpers import TWIN_MODEL  # noqa: E402

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
API_KEY = "fuzz-key"


def fuzz(url: str, headers: list[str], max_time: int, report_dir: Path) -> dict:
    """One schemathesis pass; its result and the status codes it saw per operation."""
    har = report_dir / "requests.har"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-time",
        str(max_time),
        "--request-timeout",
        "30",
        "--seed",
        "1",
        "--no-color",
        "--generation-database",
        "none",
        "--generation-with-security-parameters",
        "false" if headers else "true",  # with the key: send it, not generated tokens
        "--report",
        "har",
        "--report-har-path",
        str(har),
        *[part for header in headers for part in ("-H", header)],
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    generated = re.search(r"(\d+) generated", done.stdout)
    unique_failures = re.search(r"found (\d+) unique failure", done.stdout)
    return {
        "exit_code": done.returncode,
        "generated": int(generated.group(1)) if generated else None,
        "unique_failures": int(unique_failures.group(1)) if unique_failures else 0,
        "statuses": statuses_seen(har),
        "failures": failure_lines(done.stdout),
    }


def statuses_seen(har: Path) -> dict[str, dict[str, int]]:
    """Status codes per operation, from the HAR log of every request sent."""
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    if not har.exists():
        return {}
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path = "/" + entry["request"]["url"].split("/", 3)[-1].split("?")[0]
        seen[f"{entry['request']['method']} {path}"][str(entry["response"]["status"])] += 1
    return {operation: dict(sorted(counts.items())) for operation, counts in sorted(seen.items())}


def failure_lines(output: str) -> list[str]:
    """The lines of schemathesis' failure report that name a failed check (at most 20)."""
    lines = output.splitlines()
    found = [i for i, line in enumerate(lines) if re.match(r"\s*\d+\. Test Case ID", line)]
    return [" | ".join(part.strip() for part in lines[i : i + 4] if part.strip()) for i in found][:20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="fuzz a running server instead of starting one")
    parser.add_argument("--api-key", default=API_KEY, help="the server's key (with --url)")
    parser.add_argument("--model", default=str(TWIN_MODEL))
    parser.add_argument("--max-time", type=int, default=90, help="seconds per pass (two passes)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    url = args.url or "http://127.0.0.1:8000"
    server = None if args.url else start_server(args.model, url, {"RERANK_API_KEY": API_KEY})
    try:
        with tempfile.TemporaryDirectory() as scratch:
            passes = {
                "with_key": fuzz(
                    url, [f"Authorization: Bearer {args.api_key}"], args.max_time, Path(scratch)
                ),
                "without_key": fuzz(url, [], args.max_time, Path(scratch) / "anonymous"),
            }
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    clean = all(run["exit_code"] == 0 and not run["unique_failures"] for run in passes.values())
    print(json.dumps({"url": url, "checks": CHECKS.split(","), "passes": passes, "clean": clean}, indent=2))
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
