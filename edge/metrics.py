"""The edge's metrics about itself (prometheus_client), on an injectable registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = "stratoscope_edge"
        self.programs_attached = Gauge(
            f"{ns}_programs_attached", "1 when the program is loaded and attached.",
            ["program"], registry=registry,
        )
        self.program_fallback = Gauge(
            f"{ns}_program_fallback", "1 when the program runs its fallback build (its "
            "description's fallback: the kernel lacks a feature of the first build).",
            ["program"], registry=registry,
        )
        self.attach_failures = Counter(
            f"{ns}_program_attach_failures", "Programs that failed to load or attach.",
            ["program"], registry=registry,
        )
        self.drain_seconds = Histogram(
            f"{ns}_drain_seconds", "Time to flip, read, decode and build one batch.",
            registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.last_drain = Gauge(
            f"{ns}_last_drain_timestamp_seconds", "Unix time the last batch was built "
            "(stratoscope status shows how long ago).", registry=registry,
        )
        self.series = Gauge(
            f"{ns}_series", "Series in the last batch, per program.", ["program"],
            registry=registry,
        )
        self.folded = Counter(
            f"{ns}_cardinality_folded_series",
            "Series folded into 'other' by the per-metric top-N bound.",
            ["program", "metric"], registry=registry,
        )
        self.events_lost = Counter(
            f"{ns}_events_lost", "Ring-buffer events lost (kernel: rate limit or full ring; "
            "user: batch event limit).", ["program", "where"], registry=registry,
        )
        self.map_overflow = Counter(
            f"{ns}_map_overflow", "Increments that found their kernel map full and went to "
            "the map's overflow series (comm 'other').", ["program", "map"], registry=registry,
        )
        self.map_overflow_lost = Counter(
            f"{ns}_map_overflow_lost", "Increments lost in the kernel because the map and its "
            "overflow series were both full.", ["program", "map"], registry=registry,
        )
        self.decoder_errors = Counter(
            f"{ns}_decoder_errors", "Key fields or events that failed to decode.",
            ["program"], registry=registry,
        )
        self.batches = Counter(f"{ns}_batches", "Batches built.", registry=registry)
        self.batch_bytes = Histogram(
            f"{ns}_batch_bytes", "Serialized batch size.", registry=registry,
            buckets=(1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7),
        )


class BpfRunStats(Collector):
    """Per-program run count and run time, read from fdinfo at scrape time."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[CounterMetricFamily]:
        cnt = CounterMetricFamily(
            "stratoscope_edge_bpf_run_count",
            "BPF program runs (kernel.bpf_stats_enabled must be 1).", labels=["program"],
        )
        ns = CounterMetricFamily(
            "stratoscope_edge_bpf_run_seconds",
            "Time spent in the BPF program (kernel.bpf_stats_enabled must be 1).",
            labels=["program"],
        )
        for program, runs, run_ns in self._source():
            cnt.add_metric([program], runs)
            ns.add_metric([program], run_ns / 1e9)
        yield cnt
        yield ns


#: The forwarder's tallies (edge/forward.py ``GrpcForwarder.counts``): key -> (metric, help).
FORWARD_COUNTERS: dict[str, tuple[str, str]] = {
    "acked": ("batches_acked",
              "Batches a regional acknowledged as accepted (the edge then forgets them)."),
    "duplicates": ("batches_duplicate",
                   "Batches a regional already had (acknowledged as duplicates)."),
    "rejected": ("batches_rejected",
                 "Batches a regional refused as invalid (dropped; the reason is logged)."),
    "retries": ("batches_retried",
                "RETRY answers: the regional was behind and the batch is sent again later."),
    "reconnects": ("reconnects", "Streams to a regional that ended and were opened again."),
    "in_doubt_released": ("in_doubt_released",
                          "Batches in doubt at a regional (sent, never answered) released to any "
                          "regional after in_doubt_timeout: the only case a count may double."),
    "spool_replayed": ("spool_replayed_batches",
                       "Unacknowledged batches found in the spool at start (resent in order)."),
    "spool_corrupt_records": ("spool_corrupt_records",
                              "Torn or corrupt spool records found at start (the rest of their "
                              "segment is skipped)."),
    "spool_corrupt_bytes": ("spool_corrupt_bytes", "Spool bytes skipped at start as torn or corrupt."),
}
#: Gauges of the spool: key -> (metric, help).
FORWARD_GAUGES: dict[str, tuple[str, str]] = {
    "spool_batches": ("spool_batches", "Batches in the spool that no regional has acknowledged."),
    "spool_bytes": ("spool_bytes", "Bytes of the spool's unacknowledged batch records."),
    "spool_oldest_age_s": ("spool_oldest_age_seconds",
                           "Age of the oldest unacknowledged batch in the spool (0 when empty)."),
    "in_doubt": ("batches_in_doubt",
                 "Batches sent to a regional and not answered, held for that regional only."),
}
#: Labelled counters: key prefix -> (metric, help, label, values).
FORWARD_LABELLED: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "dropped": ("batches_dropped", "Unacknowledged batches dropped from the spool, oldest first: "
                "full (size limit), age (age limit), corrupt (unreadable record), unwritable "
                "(the spool write failed).", "reason", ("full", "age", "corrupt", "unwritable")),
    "errors": ("forwarder_errors", "Errors that ended a forwarder round (it backs off and goes "
               "on): tls (reading the certificate files), auth (reading the token file, or the "
               "regional refused the credentials), spool (its files), ack_timeout (a regional "
               "left batches unanswered past ack_timeout: failed over), internal.",
               "reason", ("tls", "auth", "spool", "ack_timeout", "internal")),
}


class ForwardCounters(Collector):
    """What happened to the batches sent to the regionals, and the spool's state, read
    from the forwarder's own tallies at scrape time (so there is one count, not a copy to
    keep in step).

    ``stratoscope_edge_batches_acked_total`` > 0 is the proof that this node's data
    reaches a regional: the rolling deployment waits for it before it moves on.
    """

    def __init__(self, source: Callable[[], Mapping[str, float]]) -> None:
        self._source = source

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        counts = self._source()
        for key, (name, text) in FORWARD_COUNTERS.items():
            yield CounterMetricFamily(f"stratoscope_edge_{name}", text, value=counts.get(key, 0))
        for key, (name, text) in FORWARD_GAUGES.items():
            yield GaugeMetricFamily(f"stratoscope_edge_{name}", text, value=counts.get(key, 0))
        for key, (name, text, label, values) in FORWARD_LABELLED.items():
            fam = CounterMetricFamily(f"stratoscope_edge_{name}", text, labels=[label])
            for v in values:
                fam.add_metric([v], counts.get(f"{key}.{v}", 0))
            yield fam
