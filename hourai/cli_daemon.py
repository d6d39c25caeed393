"""`hourai daemon` and the commands that drive it through its control socket.

Exit codes: 0 done; 1 refused or failed (the daemon said why); 2 usage error; 3 no daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from hourai.cli import UsageError, parse_env_pairs, read_env_file, run_async
from hourai.client import ApiFailure, Client, DaemonUnreachable
from hourai.config import ConfigError, default_socket, load_config

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("daemon", help="run the multi-function daemon (the systemd service)")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--state-dir", type=Path, help="overrides state_dir")
    p.add_argument("--listen", action="append", metavar="HOST:PORT", help="overrides listen")
    p.add_argument("--socket", type=Path, help="overrides control_socket")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_daemon)

    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument(
            "--socket",
            type=Path,
            help="control socket (default: $HOURAI_SOCKET or /var/lib/hourai/control.sock)",
        )
        c.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
        return c

    d = client_parser("deploy", "deploy a function (a file or a directory)")
    d.add_argument("name")
    d.add_argument("path")
    d.add_argument("--entry", help="ATTR or MODULE:ATTR inside PATH")
    d.add_argument("--kind", choices=["handler", "asgi", "wsgi"])
    d.add_argument("--tenant")
    d.add_argument("--memory", help="tenant memory limit, e.g. 128M")
    d.add_argument("--cpu", help="tenant cpu limit in cores")
    d.add_argument("--pids", type=int, help="tenant process limit")
    d.add_argument("--timeout", type=float)
    d.add_argument("--concurrency", type=int)
    d.add_argument("--max-workers", type=int)
    d.add_argument("--min-warm", type=int, help="workers kept ready (pre-forked spares)")
    d.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--env-file", action="append", default=[], metavar="FILE")
    d.set_defaults(func=cmd_deploy)

    client_parser("ls", "list deployed functions").set_defaults(func=cmd_ls)
    s = client_parser("show", "one function: versions, workers, policy")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    r = client_parser("rm", "remove a function")
    r.add_argument("name")
    r.set_defaults(func=cmd_rm)
    i = client_parser("invoke", "call a function once and print its answer")
    i.add_argument("name")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--data", help="JSON request body")
    src.add_argument("--event", type=Path, help="file holding the JSON request body ('-': stdin)")
    i.add_argument("--path", default="/", help="request path (default /)")
    i.set_defaults(func=cmd_invoke)
    lg = client_parser("logs", "a function's output")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(func=cmd_logs)
    client_parser("stats", "workers, requests, start paths, memory").set_defaults(func=cmd_stats)
    rb = client_parser("rollback", "serve an earlier version again")
    rb.add_argument("name")
    rb.add_argument("version", nargs="?")
    rb.set_defaults(func=cmd_rollback)


def cmd_daemon(args: argparse.Namespace) -> int:
    from hourai.logs import setup_daemon_logging
    from hourai.service import run_daemon

    try:
        config = load_config(
            args.config, state_dir=args.state_dir, listen=args.listen, control_socket=args.socket
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    setup_daemon_logging(config.log_format, args.verbose)
    return run_async(run_daemon(config, args.config))


# ------------------------------------------------------------------------- client side


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket or default_socket())


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    try:
        return _client(args).call(method, path, body)
    except DaemonUnreachable as exc:
        print(f"hourai: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None
    except ApiFailure as exc:
        if getattr(args, "json", False):
            print(json.dumps(exc.doc, indent=2))
        else:
            print(f"hourai: error: {exc}", file=sys.stderr)
            if exc.doc.get("details"):
                print(exc.doc["details"].rstrip(), file=sys.stderr)
        raise SystemExit(EXIT_FAILED if exc.status >= 422 or exc.status == 404 else 2) from None


def _out(args: argparse.Namespace, doc: Any, text: str) -> int:
    print(json.dumps(doc, indent=2, default=str) if args.json else text)
    return 0


def _function_toml(path: Path) -> dict[str, Any]:
    """Deploy settings from a hourai.toml in the function's directory (flags win)."""
    directory = path if path.is_dir() else path.parent
    file = directory / "hourai.toml"
    if not file.is_file():
        return {}
    try:
        doc = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{file}: {exc}") from None
    known = {
        "entry",
        "kind",
        "tenant",
        "memory",
        "cpu",
        "pids",
        "timeout",
        "concurrency",
        "max_workers",
        "min_warm",
        "env",
    }
    unknown = set(doc) - known
    if unknown:
        raise UsageError(f"{file}: unknown key {sorted(unknown)[0]!r}")
    return doc


def cmd_deploy(args: argparse.Namespace) -> int:
    path = Path(args.path).resolve()
    if not path.exists():
        raise UsageError(f"no such file or directory: {args.path}")
    toml = _function_toml(path)

    def pick(flag: str) -> Any:
        value = getattr(args, flag)
        return value if value is not None else toml.get(flag)

    env = {str(k): str(v) for k, v in (toml.get("env") or {}).items()}
    for f in args.env_file:
        env.update(read_env_file(f))
    env.update(parse_env_pairs(args.env))
    limits = {
        k: pick(k)
        for k in ("timeout", "concurrency", "max_workers", "min_warm")
        if pick(k) is not None
    }
    body = {
        "name": args.name,
        "path": str(path),
        "entry": pick("entry"),
        "kind": pick("kind"),
        "tenant": pick("tenant"),
        "env": env,
        "limits": limits,
        "resources": {"memory": pick("memory"), "cpu": pick("cpu"), "pids": pick("pids")},
    }
    doc = _call(args, "POST", "/functions", body)
    return _out(
        args,
        doc,
        f"deployed {doc['name']} version {doc['version']}: {doc['kind']} {doc['attr']!r}, "
        f"tenant {doc['tenant']}, snapshot built in {doc['init_ms']:.0f} ms",
    )


def cmd_ls(args: argparse.Namespace) -> int:
    doc = _call(args, "GET", "/functions")
    rows = [f"{'NAME':24} {'VERSION':12} {'TENANT':12} {'STATE':10} {'WORKERS':>7}  SOURCE"]
    for f in doc["functions"]:
        rows.append(
            f"{f['name']:24} {f['version']:12} {f['tenant']:12} {f['state']:10} "
            f"{f['workers']:>7}  {f['source']}"
        )
    return _out(args, doc, "\n".join(rows))


def cmd_show(args: argparse.Namespace) -> int:
    doc = _call(args, "GET", f"/functions/{args.name}")
    lines = [f"{doc['name']}: active version {doc['active']}"]
    for v in doc["versions"]:
        mark = "*" if v["version"] == doc["active"] else " "
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created"]))
        lines.append(f" {mark} {v['version']}  {when}  {v['source']}  tenant {v['tenant']}")
    sched = doc.get("scheduler")
    if sched:
        lines.append(
            f"state {sched['state']}; workers {sched['workers']}; starts {sched['starts']}"
        )
    policy = doc.get("policy")
    if policy:
        w = policy.get("windows", {})
        lines.append(
            f"snapshot keep-alive {w.get('keep_alive_s', 0):.0f}s, pre-warm after "
            f"{w.get('prewarm_s', 0):.0f}s ({w.get('source')}); actions {policy.get('actions')}"
        )
    return _out(args, doc, "\n".join(lines))


def cmd_rm(args: argparse.Namespace) -> int:
    doc = _call(args, "DELETE", f"/functions/{args.name}")
    return _out(args, doc, f"removed {args.name}")


def cmd_invoke(args: argparse.Namespace) -> int:
    body: Any = ""
    if args.data is not None:
        raw = args.data
    elif args.event is not None:
        raw = sys.stdin.read() if str(args.event) == "-" else args.event.read_text()
    else:
        raw = None
    if raw is not None:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"the event is not JSON: {exc}") from None
    doc = _call(args, "POST", f"/functions/{args.name}/invoke", {"body": body, "path": args.path})
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(doc["body"])
    return 0 if doc["status"] < 400 else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    offset = 0
    while True:
        doc = _call(args, "GET", f"/logs/{args.name}?offset={offset}")
        sys.stdout.write(doc["text"])
        sys.stdout.flush()
        offset = doc["offset"]
        if not args.follow:
            return 0
        time.sleep(0.5)


def cmd_stats(args: argparse.Namespace) -> int:
    doc = _call(args, "GET", "/stats")
    lines = [f"cgroups: {doc['cgroups']}"]
    lines += [f"WARNING: {w}" for w in doc["warnings"]]
    for name, st in sorted(doc["functions"].items()):
        pol = st.get("policy", {}).get("windows", {})
        lines.append(
            f"{name}: {st['state']}, workers {st['workers']}, queued {st['queued']}, "
            f"starts {st['starts']}, rejections {st['rejections']}"
            + (f", snapshot keep-alive {pol.get('keep_alive_s', 0):.0f}s" if pol else "")
        )
    for tenant, usage in sorted(doc["tenants"].items()):
        if "memory_current" in usage:
            lines.append(
                f"tenant {tenant}: memory {usage['memory_current'] >> 20} MiB "
                f"(peak {usage['memory_peak'] >> 20} MiB), cpu {usage['cpu_usec'] / 1e6:.1f}s, "
                f"pids {usage['pids']}, oom kills {usage['oom_kills']}"
            )
    return _out(args, doc, "\n".join(lines))


def cmd_rollback(args: argparse.Namespace) -> int:
    body = {"version": args.version} if args.version else {}
    doc = _call(args, "POST", f"/functions/{args.name}/rollback", body)
    return _out(args, doc, f"{doc['name']} now serves version {doc['version']}")
