"""Request coalescing: identical requests of one team in flight together share one
upstream call, across gateway replicas.

Identical means the same exact-cache key (model, messages, sampling, tools, response
format, pass-through fields, and the team: ``sluice.canonical``), the same dialect and
the same delivery (streamed or not: a streamed leader's ``Final`` carries no choices,
and a plain leader's stream no deltas). Only requests the exact cache takes coalesce
(reproducible answers: temperature 0 or a seed, by default), and only when they may
read the cache (``Cache-Control: no-cache`` asks for a fresh answer).

The first request to create the key in the ``sluice_coalesce`` bucket leads: it runs as
any request does, and deletes its key once its answer is in. The others follow its
stream (``ChatService._follow``): what ``SLUICE_STREAMS`` already holds, then the live
tail, rendered in their own response (streamed if they asked). The provider is billed
once, by the leader's usage event; each follower publishes a usage event marked
``cache_hit`` with the leader's cost as its saving, as a cache hit does. A follower
whose leader never opened its stream (its gateway died), or was cancelled by its
client, runs on its own.
"""

from __future__ import annotations


def coalesce_key(cache_key: str, dialect: str, stream: bool) -> str:
    """The ``sluice_coalesce`` key of a request (KV key characters only)."""
    return f"{cache_key}.{dialect}.{'s' if stream else 'p'}"
