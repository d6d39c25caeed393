"""An embedded hourai for benchmarks: `python -m bench.server TARGET [options]`.

It is the daemon of `hourai run` (the same Runtime, Router and ingress; no access log, like
the baselines) plus control paths a benchmark needs and a user does not. Under
``/__bench/`` (never routed to a function):

- ``inline``: answered by the ingress itself, without a worker: the floor under the warm path,
  so "added latency" is measured, not guessed;
- ``cold``: unloads the function's snapshot just before the request is scheduled, so it
  takes the true cold path (root zygote fork, import, snapshot, worker fork);
- ``evict``: kills the function's idle workers (``?spares=1``: its spares too), so the next
  request forks, without the kill landing on a measured request's path;
- ``wait?idle=N&spare=N&busy=N&starting=N``: answers once the function's workers are in
  exactly those counts (absent: 0), or 504 after 10 s; a benchmark waits for the state it
  needs instead of sleeping and hoping;
- ``stats``: the scheduler's view of the function, as JSON.

``?fn=NAME`` picks another function than ``fn`` for these. ``/__inline`` and ``/__cold``
are kept as short forms. ``--profile FILE`` runs the daemon under cProfile and writes the
stats to FILE at exit (``python -m pstats FILE``).

Prints ``READY <port>`` on stdout once serving; stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable
from urllib.parse import parse_qs

from hourai.cgroup import TenantLimits
from hourai.daemon import Router, Runtime, RuntimeSettings, http_handler
from hourai.ingress import Request, Response, serve
from hourai.isolate.loader import resolve_target
from hourai.registry import build_spec
from hourai.scheduler.core import FunctionLimits
from hourai.tracing import TracingSettings

WORKER_STATES = ("starting", "spare", "idle", "busy", "draining")
WAIT_TIMEOUT = 10.0


def _json(status: int, doc: object) -> Response:
    return Response(status, [("content-type", "application/json")], json.dumps(doc).encode())


async def main(args: argparse.Namespace) -> None:
    tracing = TracingSettings(enabled=bool(args.tracing), endpoint=args.tracing or "")
    runtime = Runtime(
        RuntimeSettings(preloads=args.preload, immortalize=not args.mortal, tracing=tracing)
    )
    await runtime.start()
    limits = FunctionLimits(
        spares=args.spares,
        keep_alive=args.keep_alive,
        max_workers=args.max_workers,
        concurrency=args.concurrency,
        queue_max=100_000,
        timeout=args.timeout,
    )
    await runtime.deploy(
        build_spec(
            runtime.codestore,
            "fn",
            resolve_target(args.target),
            limits=limits,
            warmup=tuple(args.warmup),
        )
    )
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

    def counts(fn: str) -> dict[str, int]:
        workers = runtime.scheduler.stats(fn)["workers"]
        return {s: workers.get(s, 0) for s in WORKER_STATES}

    async def control(request: Request, verb: str) -> Response:
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        fn = query.pop("fn", "fn")
        if fn not in runtime.functions:
            return _json(404, {"error": f"no function {fn}"})
        if verb == "inline":
            return inline
        if verb == "cold":
            runtime.unload(fn, "benchmark: measure the cold path")
            path = f"/{fn}/" if args.also else "/"
            return await forward(dataclasses.replace(request, path=path, target=path))
        if verb == "evict":
            now = counts(fn)
            runtime.evict_idle(fn, now["idle"] + (now["spare"] if query.get("spares") else 0))
            return _json(200, counts(fn))
        if verb == "wait":
            want = {s: int(query.get(s, 0)) for s in WORKER_STATES}
            deadline = time.monotonic() + WAIT_TIMEOUT
            while counts(fn) != want:
                if time.monotonic() > deadline:
                    return _json(504, {"wanted": want, "have": counts(fn)})
                await asyncio.sleep(0.001)
            return _json(200, want)
        if verb == "stats":
            return _json(200, runtime.scheduler.stats(fn))
        return _json(404, {"error": f"no control path {verb}"})

    def handle(request: Request) -> Awaitable[Response]:
        # Not a coroutine: the function's requests go straight to the scheduler's future.
        if request.path.startswith("/__"):
            verb = request.path.removeprefix("/__bench/").removeprefix("/__").strip("/")
            return control(request, verb)
        return forward(request)

    server = await serve(handle, "127.0.0.1", 0)
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        server.close()
        await runtime.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("target")
    parser.add_argument("--spares", type=int, default=1)
    parser.add_argument("--keep-alive", type=float, default=60.0)
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1, help=">1: thread isolation")
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--warmup", action="append", default=[], help="served by the snapshot")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the daemon, stats to FILE")
    parser.add_argument("--mortal", action="store_true", help="no immortal objects (3.12+)")
    parser.add_argument("--tracing", metavar="URL", help="trace every request to this OTLP URL")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME,PATH,TENANT,CPU",
        help="another function under /NAME/ (CPU may be empty: no limit)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    options = parse_args()
    if options.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            uvloop.run(main(options))
        finally:
            profiler.disable()
            profiler.dump_stats(options.profile)
    else:
        uvloop.run(main(options))
