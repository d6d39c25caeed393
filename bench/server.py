"""An embedded hourai for benchmarks: `python -m bench.server TARGET [options]`.

It is the daemon of `hourai run` plus two things a benchmark needs and a user does not:

- ``/__inline/...`` is answered by the ingress itself, without a worker: the floor under the
  warm path, so "added latency" is measured, not guessed;
- ``/__cold/...`` unloads the function's snapshot just before the request is scheduled, so
  it takes the true cold path (root zygote fork, import, snapshot, worker fork).

Prints ``READY <port>`` on stdout once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from hourai.daemon import Router, Runtime, RuntimeSettings, http_handler
from hourai.ingress import Request, Response, serve
from hourai.isolate.loader import resolve_target
from hourai.registry import build_spec
from hourai.scheduler.core import FunctionLimits


async def main(args: argparse.Namespace) -> None:
    runtime = Runtime(RuntimeSettings(preloads=args.preload))
    await runtime.start()
    target = resolve_target(args.target)
    limits = FunctionLimits(
        spares=args.spares,
        keep_alive=args.keep_alive,
        max_workers=args.max_workers,
        queue_max=100_000,
    )
    spec = build_spec(runtime.codestore, "fn", target, limits=limits)
    await runtime.deploy(spec)
    forward = http_handler(runtime, Router(runtime.functions, single="fn"))
    inline = Response(200, [("content-type", "text/plain")], b"hello")

    async def handle(request: Request) -> Response:
        if request.path.startswith("/__inline"):
            return inline
        if request.path.startswith("/__cold"):
            runtime.unload("fn", "benchmark: measure the cold path")
        return await forward(request)

    server = await serve(handle, "127.0.0.1", 0)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        server.close()
        await runtime.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--spares", type=int, default=1)
    parser.add_argument("--keep-alive", type=float, default=60.0)
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--preload", action="append", default=[])
    import uvloop

    uvloop.run(main(parser.parse_args()))
