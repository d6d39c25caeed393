"""A function for async invocation tests: the event says what to do."""

import json
import os
import time


def handler(event, context):
    # invoked directly, the event is as the caller gave it; over HTTP, the body is
    ev = json.loads(event["body"] or "{}") if "rawPath" in event else event
    if isinstance(ev, dict):
        if ev.get("sleep"):
            time.sleep(ev["sleep"])
        if ev.get("crash"):
            os._exit(3)
        if ev.get("fail"):
            raise RuntimeError(f"failing on purpose: {ev['fail']}")
        if "Records" in ev:
            for r in ev["Records"]:
                if '"sleep"' in r["body"]:
                    time.sleep(json.loads(r["body"])["sleep"])
            failed = [
                {"itemIdentifier": r["messageId"]}
                for r in ev.get("Records", [])
                if "fail" in r["body"]
            ]
            return {"batchItemFailures": failed, "got": [r["body"] for r in ev["Records"]]}
    return {"got": ev, "pid": os.getpid()}
