"""The cost-tracker: prices usage events, records them in the SQLite ledger, publishes
cost events and serves ``sluice.cost.v1.UsageService`` (usage queries, a live feed)."""
