"""A worker that a debugger attaches to: the worker's side of ``hourai debug``.

The daemon forks a fresh worker for the session (hourai.debug) and sends it one ``debug``
frame before any invocation. Here the worker imports debugpy from the directory the frame
names, hourai's own environment, and takes that directory off ``sys.path`` again at once:
a function whose import path is its declared packages only (hourai.packages.importpath)
must not start seeing the daemon's packages because it is being debugged. The debug
adapter runs in this process (``in_process_debug_adapter``), so the session is one
process in the function's sandbox, listening on loopback only.

Once a client has attached and gone again, the worker exits after the invocation it is
running, if any: a process that was stopped at breakpoints and had its variables changed
by hand serves no one else (the daemon sees it go and retires the session).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

_state = {"busy": 0}


def start(msg: dict[str, Any]) -> dict[str, Any]:
    """Open the listener the ``debug`` frame asks for; the ``debugging`` frame to reply."""
    try:
        debugpy = _import_debugpy(msg.get("path"))
        host, port = debugpy.listen(
            ("127.0.0.1", int(msg.get("port", 0))), in_process_debug_adapter=True
        )
    except Exception as exc:
        return {"t": "debugging", "error": f"{type(exc).__name__}: {exc}"}
    watcher = threading.Thread(
        target=_retire_after_detach, args=(debugpy,), name="hourai-debug", daemon=True
    )
    # Not the user's thread: hidden from the debugger and never suspended with the others
    # when a breakpoint stops "all threads" (pydevd's own mark for its helper threads).
    # A watcher suspended through a whole attach-stop-detach would never see it end.
    watcher.is_pydev_daemon_thread = True  # type: ignore[attr-defined]
    watcher.start()
    return {"t": "debugging", "host": host, "port": port, "pid": os.getpid()}


def busy(delta: int) -> None:
    _state["busy"] += delta


def _import_debugpy(path: str | None) -> Any:
    if "debugpy" in sys.modules:
        return sys.modules["debugpy"]
    added = bool(path) and path not in sys.path
    if added:
        sys.path.insert(0, path)  # type: ignore[arg-type]
    try:
        import debugpy
    finally:
        if added:
            sys.path.remove(path)  # type: ignore[arg-type]
    return debugpy


def _retire_after_detach(debugpy: Any) -> None:
    debugpy.trace_this_thread(False)
    # Blocks until a client has attached: a poll of is_client_connected() alone can miss
    # a session shorter than its interval.
    debugpy.wait_for_client()
    while True:
        if not debugpy.is_client_connected() and _state["busy"] == 0:
            # Gone, and nothing of a request is left on the stack: leave for good.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        time.sleep(0.1)
