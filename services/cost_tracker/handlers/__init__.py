"""The cost-tracker's transports: ``nats`` (the usage consumer, the cost-event
subscription behind the feed) and ``grpc`` (``UsageService``)."""
