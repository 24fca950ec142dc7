"""The local span files (``<state_dir>/spans/*.jsonl``) as the console reads them: one
trace's spans, and the provider calls of the last minutes. Read in a thread, only when
a console page asks: nothing of this runs on a request's path. With an OTLP endpoint set
spans leave the process and no file is written: both answers are then empty."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sluice.spanfiles import recent_spans, span_files, trace_spans

from services.gateway.domain.console import DEPLOYMENT_ATTRIBUTE


class LocalSpans:
    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir

    @property
    def local(self) -> bool:
        return not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")

    async def trace(self, trace_id: str) -> list[dict[str, Any]]:
        files = span_files(self._state_dir)
        return await asyncio.to_thread(trace_spans, files, trace_id)

    async def calls(self, since_ns: int) -> list[dict[str, Any]]:
        files = span_files(self._state_dir)
        found = await asyncio.to_thread(recent_spans, files, DEPLOYMENT_ATTRIBUTE, since_ns)
        return [s for s in found if s.get("kind") == "CLIENT"]
