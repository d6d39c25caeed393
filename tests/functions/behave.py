"""A Lambda-style test function whose behaviour is chosen by the request path."""

import json
import os
import signal
import sys
import time

IMPORTED_AT = time.time()
IMPORTED_IN = os.getpid()


def handler(event, context):
    path = event["rawPath"]
    params = event.get("queryStringParameters") or {}
    if path.endswith("/pid"):
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "imported_in": IMPORTED_IN,
            "pidns": os.stat("/proc/self/ns/pid").st_ino,
        }
    if path.endswith("/sleep"):
        time.sleep(float(params.get("s", "1")))
        return {"slept": float(params.get("s", "1"))}
    if path.endswith("/raise"):
        raise ValueError("deliberate failure")
    if path.endswith("/sleep-exit"):
        time.sleep(float(params.get("s", "1")))
        os._exit(3)
    if path.endswith("/exit"):
        os._exit(3)
    if path.endswith("/kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if path.endswith("/print"):
        print(f"out: {params.get('msg', '')}")
        print(f"err: {params.get('msg', '')}", file=sys.stderr)
        return "printed"
    if path.endswith("/env"):
        return dict(os.environ)
    if path.endswith("/signals"):
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines())
        names = ("SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP", "SIGPIPE")
        handlers = {n: signal.getsignal(getattr(signal, n)) for n in names}
        return {
            # SIG_DFL and SIG_IGN as ints; a Python handler by its name
            "handlers": {n: h if isinstance(h, int) else repr(h) for n, h in handlers.items()},
            "blocked": int(status["SigBlk"], 16),
            "wakeup_fd": signal.set_wakeup_fd(-1),
        }
    if path.endswith("/echo"):
        return {
            "statusCode": 201,
            "headers": {"content-type": "application/json", "x-echo": "yes"},
            "body": json.dumps(
                {
                    "method": event["requestContext"]["http"]["method"],
                    "path": path,
                    "query": event.get("rawQueryString"),
                    "body": event.get("body"),
                }
            ),
        }
    return "hello from behave"


_barrier = None


def concurrent(event, context):
    """Returns only when `n` invocations are inside this function at once (thread mode)."""
    import threading

    global _barrier
    n = int((event.get("queryStringParameters") or {}).get("n", "4"))
    if _barrier is None:
        _barrier = threading.Barrier(n, timeout=20)
    _barrier.wait()
    return {"pid": os.getpid(), "pidns": os.stat("/proc/self/ns/pid").st_ino}


async def concurrent_async(event, context):
    """The same for an async handler: `n` invocations awaiting together on one loop."""
    import asyncio

    global _barrier
    n = int((event.get("queryStringParameters") or {}).get("n", "4"))
    if _barrier is None:
        _barrier = {"event": asyncio.Event(), "count": 0}
    _barrier["count"] += 1
    if _barrier["count"] >= n:
        _barrier["event"].set()
    await asyncio.wait_for(_barrier["event"].wait(), 20)
    return {"pid": os.getpid(), "pidns": os.stat("/proc/self/ns/pid").st_ino}


_leak: list[bytearray] = []


def leaky(event, context):
    """Holds on to 24 MiB more with every call (touched, so it is resident)."""
    chunk = bytearray(24 << 20)
    chunk[::4096] = b"x" * len(chunk[::4096])
    _leak.append(chunk)
    return {
        "pid": os.getpid(),
        "pidns": os.stat("/proc/self/ns/pid").st_ino,
        "held_mib": 24 * len(_leak),
    }
