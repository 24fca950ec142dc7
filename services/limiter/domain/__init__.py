"""The limiter's logic, free of transports: ``windows`` (the sliding-window algorithm and
its state), ``admission`` (reserve, commit and usage as the contracts state them, with
the counters behind the metrics) and ``snapshots`` (keeping that state across restarts
through a ``SnapshotStore``)."""
