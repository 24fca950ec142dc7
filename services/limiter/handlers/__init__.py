"""The limiter's transports: ``nats`` (reserve, commit, the usage consumer) and ``grpc``
(``QuotaService``), both thin over ``domain.admission``."""
