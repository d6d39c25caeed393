"""The worker's serve loop: invocations in over the channel, results out.

One invocation at a time ("process" isolation, like a Lambda instance). A function that
raises gets a 500 with an error id; the traceback goes to this worker's output, which the
daemon logs tagged with the function and worker, so the id finds it.
"""

from __future__ import annotations

import os
import secrets
import sys
import traceback
from typing import Any

from hourai.channel import BlockingChannel, ChannelClosed
from hourai.isolate.adapters import Invoker


def serve_worker(channel: BlockingChannel, invoker: Invoker, spec: dict[str, Any]) -> None:
    me = os.getpid()
    while True:
        try:
            inv, _fds = channel.recv()
        except ChannelClosed:
            return
        if inv["t"] != "inv":
            continue
        reply = run_invocation(invoker, inv)
        if os.getpid() != me:
            # The function forked and this is the child coming back: it must never answer
            # on (or read from) the worker's channel.
            os._exit(0)
        channel.send(reply)


def run_invocation(invoker: Invoker, inv: dict[str, Any]) -> dict[str, Any]:
    try:
        result = invoker.invoke(inv)
    except Exception as exc:
        return error_reply(inv, exc)
    return {
        "t": "res",
        "id": inv["id"],
        "status": result["status"],
        "headers": result["headers"],
        "body": result["body"],
    }


def error_reply(inv: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    error_id = secrets.token_hex(6)
    details = traceback.format_exc()
    print(
        f"error {error_id} in request {inv.get('request_id', '-')}:\n{details}",
        file=sys.stderr,
        end="",
        flush=True,
    )
    return {
        "t": "err",
        "id": inv["id"],
        "error_id": error_id,
        "error": f"{type(exc).__name__}: {exc}",
    }
