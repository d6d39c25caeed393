"""An ASGI app that tells what an invocation inherits from the one before it."""

import asyncio
import contextvars
import json
import os

_seen = contextvars.ContextVar("seen", default=None)


async def app(scope, receive, send):
    assert scope["type"] == "http"
    await receive()
    before = _seen.get()
    _seen.set(scope["path"])
    await asyncio.sleep(0)  # a real suspension, so the loop runs the invocation
    doc = {"before": before, "loop": id(asyncio.get_running_loop()), "pid": os.getpid()}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(doc).encode()})
