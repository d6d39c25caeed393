"""Module-level init that takes a while: expensive to rebuild."""

import time

time.sleep(0.4)


def handler(event, context):
    return "dear"
