"""The one gRPC edge of every service: authenticated, traced, and speaking the error
catalogue.

``ServiceRuntime`` builds each process's grpc.aio server with ``server()``, whose
interceptor (``GrpcEdge``) does, for every call:

- **Credentials.** A caller must send the service token as ``authorization: Bearer
  <token>`` metadata, compared in constant time; otherwise UNAUTHENTICATED, for every
  method, existing or not, so nothing answers a stranger. The standard health service
  (``grpc.health.v1.Health``) stays open: Kubernetes' native gRPC probes send no
  metadata. The token is ``SLUICE_SERVICE_TOKEN``; unset in a local environment, it is
  generated once into ``<state_dir>/service-token`` and every process there reads it
  (an atomic create, so processes starting together agree); unset elsewhere, the start
  fails (``service_token``).
- **Spans.** The SERVER span ``<package.Service>/<Method>`` continues the trace context
  of the call's metadata, with ``rpc.system``, ``rpc.service``, ``rpc.method`` and
  ``rpc.grpc.status_code``; servicers add their attributes to the current span. Health
  checks are not traced: probes every few seconds would bury the request traces.
- **Errors.** A servicer raises ``SluiceError``; the caller gets the catalogue's gRPC
  status, a message ``<code>: <detail> (fix: <fix>)`` and the rich details of
  ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer: an ``ErrorInfo``
  (reason = the stable code, domain ``sluice.dev``, metadata with the fix, the field at
  fault and the error's details) and a ``RetryInfo`` when the error says when to retry.
  Any other exception is logged here and becomes INTERNAL with a message that names only
  the trace id: never the exception's text, which may quote a secret or a prompt.

``channel()`` is the client side for tests, tools and future callers: every call on it
carries the token and the current trace context.

mTLS is not offered: the token is the only credential, and the channel is plaintext
unless a mesh or the network encrypts it.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from sluice import telemetry
from sluice.errors import ErrorCode, SluiceError

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "sluice.dev"
# Services any caller may use: health, for probes that cannot send a token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})

_STATUS_BY_CODE: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}
# The statuses that mark a server span as failed, per the OpenTelemetry RPC conventions
# (the others are the caller's doing: a bad argument, a missing token, a quota).
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# --- errors -----------------------------------------------------------------------------


def status_code(error: SluiceError) -> grpc.StatusCode:
    """The gRPC status of an error, from the catalogue."""
    return _STATUS_BY_CODE[error.spec.rpc_code]


def status_message(error: SluiceError) -> str:
    return f"{error.code}: {error.detail} (fix: {error.spec.fix})"


def status_details(error: SluiceError, message: str) -> status_pb2.Status:
    """``google.rpc.Status`` of an error: what rich-error clients (``grpc_status``) read."""
    metadata = {str(k): str(v) for k, v in error.details.items()}
    metadata["fix"] = error.spec.fix
    if error.param:
        metadata["param"] = error.param
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=str(error.code), domain=ERROR_DOMAIN, metadata=metadata)
    )
    details = [info]
    if error.retry_after_ms:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(error.retry_after_ms)
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return status_pb2.Status(code=error.spec.rpc_code, message=message, details=details)


def error_from_status(status: status_pb2.Status) -> SluiceError | None:
    """The ``SluiceError`` of a status's rich details (a client's reading of the
    ``grpc-status-details-bin`` trailer); None when it carries no Sluice error."""
    for packed in status.details:
        info = error_details_pb2.ErrorInfo()
        if packed.Unpack(info) and info.domain == ERROR_DOMAIN:
            try:
                code = ErrorCode(info.reason)
            except ValueError:
                return None
            extra = dict(info.metadata)
            extra.pop("fix", None)
            param = extra.pop("param", None)
            return SluiceError(code, status.message, details=dict(extra), param=param)
    return None


# --- the server side --------------------------------------------------------------------


Behavior = Callable[..., Any]


@dataclass(frozen=True)
class _Call:
    """What the edge knows of one call before the servicer runs."""

    service: str
    method: str
    metadata: Sequence[tuple[str, str | bytes]]
    refusal: SluiceError | None


class GrpcEdge(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(
        self,
        token: str,
        *,
        tracer: trace.Tracer | None = None,
        open_services: Iterable[str] = OPEN_SERVICES,
    ) -> None:
        if not token:
            raise ValueError("the gRPC edge needs a service token")
        self._token = token.encode()
        self._tracer = tracer or trace.get_tracer("sluice.grpc")
        self._open = frozenset(open_services)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        service, _, method = str(handler_call_details.method).lstrip("/").partition("/")
        if service in self._open:
            return await continuation(handler_call_details)
        metadata = tuple(handler_call_details.invocation_metadata or ())
        call = _Call(service, method, metadata, self._refusal(metadata))
        handler = await continuation(handler_call_details)
        if handler is None:
            if call.refusal is None:
                return None  # UNIMPLEMENTED, for a caller entitled to know
            # An unknown method still answers a stranger UNAUTHENTICATED; the request
            # stays undecoded bytes.
            return grpc.unary_unary_rpc_method_handler(self._unary(_never_called, call))
        return self._wrap(handler, call)

    def _refusal(self, metadata: Sequence[tuple[str, str | bytes]]) -> SluiceError | None:
        """Why the caller is refused, or None for a caller with the token."""
        presented = [v for k, v in metadata if k == AUTHORIZATION and isinstance(v, str)]
        if not presented:
            return SluiceError(ErrorCode.INVALID_SERVICE_TOKEN, "No service token was sent.")
        scheme, _, token = presented[0].strip().partition(" ")
        # compare_digest takes as long for any wrong token of a given length: the time
        # an answer takes tells nothing about how much of a guess was right.
        if scheme.lower() != BEARER or not hmac.compare_digest(token.strip().encode(), self._token):
            return SluiceError(ErrorCode.INVALID_SERVICE_TOKEN, "The service token is not valid.")
        return None

    def _wrap(self, handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, call), **codec
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, call), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, call), **codec
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, call), **codec
        )

    def _span(self, call: _Call) -> Span:
        carrier = {k: v for k, v in call.metadata if isinstance(v, str)}
        return self._tracer.start_span(
            f"{call.service}/{call.method}",
            context=telemetry.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": call.service,
                "rpc.method": call.method,
            },
            # The edge decides the span's status from the gRPC status it answers.
            record_exception=False,
            set_status_on_exception=False,
        )

    def _unary(self, behavior: Behavior, call: _Call) -> Behavior:
        """A behavior answering once (unary responses, or a servicer that writes its
        stream with ``context.write``) inside the edge."""

        async def edge(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._span(call)
            try:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    if call.refusal is not None:
                        raise call.refusal
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                _ended(span, context)
                return result
            except BaseException as exc:
                await self._fail(call, span, context, exc)
                raise
            finally:
                span.end()

        return edge

    def _streaming(self, behavior: Behavior, call: _Call) -> Behavior:
        if not inspect.isasyncgenfunction(behavior):
            return self._unary(behavior, call)

        async def edge(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # The span is current only while the servicer's generator runs, never across
            # a yield: the stream spans many event loop turns, and a context attached
            # across them could be left behind when the generator is closed elsewhere.
            span = self._span(call)
            active = trace.set_span_in_context(span)
            try:
                if call.refusal is not None:
                    raise call.refusal
                responses = behavior(request, context)
                try:
                    while True:
                        attached = otel_context.attach(active)
                        try:
                            item = await anext(responses)
                        except StopAsyncIteration:
                            break
                        finally:
                            otel_context.detach(attached)
                        yield item
                finally:
                    attached = otel_context.attach(active)
                    try:
                        await responses.aclose()
                    finally:
                        otel_context.detach(attached)
                _ended(span, context)
            except BaseException as exc:
                await self._fail(call, span, context, exc)
                raise
            finally:
                span.end()

        return edge

    async def _fail(
        self, call: _Call, span: Span, context: grpc.aio.ServicerContext, exc: BaseException
    ) -> None:
        """Answer a failed call with its status: abort (which raises ``AbortError``) for
        a ``SluiceError`` or an unexpected exception; record a servicer's own abort or a
        cancellation and let it propagate."""
        if isinstance(exc, grpc.aio.AbortError):
            _ended(span, context)
            return
        if not isinstance(exc, Exception):
            # The call was cancelled (the client went away, the server stops).
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            return
        error = exc if isinstance(exc, SluiceError) else None
        if error is None:
            trace_id = f"{span.get_span_context().trace_id:032x}"
            log.error("%s/%s failed (trace %s)", call.service, call.method, trace_id, exc_info=exc)
            error = SluiceError(
                ErrorCode.INTERNAL_ERROR,
                f"The call failed inside the service; trace id {trace_id}.",
                details={"trace_id": trace_id},
            )
        code = status_code(error)
        message = status_message(error)
        _record(span, code, str(error.code))
        await context.abort(
            code,
            message,
            trailing_metadata=(
                (STATUS_DETAILS_KEY, status_details(error, message).SerializeToString()),
            ),
        )


async def _never_called(request: bytes, context: grpc.aio.ServicerContext) -> None:
    """The behavior behind an unknown method: the edge refuses the call first."""
    raise AssertionError("an unknown method is only ever refused")


def _ended(span: Span, context: grpc.aio.ServicerContext) -> None:
    code = context.code() if hasattr(context, "code") else None
    _record(span, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK, None)


def _record(span: Span, code: grpc.StatusCode, error_code: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if error_code is not None:
        span.set_attribute("sluice.error.code", error_code)
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))


def server(token: str, *, tracer: trace.Tracer | None = None) -> grpc.aio.Server:
    """A grpc.aio server behind the edge (``ServiceRuntime`` makes every service's)."""
    return grpc.aio.server(interceptors=[GrpcEdge(token, tracer=tracer)])


# --- the client side --------------------------------------------------------------------


class _CallerMetadata:
    """Adds the token and the current trace context to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._authorization = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
        metadata = grpc.aio.Metadata(
            *(details.metadata or ()), self._authorization, *carrier.items()
        )
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_CallerMetadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_CallerMetadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_CallerMetadata, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_CallerMetadata, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def channel(
    target: str, token: str, *, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel to a Sluice service (``host:port``) whose every call carries the
    service token and the caller's current trace context."""
    interceptors = [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
