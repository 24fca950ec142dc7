"""The cost-tracker's outside world: ``ledger`` (the SQLite ledger), ``events`` (cost
events published on NATS) and ``rebuild`` (the ledger made again from the usage
stream)."""
