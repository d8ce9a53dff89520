"""Prometheus metrics (``GET /metrics``), through the official prometheus-client.

Counters and gauges are read from the server when scraped, so they cost nothing on the
hot path; the one histogram (publish-to-send latency) is observed once per fan-out
generation, not per change or per subscriber.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from statecast.errors import ServerStateError
from statecast.transports.base import Host

__all__ = ["Metrics"]


class _ServerCollector(Collector):
    def __init__(self, host: Host) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        host = self._host
        try:
            engine = host.engine
        except ServerStateError:  # the store is still loading
            return
        connections = host.connections
        by_transport: dict[str, int] = {"tcp": 0, "ws": 0}
        pending = 0
        for conn in connections:
            by_transport[conn.transport_name] = by_transport.get(conn.transport_name, 0) + 1
            pending += conn.pending_bytes()
        g = GaugeMetricFamily(
            "statecast_connections", "Open client connections.", labels=["transport"]
        )
        for name, n in by_transport.items():
            g.add_metric([name], n)
        yield g
        yield GaugeMetricFamily(
            "statecast_subscribers",
            "Connections receiving live changes.",
            value=engine.fanout.subscriber_count,
        )
        yield GaugeMetricFamily("statecast_seq", "The current sequence number.", value=engine.seq)
        yield GaugeMetricFamily(
            "statecast_records", "Records in the state.", value=len(engine.store.state)
        )
        yield GaugeMetricFamily(
            "statecast_pending_output_bytes",
            "Output waiting to be sent, over all connections.",
            value=pending,
        )
        yield CounterMetricFamily(
            "statecast_changes_published", "Changes applied.", value=engine.changes_published
        )
        yield CounterMetricFamily(
            "statecast_deliveries",
            "Change frames handed to subscribers (the 'deliveries' of stats).",
            value=engine.fanout.deliveries,
        )
        yield CounterMetricFamily(
            "statecast_bytes_sent",
            "Bytes of change frames handed to subscribers.",
            value=engine.fanout.bytes_delivered,
        )
        yield CounterMetricFamily(
            "statecast_snapshots_served", "Snapshots started.", value=engine.snapshots
        )
        yield CounterMetricFamily(
            "statecast_slow_consumer_disconnects",
            "Subscribers cut off for falling behind.",
            value=connections.slow_consumer_disconnects,
        )
        yield CounterMetricFamily(
            "statecast_connections_accepted",
            "Connections accepted.",
            value=connections.accepted,
        )
        errors = CounterMetricFamily(
            "statecast_errors", "Error frames sent, by code.", labels=["code"]
        )
        for code, n in sorted(engine.errors.items()):
            errors.add_metric([code], n)
        yield errors
        limits = CounterMetricFamily(
            "statecast_limit_hits",
            "Requests and connections refused by a limit (§7), by limit.",
            labels=["limit"],
        )
        hits = dict(engine.limit_hits)
        hits["max_connections"] = connections.refused
        hits["snapshot_retained"] = engine.store.state.snapshots_cut
        for name in (
            "max_changes",
            "max_value",
            "rate",
            "connections_per_user",
            "auth_timeout",
            "request_timeout",
            "snapshot_timeout",
            "snapshot_retained",
            "max_connections",
        ):
            limits.add_metric([name], hits.get(name, 0))
        yield limits
        yield GaugeMetricFamily(
            "statecast_snapshot_retained_bytes",
            "Old versions kept alive for open snapshots, in bytes (--max-snapshot-retained).",
            value=engine.store.state.retained,
        )
        yield GaugeMetricFamily(
            "statecast_open_snapshots",
            "Snapshots being streamed.",
            value=engine.store.state.open_snapshots,
        )


class Metrics:
    """One registry per server (several servers may live in one process)."""

    def __init__(self, host: Host) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ServerCollector(host))
        self.latency = Histogram(
            "statecast_publish_to_send_seconds",
            "Time from a change being applied to its frames being handed to every "
            "subscriber (observed once per fan-out generation, for its oldest change).",
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
            ),
            registry=self.registry,
        )
        host.on_engine(lambda engine: setattr(engine.fanout, "on_flush", self.latency.observe))
