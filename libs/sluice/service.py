"""The lifecycle every service shares.

``ServiceRuntime`` owns, in order of start: telemetry, the NATS connection (with the
JetStream topology ensured), the gRPC port (``sluice.grpc_door``: the grpc.aio server
behind the shared edge, ``sluice.grpc_edge``, with its service token, SERVER spans, the
error catalogue and the standard health service, started with the first gRPC
connection), a Prometheus ``/metrics`` endpoint, and a NATS health responder. ``run``
waits for SIGTERM/SIGINT, then shuts down in the order that loses nothing: mark
NOT_SERVING, stop taking work, let the service finish or hand back
in-flight work, drain NATS, stop gRPC with grace, flush telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias

from nats.aio.msg import Msg

from sluice import __version__
from sluice.bus import Bus
from sluice.common.v1 import chat_pb2
from sluice.grpc_door import INNER_HOST, GrpcDoor
from sluice.logging import configure_logging
from sluice.service_token import service_token
from sluice.settings import CommonSettings, ConfigFileError
from sluice.telemetry import Telemetry, setup_telemetry
from sluice.topology import GRPC_SERVICES, ServiceName, Subjects

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1 import health

    # faststream and what it brings (uvicorn, click, anyio, unittest.mock: about 15 MiB
    # resident) load only in the services that consume durably (consumer_broker()).
    from sluice.consumers import ConsumerBroker

log = logging.getLogger(__name__)

# Adds a service's servicers to its gRPC server. Called when the server is made, with
# the first gRPC connection: a registrar imports its handlers (and grpc) there.
GrpcServer: TypeAlias = "grpc.aio.Server"
GrpcRegistrar = Callable[[GrpcServer], None]
StopHook = Callable[[], Awaitable[None]]


class ServiceRuntime:
    def __init__(
        self,
        name: ServiceName,
        common: CommonSettings,
        *,
        grpc_port: int,
        grpc_host: str | None = None,
        metrics_port: int | None,
        metrics_host: str | None = None,
    ) -> None:
        self.name = name
        self.common = common
        self.grpc_port = grpc_port
        self.grpc_host = grpc_host or common.listen_host
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host or common.listen_host
        self.started_unix_ms = int(time.time() * 1000)
        self.ready = False
        self.telemetry: Telemetry | None = None
        self.bus: Bus | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self._grpc_door: GrpcDoor | None = None
        self._grpc_token = ""
        self._registrars: list[GrpcRegistrar] = []
        self._shutting_down = False
        self._stop_hooks: list[StopHook] = []
        self._stopping = asyncio.Event()
        self._consumer_broker: ConsumerBroker | None = None

    # --- start ----------------------------------------------------------------------

    async def start(self, registrars: list[GrpcRegistrar] | None = None) -> Bus:
        configure_logging(str(self.name), self.common.log_level)
        self.common.state_dir.mkdir(parents=True, exist_ok=True)
        # First: outside a local environment a missing token fails the start here.
        self._grpc_token = service_token(self.common)
        self._registrars = list(registrars or [])
        self.telemetry = setup_telemetry(str(self.name), self.common.state_dir)
        self.bus = await Bus.connect(
            self.common.nats_url,
            f"sluice-{self.name}",
            flush_yields=self.common.nats_flush_yields,
        )
        await self.bus.ensure_topology()

        self._grpc_door = GrpcDoor(self._start_grpc_server)
        try:
            self.grpc_port = await self._grpc_door.bind(self.grpc_host, self.grpc_port)
        except OSError as exc:
            raise RuntimeError(f"cannot bind gRPC port {self.grpc_port}: {exc}") from exc

        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.metrics_port, addr=self.metrics_host)

        # Probes are not traced: they would bury the request traces.
        await self.bus.serve(
            Subjects.health(self.name), chat_pb2.ServiceStatus, self._on_health, traced=False
        )
        log.info(
            "%s started: nats=%s grpc=%s metrics=%s",
            self.name,
            self.common.nats_url,
            self.grpc_port,
            self.metrics_port,
        )
        return self.bus

    async def _start_grpc_server(self) -> int:
        """The gRPC server behind the door, made at the first connection; its loopback
        port. Its health statuses are the process's as they stand now."""
        # grpc and the servicers' modules are the bulk of the work: imported on a
        # thread, the event loop serves on meanwhile.
        await asyncio.to_thread(importlib.import_module, "grpc_health.v1.health")
        await asyncio.to_thread(importlib.import_module, "sluice.grpc_edge")
        from grpc_health.v1 import health, health_pb2_grpc

        from sluice import grpc_edge

        server = grpc_edge.server(self._grpc_token)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        for register in self._registrars:
            register(server)
        port = int(server.add_insecure_port(f"{INNER_HOST}:0"))
        if port == 0:
            raise RuntimeError("cannot bind a loopback port for the gRPC server")
        await server.start()
        self.grpc_server, self.health = server, servicer
        if self.ready:
            await self._set_serving()
        if self._shutting_down:
            await servicer.enter_graceful_shutdown()
        log.info("%s: gRPC server started for its first caller", self.name)
        return port

    async def _set_serving(self) -> None:
        if self.health is None:
            return
        from grpc_health.v1 import health_pb2

        for svc in ("", *GRPC_SERVICES[self.name]):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    async def mark_ready(self) -> None:
        self.ready = True
        await self._set_serving()

    async def _on_health(self, _req: chat_pb2.ServiceStatus, _msg: Msg) -> chat_pb2.ServiceStatus:
        return chat_pb2.ServiceStatus(
            service=str(self.name),
            instance_id=self.common.instance_id,
            version=__version__,
            ready=self.ready,
            started_unix_ms=self.started_unix_ms,
        )

    # --- durable consumers (sluice.consumers) -----------------------------------------

    def consumer_broker(self) -> ConsumerBroker:
        """The broker of this process's durable consumers, on the bus's connection. The
        runtime stops it right after intake stops and before the stop hooks, so every
        batch in hand is settled before a hook runs and before the bus closes."""
        if self.bus is None:
            raise RuntimeError("consumer_broker() before start()")
        if self._consumer_broker is None:
            from sluice.consumers import ConsumerBroker

            self._consumer_broker = ConsumerBroker(
                self.bus, graceful_timeout=self.common.shutdown_grace_seconds
            )
        return self._consumer_broker

    async def _stop_consumers(self) -> None:
        if self._consumer_broker is not None:
            try:
                await self._consumer_broker.stop()
            except Exception:
                log.exception("stopping the durable consumers failed")

    def on_stop(self, hook: StopHook) -> None:
        """Register work for shutdown, run in registration order after intake stops."""
        self._stop_hooks.append(hook)

    # --- run and stop ---------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self) -> None:
        # Everything made while starting (modules, the app, clients) lives as long as
        # the process: moved out of the collector's generations, a full collection under
        # load scans only what requests made. Measured in the gateway at 200 requests/s:
        # 14 µs of collecting per request and a 30-37 ms full collection every 20 s or
        # so without it, 6 µs and none in 20 s with it (docs/architecture.md).
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Not available off the main thread (RuntimeError: in-process tests) or on
            # loops without signal support (NotImplementedError); stop is then requested
            # by the caller instead.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("%s stopping", self.name)
        self.ready = False
        self._shutting_down = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.bus is not None:
            await self.bus.stop_serving()
        await self._stop_consumers()
        for hook in self._stop_hooks:
            try:
                await asyncio.wait_for(hook(), timeout=self.common.shutdown_grace_seconds)
            except Exception:
                log.exception("stop hook failed")
        if self.bus is not None:
            await self.bus.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        if self._grpc_door is not None:
            await self._grpc_door.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        log.info("%s stopped", self.name)


def run_service(main: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Entry point helper: run ``main`` on uvloop when available. A configuration file that
    cannot be used stops the process with its one-line reason (file, line, what is wrong)
    and exit status 2, not a stack trace."""
    try:
        _run(main)
    except ConfigFileError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None


def _run(main: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(main())
        return
    uvloop.run(main())
