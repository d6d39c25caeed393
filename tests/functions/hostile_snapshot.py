"""A function whose module-level code, run in its snapshot, writes on the snapshot's channel
to the daemon (the one unix stream socket among the snapshot's fds), as a hostile tenant
could: a frame no snapshot may send."""

import time

# the same way to the channel as the worker attacks (its module is beside this one)
from hostile_worker import _channel, _frame

# a "ready" of a kind the daemon does not know, then a "forked" that claims fds it lacks
_channel().sendall(
    _frame({"t": "ready", "kind": "root-shell", "attr": "x", "init_ms": 0, "pid": 1, "modules": []})
    + _frame({"t": "forked", "wid": 1, "pid": 1})
)
time.sleep(30)


def handler(event, context):
    return "never reached"
