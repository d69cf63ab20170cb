"""Kafka sink: one protobuf ``stratoscope.v1.Batch`` per block and kind, on three topics.

The protobuf is this sink's own encoding of a block: ``block_batch()`` builds it from
the rows of the block's part of its merged frame, with a string table of just the
strings the block uses. Each block's batch is split by kind onto ``<prefix>.metrics`` (counters, gauges and
histograms), ``<prefix>.profiles`` and ``<prefix>.events``; a kind with no data is not
sent. Every message carries the block's identity fields (node_id, boot_id, seq, window,
node labels, producer) and the *whole* string table, so it decodes on its own and stays
correct when a later schema version adds a string-index field.

Record layout:

- key: the node_id as UTF-8, or ``b"*"`` (``ROLLUP_KEY``) for a roll-up block
  (node_id ""): one node's blocks stay ordered in one partition.
- value: the serialized ``stratoscope.v1.Batch``.
- headers: ``schema`` = ``b"stratoscope.v1.Batch"``, ``block_id``, ``resolution_s``
  (decimal ASCII) and ``kind`` (``metrics`` / ``profiles`` / ``events``).

Delivery guarantees. The producer is idempotent (``enable_idempotence=True``,
``acks="all"``): the broker discards the producer's own internal retries, so while one
producer lives a record is written once. ``deliver()`` sends every record and then
awaits every delivery future; it returns only when all were acknowledged. A block that
is delivered again -- after a timeout or a partial failure, when the regional retries
it, or after a restart -- is a new record as far as Kafka knows. Consumers therefore
de-duplicate on ``(kind, block_id)`` (the same block_id appears once per kind topic):
``decode_message()`` returns the block_id with the batch for that purpose.

Errors are mapped for the delivery wrapper: timeouts, connection errors, leader changes
and every aiokafka error marked ``retriable`` raise ``RetriableError``; anything else
Kafka rejects (record too large, topic authorization, ...) raises ``PermanentError``
naming the block, topic and reason. When a batch has both kinds of failure the
permanent one wins, since a retry would fail again on the same record.

Compression: aiokafka's zstd, lz4 and snappy codecs need the ``cramjam`` package; with
``compression="auto"`` the sink uses zstd when it is available and gzip (always
available) otherwise. ``compression_type()`` tells which one was chosen.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.codec import has_lz4, has_snappy, has_zstd
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)

from stratoscope import __version__
from stratoscope.redact import redact
from stratoscope.regional.frame import Block, Col
from stratoscope.regional.sinks.base import BlockedError, PermanentError, RetriableError, SinkError
from stratoscope.regional.sinks.deadletter import write_dead_letter
from stratoscope.v1 import batch_pb2 as pb

__all__ = [
    "KIND_EVENTS",
    "KIND_METRICS",
    "KIND_PROFILES",
    "KINDS",
    "ROLLUP_KEY",
    "SCHEMA",
    "KafkaSink",
    "block_batch",
    "compression_type",
    "decode_message",
    "split_batch",
]

log = logging.getLogger(__name__)

SCHEMA = b"stratoscope.v1.Batch"
KIND_METRICS = "metrics"
KIND_PROFILES = "profiles"
KIND_EVENTS = "events"
KINDS = (KIND_METRICS, KIND_PROFILES, KIND_EVENTS)
#: Record key of a roll-up block (node_id ""): never a valid host name.
ROLLUP_KEY = b"*"

# Fields of pb.Batch that hold a kind's data; every other field is identity and is
# copied to each kind's message.
_KIND_FIELDS = ("metrics", "histograms", "profiles", "events")

# The sender task of an aiokafka producer dies on these; the producer is unusable
# afterwards and has to be replaced.
_PRODUCER_BROKEN = (ProducerClosed, ProducerFenced, OutOfOrderSequenceNumber)

_CODECS = {"zstd": has_zstd, "lz4": has_lz4, "snappy": has_snappy, "gzip": lambda: True}


def compression_type(requested: str | None = "auto") -> str | None:
    """The codec to give aiokafka: ``auto`` is zstd when available, else gzip."""
    if requested is None or requested == "none":
        return None
    if requested == "auto":
        return "zstd" if has_zstd() else "gzip"
    check = _CODECS.get(requested)
    if check is None:
        raise ValueError(
            f"unknown Kafka compression {requested!r}: expected one of auto, none, "
            + ", ".join(_CODECS)
        )
    if not check():
        raise ValueError(
            f"Kafka compression {requested!r} needs the 'cramjam' package, which is not "
            "installed (use 'auto' or 'gzip')"
        )
    return requested


# --- the encoder: a block as one protobuf Batch ---------------------------------------

def block_batch(block: Block) -> pb.Batch:
    """The block's rows as one stratoscope.v1.Batch with its own compact string table.

    Built from the frame's columns on demand (once per delivery of the block; nothing
    is kept), so a queued block holds no per-node copy of its rows.
    """
    frame, part = block.frame, block.part
    p = frame.parts[part]
    m = frame.metrics.take(frame.rows_of("metrics", [part]))
    h = frame.histograms.take(frame.rows_of("histograms", [part]))
    pr = frame.profiles.take(frame.rows_of("profiles", [part]))
    ev = frame.events.take(frame.rows_of("events", [part]))
    stacks_used = np.unique(np.concatenate([pr["kstack"], pr["ustack"]]))
    stacks_used = stacks_used[stacks_used >= 0]
    st = frame.stacks.take(stacks_used)
    fams = np.unique(np.concatenate([m["fam"], h["fam"]]))
    fam_ids = [frame.families[f] for f in fams.tolist()]
    fixed = [0, p.node, *(x for kv in p.labels for x in kv)]
    for f in fam_ids:
        fixed += [f.name, f.unit, f.help, *f.label_keys]
    used = np.unique(np.concatenate([
        np.asarray(fixed, dtype=np.int64),
        m.values("labels", "values"), h.values("labels", "values"),
        pr["name"], pr["comm"], pr["cgroup"], st.values("frames", "values"),
        ev["kind"], ev["comm"], ev["cgroup"], ev["detail"],
    ]).astype(np.int64))
    remap = np.zeros(max(len(frame.strings), 1), dtype=np.int64)
    remap[used] = np.arange(len(used))

    def local(ids: Col | list[int]) -> list[int]:
        return remap[np.asarray(ids, dtype=np.int64)].tolist()  # type: ignore[no-any-return]

    strings = frame.strings
    out = pb.Batch(node_id=strings[p.node], start_ns=frame.start_ns, end_ns=frame.end_ns,
                   producer=f"stratoscope-regional/{__version__}")
    out.strings.extend([strings[i] for i in used.tolist()])
    if p.labels:
        out.node_label_keys.extend(local([k for k, _ in p.labels]))
        out.node_label_values.extend(local([v for _, v in p.labels]))
    for fam, lo, hi in _runs(m["fam"]):
        f = frame.families[fam]
        name, unit, help_ = local([f.name, f.unit, f.help])
        mb = out.metrics.add(name=name, kind=f.kind, unit=unit, help=help_)
        mb.label_keys.extend(local(list(f.label_keys)))
        off = m.offsets("labels")
        mb.label_values.extend(local(m.values("labels", "values")[off[lo]:off[hi]]))
        if f.kind == pb.GAUGE:
            mb.gauge_values.extend(m["gauge"][lo:hi].tolist())
        else:
            mb.counter_values.extend(m["value"][lo:hi].tolist())
    for fam, lo, hi in _runs(h["fam"]):
        f = frame.families[fam]
        name, unit, help_ = local([f.name, f.unit, f.help])
        hb = out.histograms.add(name=name, unit=unit, help=help_, scale=0)
        hb.label_keys.extend(local(list(f.label_keys)))
        off = h.offsets("labels")
        hb.label_values.extend(local(h.values("labels", "values")[off[lo]:off[hi]]))
        hb.count.extend(h["count"][lo:hi].tolist())
        hb.sum.extend(h["sum"][lo:hi].tolist())
        hb.zero_count.extend(h["zero"][lo:hi].tolist())
        boff = h.offsets("buckets")
        hb.bucket_offsets.extend((boff[lo:hi + 1] - boff[lo]).tolist())
        hb.bucket_index.extend(h.values("buckets", "index")[boff[lo]:boff[hi]].tolist())
        hb.bucket_count.extend(h.values("buckets", "count")[boff[lo]:boff[hi]].tolist())
    if len(pr):
        stack_local = np.full(len(frame.stacks) + 1, -1, dtype=np.int64)  # index -1 -> -1
        stack_local[stacks_used] = np.arange(len(stacks_used))
        key = np.stack([pr["name"].astype(np.uint64), pr["period"]])
        change = np.ones(len(pr), dtype=bool)
        change[1:] = np.any(key[:, 1:] != key[:, :-1], axis=0)
        starts = np.flatnonzero(change).tolist() + [len(pr)]
        frames_off = st.offsets("frames")
        frames = local(st.values("frames", "values"))
        for lo, hi in zip(starts, starts[1:], strict=False):
            pb_ = out.profiles.add(name=local([pr["name"][lo]])[0], period_ns=int(pr["period"][lo]))
            pb_.stack_offsets.extend(frames_off.tolist())
            pb_.stack_frames.extend(frames)
            pb_.pid.extend(pr["pid"][lo:hi].tolist())
            pb_.comm.extend(local(pr["comm"][lo:hi]))
            pb_.cgroup.extend(local(pr["cgroup"][lo:hi]))
            pb_.kernel_stack.extend(stack_local[pr["kstack"][lo:hi]].tolist())
            pb_.user_stack.extend(stack_local[pr["ustack"][lo:hi]].tolist())
            pb_.samples.extend(pr["samples"][lo:hi].tolist())
    if len(ev) or p.events_lost:
        e = out.events
        e.time_ns.extend(ev["time"].tolist())
        e.kind.extend(local(ev["kind"]))
        e.pid.extend(ev["pid"].tolist())
        e.ppid.extend(ev["ppid"].tolist())
        e.comm.extend(local(ev["comm"]))
        e.cgroup.extend(local(ev["cgroup"]))
        e.detail.extend(local(ev["detail"]))
        e.code.extend(ev["code"].tolist())
        e.lost = p.events_lost
    return out


def _runs(col: Col) -> Iterable[tuple[int, int, int]]:
    """(value, lo, hi) for every run of equal values of a column."""
    n = len(col)
    if n == 0:
        return []
    change = np.flatnonzero(col[1:] != col[:-1]) + 1
    starts = [0, *change.tolist()]
    ends = [*change.tolist(), n]
    vals = col[starts].tolist()
    return zip(vals, starts, ends, strict=True)


def split_batch(batch: pb.Batch) -> list[tuple[str, pb.Batch]]:
    """One Batch per non-empty kind, each with the identity fields and string table."""
    identity = pb.Batch()
    identity.CopyFrom(batch)
    for f in _KIND_FIELDS:
        identity.ClearField(f)

    out: list[tuple[str, pb.Batch]] = []
    if batch.metrics or batch.histograms:
        m = pb.Batch()
        m.CopyFrom(identity)
        m.metrics.extend(batch.metrics)
        m.histograms.extend(batch.histograms)
        out.append((KIND_METRICS, m))
    if batch.profiles:
        p = pb.Batch()
        p.CopyFrom(identity)
        p.profiles.extend(batch.profiles)
        out.append((KIND_PROFILES, p))
    if batch.HasField("events") and (batch.events.time_ns or batch.events.lost):
        e = pb.Batch()
        e.CopyFrom(identity)
        e.events.CopyFrom(batch.events)
        out.append((KIND_EVENTS, e))
    return out


def decode_message(
    value: bytes, headers: Iterable[tuple[str, bytes]] | None
) -> tuple[str, pb.Batch]:
    """``(block_id, batch)`` of a record written by KafkaSink.

    ``headers`` are the record's headers as aiokafka gives them (``(name, bytes)``
    pairs). De-duplicate on ``(kind header or topic, block_id)``: a block delivered
    again carries the same block_id. Raises ValueError for a record of another schema.
    """
    h = dict(headers or ())
    schema = h.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"record schema is {schema!r}, expected {SCHEMA!r}")
    raw_id = h.get("block_id")
    if not raw_id:
        raise ValueError("record has no block_id header")
    batch = pb.Batch()
    batch.ParseFromString(value)
    return raw_id.decode(), batch


@dataclass(frozen=True)
class _Record:
    block_id: str
    kind: str
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def _describe(exc: BaseException) -> str:
    """``Type: message``; aiokafka's errors already start with their type's name. Every
    error text of this sink is built from this, and masked here: a library's message is
    not ours to write (stratoscope.redact)."""
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return redact(text if text.startswith(name) else f"{name}: {text}")


#: Errors a person must fix (credentials, ACLs, a topic that is not there): retried
#: forever with ``stratoscope_regional_sink_blocked{reason}`` set.
_BLOCKED: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((AuthenticationFailedError, SaslAuthenticationFailed, TopicAuthorizationFailedError,
      ClusterAuthorizationFailedError, TransactionalIdAuthorizationFailed), "auth"),
    ((UnknownTopicOrPartitionError,), "missing"),
)


def _classify(exc: BaseException) -> SinkError:
    reason = _describe(exc)
    if isinstance(exc, SinkError):
        return exc
    for classes, why in _BLOCKED:
        if isinstance(exc, classes):
            return BlockedError(reason, why)
    if isinstance(
        exc,
        KafkaTimeoutError | KafkaConnectionError | NotLeaderForPartitionError | TimeoutError,
    ) or getattr(exc, "retriable", False):
        return RetriableError(reason)
    if isinstance(exc, _PRODUCER_BROKEN):
        return RetriableError(f"producer reset after {reason}")
    return PermanentError(reason)


class KafkaSink:
    """Sink that writes blocks to Kafka; see the module docstring for the layout.

    What it delivered is counted by the delivery queue that drives it (per block).
    """

    name = "kafka"

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str = "stratoscope",
        client_id: str = "stratoscope-regional",
        request_timeout_s: float = 30,
        *,
        compression: str | None = "auto",
        linger_s: float = 0.01,
        max_batch_bytes: int = 256 * 1024,
        max_request_bytes: int = 1024 * 1024,
        security_protocol: str = "PLAINTEXT",
        ssl_context: ssl.SSLContext | None = None,
        sasl_mechanism: str = "PLAIN",
        sasl_plain_username: str | None = None,
        sasl_plain_password: str | None = None,
        dead_letter_dir: Path | str | None = None,
    ) -> None:
        if not bootstrap.strip():
            raise ValueError("Kafka bootstrap is empty: expected host:port[,host:port...]")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.client_id = client_id
        self.request_timeout_s = float(request_timeout_s)
        self.compression = compression_type(compression)
        self.topics = {kind: f"{topic_prefix}.{kind}" for kind in KINDS}
        self._linger_ms = int(linger_s * 1000)
        self._max_batch_bytes = max_batch_bytes
        self._max_request_bytes = max_request_bytes
        self._security: dict[str, Any] = {
            "security_protocol": security_protocol,
            "ssl_context": ssl_context,
            "sasl_mechanism": sasl_mechanism,
            "sasl_plain_username": sasl_plain_username,
            "sasl_plain_password": sasl_plain_password,
        }
        self._producer: AIOKafkaProducer | None = None
        # Producers whose sender task died; closed by the next start() or stop().
        self._retired: list[AIOKafkaProducer] = []
        self._start_lock: asyncio.Lock | None = None
        #: Where blocks Kafka refuses for good go (None: deliver raises PermanentError).
        self.dead_letter_dir = None if dead_letter_dir is None else Path(dead_letter_dir)
        self._dead: dict[str, None] = {}

    # --- lifecycle ---------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Connect the producer. Idempotent. Raises RetriableError if Kafka is unreachable."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            await self._close_retired()
            if self._producer is not None:
                return
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                compression_type=self.compression,
                linger_ms=self._linger_ms,
                max_batch_size=self._max_batch_bytes,
                max_request_size=self._max_request_bytes,
                request_timeout_ms=int(self.request_timeout_s * 1000),
                **self._security,
            )
            try:
                await asyncio.wait_for(producer.start(), self.request_timeout_s)
            except BaseException as exc:
                await self._close(producer)
                if isinstance(exc, Exception):
                    raise self._start_error(exc) from exc
                raise
            self._producer = producer
            log.info(
                "kafka sink connected to %s (topics %s, compression %s)",
                self.bootstrap, ", ".join(self.topics.values()), self.compression or "none",
            )

    async def stop(self) -> None:
        """Flush pending records and disconnect. Idempotent; safe without start()."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._close(producer)
        await self._close_retired()

    async def __aenter__(self) -> KafkaSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _start_error(self, exc: Exception) -> SinkError:
        err = _classify(exc)
        return type(err)(f"cannot connect to Kafka at {self.bootstrap}: {err}")

    async def _close_retired(self) -> None:
        while self._retired:
            await self._close(self._retired.pop())

    @staticmethod
    async def _close(producer: AIOKafkaProducer) -> None:
        try:
            await producer.stop()
        except Exception as exc:  # a dead sender task re-raises its error here
            log.warning("kafka producer did not stop cleanly: %s", _describe(exc))

    # --- health ------------------------------------------------------------------

    async def health_check(self) -> None:
        """Fetch cluster metadata; raise SinkError naming the reason if it fails.

        ``RetriableError`` when the cluster does not answer or lists no brokers (it may
        come back), ``PermanentError`` when it refuses this sink's topics; the same
        classes ``deliver()`` raises for the same causes.
        """
        where = f"kafka at {self.bootstrap}"
        try:
            if self._producer is not None:
                md = await asyncio.wait_for(
                    self._producer.client.fetch_all_metadata(), self.request_timeout_s
                )
            else:
                md = await asyncio.wait_for(self._probe_metadata(), self.request_timeout_s)
        except TimeoutError:
            raise RetriableError(
                f"{where}: no cluster metadata within {self.request_timeout_s:g}s"
            ) from None
        except KafkaError as exc:
            raise type(_classify(exc))(f"{where}: {_describe(exc)}") from exc
        except OSError as exc:
            raise RetriableError(redact(f"{where}: {exc}")) from exc
        if not md.brokers():
            raise RetriableError(f"{where}: cluster metadata lists no brokers")
        denied = sorted(set(self.topics.values()) & set(md.unauthorized_topics))
        if denied:
            raise BlockedError(f"{where}: not authorized for {', '.join(denied)}", "auth")
        missing = sorted(set(self.topics.values()) - set(md.topics()))
        if missing:
            log.info(
                "kafka topics %s do not exist yet (created on first write if the broker "
                "auto-creates topics)", ", ".join(missing),
            )

    async def _probe_metadata(self) -> Any:
        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.client_id}-health",
            request_timeout_ms=int(self.request_timeout_s * 1000),
            **self._security,
        )
        try:
            await client.bootstrap()
            return await client.fetch_all_metadata()
        finally:
            await client.close()

    # --- delivery ----------------------------------------------------------------

    def records(self, blocks: Sequence[Block]) -> list[_Record]:
        """The records ``deliver`` would send for ``blocks`` (pure; used by tests too)."""
        out: list[_Record] = []
        for block in blocks:
            batch = block_batch(block)  # built from the merged frame on demand: once per block
            key = batch.node_id.encode() if batch.node_id else ROLLUP_KEY
            for kind, part in split_batch(batch):
                out.append(_Record(
                    block_id=block.block_id,
                    kind=kind,
                    topic=self.topics[kind],
                    key=key,
                    value=part.SerializeToString(),
                    headers=[
                        ("schema", SCHEMA),
                        ("block_id", block.block_id.encode()),
                        ("resolution_s", str(block.resolution_s).encode()),
                        ("kind", kind.encode()),
                    ],
                ))
        return out

    async def deliver(self, blocks: list[Block]) -> list[str]:
        """Send every record, then await every acknowledgement; returns the ids of the
        blocks written to the dead-letter directory (a record Kafka refuses for good,
        e.g. too large: the block's other records are kept, consumers de-duplicate).

        Starts the producer if needed. Raises RetriableError (BlockedError) or, without a
        dead-letter directory, PermanentError; the records that were acknowledged stay
        written (consumers de-duplicate).
        """
        todo = [b for b in blocks if b.block_id not in self._dead]
        # Building and serializing per-node messages is CPU work: off the event loop.
        records = await asyncio.to_thread(self.records, todo)
        if records:
            await self._send(records, {b.block_id: b for b in todo})
        return [b.block_id for b in blocks if b.block_id in self._dead]

    async def _send(self, records: list[_Record], by_id: dict[str, Block]) -> None:
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None

        pending: list[tuple[_Record, asyncio.Future[Any]]] = []
        errors: list[tuple[_Record, BaseException]] = []
        unsent = 0
        for i, rec in enumerate(records):
            try:
                fut = await producer.send(
                    rec.topic, value=rec.value, key=rec.key, headers=rec.headers
                )
            except MessageSizeTooLargeError as exc:  # this record only
                errors.append((rec, exc))
                continue
            except KafkaError as exc:  # timeout, metadata, broken producer: stop here
                errors.append((rec, exc))
                unsent = len(records) - i - 1
                break
            # If this call is cancelled (the caller's timeout) the producer still
            # completes the future; the callback keeps its error from being reported as
            # "never retrieved". Otherwise every future is awaited below.
            fut.add_done_callback(_retrieve)
            pending.append((rec, fut))
        if pending:
            # asyncio.wait neither raises nor cancels the futures it waits on.
            await asyncio.wait([f for _, f in pending])

        for rec, fut in pending:
            failure = fut.exception()
            if failure is not None:
                errors.append((rec, failure))
        if not errors:
            return
        if self.dead_letter_dir is not None:
            refused: dict[str, str] = {}
            for rec, failure in errors:
                err = _classify(failure)
                if isinstance(err, PermanentError):
                    refused.setdefault(rec.block_id, f"{rec.kind} record to {rec.topic}: {err}")
            for block_id, why in refused.items():
                try:
                    await asyncio.to_thread(write_dead_letter, self.dead_letter_dir, self.name,
                                            by_id[block_id], f"refused by Kafka: {why}")
                except OSError as oserr:
                    raise RetriableError(f"writing dead letter {block_id}: {oserr}") from oserr
                self._dead[block_id] = None
            errors = [(r, e) for r, e in errors if r.block_id not in refused]
            if not errors and not unsent:
                return
        raise self._delivery_error(records, errors, unsent)

    def _delivery_error(
        self, records: list[_Record], errors: list[tuple[_Record, BaseException]], unsent: int
    ) -> SinkError:
        classified = [(rec, _classify(exc)) for rec, exc in errors]
        if any(isinstance(exc, _PRODUCER_BROKEN) for _, exc in errors):
            # Its sender task is gone: the next deliver() starts a new producer.
            broken, self._producer = self._producer, None
            if broken is not None:
                self._retired.append(broken)
        permanent = [(r, e) for r, e in classified if isinstance(e, PermanentError)]
        blocked = [(r, e) for r, e in classified if isinstance(e, BlockedError)]
        chosen = permanent or blocked or classified
        first_rec, first_err = chosen[0]
        summary = (
            f"kafka: {len(errors) + unsent} of {len(records)} record(s) not delivered; "
            f"first: block {first_rec.block_id} ({first_rec.kind}) to {first_rec.topic}: "
            f"{first_err}"
        )
        if permanent:
            bad = sorted({f"{r.block_id}/{r.kind}" for r, _ in permanent})
            return PermanentError(f"{summary}; rejected: {', '.join(bad)}")
        if blocked:
            return BlockedError(summary, blocked[0][1].reason)  # type: ignore[attr-defined]
        return RetriableError(summary)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Mark the exception as retrieved so a future abandoned by a cancelled
    # deliver() does not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()
