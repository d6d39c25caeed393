"""`hourai daemon` and the commands that drive it through the control API.

Exit status of the client commands: 0 done; 1 the daemon refused or the function failed
(its reason on stderr); 2 a usage error; 3 no daemon could be reached. ``--json`` prints the
daemon's answer as JSON for scripts, on success and on refusal alike.

The client commands import nothing of the daemon, so they start as fast as Python does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from hourai.cli import UsageError, parse_env_pairs, read_env_file

EXIT_REFUSED = 1
EXIT_NO_DAEMON = 3


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register daemon, deploy, ls, show, rm, invoke, logs, stats and rollback."""
    p = sub.add_parser(
        "daemon",
        help="run the multi-function service (what systemd starts)",
        description="Serve every deployed function; take commands on the control socket.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("HOURAI_CONFIG") or None,
        metavar="FILE",
        help="TOML config file (default: $HOURAI_CONFIG; none: built-in defaults)",
    )
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="overrides state_dir")
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="overrides listen (repeatable; port 0 picks a free one)",
    )
    p.add_argument("--socket", type=Path, metavar="PATH", help="overrides socket")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_daemon)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's control socket (default: $HOURAI_SOCKET, else "
        "$STATE_DIRECTORY/control.sock or /var/lib/hourai/control.sock)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "deploy",
        parents=[common],
        help="deploy a function (a new version, or new limits for the same code)",
        description="Deploy PATH (a .py file or a directory) as function NAME. Options may "
        "also come from a hourai.toml beside the code; flags win over it.",
    )
    p.add_argument("name", metavar="NAME", help="the function's name (its URL prefix)")
    p.add_argument("path", metavar="PATH", help="a .py file or a directory, on this host")
    p.add_argument(
        "--entry", metavar="ATTR", help="attribute to call (for a directory: MODULE[:ATTR])"
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
        metavar="REQUEST",
        help="a request its snapshot serves before forking workers, e.g. / or 'GET /status' "
        "(repeatable): a framework's lazy first-request work, done once for all workers",
    )
    p.add_argument("--tenant", help="the tenant it runs as (default: [defaults] tenant)")
    p.add_argument("--memory", metavar="SIZE", help="the tenant's memory limit, e.g. 256M")
    p.add_argument("--cpu", metavar="CORES", help="the tenant's CPU quota, e.g. 0.5")
    p.add_argument("--pids", type=int, metavar="N", help="the tenant's process limit")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="invocation timeout")
    p.add_argument("--concurrency", type=int, metavar="N", help="invocations per worker")
    p.add_argument("--max-workers", type=int, metavar="N", help="workers at most")
    p.add_argument(
        "--min-warm", type=int, metavar="N", help="workers kept warm, also across restarts"
    )
    p.add_argument("--spares", type=int, metavar="N", help="pre-forked idle workers")
    p.add_argument("--keep-alive", type=float, metavar="SECONDS", help="idle worker lifetime")
    p.add_argument("--queue-max", type=int, metavar="N", help="requests waiting at most")
    p.add_argument("--queue-timeout", type=float, metavar="SECONDS", help="longest wait")
    p.add_argument("--rate", type=float, metavar="PER_SECOND", help="rate limit")
    p.add_argument("--burst", type=int, metavar="N", help="rate limit bucket size")
    p.add_argument("--max-inflight", type=int, metavar="N", help="concurrent invocations")
    p.add_argument("--max-requests", type=int, metavar="N", help="recycle after N invocations")
    p.add_argument("--worker-memory", metavar="SIZE", help="recycle a worker above SIZE")
    p.add_argument("--tmp-size", metavar="SIZE", help="the function's private /tmp (512M)")
    p.add_argument("--max-response-size", metavar="SIZE", help="largest response body (default 6M)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE")
    p.add_argument(
        "--schedule", metavar="EXPR", help='e.g. "rate(5 minutes)", "cron(0 12 * * ? *)"'
    )
    p.add_argument("--async-retries", type=int, metavar="N", help="0-2 (default 2)")
    p.add_argument("--async-max-age", type=float, metavar="SECONDS", help="oldest event run")
    p.add_argument("--async-concurrency", type=int, metavar="N", help="async in flight at most")
    p.add_argument("--async-timeout", type=float, metavar="SECONDS", help="async timeout")
    p.add_argument("--on-success", metavar="FUNCTION", help="async destination on success")
    p.add_argument("--on-failure", metavar="FUNCTION", help="async destination on failure")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("ls", parents=[common], help="list the functions")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", parents=[common], help="one function: versions, limits, state")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", parents=[common], help="remove a function and its history")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "invoke",
        parents=[common],
        help="call a function once and print its answer",
        description="Call NAME once. The body is --data, or stdin with '-'; or give a whole "
        "API Gateway HTTP API (2.0) event with --event FILE ('-': stdin), as in a Lambda "
        "test event. Exit status 1 if the answer is an HTTP error.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("stdin", nargs="?", choices=["-"], help="read the body from stdin")
    p.add_argument("--data", metavar="JSON", help="the request body")
    p.add_argument(
        "--event",
        metavar="FILE",
        help="invoke directly with this JSON event, as Lambda's Invoke API does ('-': stdin)",
    )
    p.add_argument("--path", default="/", help="request path (default /)")
    p.add_argument("--method", help="default: POST with a body, else GET")
    p.add_argument(
        "-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="(repeatable)"
    )
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="queue it (Lambda's InvocationType=Event): the event (--event, --data or -) is "
        "stored durably and run later; prints its id at once. With tracing on, its runs link "
        "to the trace context given as -H traceparent:... or in $TRACEPARENT",
    )
    p.set_defaults(func=cmd_invoke)

    p = sub.add_parser(
        "invocations",
        parents=[common],
        help="a function's asynchronous invocations: status, attempts, result or error",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID", nargs="?", help="one invocation, with its event")
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="(default 20)")
    p.add_argument(
        "--status", choices=["queued", "running", "succeeded", "dead"], help="only these"
    )
    p.set_defaults(func=cmd_invocations)

    p = sub.add_parser("logs", parents=[common], help="a function's output")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="(default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "--request",
        metavar="ID",
        help="only the lines of one request: its request id, trace id or error id "
        "(searches the whole log unless -n is given)",
    )
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stats", parents=[common], help="workers, requests, latency, memory")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "debug", parents=[common], help="a debugger's worker: debugpy on a fresh worker"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--port", type=int, default=5678, help="loopback port (default 5678)")
    p.add_argument("--stop", action="store_true", help="end the function's debug session")
    p.set_defaults(func=cmd_debug)

    p = sub.add_parser("rollback", parents=[common], help="serve an earlier version again")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", nargs="?", help="default: the one before")
    p.set_defaults(func=cmd_rollback)


# ---------------------------------------------------------------------- hourai daemon


def cmd_daemon(args: argparse.Namespace) -> int:
    from hourai.cli import run_async
    from hourai.config import ConfigError, load_config
    from hourai.logs import setup_daemon_logging
    from hourai.service import run_daemon

    overrides: dict[str, Any] = {
        "state_dir": args.state_dir,
        "listen": args.listen,
        "socket": args.socket,
    }
    try:
        config = load_config(args.config, **overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    level = 10 if args.verbose else config.log_level
    setup_daemon_logging(level, config.log.format, access=config.log.access)
    return run_async(run_daemon(config, overrides))


# ---------------------------------------------------------------------- the client side


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from hourai.client import Client

    if args.socket:
        return Client(args.socket)
    env = os.environ.get("HOURAI_SOCKET")
    if env:
        return Client(env)
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/hourai"
    return Client(Path(state) / "control.sock")


def _run(args: argparse.Namespace, call) -> int:  # type: ignore[no-untyped-def]
    """Call the daemon; map its refusals and absence to exit statuses."""
    from hourai.client import ApiFailure, ClientError

    try:
        call()
    except ClientError as exc:
        print(f"hourai: error: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ApiFailure as exc:
        if args.json:
            print(json.dumps({"status": exc.status, **exc.doc}, indent=2))
        print(f"hourai: error: {exc}", file=sys.stderr)
        details = str(exc.doc.get("details") or "").rstrip()
        if details and details != str(exc):
            print(details, file=sys.stderr)
        if exc.doc.get("serving"):
            print(f"hourai: version {exc.doc['serving']} keeps serving", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def cmd_deploy(args: argparse.Namespace) -> int:
    env: dict[str, str] = {}
    for path in args.env_file:
        env.update(read_env_file(path))
    env.update(parse_env_pairs(args.env))
    options: dict[str, Any] = {
        "entry": args.entry,
        "kind": args.kind,
        "tenant": args.tenant,
        "memory": args.memory,
        "cpu": args.cpu,
        "pids": args.pids,
        "timeout": args.timeout,
        "concurrency": args.concurrency,
        "max_workers": args.max_workers,
        "min_warm": args.min_warm,
        "spares": args.spares,
        "keep_alive": args.keep_alive,
        "queue_max": args.queue_max,
        "queue_timeout": args.queue_timeout,
        "rate": args.rate,
        "burst": args.burst,
        "max_inflight": args.max_inflight,
        "max_requests": args.max_requests,
        "worker_memory": args.worker_memory,
        "tmp_size": args.tmp_size,
        "factory": True if args.factory else None,
        "max_response_size": args.max_response_size,
        "env": env or None,
        "schedule": args.schedule,
        "warmup": args.warmup,
        "async_retries": args.async_retries,
        "async_max_age": args.async_max_age,
        "async_concurrency": args.async_concurrency,
        "async_timeout": args.async_timeout,
        "on_success": args.on_success,
        "on_failure": args.on_failure,
    }
    options = {k: v for k, v in options.items() if v is not None}

    def call() -> None:
        doc = _client(args).deploy(args.name, args.path, os.getcwd(), options)
        if args.json:
            _print_json(doc)
            return
        detected = f"{doc['kind']} {doc['attr']!r} ({doc['module']})"
        if doc["unchanged"]:
            print(
                f"{doc['name']}: version {doc['version']} is already serving (same code); "
                "limits applied"
            )
            return
        previous = f" (was {doc['previous']})" if doc.get("previous") else ""
        print(f"deployed {doc['name']} version {doc['version']}{previous}")
        limits = f", {doc['tenant_limits']}" if doc.get("tenant_limits") else ""
        warm = f", {doc['min_warm']} kept warm" if doc.get("min_warm") else ""
        print(
            f"  {detected} from {doc['source']}, tenant {doc['tenant']}{limits}{warm}; "
            f"snapshot built in {doc['init_ms']:.0f} ms"
        )
        if doc.get("packages") is not None:
            names = ", ".join(n.rsplit("-", 1)[0] for n in doc["packages"]) or "none"
            print(f"  packages: {names} (resolved in {doc.get('packages_ms', 0):.0f} ms)")

    return _run(args, call)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_ls(args: argparse.Namespace) -> int:
    def call() -> None:
        doc = _client(args).functions()
        if args.json:
            _print_json(doc)
            return
        rows = []
        for f in doc["functions"]:
            workers = f"{f.get('workers', 0)}" + (f" ({f['busy']} busy)" if f.get("busy") else "")
            rows.append(
                [
                    f["name"],
                    f.get("version") or "-",
                    f.get("tenant") or "-",
                    f.get("kind") or "-",
                    f["state"],
                    workers,
                    str(f.get("requests", 0)),
                ]
            )
        if not rows:
            print("no functions deployed (hourai deploy NAME PATH)")
            return
        _table(rows, ["NAME", "VERSION", "TENANT", "KIND", "STATE", "WORKERS", "REQUESTS"])

    return _run(args, call)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def cmd_show(args: argparse.Namespace) -> int:
    def call() -> None:
        doc = _client(args).show(args.name)
        if args.json:
            _print_json(doc)
            return
        print(f"{doc['name']}: {doc['state']}, version {doc.get('active') or '-'}")
        for key in (
            *("tenant", "code", "tenant_limits", "declared_tenant_limits", "min_warm"),
            *("restore_error", "limits_error"),
        ):
            if doc.get(key) not in (None, ""):
                print(f"  {key.replace('_', ' ')}: {doc[key]}")
        if doc.get("env"):
            print(f"  env: {', '.join(doc['env'])}")
        if doc.get("limits"):
            lim = doc["limits"]
            print("  limits: " + ", ".join(f"{k}={v}" for k, v in lim.items() if v is not None))
        st = doc.get("scheduler")
        if st:
            w = st["workers"]
            print(
                f"  snapshot {st['snapshot']}; workers: "
                + ", ".join(f"{n} {k}" for k, n in w.items() if n)
                + (" (none)" if not any(w.values()) else "")
            )
            print(
                f"  starts: {', '.join(f'{k} {n}' for k, n in st['starts'].items())}; "
                f"queued {st['queued']}, in flight {st['inflight']}"
            )
            if st.get("last_error"):
                print(f"  last error: {st['last_error']}")
        for line in _event_lines(doc):
            print(f"  {line}")
        req = doc.get("requests")
        if req and req["requests"]:
            lat = req["latency_ms"]
            by_status = ", ".join(f"{k} {n}" for k, n in req["by_status"].items())
            print(
                f"  requests: {req['requests']} ({by_status}); "
                f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms"
            )
        print("  versions:")
        for v in doc["versions"]:
            mark = "*" if v["active"] else " "
            note = f"  {v['error']}" if v.get("error") else ""
            print(
                f"   {mark} {v['version']}  {v['status']:<11} {v.get('kind') or '-':<7} "
                f"{v['source']}  deployed {_ago(v['deployed_at'])}{note}"
            )

    return _run(args, call)


def _event_lines(doc: dict[str, Any]) -> list[str]:
    """What `hourai show` says of async settings, the schedule and the trigger."""
    out = []
    a = doc.get("async")
    if a:
        q = a.get("queue") or {}
        dest = ", ".join(f"{k} -> {a[k]}" for k in ("on_success", "on_failure") if a.get(k))
        out.append(
            f"async: {a['retries']} retries, max age {a['max_age']:g}s, {a['concurrency']} in "
            f"flight at most; queued {q.get('queued', 0)}, running {q.get('running', 0)}, "
            f"dead {q.get('dead', 0)}" + (f"; {dest}" if dest else "")
        )
    sched = doc.get("schedule")
    if sched:
        out.append(f"schedule: {sched['expression']} ({sched['ticks']} ticks since start)")
        if sched.get("missed"):
            out.append(f"  missed: {sched['missed']}")
    trig = doc.get("trigger")
    if trig:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(trig["counts"].items())) or "nothing yet"
        out.append(f"trigger: {trig['source']}, batches of {trig['batch_size']}; {counts}")
        if trig.get("error"):
            out.append(f"  error: {trig['error']}")
    return out


def cmd_rm(args: argparse.Namespace) -> int:
    def call() -> None:
        doc = _client(args).remove(args.name)
        if args.json:
            _print_json(doc)
        elif doc.get("set_aside"):
            print(f"removed {args.name}; its corrupt record was moved to {doc['set_aside']}")
        else:
            print(f"removed {args.name} ({doc.get('versions', 0)} versions)")

    return _run(args, call)


def cmd_invoke(args: argparse.Namespace) -> int:
    given = sum(x is not None for x in (args.data, args.event, args.stdin))
    if given > 1:
        raise UsageError("give at most one of --data, --event and -")
    if args.asynchronous:
        return _invoke_async(args)
    request: dict[str, Any] = {"path": args.path}
    if args.method:
        request["method"] = args.method
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header takes NAME:VALUE, got {h!r}")
        headers.append([name.strip(), value.strip()])
    if headers:
        request["headers"] = headers
    if args.event is not None:
        # A direct invocation: the event goes to the function exactly as written.
        try:
            text = sys.stdin.read() if args.event == "-" else Path(args.event).read_text()
            json.loads(text)
        except OSError as exc:
            raise UsageError(f"cannot read {args.event}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{args.event} is not JSON: {exc}") from None
        request = {"event_json": text}
    elif args.data is not None:
        request["body"] = args.data
    elif args.stdin:
        request["body"] = sys.stdin.read()
    if "body" in request and not any(h[0].lower() == "content-type" for h in headers):
        try:
            json.loads(request["body"])
        except ValueError:
            headers.append(["content-type", "text/plain; charset=utf-8"])
            request["headers"] = headers
    status = 0

    def call() -> None:
        nonlocal status
        doc = _client(args).invoke(args.name, request)
        if args.json:
            _print_json(doc)
        else:
            if "body_base64" in doc:
                import base64

                sys.stdout.buffer.write(base64.b64decode(doc["body_base64"]))
            else:
                body = doc.get("body", "")
                sys.stdout.write(body if body.endswith("\n") or not body else body + "\n")
            sys.stdout.flush()
        if doc.get("function_error"):
            try:
                error = json.loads(doc.get("body") or "{}")
            except ValueError:
                error = {}
            print(
                f"hourai: {args.name} raised {error.get('errorType', 'an error')}: "
                f"{error.get('errorMessage', '')} (what it printed: hourai logs {args.name})",
                file=sys.stderr,
            )
            status = EXIT_REFUSED
        elif doc["status"] >= 400:
            print(f"hourai: {args.name} answered {doc['status']}", file=sys.stderr)
            status = EXIT_REFUSED

    return _run(args, call) or status


def _invoke_async(args: argparse.Namespace) -> int:
    """The event as written (any JSON), queued; its id printed once it is durable."""
    try:
        if args.event is not None:
            text = sys.stdin.read() if args.event == "-" else Path(args.event).read_text()
        elif args.data is not None:
            text = args.data
        elif args.stdin:
            text = sys.stdin.read()
        else:
            text = "{}"
        event = json.loads(text)
    except OSError as exc:
        raise UsageError(f"cannot read {args.event}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"the event is not JSON: {exc}") from None

    # The caller's trace context: -H traceparent:..., as for a synchronous invoke, else
    # $TRACEPARENT (OpenTelemetry's environment carrier, set by a traced parent process).
    traceparent = next(
        (
            v.strip()
            for n, _, v in (h.partition(":") for h in args.header)
            if n.strip().lower() == "traceparent"
        ),
        os.environ.get("TRACEPARENT") or None,
    )

    def call() -> None:
        doc = _client(args).invoke_async(args.name, event, traceparent)
        if args.json:
            _print_json(doc)
        else:
            print(doc["id"])

    return _run(args, call)


def cmd_invocations(args: argparse.Namespace) -> int:
    def call() -> None:
        client = _client(args)
        if args.id:
            doc = client.invocations(args.name, args.id)
            if args.json:
                _print_json(doc)
                return
            print(
                f"{doc['id']}: {doc['status']}, {doc['attempts']} of {doc['max_attempts']} "
                f"attempts ({doc['source']}, accepted {_ago(doc['accepted_at'])})"
            )
            if doc.get("condition"):
                print(f"  condition: {doc['condition']}")
            if doc.get("error"):
                print(f"  error: {doc['error']}")
            tp = doc.get("traceparent")
            if tp:  # hourai's own publish span: what each attempt's trace links to
                print(f"  accepted in trace {tp[3:35]} (span {tp[36:52]})")
            if "result" in doc:
                print(f"  result: {json.dumps(doc['result'])}")
            print(f"  event: {json.dumps(doc.get('event'))}")
            return
        doc = client.invocations(args.name, limit=args.limit, status=args.status)
        if args.json:
            _print_json(doc)
            return
        rows = [
            [
                i["id"],
                i["status"],
                f"{i['attempts']}/{i['max_attempts']}",
                i["source"],
                _ago(i["accepted_at"]),
                (i.get("error") or "")[:60],
            ]
            for i in doc["invocations"]
        ]
        if not rows:
            print(f"no async invocations of {args.name} (hourai invoke {args.name} --async)")
            return
        _table(rows, ["ID", "STATUS", "ATTEMPTS", "SOURCE", "ACCEPTED", "ERROR"])

    return _run(args, call)


def cmd_logs(args: argparse.Namespace) -> int:
    if args.lines is not None and args.lines < 0:
        raise UsageError("--lines must be 0 or more")

    wanted = RequestLines(args.request) if args.request else None
    if args.lines is None:
        args.lines = 100 if wanted is None else 1_000_000

    def call() -> None:
        client = _client(args)
        doc = client.logs(args.name, lines=args.lines)
        if wanted is not None:
            doc["text"] = wanted.filter(doc["text"])
        _emit_logs(args, doc)
        if not args.follow:
            return
        cursor = doc["cursor"]
        try:
            while True:
                doc = client.logs(args.name, cursor=cursor, wait=25)
                if wanted is not None:
                    doc["text"] = wanted.filter(doc["text"])
                _emit_logs(args, doc)
                cursor = doc["cursor"]
        except KeyboardInterrupt:
            return

    return _run(args, call)


class RequestLines:
    """The lines of one request in a function's log (tagged ``req=`` and ``trace=`` by the
    daemon); an error id is taken to its request by the traceback's ``error ID in request
    REQ`` line."""

    def __init__(self, ident: str) -> None:
        self.ids = {ident}
        self._error = re.compile(rf"\berror {re.escape(ident)} in request ([0-9a-f]+-\d+)")

    def filter(self, text: str) -> str:
        # by "\n" only: what a function printed may hold other characters splitlines() cuts at
        lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
        for line in lines:  # first: the request an error id names may have printed before
            found = self._error.search(line)
            if found is not None:
                self.ids.add(found.group(1))
        out = []
        for line in lines:
            if any(
                f"req={i} " in line or f"req={i}]" in line or f"trace={i}]" in line
                for i in self.ids
            ):
                out.append(line)
        return "".join(out)


def _emit_logs(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(doc), flush=True)
    elif doc["text"]:
        sys.stdout.write(doc["text"])
        sys.stdout.flush()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def cmd_stats(args: argparse.Namespace) -> int:
    def call() -> None:
        doc = _client(args).stats()
        if args.json:
            _print_json(doc)
            return
        host = doc["host"]
        print(
            f"host: {host['workers']} workers, {host['functions']} functions, "
            f"up {host['uptime_s']:.0f}s; {host['cgroups']}"
        )
        for warning in host.get("warnings", []):
            print(f"  WARNING: {warning}")
        rows = []
        for name, f in sorted(doc["functions"].items()):
            w = f["workers"]
            lat = f["latency_ms"]
            rows.append(
                [
                    name,
                    f["tenant"],
                    f["state"],
                    "/".join(str(w.get(k, 0)) for k in ("spare", "idle", "busy")),
                    str(f["requests"]),
                    "/".join(str(f["starts"].get(k, 0)) for k in ("warm", "spare", "fork", "cold")),
                    "-" if lat["p50"] is None else f"{lat['p50']:.2f}",
                    "-" if lat["p99"] is None else f"{lat['p99']:.2f}",
                    _size(f.get("memory_pss")),
                ]
            )
        if rows:
            print()
            _table(
                rows,
                [
                    "FUNCTION",
                    "TENANT",
                    "STATE",
                    "SPARE/IDLE/BUSY",
                    "REQUESTS",
                    "WARM/SPARE/FORK/COLD",
                    "P50MS",
                    "P99MS",
                    "PSS",
                ],
            )
        rows = []
        for name, t in sorted(doc["tenants"].items()):
            rows.append(
                [
                    name,
                    str(t.get("uid", "-")),
                    str(t["functions"]),
                    _size(t.get("memory_current")),
                    _size(t.get("memory_peak")),
                    "-" if "cpu_usec" not in t else f"{t['cpu_usec'] / 1e6:.2f}s",
                    str(t.get("pids", "-")),
                    str(t.get("oom_kills", "-")),
                    t.get("limits", "-"),
                ]
            )
        if rows:
            print()
            _table(
                rows,
                ["TENANT", "UID", "FUNCTIONS", "MEMORY", "PEAK", "CPU", "PIDS", "OOM", "LIMITS"],
            )
        rows = [
            [
                z["name"],
                z["tenant"],
                z["parent"],
                ", ".join(z["packages"]),
                str(z["functions"]),
                str(z["snapshots"]),
                _size(z.get("memory_pss")),
            ]
            for z in doc.get("zygotes", [])
        ]
        if rows:
            print()
            header = ["ZYGOTE", "TENANT", "FROM", "PACKAGES", "FUNCTIONS", "SNAPSHOTS", "PSS"]
            _table(rows, header)

    return _run(args, call)


def attach_instructions(doc: dict[str, Any]) -> str:
    """What to tell a debugger: where to attach, and which of its paths are the worker's."""
    config = {
        "name": f"hourai: {doc['function']}",
        "type": "debugpy",
        "request": "attach",
        "connect": {"host": doc["host"], "port": doc["port"]},
        "pathMappings": [{"localRoot": doc["source_root"], "remoteRoot": doc["code_root"]}],
        "justMyCode": True,
    }
    return (
        f"{doc['function']}: debugpy listens on {doc['host']}:{doc['port']} "
        f"(worker {doc['pid']}); the function's requests go to it until you detach.\n"
        'Attach with this configuration (VS Code: .vscode/launch.json "configurations"):\n'
        + json.dumps(config, indent=2)
    )


def cmd_debug(args: argparse.Namespace) -> int:
    def call() -> None:
        client = _client(args)
        if args.stop:
            doc = client.debug_stop(args.name)
            print(json.dumps(doc) if args.json else f"{args.name}: debug session ended")
            return
        doc = client.debug(args.name, args.port)
        print(json.dumps(doc, indent=2) if args.json else attach_instructions(doc))

    return _run(args, call)


def cmd_rollback(args: argparse.Namespace) -> int:
    def call() -> None:
        doc = _client(args).rollback(args.name, args.version)
        if args.json:
            _print_json(doc)
        elif doc.get("unchanged"):
            print(f"{args.name}: version {doc['version']} is already serving")
        else:
            print(f"{args.name}: now serving version {doc['version']} (was {doc['previous']})")

    return _run(args, call)
