"""Prometheus metrics of the node (served on ``/metrics`` by :mod:`dicom_node.http`)."""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

ASSOCIATIONS = Counter("spine_node_associations", "DICOM associations requested",
                       ["outcome"])  # accepted | rejected
INSTANCES = Counter("spine_node_instances_received", "C-STORE requests answered",
                    ["status"])  # success | duplicate | refused | out_of_resources | error
BYTES = Counter("spine_node_bytes_received", "Bytes of stored instances")
STORE_SECONDS = Histogram("spine_node_store_seconds", "Time to store and index one instance",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
JOB_SECONDS = Histogram("spine_node_job_seconds", "Wall time of a job", ["state"],
                        buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800))


class JobsCollector:
    """``spine_node_jobs{state=...}``: read from the database at scrape time, so it is right
    across processes (several workers) and restarts."""

    def __init__(self, index):
        self.index = index

    def collect(self):
        family = GaugeMetricFamily("spine_node_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.index.job_counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            counts = {}
        for state, n in sorted(counts.items()):
            family.add_metric([state], n)
        yield family


_registered: JobsCollector | None = None


def register_jobs_collector(index) -> None:
    global _registered
    if _registered is not None:
        try:
            REGISTRY.unregister(_registered)
        except KeyError:
            pass
    _registered = JobsCollector(index)
    REGISTRY.register(_registered)
