"""Asynchronous invocations through a real daemon: accepted means durable (kill -9 loses
nothing), retries, dead letters, destinations, the HTTP way in, the CLI."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

from conftest import FUNCTIONS, request, wait_until

from hourai.client import Client

NO_SPARES = "[defaults]\nspares = 0\n"


def _function(tmp: Path, name: str, toml: str = "") -> str:
    where = tmp / name
    shutil.copytree(FUNCTIONS / "asyncjob", where)
    (where / "hourai.toml").write_text('entry = "handler"\nasync_retry_delay = 0.1\n' + toml)
    return str(where)


def _done(client: Client, name: str, ids: list[str]) -> bool:
    rows = {i["id"]: i for i in client.invocations(name, limit=1000)["invocations"]}
    return all(rows.get(i, {}).get("status") in ("succeeded", "dead") for i in ids)


def test_async_invoke_cli_http_and_status(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "job", _function(tmp_path, "job"))
    iid = d.cli("invoke", "job", "--async", "--data", '{"n": 1}').stdout.strip()
    assert len(iid) == 32
    client = Client(d.socket)
    wait_until(lambda: _done(client, "job", [iid]), timeout=30)
    doc = client.invocations("job", iid)
    assert doc["status"] == "succeeded" and doc["attempts"] == 1
    assert doc["result"]["got"] == {"n": 1} and doc["event"] == {"n": 1}
    shown = d.cli("invocations", "job", iid).stdout
    assert "succeeded, 1 of 3 attempts" in shown

    # the HTTP way in: Lambda's header, answered 202 at once with the id
    t0 = time.perf_counter()
    reply = request(d.port, "/job/", "POST", b'{"sleep": 0.5}', {"X-Amz-Invocation-Type": "Event"})
    accept_ms = (time.perf_counter() - t0) * 1e3
    assert reply.status == 202, reply.body
    hid = reply.json()["invocationId"]  # type: ignore[index]
    assert reply.headers["x-hourai-invocation-id"] == hid
    assert accept_ms < 400, f"the 202 took {accept_ms:.1f} ms: it must not wait for the run"
    wait_until(lambda: _done(client, "job", [hid]), timeout=30)
    assert client.invocations("job", hid)["source"] == "http"
    listed = d.cli("invocations", "job").stdout
    assert iid in listed and hid in listed
    # synchronous traffic is untouched by the header's absence
    assert request(d.port, "/job/", "POST", b'{"x": 2}').json()["got"] == {"x": 2}  # type: ignore[index]
    metrics = client.metrics()
    assert 'hourai_async_outcomes_total{function="job",outcome="succeeded"} 2.0' in metrics
    assert 'hourai_async_queue_depth{function="job",status="succeeded"} 2.0' in metrics


def test_retries_dead_letter_and_destinations(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "sink", _function(tmp_path, "sink"))
    d.cli(
        "deploy",
        "job",
        _function(tmp_path, "job", 'on_failure = "sink"\non_success = "sink"\n'),
    )
    client = Client(d.socket)
    bad = client.invoke_async("job", {"fail": "always"})["id"]
    crash = client.invoke_async("job", {"crash": True})["id"]
    good = client.invoke_async("job", {"ok": 1})["id"]
    wait_until(lambda: _done(client, "job", [bad, crash, good]), timeout=60)
    for iid in (bad, crash):
        doc = client.invocations("job", iid)
        assert doc["status"] == "dead" and doc["attempts"] == 3, doc
        assert doc["condition"] == "RetriesExhausted"
    assert client.invocations("job", bad)["error"] == "RuntimeError: failing on purpose: always"
    assert client.invocations("job", bad)["result"]["errorType"] == "RuntimeError"

    # the destination function got Lambda's destination records, one per outcome
    def records() -> list[dict]:  # type: ignore[type-arg]
        rows = client.invocations("sink", limit=100)["invocations"]
        return [r["result"]["got"] for r in rows if r["status"] == "succeeded"]

    wait_until(lambda: len(records()) == 3, timeout=30)
    by_id = {r["requestContext"]["requestId"]: r for r in records()}
    assert by_id[good]["requestContext"]["condition"] == "Success"
    assert by_id[good]["responsePayload"]["got"] == {"ok": 1}
    assert by_id[bad]["requestContext"]["condition"] == "RetriesExhausted"
    assert by_id[bad]["requestContext"]["approximateInvokeCount"] == 3
    assert by_id[bad]["requestPayload"] == {"fail": "always"}
    assert by_id[bad]["responseContext"]["functionError"] == "Unhandled"
    assert set(by_id[crash]) >= {"version", "timestamp", "requestContext", "responsePayload"}
    # a Lambda error payload reaches the destination as the response payload
    assert by_id[bad]["responsePayload"]["errorMessage"] == "failing on purpose: always"


def test_kill_9_loses_nothing_accepted(hourai_daemon, tmp_path) -> None:
    """Events accepted (202 / an id) before a kill -9 all run after the restart: those that
    were queued, and those that were running when the daemon died."""
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "job", _function(tmp_path, "job", "async_concurrency = 2\n"))
    client = Client(d.socket)
    ids = [client.invoke_async("job", {"i": i, "sleep": 0.3})["id"] for i in range(12)]
    ids += [
        request(
            d.port,
            "/job/",
            "POST",
            json.dumps({"i": 12 + i}).encode(),
            {"X-Hourai-Invocation-Type": "Event"},
        ).json()["invocationId"]  # type: ignore[index]
        for i in range(4)
    ]
    wait_until(
        lambda: any(i["status"] == "running" for i in client.invocations("job")["invocations"]),
        timeout=30,
    )
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)

    again = hourai_daemon(NO_SPARES)
    assert "queued again" in again.log  # what was running is put back
    client = Client(again.socket)
    wait_until(lambda: _done(client, "job", ids), timeout=90)
    rows = {i["id"]: i for i in client.invocations("job", limit=100)["invocations"]}
    assert all(rows[i]["status"] == "succeeded" for i in ids), rows
    assert sorted(rows[i]["result"]["got"]["i"] for i in ids) == list(range(16))
    interrupted = [i for i in ids if client.invocations("job", i).get("interrupted")]
    assert interrupted, "some were running at the kill"


def test_own_timeout_and_a_cap_that_leaves_room_for_sync(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli(
        "deploy",
        "job",
        _function(
            tmp_path,
            "job",
            "timeout = 1\nasync_timeout = 5\nasync_concurrency = 1\n"
            "max_workers = 3\nasync_retries = 0\n",
        ),
    )
    client = Client(d.socket)
    ids = [client.invoke_async("job", {"sleep": 1.3, "i": i})["id"] for i in range(3)]
    peak = 0
    t_sync: list[float] = []
    deadline = time.monotonic() + 60
    while not _done(client, "job", ids) and time.monotonic() < deadline:
        rows = client.invocations("job")["invocations"]
        peak = max(peak, sum(r["status"] == "running" for r in rows))
        t0 = time.perf_counter()
        assert request(d.port, "/job/", "POST", b'{"x": 1}').status == 200
        t_sync.append(time.perf_counter() - t0)
        time.sleep(0.1)
    rows = {r["id"]: r for r in client.invocations("job")["invocations"]}
    # 1.3 s is past the function's 1 s timeout, within its async_timeout
    assert all(rows[i]["status"] == "succeeded" for i in ids), rows
    assert peak == 1
    assert max(t_sync) < 0.5, f"a synchronous call waited {max(t_sync):.2f}s behind async ones"
    # and the synchronous timeout still holds
    assert request(d.port, "/job/", "POST", b'{"sleep": 1.3}').status == 504


def test_too_old_is_a_dead_letter_with_its_destination(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "sink", _function(tmp_path, "sink"))
    d.cli(
        "deploy",
        "job",
        _function(
            tmp_path, "job", 'async_concurrency = 1\nasync_max_age = 1\non_failure = "sink"\n'
        ),
    )
    client = Client(d.socket)
    slow = client.invoke_async("job", {"sleep": 1.5})["id"]
    late = client.invoke_async("job", {"never": "runs"})["id"]
    wait_until(lambda: _done(client, "job", [slow, late]), timeout=30)
    doc = client.invocations("job", late)
    assert doc["status"] == "dead" and doc["attempts"] == 0
    assert doc["condition"] == "EventAgeExceeded"

    def got() -> list[dict]:  # type: ignore[type-arg]
        rows = client.invocations("sink")["invocations"]
        return [r["result"]["got"] for r in rows if r["status"] == "succeeded"]

    wait_until(lambda: len(got()) == 1, timeout=30)
    assert got()[0]["requestContext"]["condition"] == "EventAgeExceeded"
    assert got()[0]["requestPayload"] == {"never": "runs"}


def test_boto3_invocation_type_event_is_queued(hourai_daemon, tmp_path) -> None:
    import pytest

    boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency")
    from botocore.config import Config

    d = hourai_daemon('lambda_listen = "127.0.0.1:0"\n' + NO_SPARES)
    d.cli("deploy", "job", _function(tmp_path, "job"))
    url = d.wait_for(r"Lambda Invoke API at (http://[\d.:]+)").group(1)
    client = boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}),
    )
    reply = client.invoke(FunctionName="job", InvocationType="Event", Payload=b'{"via": "boto3"}')
    assert reply["StatusCode"] == 202
    iid = reply["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    hourai = Client(d.socket)
    wait_until(lambda: _done(hourai, "job", [iid]), timeout=30)
    doc = hourai.invocations("job", iid)
    assert doc["status"] == "succeeded" and doc["source"] == "lambda-api"
    assert doc["result"]["got"] == {"via": "boto3"}  # handed over directly, as written
