"""One process of a floor pipeline (bench/floor.py), by role:

- ``proxy``: HTTP in, the upstream called with aiohttp, its answer out (one process).
- ``gateway --mode core``: HTTP in, a core NATS request to a worker, the reply out.
- ``gateway --mode js``: HTTP in; subscribes to the request's stream subject, publishes
  the work to the JetStream work queue (acked, ``Nats-Msg-Id`` = request id), answers
  with the first message on the subscription.
- ``worker --mode core``: serves the core requests (queue group), calls the upstream.
- ``worker --mode js``: keeps one batch pull open on the work queue's durable, calls the
  upstream per message, publishes the answer as a core publish on the request's stream
  subject (captured by a file-stored stream), publishes a ``UsageEvent`` to the usage
  stream (acked, deduplicated by request id), then acks the work.
- ``usage --durable NAME``: every quarter of a second (as the limiter and the
  cost-tracker gather them), fetches what the usage stream holds for its durable in
  batches of 64, decodes and acks each event.

Every HTTP edge checks a bearer key by the SHA-256 of its secret, as the gateway does.
A process prints ``ready`` on stdout when it serves; the bench stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2

WORK_SUBJECT = "floor.work"
INFER_SUBJECT = "floor.infer.interactive"
INFER_STREAM = "FLOOR_INFER"
WORKER_DURABLE = "worker"
STREAMS_STREAM = "FLOOR_STREAMS"
USAGE_STREAM = "FLOOR_USAGE"
KEY_ID = "key_floor"
PULL_BATCH = 64
PULL_EXPIRES_NS = 5 * 10**9
USAGE_BATCH = 64
USAGE_WINDOW_S = 0.25
ANSWER_TIMEOUT_S = 60.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[bytes], Awaitable[tuple[int, bytes]]]

JSON_HEADERS = [(b"content-type", b"application/json")]


def stream_subject(request_id: str) -> str:
    return f"floor.stream.{request_id}"


def usage_subject(key_id: str) -> str:
    return f"floor.usage.{key_id}"


def asgi_app(key_sha256: str, handle: Handler) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI app: the bearer key checked, the body read whole, ``handle`` answers."""
    wanted = bytes.fromhex(key_sha256)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        authorized = False
        for name, value in scope["headers"]:
            if name == b"authorization" and value.startswith(b"Bearer "):
                authorized = hashlib.sha256(value[7:]).digest() == wanted
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if not authorized:
            status, body = 401, b'{"error":"unauthorized"}'
        else:
            status, body = await handle(b"".join(chunks))
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve_http(app: Any, port: int) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(
        app,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGINL,
        websockets=False,
        log_access=False,
        backlog=2048,
    )
    task = asyncio.create_task(server.serve())
    await wait_listening(port, task)
    ready()
    await task


async def wait_listening(port: int, task: asyncio.Task[Any]) -> None:
    for _ in range(500):
        if task.done():
            task.result()
            raise RuntimeError("HTTP server exited during start")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise TimeoutError(f"not listening on {port}")


def ready() -> None:
    print("ready", flush=True)


def upstream_session() -> aiohttp.ClientSession:
    # One pooled, kept-alive session per upstream, as the worker holds per provider.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S),
    )


async def call_upstream(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        return 502, b'{"error":"upstream"}'


async def connect(url: str, name: str) -> NatsClient:
    return await nats.connect(url, name=f"floor-{name}", max_reconnect_attempts=-1)


# --- roles ----------------------------------------------------------------------------


async def proxy(args: argparse.Namespace) -> None:
    async with upstream_session() as session:

        async def handle(body: bytes) -> tuple[int, bytes]:
            return await call_upstream(session, args.upstream, body)

        await serve_http(asgi_app(args.key_sha256, handle), args.port)


async def gateway(args: argparse.Namespace) -> None:
    nc = await connect(args.nats, "gateway")
    js = nc.jetstream()

    async def core(body: bytes) -> tuple[int, bytes]:
        try:
            reply = await nc.request(WORK_SUBJECT, body, timeout=ANSWER_TIMEOUT_S)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return 503, b'{"error":"no worker"}'
        return (200, reply.data) if reply.data else (502, b'{"error":"upstream"}')

    async def durable(body: bytes) -> tuple[int, bytes]:
        request_id = os.urandom(12).hex()
        # Subscribed before the work exists, so the answer cannot come before it.
        sub = await nc.subscribe(stream_subject(request_id), max_msgs=1)
        try:
            await js.publish(INFER_SUBJECT, body, headers={"Nats-Msg-Id": request_id})
            answer = await sub.next_msg(timeout=ANSWER_TIMEOUT_S)
        except nats.errors.TimeoutError:
            return 504, b'{"error":"timeout"}'
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return (200, answer.data) if answer.data else (502, b'{"error":"upstream"}')

    await serve_http(asgi_app(args.key_sha256, core if args.mode == "core" else durable), args.port)


def usage_event(request_id: str, answer: bytes) -> bytes:
    parsed = orjson.loads(answer)
    usage = parsed.get("usage") or {}
    model = str(parsed.get("model", ""))
    return cost_pb2.UsageEvent(
        request_id=request_id,
        key_id=KEY_ID,
        team_id="team_floor",
        model_requested=model,
        model_served=model,
        provider="simulator",
        usage=chat_pb2.Usage(
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
        ),
        occurred_unix_nanos=time.time_ns(),
        outcome="completed",
    ).SerializeToString()


async def worker(args: argparse.Namespace) -> None:
    nc = await connect(args.nats, "worker")
    js = nc.jetstream()
    async with upstream_session() as session:
        if args.mode == "core":

            async def serve(msg: Msg) -> None:
                status, answer = await call_upstream(session, args.upstream, msg.data)
                await msg.respond(answer if status == 200 else b"")

            await nc.subscribe(WORK_SUBJECT, queue="workers", cb=serve)
            await nc.flush()
            ready()
            await asyncio.Event().wait()
            return

        tasks: set[asyncio.Task[None]] = set()
        inbox = nc.new_inbox()
        pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{INFER_STREAM}.{WORKER_DURABLE}"
        pull_request = orjson.dumps({"batch": PULL_BATCH, "expires": PULL_EXPIRES_NS})
        left = 0

        async def pull() -> None:
            nonlocal left
            left = PULL_BATCH
            await nc.publish(pull_subject, pull_request, reply=inbox)

        async def work(msg: Msg) -> None:
            request_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            status, answer = await call_upstream(session, args.upstream, msg.data)
            ok = status == 200
            await nc.publish(stream_subject(request_id), answer if ok else b"")
            if ok:
                await js.publish(
                    usage_subject(KEY_ID),
                    usage_event(request_id, answer),
                    headers={"Nats-Msg-Id": request_id},
                )
            await msg.ack()

        async def delivered(msg: Msg) -> None:
            nonlocal left
            if msg.headers and msg.headers.get("Status"):
                # The pull expired (408) or was refused (409): open the next one.
                await pull()
                return
            task = asyncio.create_task(work(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            left -= 1
            if left == 0:
                await pull()

        await nc.subscribe(inbox, cb=delivered)
        await pull()
        await nc.flush()
        ready()
        await asyncio.Event().wait()


async def usage(args: argparse.Namespace) -> None:
    nc = await connect(args.nats, args.durable)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=args.durable, stream=USAGE_STREAM)
    ready()
    while True:
        # Everything stored since the last window, a batch at a time, then a pause.
        while True:
            try:
                msgs = await sub.fetch(USAGE_BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            except nats.errors.Error as exc:
                # As a durable consumer does: say so, and fetch again after the window.
                print(f"fetch failed: {exc!r}", file=sys.stderr, flush=True)
                break
            for msg in msgs:
                cost_pb2.UsageEvent.FromString(msg.data)
                await msg.ack()
            if len(msgs) < USAGE_BATCH:
                break
        await asyncio.sleep(USAGE_WINDOW_S)


ROLES = {"proxy": proxy, "gateway": gateway, "worker": worker, "usage": usage}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_parts")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--nats", default="")
    parser.add_argument("--mode", choices=("core", "js"), default="core")
    parser.add_argument("--durable", default="usage")
    parser.add_argument("--key-sha256", default="")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    import uvloop

    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(ROLES[args.role](args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
