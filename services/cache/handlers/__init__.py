"""The cache's transports: ``nats`` (lookup and store) and ``grpc``
(``CacheAdminService``), both thin over ``domain.Cache``."""
