"""The Sluice gateway: the OpenAI-compatible HTTP front door (Litestar) on the NATS data
path. ``python -m services.gateway`` runs it."""
