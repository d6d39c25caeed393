"""Burns CPU for ?s= seconds: the noisy neighbour of the isolation benchmark."""

import time


def handler(event, context):
    seconds = float((event.get("queryStringParameters") or {}).get("s", "0.5"))
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return {"spins": n}
