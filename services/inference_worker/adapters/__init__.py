"""The worker's outside world: ``providers`` (the model servers, over HTTP) and
``sink`` (where a request's results go on NATS: stream events, usage, lifecycle, cache
stores, and the stream's history read back for a takeover)."""
