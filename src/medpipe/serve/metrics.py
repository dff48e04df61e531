"""Prometheus metrics for the service, in a private registry (one per app)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medpipe_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("medpipe_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("medpipe_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue = Gauge("medpipe_queue_images", "Images admitted and not yet answered", registry=r)
        self.rejected = Counter("medpipe_rejected_total", "Requests refused with 503 (queue, requests or memory full)",
                                registry=r)
        self.connections_closed = Counter("medpipe_connections_closed_total", "Connections the server closed "
                                          "itself, by reason (header_timeout, evicted, over_capacity, "
                                          "client_over_capacity, malformed_http)", ["reason"], registry=r)
        self.uploads = Gauge("medpipe_uploads", "Request bodies still arriving", registry=r)
        self.upload_bytes = Gauge("medpipe_upload_buffer_bytes", "Bytes held by request bodies still arriving "
                                  "(upload_buffer_mb)", registry=r)
        self.processing = Gauge("medpipe_requests_processing", "Requests with a complete body being decoded, "
                                "queued or run (max_requests)", registry=r)
        self.uploads_refused = Counter("medpipe_uploads_refused_total", "Request bodies refused or cut off, by "
                                       "reason (per_client, buffer_full, too_slow, body_timeout, overloaded)",
                                       ["reason"], registry=r)
        self.unauthorized = Counter("medpipe_unauthorized_total", "Requests answered 401 (missing or wrong "
                                    "bearer token)", registry=r)
        self.decode_abandoned = Counter("medpipe_decode_abandoned_total", "Decodes stopped at their time "
                                        "budget or refused for too many JPEG scans", registry=r)
        self.ceiling = Gauge("medpipe_memory_ceiling_megabytes", "memory_ceiling_mb in force: bodies are refused "
                             "above it", registry=r)
        self.rss = Gauge("medpipe_memory_rss_megabytes", "Resident memory of the server and its decode "
                         "processes", registry=r)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


class _WithoutCreated:
    """A registry as /metrics shows it: without the ``*_created`` series (they double the output and nobody
    graphs them). Filtered here, not with prometheus_client's process-wide ``disable_created_metrics()``, so
    neither importing nor running the service changes a library setting."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def process_tree_rss_mb(pid: int | str = "self") -> float:
    """Resident memory (MB) of a process and all its descendants (the decode processes), from /proc."""
    total, todo = 0, [str(pid)]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += f.read().split()
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20
