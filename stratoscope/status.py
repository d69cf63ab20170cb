"""``stratoscope status``: a person's view of a running edge or regional, from its /metrics.

    stratoscope status                       # this machine: edge :9431 and regional :9432
    stratoscope status --edge node7:9431
    stratoscope status --regional http://r1:9432/metrics

Reads the Prometheus text both expose (prometheus_client's parser) and prints what a
person asks first: is every program attached, when did the edge last drain, did the
regional acknowledge its batches, what was dropped and why, how far behind the sinks are.
A figure the process does not export (an older version) prints as ``n/a``.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stratoscope.settings import ConfigError
from stratoscope.units import format_count, format_duration_ns

__all__ = ["Scrape", "add_parser", "edge_view", "regional_view", "scrape"]

DEFAULT_EDGE = "http://127.0.0.1:9431/metrics"
DEFAULT_REGIONAL = "http://127.0.0.1:9432/metrics"
NA = "n/a"


@dataclass
class Scrape:
    """The samples of one /metrics page: name -> [(labels, value)]."""

    url: str
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.samples

    def get(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of ``name`` matching ``labels``; None if it is not exported."""
        if name not in self.samples:
            return None
        return sum(v for lab, v in self.samples[name]
                   if all(lab.get(k) == val for k, val in labels.items()))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Samples of ``name`` summed by the label values ``keys``."""
        out: dict[tuple[str, ...], float] = {}
        for lab, v in self.samples.get(name, []):
            k = tuple(lab.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + v
        return out


def parse(url: str, text: str) -> Scrape:
    s = Scrape(url)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            s.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return s


def metrics_url(where: str) -> str:
    """``host:port``, ``http://host:port`` or a full /metrics URL, as a /metrics URL."""
    url = where if "://" in where else "http://" + where
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url += "/metrics"
    return url


def scrape(where: str, timeout_s: float = 10.0) -> Scrape:
    url = metrics_url(where)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot read {url}: {getattr(exc, 'reason', exc)}") from None
    try:
        return parse(url, text)
    except ValueError as exc:
        raise ConfigError(f"{url} is not Prometheus metrics: {exc}") from None


def _count(v: float | None) -> str:
    return NA if v is None else format_count(int(v))


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return NA
    return f"{format_duration_ns(max(0.0, now - ts) * 1e9)} ago"


def _kv_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    return t


def _drops(title: str, rows: list[tuple[str, str, float]]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("reason")
    t.add_column("where")
    t.add_column("count", justify="right")
    shown = [r for r in rows if r[2]]
    for reason, where, v in shown:
        t.add_row(reason, escape(where), format_count(int(v)))
    if not shown:
        t.add_row("none", "", "0")
    return t


def edge_view(s: Scrape, now: float | None = None) -> list[Table]:
    """Tables describing an edge from its /metrics."""
    now = time.time() if now is None else now
    if not any(n.startswith("stratoscope_edge_") for n in s.samples):
        raise ConfigError(f"{s.url} is not an edge's /metrics (no stratoscope_edge_ metrics)")
    attached = s.by("stratoscope_edge_programs_attached", "program")
    up = sorted(p for (p,), v in attached.items() if v >= 1)
    down = sorted(p for (p,), v in attached.items() if v < 1)
    drains = s.get("stratoscope_edge_drain_seconds_count")
    drain_sum = s.get("stratoscope_edge_drain_seconds_sum")
    mean = (format_duration_ns(drain_sum / drains * 1e9)
            if drains and drain_sum is not None else NA)
    summary = [
        ("programs attached", f"{len(up)} of {len(attached)}: {', '.join(up) or 'none'}"),
        ("not attached", ", ".join(down) or "none"),
        ("last drain", _ago(s.get("stratoscope_edge_last_drain_timestamp_seconds"), now)),
        ("drains", f"{_count(drains)} (mean {mean})"),
        ("batches built", _count(s.get("stratoscope_edge_batches_total"))),
        ("batches acked", _count(s.get("stratoscope_edge_batches_acked_total"))),
    ]
    if s.has("stratoscope_edge_spool_batches"):
        oldest = s.get("stratoscope_edge_spool_oldest_age_seconds")
        summary += [
            ("spool", f"{_count(s.get('stratoscope_edge_spool_batches'))} batches not yet acknowledged, "
                      f"{_count(s.get('stratoscope_edge_spool_bytes'))} bytes"
                      + (f", oldest {format_duration_ns(oldest * 1e9)}" if oldest else "")),
            ("in doubt (held for their regional)", _count(s.get("stratoscope_edge_batches_in_doubt"))),
            ("replayed from the spool at start", _count(s.get("stratoscope_edge_spool_replayed_batches_total"))),
        ]
        errors = {r: v for (r,), v in s.by("stratoscope_edge_forwarder_errors_total", "reason").items() if v}
        if errors:
            summary.append(("forwarder errors", ", ".join(f"{r} {format_count(int(v))}"
                                                          for r, v in sorted(errors.items()))))
    drops: list[tuple[str, str, float]] = []
    for (reason,), v in sorted(s.by("stratoscope_edge_batches_dropped_total", "reason").items()):
        drops.append(("batches dropped from the spool", reason, v))
    corrupt = s.get("stratoscope_edge_spool_corrupt_records_total")
    if corrupt:
        drops.append(("corrupt spool records skipped", "spool", corrupt))
    released = s.get("stratoscope_edge_in_doubt_released_total")
    if released:
        drops.append(("in-doubt batches released (may count twice)", "spool", released))
    for (program, where), v in sorted(s.by("stratoscope_edge_events_lost_total", "program", "where").items()):
        drops.append((f"events lost ({where})", program, v))
    for (program, m), v in sorted(s.by("stratoscope_edge_map_overflow_lost_total", "program", "map").items()):
        drops.append(("kernel map full", f"{program}.{m}", v))
    for (program,), v in sorted(s.by("stratoscope_edge_decoder_errors_total", "program").items()):
        drops.append(("decoder errors", program, v))
    for (program,), v in sorted(s.by("stratoscope_edge_program_attach_failures_total", "program").items()):
        drops.append(("attach failures", program, v))
    folded = [(f"{p}.{m}", v) for (p, m), v in
              sorted(s.by("stratoscope_edge_cardinality_folded_series_total", "program", "metric").items())]
    overflow = [(f"{p}.{m}", v) for (p, m), v in
                sorted(s.by("stratoscope_edge_map_overflow_total", "program", "map").items())]
    kept = [(f"series folded into 'other' ({w})", format_count(int(v))) for w, v in folded if v]
    kept += [(f"increments to overflow series ({w})", format_count(int(v))) for w, v in overflow if v]
    tables = [_kv_table(f"Edge {s.url}", summary), _drops("Dropped (lost data)", drops)]
    if kept:
        tables.append(_kv_table("Kept, in aggregate ('other' series)", kept))
    return tables


def regional_view(s: Scrape) -> list[Table]:
    """Tables describing a regional from its /metrics."""
    if not any(n.startswith("stratoscope_regional_") for n in s.samples):
        raise ConfigError(f"{s.url} is not a regional's /metrics (no stratoscope_regional_ metrics)")
    batches = {k[0]: v for k, v in s.by("stratoscope_regional_batches_total", "status").items()}
    held = s.get("stratoscope_regional_held_points")
    limit = s.get("stratoscope_regional_held_points_limit")
    lag = s.get("stratoscope_regional_window_lag_seconds")
    summary = [
        ("batches", ", ".join(f"{k} {format_count(int(v))}" for k, v in sorted(batches.items()))
         or "none yet"),
        ("points received", _count(s.get("stratoscope_regional_points_total"))),
        ("late batches", _count(s.get("stratoscope_regional_late_batches_total"))),
        ("oldest open window", NA if lag is None else f"{format_duration_ns(lag * 1e9)} past its end"),
        ("points held", NA if held is None else
         f"{format_count(int(held))} of {_count(limit)}"),
    ]
    stalls = s.by("stratoscope_regional_event_loop_longest_stall_seconds", "process")
    for (proc,), v in sorted(stalls.items()):
        summary.append((f"longest event-loop stall ({proc})", format_duration_ns(v * 1e9)))
    hangs = {p: v for (p,), v in s.by("stratoscope_regional_child_hangs_total", "process").items() if v}
    if hangs:
        summary.append(("processes hung and killed",
                        ", ".join(f"{p} {format_count(int(v))}" for p, v in sorted(hangs.items()))))
    queries = s.by("stratoscope_regional_query_requests_total", "outcome")
    if queries:
        summary.append(("read endpoint requests",
                        ", ".join(f"{o} {format_count(int(v))}" for (o,), v in sorted(queries.items()))))
    sinks = Table(title="Sinks", title_justify="left")
    for col in ("sink", "delivered", "queued (lag)", "last insert", "retried", "failed", "dead letters",
                "blocked"):
        sinks.add_column(col, justify="left" if col == "sink" else "right")
    names = sorted({lab.get("sink", "") for lab, _ in s.samples.get("stratoscope_regional_sink_delivered_blocks_total", [])})
    for name in names:
        last = s.get("stratoscope_regional_sink_last_delivery_seconds", sink=name)
        sinks.add_row(
            name,
            _count(s.get("stratoscope_regional_sink_delivered_blocks_total", sink=name)),
            _count(s.get("stratoscope_regional_sink_queued_blocks", sink=name)),
            NA if last is None else format_duration_ns(last * 1e9),
            _count(s.get("stratoscope_regional_sink_retried_total", sink=name)),
            _count(s.get("stratoscope_regional_sink_failed_blocks_total", sink=name)),
            _count(s.get("stratoscope_regional_sink_dead_letter_blocks_total", sink=name)),
            _blocked(s, name),
        )
    tables = [_kv_table(f"Regional {s.url}", summary), sinks]
    if s.has("stratoscope_regional_wal_segments"):
        tables.append(_wal_table(s))
    drops: list[tuple[str, str, float]] = []
    for (reason,), v in sorted(s.by("stratoscope_regional_rejected_batches_total", "reason").items()):
        drops.append(("batch rejected", reason, v))
    for (sink,), v in sorted(s.by("stratoscope_regional_sink_dead_letter_blocks_total", "sink").items()):
        drops.append(("dead letter (on disk, not stored)", sink, v))
    return [*tables, _drops("Dropped (lost data)", drops)]


def _blocked(s: Scrape, sink: str) -> str:
    """Why deliveries to ``sink`` fail right now, and for how long ("no" if they do not)."""
    reasons = [lab.get("reason", "") for lab, v in s.samples.get("stratoscope_regional_sink_blocked", [])
               if lab.get("sink") == sink and v]
    if not s.has("stratoscope_regional_sink_blocked"):
        return NA
    if not reasons:
        return "no"
    waited = s.get("stratoscope_regional_sink_seconds_since_delivery", sink=sink) or 0.0
    return f"{', '.join(reasons)} for {format_duration_ns(waited * 1e9)}"


def _wal_table(s: Scrape) -> Table:
    """The regional's write-ahead log: how much it holds, how old, what a start replayed."""
    w = "stratoscope_regional_wal"
    nbytes, limit = s.get(f"{w}_bytes"), s.get(f"{w}_bytes_limit")
    oldest = s.get(f"{w}_oldest_unstored_seconds")
    replayed = s.by(f"{w}_replayed_batches_total", "outcome")
    rows = [
        ("log", f"{_count(s.get(f'{w}_segments'))} segments, {_count(nbytes)} bytes of {_count(limit)}"
                " (RETRY from 90 %)"),
        ("batches not yet stored by every sink", _count(s.get(f"{w}_batches"))),
        ("oldest window not yet stored", NA if oldest is None else
         ("none" if not oldest else f"started {format_duration_ns(oldest * 1e9)} ago")),
        ("logged", f"{_count(s.get(f'{w}_written_batches_total'))} batches, "
                   f"{_count(s.get(f'{w}_fsyncs_total'))} fsyncs"),
        ("write or fsync", _in_progress(s.get(f"{w}_fsync_in_progress_seconds"),
                                        s.get(f"{w}_fsync_longest_seconds"))),
        ("replayed at start", ", ".join(f"{o} {format_count(int(v))}" for (o,), v in sorted(replayed.items()))
         or NA),
        ("corrupt records skipped at start", _count(s.get(f"{w}_corrupt_records_total"))),
    ]
    if s.get(f"{w}_failed"):
        rows.append(("FAILED", "the log cannot be written, or its disk is stuck: batches are not "
                               "acknowledged"))
    return _kv_table("Write-ahead log", rows)


def _in_progress(age: float | None, longest: float | None) -> str:
    """The log's write or fsync in progress, and the longest of the last minute or two."""
    if age is None or longest is None:
        return NA
    now = f"in progress for {format_duration_ns(age * 1e9)}" if age else "none in progress"
    return f"{now}, longest recently {format_duration_ns(longest * 1e9)}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="a readable view of a running edge or regional (its /metrics)")
    p.add_argument("--edge", metavar="URL", help=f"an edge's /metrics (default {DEFAULT_EDGE})")
    p.add_argument("--regional", metavar="URL",
                   help=f"a regional's /metrics (default {DEFAULT_REGIONAL})")
    p.set_defaults(func=run_command)


def run_command(args: Any) -> int:
    console = Console(soft_wrap=False)
    targets: list[tuple[str, str]] = []
    if args.edge:
        targets.append(("edge", args.edge))
    if args.regional:
        targets.append(("regional", args.regional))
    explicit = bool(targets)
    if not targets:
        targets = [("edge", DEFAULT_EDGE), ("regional", DEFAULT_REGIONAL)]
    shown = 0
    for kind, where in targets:
        try:
            s = scrape(where)
        except ConfigError:
            if explicit:
                raise
            console.print(f"no {kind} answers at {metrics_url(where)}")
            continue
        for table in (edge_view(s) if kind == "edge" else regional_view(s)):
            console.print(table)
        shown += 1
    if not shown:
        raise ConfigError("neither an edge nor a regional answers on this machine; "
                          "name one with --edge URL or --regional URL")
    return 0
