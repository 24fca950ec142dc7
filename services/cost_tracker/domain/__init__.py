"""The cost-tracker's logic, free of transports: ``usage`` (pricing into ledger entries,
money in nano-dollars, query shapes), ``recording`` (a batch of usage into the ledger,
then a cost event per new row) and ``feed`` (fan-out of cost events to watchers)."""
