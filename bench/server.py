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
import dataclasses
import sys

from hourai.cgroup import TenantLimits
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
        timeout=args.timeout,
    )
    spec = build_spec(runtime.codestore, "fn", target, limits=limits)
    await runtime.deploy(spec)
    # More functions under /<name>/ (path routing), each with its tenant and CPU limit.
    for extra in args.also:
        name, path, tenant, cpu = extra.split(",")
        resources = TenantLimits(cpu_max=float(cpu)) if cpu else None
        await runtime.deploy(
            build_spec(
                runtime.codestore,
                name,
                resolve_target(path),
                tenant=tenant,
                limits=limits,
                resources=resources,
            )
        )
    forward = http_handler(runtime, Router(runtime.functions, single=None if args.also else "fn"))
    inline = Response(200, [("content-type", "text/plain")], b"hello")

    async def handle(request: Request) -> Response:
        if request.path.startswith("/__inline"):
            return inline
        if request.path.startswith("/__cold"):
            runtime.unload("fn", "benchmark: measure the cold path")
            request = dataclasses.replace(request, path="/", target="/")
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
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME,PATH,TENANT,CPU",
        help="another function under /NAME/ (CPU may be empty: no limit)",
    )
    import uvloop

    uvloop.run(main(parser.parse_args()))
