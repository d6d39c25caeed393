"""The Lambda compatibility layer against the documented API Gateway payload format 2.0.

Reference: AWS API Gateway developer guide, "Working with AWS Lambda proxy integrations for
HTTP APIs" (payload format 2.0 request example and "Lambda function response for format 2.0").
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from hourai.isolate.lambda_event import LambdaContext, build_event, infer_response

# 2020-03-04 19:03:58.390 UTC
NOW = 1583348638.390


def make_inv(**overrides: Any) -> dict[str, Any]:
    inv: dict[str, Any] = {
        "id": 7,
        "method": "GET",
        "path": "/",
        "root_path": "",
        "query": "",
        "headers": [],
        "body": b"",
        "client": ["192.0.2.1", 40123],
        "server": ["127.0.0.1", 8080],
        "scheme": "http",
        "http_version": "1.1",
        "request_id": "req-1",
        "function": "myfn",
        "deadline_ms": 3000,
        "stage": "$default",
    }
    inv.update(overrides)
    return inv


# -- the event ----------------------------------------------------------------------------------


def test_event_matches_the_documented_2_0_example_field_by_field() -> None:
    inv = make_inv(
        method="POST",
        path="/my/path",
        query="parameter1=value1&parameter1=value2&parameter2=value",
        headers=[
            ["host", "id.execute-api.us-east-1.amazonaws.com"],
            ["user-agent", "agent"],
            ["header1", "value1"],
            ["header2", "value1"],
            ["header2", "value2"],
            ["cookie", "cookie1"],
            ["cookie", "cookie2"],
            ["content-type", "text/plain"],
        ],
        body=b"Hello from Lambda",
    )
    event = build_event(inv, now=NOW)
    assert event == {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/my/path",
        "rawQueryString": "parameter1=value1&parameter1=value2&parameter2=value",
        "cookies": ["cookie1", "cookie2"],
        "headers": {
            "host": "id.execute-api.us-east-1.amazonaws.com",
            "user-agent": "agent",
            "header1": "value1",
            "header2": "value1,value2",
            "content-type": "text/plain",
        },
        "queryStringParameters": {"parameter1": "value1,value2", "parameter2": "value"},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "myfn",
            "domainName": "id.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "id",
            "http": {
                "method": "POST",
                "path": "/my/path",
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "agent",
            },
            "requestId": "req-1",
            "routeKey": "$default",
            "stage": "$default",
            "time": "04/Mar/2020:19:03:58 +0000",
            "timeEpoch": 1583348638390,
        },
        "body": "Hello from Lambda",
        "isBase64Encoded": False,
    }
    # Documented but unused without routes with parameters or stage variables.
    assert "pathParameters" not in event
    assert "stageVariables" not in event


def test_minimal_get_has_no_cookies_query_or_body() -> None:
    event = build_event(make_inv(headers=[["host", "localhost:8080"]]))
    assert "cookies" not in event
    assert "queryStringParameters" not in event
    assert "body" not in event
    assert event["isBase64Encoded"] is False
    assert event["rawQueryString"] == ""
    assert event["requestContext"]["domainName"] == "localhost"
    assert event["requestContext"]["domainPrefix"] == "localhost"
    assert event["requestContext"]["http"]["userAgent"] == ""


def test_time_fields_are_now() -> None:
    before = int(time.time() * 1000)
    ctx = build_event(make_inv())["requestContext"]
    after = int(time.time() * 1000)
    assert before <= ctx["timeEpoch"] <= after
    t = time.gmtime(ctx["timeEpoch"] / 1000)
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    month = months[t.tm_mon - 1]
    assert ctx["time"] == f"{t.tm_mday:02d}/{month}/{t.tm_year}:" + time.strftime(
        "%H:%M:%S +0000", t
    )


def test_repeated_headers_are_joined_with_commas_and_names_lower_cased() -> None:
    event = build_event(
        make_inv(headers=[["Accept", "text/html"], ["X-Multi", "a"], ["x-multi", "b, c"]])
    )
    assert event["headers"] == {"accept": "text/html", "x-multi": "a,b, c"}


def test_cookies_are_split_and_removed_from_headers() -> None:
    event = build_event(make_inv(headers=[["cookie", "a=1; b=2;c=3"], ["cookie", " d=4 "]]))
    assert event["cookies"] == ["a=1", "b=2", "c=3", "d=4"]
    assert "cookie" not in event["headers"]


def test_query_parameters_are_decoded_and_repeated_ones_joined() -> None:
    raw = "a=1&a=2&b=x%20y&plus=1+2&empty=&flag&caf%C3%A9=%E2%9C%93"
    event = build_event(make_inv(query=raw))
    assert event["rawQueryString"] == raw
    assert event["queryStringParameters"] == {
        "a": "1,2",
        "b": "x y",
        "plus": "1 2",
        "empty": "",
        "flag": "",
        "café": "✓",
    }


def test_raw_path_keeps_encoding_and_includes_the_mount_prefix() -> None:
    event = build_event(make_inv(root_path="/myfn", path="/caf%C3%A9/a%2Fb%3Fc"))
    assert event["rawPath"] == "/myfn/caf%C3%A9/a%2Fb%3Fc"
    assert event["requestContext"]["http"]["path"] == "/myfn/café/a/b?c"


@pytest.mark.parametrize(
    ("content_type", "body", "is_b64"),
    [
        ("application/json", b'{"k": "v"}', False),
        ("text/plain; charset=utf-8", "héllo".encode(), False),
        ("application/x-www-form-urlencoded", b"a=1&b=2", False),
        ("application/vnd.api+json", b"{}", False),
        ("application/xml", b"<a/>", False),
        (None, b"plain bytes that are utf-8", False),
        (None, b"\xff\xfe\x00binary", True),
        ("text/plain", b"\xff\xfe not utf-8", True),
        ("application/octet-stream", b"valid utf-8 but declared binary", True),
        ("image/png", b"\x89PNG\r\n\x1a\n", True),
        ("multipart/form-data; boundary=x", b"--x\r\n", True),
    ],
)
def test_body_is_text_or_base64(content_type: str | None, body: bytes, is_b64: bool) -> None:
    headers = [["content-type", content_type]] if content_type else []
    event = build_event(make_inv(method="POST", headers=headers, body=body))
    assert event["isBase64Encoded"] is is_b64
    if is_b64:
        assert base64.b64decode(event["body"]) == body
    else:
        assert event["body"] == body.decode("utf-8")


def test_protocol_method_and_stage_come_from_the_invocation() -> None:
    event = build_event(make_inv(method="HEAD", http_version="1.0", stage="prod"))
    assert event["requestContext"]["http"]["method"] == "HEAD"
    assert event["requestContext"]["http"]["protocol"] == "HTTP/1.0"
    assert event["requestContext"]["stage"] == "prod"
    assert event["routeKey"] == event["requestContext"]["routeKey"] == "$default"


def test_event_is_json_serialisable() -> None:
    event = build_event(make_inv(method="POST", body=b"\x00\x01", query="a=1"))
    assert json.loads(json.dumps(event)) == event


# -- the context --------------------------------------------------------------------------------


def test_context_has_the_lambda_runtime_attributes() -> None:
    ctx = LambdaContext(make_inv(function="orders", request_id="abc-123"), memory_limit_mb=256)
    assert ctx.function_name == "orders"
    assert ctx.function_version == "$LATEST"
    assert ctx.invoked_function_arn.startswith("arn:aws:lambda:")
    assert ctx.invoked_function_arn.endswith(":function:orders")
    assert ctx.memory_limit_in_mb == "256"
    assert ctx.aws_request_id == "abc-123"
    assert ctx.log_group_name == "/aws/lambda/orders"
    assert "[$LATEST]" in ctx.log_stream_name
    assert ctx.identity is None
    assert ctx.client_context is None


def test_remaining_time_counts_down_from_the_deadline() -> None:
    ctx = LambdaContext(make_inv(deadline_ms=5000))
    first = ctx.get_remaining_time_in_millis()
    assert 4900 < first <= 5000
    time.sleep(0.05)
    assert ctx.get_remaining_time_in_millis() <= first - 50
    assert LambdaContext(make_inv(deadline_ms=0)).get_remaining_time_in_millis() == 0


# -- the response -------------------------------------------------------------------------------


def test_custom_response_uses_status_headers_cookies_and_body() -> None:
    response = infer_response(
        {
            "statusCode": 201,
            "headers": {"Content-Type": "application/json", "My-Custom-Header": "Custom Value"},
            "body": '{ "message": "Hello, world!" }',
            "cookies": ["Cookie_1=Value1; Expires=21 Oct 2021 07:48 GMT", "Cookie_2=Value2"],
            "isBase64Encoded": False,
        }
    )
    assert response == {
        "status": 201,
        "headers": [
            ["Content-Type", "application/json"],
            ["My-Custom-Header", "Custom Value"],
            ["set-cookie", "Cookie_1=Value1; Expires=21 Oct 2021 07:48 GMT"],
            ["set-cookie", "Cookie_2=Value2"],
        ],
        "body": b'{ "message": "Hello, world!" }',
    }


def test_custom_response_decodes_base64_and_accepts_multi_value_headers() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00"
    response = infer_response(
        {
            "statusCode": "200",
            "headers": {"content-type": "image/png", "x-count": 3, "x-flag": True},
            "multiValueHeaders": {"x-multi": ["a", "b"]},
            "body": base64.b64encode(png).decode(),
            "isBase64Encoded": True,
        }
    )
    assert response["status"] == 200
    assert response["body"] == png
    assert response["headers"] == [
        ["content-type", "image/png"],
        ["x-count", "3"],
        ["x-flag", "true"],
        ["x-multi", "a"],
        ["x-multi", "b"],
    ]


def test_custom_response_without_body_is_empty() -> None:
    assert infer_response({"statusCode": 204}) == {"status": 204, "headers": [], "body": b""}


def test_custom_response_with_a_structured_body_serialises_it() -> None:
    response = infer_response({"statusCode": 200, "body": {"a": [1, 2]}})
    assert json.loads(response["body"]) == {"a": [1, 2]}


@pytest.mark.parametrize("bad", ["abc", None, 99, 600, True])
def test_bad_status_code_is_an_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="statusCode"):
        infer_response({"statusCode": bad, "body": "x"})


def test_bad_base64_is_an_error() -> None:
    with pytest.raises(ValueError, match="base64"):
        infer_response({"statusCode": 200, "body": "not base64!", "isBase64Encoded": True})


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ({"message": "Hello from Lambda!"}, b'{"message": "Hello from Lambda!"}'),
        ([1, "two"], b'[1, "two"]'),
        (42, b"42"),
        (1.5, b"1.5"),
        (True, b"true"),
        (None, b"null"),
        # The documented 2.0 interpretation: the string itself is the body, not a JSON literal.
        ("Hello from Lambda!", b"Hello from Lambda!"),
        ("", b""),
    ],
)
def test_other_values_are_200_json(value: Any, body: bytes) -> None:
    assert infer_response(value) == {
        "status": 200,
        "headers": [["content-type", "application/json"]],
        "body": body,
    }


def test_bytes_are_200_octet_stream() -> None:
    assert infer_response(b"\x00\x01raw") == {
        "status": 200,
        "headers": [["content-type", "application/octet-stream"]],
        "body": b"\x00\x01raw",
    }


def test_unserialisable_value_says_what_was_returned() -> None:
    with pytest.raises(TypeError, match="returned set, which is not JSON serializable"):
        infer_response({1, 2})
