"""Sluice shared code: contracts (generated, under ``sluice.<area>.v1``) and the small
runtime every service shares (bus, telemetry, settings, errors, service lifecycle)."""

import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"


class _DeferredImports:
    """A finder on ``sys.meta_path``: the first ``import`` of one of ``names`` gives a
    module that loads on first use of an attribute (``importlib.util.LazyLoader``); a
    later ``import`` statement, as any use, loads it in full."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


# nats-py imports aiohttp (with yarl, multidict's helpers and attrs: about 10 MiB
# resident per process) for its WebSocket transport alone; Sluice connects over TCP.
# Deferred, aiohttp loads where it is used (the gateway and the worker call HTTP with
# it) and nowhere else (limiter, cache, cost-tracker).
if not any(isinstance(finder, _DeferredImports) for finder in sys.meta_path):
    sys.meta_path.insert(0, _DeferredImports(frozenset({"aiohttp"})))
