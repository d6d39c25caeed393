"""The worker's serve loops: invocations in over the channel, results out.

"process" isolation (concurrency 1, like a Lambda instance): a blocking loop, one invocation
at a time, nothing between the channel and the function. "thread" isolation (concurrency
N > 1): the worker's own event loop reads the channel and runs up to N invocations at once,
async functions and ASGI apps as tasks on that loop, sync ones in a pool of N threads.

A function that raises gets a 500 with an error id; the traceback goes to this worker's
output, which the daemon logs tagged with the function and worker, so the id finds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import socket
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hourai.channel import AsyncChannel, BlockingChannel, ChannelClosed
from hourai.isolate import context, debugging, direct
from hourai.isolate.adapters import Invoker, new_event_loop
from hourai.isolate.tracebacks import user_paths
from hourai.protocol import MAX_ERROR_TEXT, Message, ProtocolError

# The traceback is in the worker's output; the daemon only needs the gist, within its bound.
_MAX_ERROR = MAX_ERROR_TEXT // 4

# A request-shaped message for warm_up: every field the adapters read, nothing of a tenant's.
_DUMMY = {
    "t": "inv",
    "id": 0,
    "method": "GET",
    "path": "/",
    "root_path": "",
    "query": "a=1",
    "headers": [["host", "warm-up"], ["user-agent", "hourai"]],
    "body": b"",
    "client": ["127.0.0.1", 0],
    "server": ["127.0.0.1", 0],
    "scheme": "http",
    "http_version": "1.1",
    "request_id": "warm-up",
    "function": "warm-up",
    "deadline_ms": 1000,
}


def warm_up(invoker: Invoker) -> None:
    """Walk the worker's own request path once, without calling the function.

    A fresh fork shares every page with its snapshot; the first request then pays a
    copy-on-write fault (several microseconds on a VM) for each page it writes to, mostly
    refcounts in the decoder, the adapter and the encoder: about 2 ms in all. A spare has
    time to pay that before its first request; a worker forked for a waiting request does
    not, and skips this (see serve_worker).
    """
    from hourai.isolate import adapters, lambda_event
    from hourai.protocol import FrameDecoder, encode

    (inv,) = FrameDecoder().feed(encode(_DUMMY))
    if invoker.kind == "handler":
        lambda_event.LambdaContext(inv)
        lambda_event.build_event(inv)
    elif invoker.kind == "wsgi":
        adapters.build_environ(inv)
    else:
        adapters.build_scope(inv)
    encode({"t": "res", "id": 0, "status": 200, "headers": [["content-type", "x"]], "body": b""})


def serve_worker(channel: BlockingChannel, invoker: Invoker, spec: dict[str, Any]) -> None:
    me = os.getpid()
    if not select.select([channel.sock], [], [], 0)[0]:
        warm_up(invoker)  # nothing is waiting: we are a spare, pay the page faults now
    debug = False
    while True:
        try:
            inv, _fds = channel.recv()
        except ChannelClosed:
            return
        if inv["t"] != "inv":
            if inv["t"] == "debug":  # hourai debug: this worker is the session's
                debug = True
                channel.send(debugging.start(inv))
            continue
        if debug:
            debugging.busy(1)
        reply = run_invocation(invoker, inv)
        if debug:
            debugging.busy(-1)
        if os.getpid() != me:
            # The function forked and this is the child coming back: it must never answer
            # on (or read from) the worker's channel.
            os._exit(0)
        send_reply(channel, inv, reply)


def send_reply(
    channel: BlockingChannel | AsyncChannel, inv: dict[str, Any], reply: Message
) -> None:
    """Send the answer; one that cannot be framed (over the frame limit, or not msgpack-able)
    becomes the function's error, not the worker's death."""
    try:
        channel.send(reply)
    except (ProtocolError, TypeError, ValueError, OverflowError) as exc:
        channel.send(error_reply(inv, exc))


def run_invocation(invoker: Invoker, inv: dict[str, Any]) -> dict[str, Any]:
    tokens = context.enter(inv)
    try:
        result = direct.run(invoker, inv) if "event" in inv else invoker.invoke(inv)
    except Exception as exc:
        return error_reply(inv, exc)
    finally:
        context.leave(tokens)
    return {
        "t": "res",
        "id": inv["id"],
        "status": result["status"],
        "headers": result["headers"],
        "body": result["body"],
    }


def error_reply(inv: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    error_id = secrets.token_hex(6)
    details = user_paths(traceback.format_exc())
    print(
        f"error {error_id} in request {inv.get('request_id', '-')}:\n{details}",
        file=sys.stderr,
        end="",
        flush=True,
    )
    if "event" in inv:
        # A direct invocation is answered as Lambda answers it: the error payload, flagged.
        fields = direct.error_fields(exc)
        fields["errorMessage"] = fields["errorMessage"][:_MAX_ERROR]
        return {
            "t": "res",
            "id": inv["id"],
            "status": 200,
            "headers": [
                *direct.JSON,
                ["x-amz-function-error", "Unhandled"],
                ["x-hourai-error-id", error_id],
            ],
            "body": json.dumps(fields).encode(),
        }
    error = f"{type(exc).__name__}: {exc}"
    if len(error) > _MAX_ERROR:
        error = error[: _MAX_ERROR - 1] + "…"
    return {"t": "err", "id": inv["id"], "error_id": error_id, "error": error}


def serve_worker_concurrent(sock: socket.socket, invoker: Invoker, concurrency: int) -> None:
    """Thread mode: up to `concurrency` invocations at once on this worker's own loop."""
    loop = getattr(invoker, "loop", None) or new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="invocation")
    )
    me = os.getpid()
    closed: asyncio.Future[None] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    debug = False

    async def handle(inv: dict[str, Any]) -> None:
        # Each task has a context of its own, so this marks only this invocation's lines.
        context.enter(inv)
        if debug:
            debugging.busy(1)
        try:
            if "event" in inv:
                result = await direct.run_async(invoker, inv)
            else:
                result = await invoker.invoke_async(inv)
            reply = {
                "t": "res",
                "id": inv["id"],
                "status": result["status"],
                "headers": result["headers"],
                "body": result["body"],
            }
        except Exception as exc:
            reply = error_reply(inv, exc)
        finally:
            if debug:
                debugging.busy(-1)
        if os.getpid() != me:
            os._exit(0)  # a fork of the function's, see serve_worker
        send_reply(channel, inv, reply)

    def on_message(msg: dict[str, Any], _fds: list[int]) -> None:
        if msg["t"] == "inv":
            task = loop.create_task(handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif msg["t"] == "debug":
            nonlocal debug
            debug = True
            channel.send(debugging.start(msg))

    def on_close(_reason: str) -> None:
        if not closed.done():
            closed.set_result(None)

    channel = AsyncChannel(loop, sock, on_message, on_close)
    loop.run_until_complete(closed)
