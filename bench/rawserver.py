"""The floor under any Python HTTP server here: uvloop + httptools answering by itself.

`python -m bench.rawserver PORT` serves one fixed 200 to every request on a kept-alive
connection, with none of hourai's limits, routing or workers: what "added latency" and the
throughput ratios in bench/warm.py are measured against. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

BODY = b"hello\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b" % (
    len(BODY),
    BODY,
)


class RawProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(RESPONSE)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawProtocol, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
