from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.test_fault_tolerance import WORDS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 with one bucket; yields fsspec storage options."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="rerank")
    yield {"endpoint_url": endpoint, "key": "test", "secret": "test"}
    server.stop()


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cascade input: 3 files of 444 rows, 37 queries of 36 candidates, passages distinct (no score ties)."""
    source = tmp_path_factory.mktemp("cascade-in")
    for index in range(3):
        pids = range(index * 444, (index + 1) * 444)
        table = pa.table(
            {
                "qid": [pid % 37 for pid in pids],
                "pid": list(pids),
                "query": [" ".join(WORDS[(pid % 37 + j) % len(WORDS)] for j in range(3)) for pid in pids],
                "passage": [
                    " ".join(WORDS[pid // len(WORDS) ** j % len(WORDS)] for j in range(4)) for pid in pids
                ],
            }
        )
        pq.write_table(table, source / f"pairs-{index}.parquet", row_group_size=250)
    return source
