"""Streaming responses of every kind, for tests/test_streaming.py.

Each app takes ``?n=COUNT&gap=SECONDS&size=BYTES`` and writes one line per chunk,
``<index> <time.time()>`` padded to ``size`` bytes, so the client can tell when each chunk was
produced. ``/big?mb=N`` streams N MiB as fast as the client takes it; ``/forever`` streams a
chunk every 50 ms until stopped and records in /tmp whether it was told to stop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

MB = 1024 * 1024


def _params(query: str) -> tuple[int, float, int]:
    q = {k: v[0] for k, v in parse_qs(query).items()}
    return int(q.get("n", "5")), float(q.get("gap", "0.2")), int(q.get("size", "0"))


def _line(i: int, size: int) -> bytes:
    line = f"{i} {time.time():.6f}\n".encode()
    return line + b"." * max(0, size - len(line) - 1) + b"\n" if size > len(line) else line


fastapi_app = FastAPI()


@fastapi_app.get("/events")
async def events(n: int = 5, gap: float = 0.2) -> StreamingResponse:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            yield f"data: {i} {time.time():.6f}\n\n".encode()

    return StreamingResponse(gen(), media_type="text/event-stream")


@fastapi_app.get("/plain")
async def plain() -> dict[str, str]:
    return {"hello": "world"}


async def raw_asgi(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    n, gap, size = _params(scope["query_string"].decode())
    path = scope["path"]
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/x")]}
    )
    if path == "/big":
        mb = int(parse_qs(scope["query_string"].decode()).get("mb", ["200"])[0])
        block = b"x" * MB
        for _ in range(mb):
            await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path == "/forever":
        marker = "/tmp/hourai-stream-stopped"
        try:
            for i in range(100_000):
                await send({"type": "http.response.body", "body": _line(i, 0), "more_body": True})
                await asyncio.sleep(0.05)
        except OSError:
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            raise
        return
    for i in range(n):
        if i:
            await asyncio.sleep(gap)
        await send({"type": "http.response.body", "body": _line(i, size), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def wsgi_app(environ, start_response):  # type: ignore[no-untyped-def]
    n, gap, size = _params(environ.get("QUERY_STRING", ""))
    path = environ["PATH_INFO"]
    if path == "/list":
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"one ", b"frame"]
    if path == "/raise":

        def failing() -> Iterator[bytes]:
            start_response("200 OK", [("content-type", "text/plain")])
            yield b"first\n"
            raise RuntimeError("broke mid-stream")

        return failing()

    def gen() -> Iterator[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        for i in range(n):
            if i:
                time.sleep(gap)
            yield _line(i, size)

    return gen()


def handler(event, context):  # type: ignore[no-untyped-def]
    return {"statusCode": 200, "body": "buffered"}
