"""A/B the fork path of two source trees, side by side: `python -m bench.ab_fork OLD NEW [N]`.

Starts `bench.server` on the hello handler from each tree (spares 0, keep-alive 0: every
request forks a worker from the snapshot) and sends N requests to each, alternating which
tree goes first, so both see the same machine at the same moments. Prints n, p50 and p90 of
the fork-path requests per tree. For a change's cost on the fork path on a shared machine,
where two separate runs minutes apart are not comparable.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from bench.httpclient import Client


def start(tree: str) -> tuple[subprocess.Popen[str], Client]:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.server", f"{tree}/examples/hello/handler.py"),
            *("--spares", "0", "--keep-alive", "0"),
        ],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Client(int(proc.stdout.readline().split()[1]))


def main(argv: list[str]) -> None:
    old, new = argv[0], argv[1]
    n = int(argv[2]) if len(argv) > 2 else 100
    servers = {"old": start(old), "new": start(new)}
    samples: dict[str, list[float]] = {k: [] for k in servers}
    try:
        for i in range(n):
            for name in ("old", "new") if i % 2 else ("new", "old"):
                time.sleep(0.05)  # the previous worker is reaped, the machine settles
                status, headers, _body, ms = servers[name][1].get("/")
                if status != 200:
                    raise RuntimeError(f"{name}: HTTP {status}")
                if headers.get("x-hourai-start") == "fork":
                    samples[name].append(ms)
    finally:
        for proc, client in servers.values():
            client.close()
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
    for name, values in samples.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"{name} n {len(values)} p50 {statistics.median(values):.3f} ms p90 {p90:.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
