"""A function that probes its own confinement and misbehaves on request."""

import os
import resource
import signal
import sys
import time


def handler(event, context):
    # the last segment: the function may be mounted under a prefix (/<name>/whoami)
    path = "/" + event["rawPath"].rsplit("/", 1)[-1]
    params = event.get("queryStringParameters") or {}
    if path == "/whoami":
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        with open("/proc/self/cgroup") as f:
            cgroups = f.read().splitlines()
        return {
            "pid": os.getpid(),
            "pidns": os.stat("/proc/self/ns/pid").st_ino,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "groups": os.getgroups(),
            "tmpdir": os.environ.get("TMPDIR"),
            "env": sorted(os.environ),
            "no_new_privs": status.get("NoNewPrivs", "").strip(),
            "core": resource.getrlimit(resource.RLIMIT_CORE),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "cgroups": cgroups,
            "sys_path_ok": __import__("wave").__name__,  # a stdlib module nobody preloads
            # a submodule of a package imported before the privilege drop (encodings)
            "idna": "bücher.example".encode("idna").decode(),
        }
    if path == "/write":
        target = os.path.join(os.environ["TMPDIR"], params.get("name", "secret.txt"))
        with open(target, "w") as f:
            f.write(params.get("text", "secret"))
        return {"written": target}
    if path == "/read":
        try:
            with open(params["path"]) as f:
                return {"read": f.read()}
        except OSError as exc:
            return {"error": type(exc).__name__}
    if path == "/write-code":
        try:
            with open(__file__, "a") as f:
                f.write("# tampered\n")
            return {"wrote": True}
        except OSError as exc:
            return {"error": type(exc).__name__}
    if path == "/signal":
        try:
            os.kill(int(params["pid"]), signal.SIGKILL)
            return {"killed": True}
        except OSError as exc:
            return {"error": type(exc).__name__}
    if path == "/alloc":
        hog = []
        while True:  # until the kernel's OOM killer ends us
            hog.append(bytearray(16 * 1024 * 1024))
            hog[-1][::4096] = b"x" * len(hog[-1][::4096])
    if path == "/forkbomb":
        while True:  # every process keeps forking; pids.max is what stops it
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    if path == "/spin":
        end = time.monotonic() + float(params.get("s", "1"))
        n = 0
        while time.monotonic() < end:
            n += 1
        return {"spins": n}
    print("probe", file=sys.stderr)
    return "ok"
