"""The `hourai` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hourai import __version__

if TYPE_CHECKING:
    from hourai.cgroup import TenantLimits
    from hourai.isolate.loader import Target

log = logging.getLogger("hourai")


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def read_env_file(path: str) -> dict[str, str]:
    """dotenv-style: KEY=VALUE lines, # comments, optional quotes around the value."""
    env: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read env file {path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---------------------------------------------------------------------- hourai run


def add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="serve one function on localhost",
        description="Serve one function at http://HOST:PORT/ from snapshot workers.",
    )
    p.add_argument(
        "target",
        metavar="PATH[:ATTR]",
        help="a .py file or directory, with :ATTR or Lambda-style file.function",
    )
    p.add_argument("--kind", choices=["handler", "asgi", "wsgi"], help="default: detected")
    p.add_argument(
        "--factory",
        action="store_true",
        help="ATTR is an application factory (default create_app), called once in the snapshot",
    )
    p.add_argument(
        "--warmup",
        action="append",
        default=[],
        metavar="REQUEST",
        help="a request the snapshot serves before forking workers, and each spare again "
        "before its first request, e.g. / (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds an invocation may run before its worker is killed (default 30)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the function (repeatable)",
    )
    p.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="KEY=VALUE lines for the function's environment",
    )
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MOD",
        help="module the root zygote imports once, e.g. flask (repeatable)",
    )
    p.add_argument(
        "--index-url",
        metavar="URL",
        help="package index for the function's requirements.txt (default: uv's)",
    )
    p.add_argument(
        "--find-links",
        action="append",
        default=[],
        metavar="DIR",
        help="directory or page of wheels for the requirements (repeatable)",
    )
    p.add_argument(
        "--no-index", action="store_true", help="install requirements from --find-links only"
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long an idle worker lives (default 60)",
    )
    p.add_argument(
        "--spares",
        type=int,
        default=1,
        metavar="N",
        help="pre-forked idle workers kept while the snapshot lives (default 1; 0: none)",
    )
    p.add_argument(
        "--max-workers", type=int, default=8, metavar="N", help="most workers at once (default 8)"
    )
    p.add_argument(
        "--reload",
        action="store_true",
        help="rebuild on file change; a broken edit keeps the old version serving",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="invocations one worker runs at once (default 1: process mode; >1: thread mode)",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="PER_SECOND",
        help="token-bucket rate limit; beyond it requests get 429 with Retry-After",
    )
    p.add_argument(
        "--queue-max",
        type=int,
        default=256,
        metavar="N",
        help="requests that may wait for a worker; beyond it 503 (default 256)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a request may wait for a worker before 503 (default 10)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=0,
        metavar="N",
        help="recycle a worker after N invocations (default 0: never)",
    )
    p.add_argument(
        "--worker-memory",
        metavar="SIZE",
        help="recycle a worker once its resident memory passes SIZE, e.g. 256M",
    )
    p.add_argument(
        "--max-response-size",
        default="6M",
        metavar="SIZE",
        help="largest response body; a larger one is refused with 502 (default 6M)",
    )
    p.add_argument(
        "--tenant", default="default", help="tenant the function runs as (default: default)"
    )
    p.add_argument(
        "--tenant-max-inflight",
        type=int,
        metavar="N",
        help="invocations at once over all of the tenant's functions",
    )
    p.add_argument(
        "--tenant-rate", type=float, metavar="PER_SECOND", help="rate limit over the tenant"
    )
    p.add_argument("--memory", metavar="SIZE", help="tenant memory limit, e.g. 128M, 1G")
    p.add_argument("--cpu", metavar="CORES", help="tenant cpu limit in cores, e.g. 0.5")
    p.add_argument("--pids", type=int, metavar="N", help="tenant limit on processes and threads")
    p.add_argument(
        "--tmp-size",
        metavar="SIZE",
        help="size of the function's private /tmp and /dev/shm (default 512M)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="serve from a worker with a debugpy listener (attach, set breakpoints); a new "
        "one after each detach",
    )
    p.add_argument("--debug-port", type=int, default=5678, help="its port (default 5678)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from hourai.isolate.loader import TargetError, as_factory, resolve_target
    from hourai.scheduler.core import FunctionLimits

    setup_logging(args.verbose)
    if (
        args.spares < 0
        or args.max_workers < 1
        or args.concurrency < 1
        or args.timeout <= 0
        or args.keep_alive < 0
    ):
        raise UsageError(
            "--spares must be >= 0, --max-workers and --concurrency >= 1, "
            "--timeout and --keep-alive > 0"
        )
    try:
        target = resolve_target(args.target)
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    if args.factory:
        target = as_factory(target)
    env: dict[str, str] = {}
    for path in args.env_file:
        env.update(read_env_file(path))
    env.update(parse_env_pairs(args.env))
    try:
        limits = FunctionLimits(
            timeout=args.timeout,
            keep_alive=args.keep_alive,
            spares=args.spares,
            max_workers=args.max_workers,
            concurrency=args.concurrency,
            max_requests=args.max_requests,
            rate=args.rate,
            queue_max=args.queue_max,
            queue_timeout=args.queue_timeout,
            max_worker_memory=parse_size_arg("--worker-memory", args.worker_memory),
            tmp_size=parse_size_arg("--tmp-size", args.tmp_size) or FunctionLimits.tmp_size,
            max_response_size=parse_size_arg("--max-response-size", args.max_response_size) or 0,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return run_async(serve_one(args, target, env, limits, parse_resources(args)))


def parse_size_arg(flag: str, value: str | None) -> int | None:
    from hourai.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def parse_resources(args: argparse.Namespace) -> TenantLimits | None:
    """--memory/--cpu/--pids as the tenant's cgroup limits (None when none is given)."""
    from hourai.cgroup import CgroupError, TenantLimits

    if args.memory is None and args.cpu is None and args.pids is None:
        return None
    try:
        return TenantLimits.parse(memory_max=args.memory, cpu_max=args.cpu, pids_max=args.pids)
    except (CgroupError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def function_name(target: Target) -> str:
    """A URL- and cgroup-safe name from the file the user named."""
    from hourai.isolate.loader import split_call

    attr = split_call(target.attr)[0] if target.attr else None
    stem = Path(target.file or target.source).stem if attr is None else attr
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:63].strip("-")
    return name or "fn"


async def serve_one(  # type: ignore[no-untyped-def]
    args: argparse.Namespace, target, env, limits, resources
) -> int:
    from hourai.codestore import CodeStoreError
    from hourai.config import parse_warmup
    from hourai.daemon import DeployError, Router, Runtime, RuntimeSettings, http_handler
    from hourai.ingress import serve
    from hourai.packages import PackageError
    from hourai.packages.installer import IndexSettings
    from hourai.packages.requirements import declared
    from hourai.registry import build_spec

    # uv's own cache (in the user's home) outlives this run: the next one installs from it.
    index = IndexSettings(
        index_url=args.index_url, find_links=tuple(args.find_links), no_index=args.no_index
    )
    runtime = Runtime(RuntimeSettings(preloads=args.preload, packages=index))
    name = function_name(target)
    try:
        warmup = parse_warmup(args.warmup)
    except ValueError as exc:
        raise UsageError(f"--warmup: {exc}") from None
    resolved: dict[str, list[str] | None] = {}

    def packages() -> list[str] | None:
        """The function's packages, resolved again only when what it declares changes
        (the reload loop asks twice a second)."""
        wanted = declared(Path(target.root))
        key = repr(wanted)
        if key not in resolved:
            got = None if wanted is None else runtime.packages.provide(wanted)
            if got is not None:
                runtime.packages.release(got)  # a private store: nothing collects it
            resolved.clear()
            resolved[key] = got
        return resolved[key]

    def make_spec():  # type: ignore[no-untyped-def]
        return build_spec(
            runtime.codestore,
            name,
            target,
            kind=args.kind,
            tenant=args.tenant,
            env=env,
            limits=limits,
            resources=resources,
            packages=packages(),
            warmup=warmup,
        )

    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
            " (is another server there? pick another with --port)"
        ) from None
    server = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for warning in runtime.warnings:
            print(f"hourai: WARNING: {warning}", file=sys.stderr, flush=True)
        await runtime.start()
        if args.tenant_max_inflight is not None or args.tenant_rate is not None:
            from hourai.scheduler.limits import TenantLimits as TenantCaps

            try:
                caps = TenantCaps(max_inflight=args.tenant_max_inflight, rate=args.tenant_rate)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            runtime.set_tenant_caps(args.tenant, caps)
        try:
            spec = make_spec()
            info = await runtime.deploy(spec)
        except PackageError as exc:
            print(f"hourai: error: the requirements cannot be installed: {exc}", file=sys.stderr)
            return 1
        except (DeployError, CodeStoreError, ValueError) as exc:
            print(f"hourai: error: {exc}", file=sys.stderr)
            return 1
        # Listening only now, as uvicorn does after startup: until the function is
        # ready a connection is refused (curl --retry-connrefused waits), not given 503.
        handler = http_handler(runtime, Router(runtime.functions, single=name))
        server = await serve(handler, args.host, args.port, sock=sock)
        host, port = server.sockets[0].getsockname()[:2]
        limits_note = f", tenant {spec.tenant}: {resources.describe()}" if resources else ""
        print(
            f"hourai: {target.source}: serving {info['kind']} {info['attr']!r} "
            f"at http://{host}:{port}/ (snapshot built in {info['init_ms']:.0f} ms{limits_note})",
            file=sys.stderr,
            flush=True,
        )
        watchers = []
        if args.reload:
            watchers.append(loop.create_task(_reload_loop(runtime, make_spec, spec.version)))
        if args.debug:
            watchers.append(loop.create_task(_debug_loop(runtime, name, args.debug_port)))
        await stop.wait()
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return 0
    finally:
        if server is not None:
            server.close()
        sock.close()
        await runtime.stop()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` but not listening yet: a port in use is said at
    once, before the function is built, and nothing can connect before it is ready."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _reload_loop(runtime, make_spec, version: str) -> None:  # type: ignore[no-untyped-def]
    """Poll the code tree; a new version is built beside the old one and only then switched."""
    from hourai.codestore import CodeStoreError
    from hourai.daemon import DeployError
    from hourai.packages import PackageError

    while True:
        await asyncio.sleep(0.5)
        try:
            spec = make_spec()
        except (OSError, CodeStoreError, PackageError) as exc:
            print(f"hourai: reload skipped: {exc}", file=sys.stderr, flush=True)
            continue
        if spec.version == version:
            continue
        version = spec.version
        print("hourai: change detected, building the new version...", file=sys.stderr, flush=True)
        try:
            await runtime.deploy(spec)
        except DeployError as exc:
            print(
                f"hourai: reload refused, the previous version keeps serving: {exc}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"hourai: now serving version {version}", file=sys.stderr, flush=True)


async def _debug_loop(runtime, name: str, port: int) -> None:  # type: ignore[no-untyped-def]
    """Keep a debug session open: a new one when the debugger detached or the code was
    reloaded (the session's worker runs the version it was forked from)."""
    from hourai.cli_daemon import attach_instructions
    from hourai.debug import DebugError

    debugger = runtime.debugger
    while True:
        session = debugger.sessions.get(name)
        spec = runtime.functions.get(name)
        if session is not None and spec is not None and session.version != spec.version:
            debugger.close(name, "the code was reloaded")
            session = None
        if session is None and spec is not None:
            try:
                doc = await debugger.open(name, port)
            except DebugError as exc:
                print(f"hourai: debugger: {exc}", file=sys.stderr, flush=True)
                await asyncio.sleep(2.0)
                continue
            print(f"hourai: {attach_instructions(doc)}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.25)


def run_async(coro) -> int:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# ---------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hourai", description="Dense serverless runtime.")
    parser.add_argument("--version", action="version", version=f"hourai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_run_parser(sub)
    from hourai.cli_daemon import add_daemon_parsers

    add_daemon_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"hourai: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
