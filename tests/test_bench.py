"""The benchmark suite runs end to end in --quick mode, so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_quick_suite_writes_results_for_every_part(tmp_path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "coldstart",
            "warm",
            "burst",
            "density",
            "isolation",
            "--quick",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["cpu_count"] and doc["machine"]["python"]
    assert doc["machine"]["versions"]["hourai"]
    paths = doc["parts"]["coldstart"]["paths"]
    for path in (
        "inline",
        "warm",
        "warm-gap",
        "spare",
        "spare-warmup",
        "fork",
        "cold",
        "python",
        "fork-floor",
    ):
        assert paths[path]["n"] > 0 and paths[path]["p50_ms"] > 0
    assert set(doc["parts"]["coldstart"]["goals"]) == {
        "warm_added_p50_ms",
        "spare_p50_ms",
        "spare_over_warm_gap_p50_ms",
        "spare_warmup_over_warm_gap_p50_ms",
        "fork_p50_ms",
        "fork_p99_ms",
        "flask_fork_p50_ms",
        "flask_cold_10x",
    }
    apps = doc["parts"]["coldstart"]["apps"]
    for app in ("flask", "fastapi"):
        assert apps[app]["cold (preloaded)"]["n"] > 0
        assert apps[app]["uvicorn_per_request"]["n"] > 0
    burst = doc["parts"]["burst"]["runs"][0]
    assert burst["all_answered"] and burst["answered_200"] == burst["requests"]
    for same_again in (burst["warm_pool"], burst["floor"]):
        assert same_again["all_answered"] and same_again["requests"] == burst["requests"]
    isolation = doc["parts"]["isolation"]
    for mode in ("adaptive off", "adaptive on"):
        cases = isolation[mode]
        for case in ("alone", "cpu hog", "memory hog", "fork bomb"):
            assert cases[case]["n"] > 0 and cases[case]["p50_ratio"] > 0
        # Every neighbour at the same share as the light tenant, whatever it burned.
        for case in ("cpu hog", "memory hog", "fork bomb"):
            assert cases[case]["light_cpu_shares"] == cases[case]["neighbour_cpu_shares"]
        assert 0 < cases["fork bomb"]["neighbour_pids_peak"] <= isolation["limits"]["pids_max"]
    density = doc["parts"]["density"]
    points = density["points"]
    assert [p["functions"] for p in points] == [10, 20]  # one tenant, then two
    for p in points:
        assert p["settled"], p
        # the tree did its work: the functions that use the same packages fork from a zygote
        assert p["zygotes"] > 0 and p["snapshots_on_zygotes"] > 0
        resident, warm = p["resident"], p["warm"]
        roles = set(resident["by_role"])
        assert roles == {"daemon", "root zygote", "package zygotes", "snapshots"}
        assert warm["by_role"]["workers"]["processes"] == p["functions"]
        assert 0 < resident["pss"] < warm["pss"]
        for state in ("idle", "served"):
            assert 0 < p["baseline"][state]["floor"] <= p["baseline"][state]["linear"]
    for variant, cold in density["cold"].items():
        assert cold["no zygote"]["n"] > 0, variant
        if variant != "plain":  # (no packages: no zygote)
            assert cold["with zygote"]["built_on_zygote"] == cold["with zygote"]["n"] > 0
    assert {"cold cache", "warm cache, empty store", "packages stored"} <= set(
        density["deploy_summary"]
    )
    assert len(density["goals"]) == 5
    assert (out / "density.png").stat().st_size > 0
    servers = doc["parts"]["warm"]["servers"]
    assert {
        "raw/asgi",
        "uvicorn/asgi",
        "gunicorn/wsgi",
        "hourai-1w/asgi",
        "hourai-c16/asgi",
        "hourai-1w/wsgi",
    } <= set(servers)
    assert all(s["rps"] > 0 and s["errors"] == 0 for s in servers.values())
    warm = doc["parts"]["warm"]
    assert warm["latency"]["n"] > 0 and warm["latency"]["raw_p50_ms"] > 0
    assert len(warm["goals"]) == 4  # the three throughput ratios and the added latency
    assert all(isinstance(g["met"], bool) for g in warm["goals"].values())
    assert "| path |" in result.stdout  # the table a reader sees


def test_unknown_part_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown part nope" in result.stderr
