"""The worker's transports: ``nats`` (the pull dispatcher over SLUICE_INFER and the
cancel subscription) and ``grpc`` (``ProviderHealthService``)."""
