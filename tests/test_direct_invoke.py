"""Direct invocation: `hourai invoke --event` and the Lambda Invoke API, driven by an
unmodified boto3 client against a real daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXAMPLES

boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency: pip install -e .[test]")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

DIRECT = """
import asyncio

def handler(event, context):
    if event.get("fail"):
        raise KeyError("no such order: " + str(event["fail"]))
    if event.get("sleep"):
        import time
        time.sleep(event["sleep"])
    if event.get("unserialisable"):
        return {1, 2}
    return {"doubled": event["size"] * 2, "event": event, "request_id": context.aws_request_id}

async def async_handler(event, context):
    await asyncio.sleep(0)
    return [event, context.function_name]
"""
CONFIG = 'lambda_listen = "127.0.0.1:0"\n[defaults]\nspares = 0\n'


@pytest.fixture
def daemon(hourai_daemon, tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "direct").mkdir()
    (tmp_path / "direct" / "handler.py").write_text(DIRECT)
    d = hourai_daemon(CONFIG)
    d.cli("deploy", "direct", str(tmp_path / "direct" / "handler.py"), "--timeout", "2")
    d.cli("deploy", "asyncdirect", str(tmp_path / "direct" / "handler.py:async_handler"))
    d.cli("deploy", "web", str(EXAMPLES / "fastapi_app" / "app.py"))
    d.lambda_url = d.wait_for(r"Lambda Invoke API at (http://[\d.:]+)").group(1)
    d.function_dir = tmp_path / "direct"
    return d


def _lambda(d):  # type: ignore[no-untyped-def]
    return boto3.client(
        "lambda",
        endpoint_url=d.lambda_url,
        region_name="us-east-1",
        aws_access_key_id="hourai",
        aws_secret_access_key="hourai",
        config=Config(retries={"max_attempts": 1}, read_timeout=30),
    )


def _invoke(client, name: str, event: object, **kw):  # type: ignore[no-untyped-def]
    reply = client.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    reply["Payload"] = json.loads(reply["Payload"].read() or b"null")
    return reply


def test_the_cli_hands_the_event_over_exactly_as_written(daemon, tmp_path: Path) -> None:
    (tmp_path / "event.json").write_text('{"size": 10, "nested": {"a": [1, 2.5, null]}}')
    out = json.loads(daemon.cli("invoke", "direct", "--event", str(tmp_path / "event.json")).stdout)
    assert out["doubled"] == 20 and out["event"] == {"size": 10, "nested": {"a": [1, 2.5, None]}}
    failed = daemon.cli("invoke", "direct", "--event", "-", input='{"fail": 7}', check=False)
    assert failed.returncode != 0
    assert "raised KeyError: 'no such order: 7'" in failed.stderr
    assert "hourai logs direct" in failed.stderr


def test_boto3_invokes_a_handler_and_gets_its_payload(daemon) -> None:
    client = _lambda(daemon)
    reply = _invoke(client, "direct", {"size": 21})
    assert reply["StatusCode"] == 200 and "FunctionError" not in reply
    assert reply["Payload"]["doubled"] == 42 and reply["Payload"]["event"] == {"size": 21}
    assert reply["Payload"]["request_id"]
    # a full ARN and an async handler work the same way
    arn = "arn:aws:lambda:us-east-1:000000000000:function:asyncdirect"
    assert _invoke(client, arn, {"x": 1})["Payload"] == [{"x": 1}, "asyncdirect"]


def test_function_errors_come_back_as_lambda_reports_them(daemon) -> None:
    client = _lambda(daemon)
    reply = _invoke(client, "direct", {"fail": 3})
    assert reply["StatusCode"] == 200 and reply["FunctionError"] == "Unhandled"
    error = reply["Payload"]
    assert error["errorType"] == "KeyError" and "no such order: 3" in error["errorMessage"]
    # the traceback names the file that was deployed, not the code store's copy of it
    deployed = str(daemon.function_dir / "handler.py")
    assert any(f'"{deployed}", line' in f for f in error["stackTrace"]), error["stackTrace"]
    assert not any("/code/" in f for f in error["stackTrace"])
    marshal = _invoke(client, "direct", {"unserialisable": True, "size": 1})
    assert marshal["Payload"]["errorType"] == "Runtime.MarshalError"
    timeout = _invoke(client, "direct", {"sleep": 10})
    assert timeout["FunctionError"] == "Unhandled"
    assert timeout["Payload"]["errorType"] == "Sandbox.Timedout"
    # the worker that timed out was replaced: the next call is served
    assert _invoke(client, "direct", {"size": 1})["Payload"]["doubled"] == 2


def test_service_errors_are_botocore_exceptions(daemon) -> None:
    client = _lambda(daemon)
    with pytest.raises(ClientError) as missing:
        client.invoke(FunctionName="nope", Payload=b"{}")
    assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as bad:
        client.invoke(FunctionName="direct", Payload=b"{not json")
    assert bad.value.response["Error"]["Code"] == "InvalidRequestContentException"
    with pytest.raises(ClientError) as qualifier:
        client.invoke(FunctionName="direct", Qualifier="7", Payload=b"{}")
    assert qualifier.value.response["Error"]["Code"] == "ResourceNotFoundException"
    dry = client.invoke(FunctionName="direct", InvocationType="DryRun", Payload=b"{}")
    assert dry["StatusCode"] == 204


def test_an_http_app_takes_an_api_gateway_event_and_refuses_others(daemon) -> None:
    client = _lambda(daemon)
    event = {  # as API Gateway's HTTP API (payload format 2.0) sends it
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"host": "api.example.com", "accept": "application/json"},
        "requestContext": {"http": {"method": "GET", "path": "/", "protocol": "HTTP/1.1"}},
        "isBase64Encoded": False,
    }
    reply = _invoke(client, "web", event)
    assert "FunctionError" not in reply, reply["Payload"]
    assert reply["Payload"]["statusCode"] == 200
    assert json.loads(reply["Payload"]["body"])["message"]
    refused = _invoke(client, "web", {"size": 1})
    assert refused["FunctionError"] == "Unhandled"
    assert refused["Payload"]["errorType"] == "Runtime.InvalidEvent"
    assert "API Gateway event" in refused["Payload"]["errorMessage"]


def test_http_callers_get_the_error_or_only_its_id_when_told(hourai_daemon) -> None:
    from conftest import FUNCTIONS

    d = hourai_daemon("show_errors = false\n[defaults]\nspares = 0\n")
    d.cli("deploy", "b", str(FUNCTIONS / "behave.py"))
    reply = d.get("/b/raise")
    assert reply.status == 500 and b"error id" in reply.body and b"hourai logs b" in reply.body
    assert b"deliberate failure" not in reply.body  # production: no internals
