"""`python -m bench.deploy [--requirements FILE] [--index-url URL]`: what a deploy costs when a
function brings its own dependencies.

Three deploys of a Flask app with the same requirements, each timed from the control API
request to the answer (the snapshot is built and serving by then):

- cold: an empty uv cache and an empty package store: everything is downloaded and installed;
- warm cache: a new state dir (empty store) over the same uv cache: installed, not downloaded;
- stored: a second function on the same host: resolved again, nothing installed.

Each cold/warm run is its own `hourai daemon` on a temp dir it removes afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hourai.client import Client

APP = """from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "hello"
"""


def _daemon(state: Path, cache: Path, index_url: str | None) -> subprocess.Popen[bytes]:
    config = state.parent / f"{state.name}.toml"
    text = 'listen = ["127.0.0.1:0"]\ncgroup_subtree = "hourai-bench-deploy"\n'
    text += "[defaults]\nspares = 0\n[packages]\n" + f'cache_dir = "{cache}"\n'
    if index_url:
        text += f'index_url = "{index_url}"\n'
    config.write_text(text)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hourai",
            "daemon",
            "--config",
            str(config),
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Client(state / "control.sock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.health()[0] == 200:
                return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the daemon did not become ready")


def _deploy(state: Path, name: str, fn: Path) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    doc = Client(state / "control.sock").deploy(name, str(fn), str(fn), {})
    return time.perf_counter() - t0, doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.deploy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requirements", default="flask==3.0.3\n", help="requirements.txt text")
    parser.add_argument("--index-url", help="index (default: uv's)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hourai-bench-deploy-", dir="/var/tmp"))
    root.chmod(0o711)
    cache = root / "uv-cache"
    try:
        fns = []
        for name in ("app", "app2"):
            fn = root / name
            fn.mkdir()
            (fn / "app.py").write_text(APP)
            (fn / "requirements.txt").write_text(args.requirements)
            fns.append(fn)
        rows: list[tuple[str, float, dict[str, object]]] = []
        for label, state in (
            ("cold (empty uv cache, empty store)", "s1"),
            ("warm uv cache, empty store", "s2"),
        ):
            proc = _daemon(root / state, cache, args.index_url)
            try:
                seconds, doc = _deploy(root / state, "app", fns[0])
                rows.append((label, seconds, doc))
                if state == "s2":
                    seconds, doc = _deploy(root / state, "app2", fns[1])
                    rows.append(("every package stored (a second function)", seconds, doc))
                    # the same, pinned the way pip freeze writes it: resolved once, then never
                    pins = "".join(
                        "{}=={}\n".format(*n.rsplit("-", 1)[0].rsplit("-", 1))
                        for n in doc["packages"]  # type: ignore[union-attr]
                    )
                    for name in ("pinned1", "pinned2"):
                        fn = root / name
                        fn.mkdir()
                        (fn / "app.py").write_text(APP)
                        (fn / "requirements.txt").write_text(pins)
                        seconds, doc = _deploy(root / state, name, fn)
                        what = "first" if name == "pinned1" else "second"
                        rows.append((f"stored, every pin given ({what} time)", seconds, doc))
            finally:
                proc.terminate()
                proc.wait(30)
        print(f"requirements: {args.requirements.strip()}")
        print(f"{'deploy':45s} {'total':>8s}    {'packages':>8s}    {'snapshot':>8s}")
        for label, seconds, doc in rows:
            print(
                f"{label:45s} {seconds * 1e3:8.0f} ms {doc.get('packages_ms', 0):8.0f} ms "
                f"{doc.get('init_ms', 0):8.0f} ms  ({len(doc.get('packages') or [])} dists)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
