"""The worker's logic, free of transports: ``engine`` (one work item from pickup to its
last event: model chain, retries, fallbacks, deltas, usage), ``upstream`` (what a
provider is asked and answers), ``circuit`` (per-provider breakers), ``resume`` (taking
over a half-streamed request, cancels) and ``scheduling`` (which priority class a free
slot asks next)."""
