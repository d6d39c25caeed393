"""Reports what it can import: its declared packages, and what it did not declare."""

import errno
import importlib
import os


def handler(event, context):
    out = {}
    for name in ("alpha", "beta", "gamma", "flask", "msgpack", "uvloop"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            out[name] = f"ModuleNotFoundError: {exc}"
            continue
        out[name] = (
            getattr(module, "X", None)
            or getattr(module, "Y", None)
            or getattr(module, "G", None)
            or "imported"
        )
        if name in ("alpha", "beta", "gamma"):
            out[name + "_dir"] = os.path.dirname(os.path.dirname(module.__file__))
            try:
                with open(os.path.join(os.path.dirname(module.__file__), "planted.py"), "w"):
                    pass
                out[name + "_write"] = "written"
            except OSError as exc:
                out[name + "_write"] = errno.errorcode.get(exc.errno or 0, str(exc))
    return out
