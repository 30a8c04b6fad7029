"""Application metrics, exported on Ray's Prometheus endpoint next to Serve's own.

Serve's metrics API adds each series' ``deployment``, ``replica`` and ``application`` labels; Ray prefixes
every name with ``ray_`` (``rerank_requests_total`` is scraped as ``ray_rerank_requests_total``).
``docs/serving.md`` lists the names as a scrape shows them and ``configs/grafana-dashboard.json`` charts
them (a test checks both against a real scrape).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

_PAIR_BUCKETS = [1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0]
_REQUEST_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


class RerankMetrics:
    """Counters and histograms of one replica."""

    def __init__(self) -> None:
        self.requests = Counter("rerank_requests_total", "Rerank requests by route.", tag_keys=("route",))
        self.errors = Counter("rerank_errors_total", "Error responses by type.", tag_keys=("type",))
        self.config_refused = Counter(
            "rerank_config_refused_total", "user_configs refused (the settings kept).", tag_keys=("stage",)
        )
        stage = ("stage",)  # a cascade's stage name; stage1 for a single model
        self.pairs = Counter("rerank_pairs_scored_total", "Query-passage pairs scored.", tag_keys=stage)
        self.tokens = Counter("rerank_tokens_total", "Tokens fed to the model.", tag_keys=stage)
        self.truncated = Counter("rerank_pairs_truncated_total", "Pairs cut to max_length.", tag_keys=stage)
        self.batch_pairs = Histogram(
            "rerank_batch_pairs", "Pairs per model batch.", boundaries=_PAIR_BUCKETS, tag_keys=stage
        )
        self.pending_pairs = Gauge(
            "rerank_pending_pairs", "Pairs admitted and not yet scored (the queue depth).", tag_keys=stage
        )
        self.batch_requests = Histogram(
            "rerank_batch_requests",
            "Requests coalesced into one model batch.",
            boundaries=_REQUEST_BUCKETS,
            tag_keys=stage,
        )
