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
        return {"pid": os.getpid(), "ppid": os.getppid(), "imported_in": IMPORTED_IN}
    if path.endswith("/sleep"):
        time.sleep(float(params.get("s", "1")))
        return {"slept": float(params.get("s", "1"))}
    if path.endswith("/raise"):
        raise ValueError("deliberate failure")
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
