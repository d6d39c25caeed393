"""Holds ?mb= MiB and keeps writing every page of it for ?s= seconds: a memory hog that
stays under its tenant's limit (so it keeps hogging instead of being OOM-killed)."""

import time

PAGE = 4096


def handler(event, context):
    params = event.get("queryStringParameters") or {}
    mb = int(params.get("mb", "96"))
    end = time.monotonic() + float(params.get("s", "0.5"))
    block = bytearray(mb << 20)
    passes = 0
    while time.monotonic() < end:
        block[::PAGE] = bytes([passes & 0xFF]) * len(block[::PAGE])
        passes += 1
    return {"mb": mb, "passes": passes}
