"""A fork bomb that burns CPU: every process forks again and spins between attempts, until
the tenant's pids limit makes fork() fail; it runs until its invocation times out."""

import os
import time


def handler(event, context):
    while True:
        try:
            os.fork()
        except OSError:
            end = time.monotonic() + 0.01
            while time.monotonic() < end:
                pass
