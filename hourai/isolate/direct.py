"""Direct invocation (Lambda's Invoke API): an arbitrary JSON event in, the JSON payload out.

An invocation message with an ``event`` field (the event's JSON bytes, exactly as the caller
gave them) is not an HTTP request:

- a ``handler`` gets the event as it is, and its return value is the payload, serialised as
  the Python runtime does (``json.dumps``; ``None`` is ``null``);
- an ``asgi`` or ``wsgi`` app can only answer HTTP: an API Gateway event (payload format 2.0,
  or 1.0 from a REST API) is turned into the request it describes, and the app's response
  into the proxy-integration response payload (``statusCode``, ``headers``, ``body``,
  ``isBase64Encoded``), as the Lambda Web Adapter and Mangum do. Any other event is refused
  with an error that says so.

Errors come back as Lambda reports them: ``errorType``, ``errorMessage``, ``stackTrace`` (see
:func:`error_fields`).
"""

from __future__ import annotations

import base64
import json
import traceback
from typing import Any
from urllib.parse import urlencode

from hourai.isolate.adapters import Invoker
from hourai.isolate.lambda_event import Invocation, Response, is_text_content_type
from hourai.isolate.tracebacks import user_paths

JSON = [["content-type", "application/json"]]


class InvalidEvent(Exception):
    """The event cannot be given to this kind of function."""


class MarshalError(Exception):
    """The handler's return value is not JSON serialisable."""


def run(invoker: Invoker, inv: Invocation) -> Response:
    event = json.loads(inv["event"])
    if invoker.kind == "handler":
        return payload(invoker.call_event(event, inv))  # type: ignore[attr-defined]
    return _http_payload(invoker.invoke(http_invocation(inv, event, invoker.kind)))


async def run_async(invoker: Invoker, inv: Invocation) -> Response:
    event = json.loads(inv["event"])
    if invoker.kind == "handler":
        return payload(await invoker.call_event_async(event, inv))  # type: ignore[attr-defined]
    return _http_payload(await invoker.invoke_async(http_invocation(inv, event, invoker.kind)))


def payload(result: Any) -> Response:
    try:
        body = json.dumps(result).encode()
    except (TypeError, ValueError) as exc:
        raise MarshalError(f"Unable to marshal response: {exc}") from None
    return {"status": 200, "headers": JSON, "body": body}


def error_fields(exc: BaseException) -> dict[str, Any]:
    """Lambda's error payload fields for an exception raised by the function."""
    if isinstance(exc, MarshalError):
        kind = "Runtime.MarshalError"
    elif isinstance(exc, InvalidEvent):
        kind = "Runtime.InvalidEvent"
    else:
        kind = type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "errorType": kind,
        "errorMessage": str(exc),
        "stackTrace": [user_paths(line) for line in traceback.format_list(frames)],
    }


# ---------------------------------------------------------------------------- HTTP apps


def http_invocation(inv: Invocation, event: Any, kind: str) -> dict[str, Any]:
    """The HTTP request an API Gateway event describes, as an invocation message."""
    if not isinstance(event, dict):
        raise InvalidEvent(_not_http(kind, event))
    if event.get("version") == "2.0" and isinstance(event.get("requestContext"), dict):
        http = event["requestContext"].get("http") or {}
        method, path = http.get("method"), event.get("rawPath")
        query = event.get("rawQueryString") or ""
        headers = [[k.lower(), str(v)] for k, v in (event.get("headers") or {}).items()]
        if event.get("cookies"):
            headers.append(["cookie", "; ".join(event["cookies"])])
    elif "httpMethod" in event:
        method, path = event.get("httpMethod"), event.get("path")
        multi = event.get("multiValueQueryStringParameters") or {}
        single = event.get("queryStringParameters") or {}
        pairs = [(k, v) for k, vs in multi.items() for v in vs] or list(single.items())
        query = urlencode(pairs)
        headers = [[k.lower(), str(v)] for k, v in (event.get("headers") or {}).items()]
    else:
        raise InvalidEvent(_not_http(kind, event))
    if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
        raise InvalidEvent("an API Gateway event needs an HTTP method and a path starting with /")
    raw = event.get("body") or ""
    body = base64.b64decode(raw) if event.get("isBase64Encoded") else str(raw).encode()
    return {
        **{k: v for k, v in inv.items() if k != "event"},
        "method": method.upper(),
        "path": path,
        "root_path": "",
        "query": query,
        "headers": headers,
        "body": body,
    }


def _not_http(kind: str, event: Any) -> str:
    shown = json.dumps(event)[:80]
    return (
        f"this function is a {kind.upper()} app: it answers HTTP requests, and the event "
        f"{shown} is none; send an API Gateway event (payload format 2.0) or call it over HTTP"
    )


def _http_payload(response: Response) -> Response:
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in response["headers"]:
        if name.lower() == "set-cookie":
            cookies.append(value)
        else:
            headers[name.lower()] = (
                f"{headers[name.lower()]},{value}" if name.lower() in headers else value
            )
    body: bytes = response["body"]
    text = is_text_content_type(headers.get("content-type"))
    try:
        shown = body.decode() if text else None
    except UnicodeDecodeError:
        shown = None
    doc: dict[str, Any] = {
        "statusCode": response["status"],
        "headers": headers,
        "body": shown if shown is not None else base64.b64encode(body).decode(),
        "isBase64Encoded": shown is None,
    }
    if cookies:
        doc["cookies"] = cookies
    return payload(doc)
