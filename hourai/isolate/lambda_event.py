"""AWS Lambda compatibility: the HTTP API event (payload format 2.0), the context, the response.

A ``handler`` function receives exactly what API Gateway's HTTP API (and Lambda function URLs)
would give it, so an existing Lambda handler runs unchanged:

- :func:`build_event` turns an invocation message into the payload format 2.0 event, with the
  field names and conventions of the AWS developer guide ("Working with AWS Lambda proxy
  integrations for HTTP APIs"): lower-case headers with repeated ones joined by ``,``, cookies
  moved to ``cookies``, ``queryStringParameters`` joined by ``,`` and absent when empty,
  ``body`` absent when empty and base64 when binary.
- :class:`LambdaContext` has the attributes and method of the Python runtime's context object.
- :func:`infer_response` applies the 2.0 response rules: a dict with ``statusCode`` is a
  response; anything else JSON-able is a 200 ``application/json`` body.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

# What the ingress sends to a worker; see hourai.protocol ("inv").
Invocation = Mapping[str, Any]
# What every adapter returns: {"status": int, "headers": [[name, value], ...], "body": bytes}.
Response = dict[str, Any]

# Function URLs with auth type NONE report this account; there is no AWS account here.
ACCOUNT_ID = "anonymous"
# The runtime's own default when a function names no memory size.
DEFAULT_MEMORY_MB = 128

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Request bodies of these types are passed as text when they are valid UTF-8. Every other
# declared type is binary and arrives base64-encoded, as API Gateway does for HTTP APIs; a
# body without a content-type is text exactly when it decodes as UTF-8.
_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/javascript",
        "application/ecmascript",
        "application/xml",
        "application/x-www-form-urlencoded",
        "application/yaml",
        "application/x-yaml",
        "application/graphql",
        "application/ld+json",
        "application/x-ndjson",
    }
)


def path_bytes(path: str) -> bytes:
    """The bytes of a request target the ingress handed over as a str."""
    # Non-ASCII bytes sent unencoded arrive latin-1 decoded, so latin-1 gets them back.
    try:
        return path.encode("latin-1")
    except UnicodeEncodeError:
        return path.encode("utf-8")


def decoded_path(raw_path: str) -> str:
    """A percent-encoded path, decoded as UTF-8 (what ASGI's ``path`` and most routers use)."""
    return unquote_to_bytes(path_bytes(raw_path)).decode("utf-8", "replace")


def is_text_content_type(content_type: str | None) -> bool:
    """Whether a body of this content type is sent to a handler as text rather than base64."""
    if not content_type:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return (
        mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml", "+yaml"))
    )


def _joined_headers(headers: Iterable[tuple[str, str] | list[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _query_parameters(raw_query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _request_time(epoch: float) -> str:
    # strftime's %b follows the locale; AWS always writes English month names.
    t = time.gmtime(epoch)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def build_event(inv: Invocation, now: float | None = None) -> dict[str, Any]:
    """The API Gateway HTTP API payload format 2.0 event for one invocation.

    ``rawPath`` is the full path (mount prefix included) exactly as the client sent it,
    percent-encoding intact, as Lambda function URLs deliver it; ``requestContext.http.path``
    is the same path percent-decoded, which is what handlers compare against route literals.
    """
    now = time.time() if now is None else now
    raw_path = inv.get("root_path", "") + inv["path"]
    raw_query = inv.get("query", "")
    header_pairs = inv.get("headers", [])

    # Format 2.0 moves every cookie out of the headers into "cookies", one entry per cookie.
    cookies: list[str] = []
    other_pairs: list[tuple[str, str]] = []
    for name, value in header_pairs:
        if name.lower() == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
        else:
            other_pairs.append((name, value))
    headers = _joined_headers(other_pairs)

    host = headers.get("host", "")
    domain = host.rsplit(":", 1)[0] if host and not host.endswith("]") else host
    client = inv.get("client") or ["", 0]

    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    query = _query_parameters(raw_query)
    if query:
        event["queryStringParameters"] = query
    event["requestContext"] = {
        "accountId": ACCOUNT_ID,
        "apiId": inv.get("function", ""),
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            "method": inv["method"],
            "path": decoded_path(raw_path),
            "protocol": f"HTTP/{inv.get('http_version', '1.1')}",
            "sourceIp": client[0],
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": inv.get("request_id", ""),
        "routeKey": "$default",
        "stage": inv.get("stage", "$default"),
        "time": _request_time(now),
        "timeEpoch": int(now * 1000),
    }
    body: bytes = inv.get("body") or b""
    is_base64 = False
    if body:
        text: str | None = None
        if is_text_content_type(headers.get("content-type")):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        if text is None:
            text = base64.b64encode(body).decode("ascii")
            is_base64 = True
        event["body"] = text
    event["isBase64Encoded"] = is_base64
    return event


class LambdaContext:
    """The ``context`` argument, with the attributes of the AWS Python runtime's object."""

    __slots__ = (
        "_deadline",
        "aws_request_id",
        "client_context",
        "function_name",
        "function_version",
        "identity",
        "invoked_function_arn",
        "log_group_name",
        "log_stream_name",
        "memory_limit_in_mb",
        "tenant_id",
    )

    def __init__(self, inv: Invocation, memory_limit_mb: int = DEFAULT_MEMORY_MB) -> None:
        name = inv.get("function", "") or "function"
        self.function_name: str = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:000000000000:function:{name}"
        # The runtime reports it as a string (it comes from an environment variable).
        self.memory_limit_in_mb = str(memory_limit_mb)
        self.aws_request_id: str = inv.get("request_id", "")
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = f"{time.strftime('%Y/%m/%d', time.gmtime())}/[$LATEST]{os.getpid()}"
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline = time.monotonic() + inv.get("deadline_ms", 0) / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the invocation's deadline (0 once it has passed)."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def __repr__(self) -> str:
        return (
            f"LambdaContext(function_name={self.function_name!r}, "
            f"aws_request_id={self.aws_request_id!r})"
        )


def _header_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def infer_response(value: Any) -> Response:
    """Turn what a handler returned into a response, by the payload format 2.0 rules.

    - a dict with ``statusCode``: statusCode, headers, cookies (each becomes a ``set-cookie``
      header), body and isBase64Encoded, as documented. ``multiValueHeaders`` belongs to
      format 1.0; it is honoured too, so handlers written for REST APIs keep their headers.
    - ``bytes``: 200, ``application/octet-stream``, the bytes as they are (a hourai
      convenience; AWS cannot return raw bytes).
    - a ``str``: 200, ``application/json``, and the body is the string itself, not a JSON
      string literal. This follows the API Gateway guide, whose example turns the output
      ``"Hello from Lambda!"`` into the body ``Hello from Lambda!``. (The Lambda function URL
      guide shows the quoted form instead; hourai implements the HTTP API.)
    - anything else JSON-able (dict without statusCode, list, number, bool, None): 200,
      ``application/json``, body ``json.dumps(value)``.
    """
    if isinstance(value, dict) and "statusCode" in value:
        return _custom_response(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _response(200, [["content-type", "application/octet-stream"]], bytes(value))
    if isinstance(value, str):
        body = value.encode("utf-8")
    else:
        try:
            body = json.dumps(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the handler returned {type(value).__name__}, which is not JSON serializable: "
                f"{exc}; return a dict, list, str, number, bool, None or bytes"
            ) from exc
    return _response(200, [["content-type", "application/json"]], body)


def _response(status: int, headers: list[list[str]], body: bytes) -> Response:
    return {"status": status, "headers": headers, "body": body}


def _custom_response(value: Mapping[str, Any]) -> Response:
    raw_status = value["statusCode"]
    try:
        if isinstance(raw_status, bool):
            raise ValueError
        status = int(raw_status)
    except (TypeError, ValueError):
        raise ValueError(
            f"the handler returned statusCode {raw_status!r}; it must be an integer such as 200"
        ) from None
    if not 100 <= status <= 599:
        raise ValueError(f"the handler returned statusCode {status}; it must be in 100..599")

    headers: list[list[str]] = []
    for name, item in (value.get("headers") or {}).items():
        headers.append([str(name), _header_value(item)])
    for name, items in (value.get("multiValueHeaders") or {}).items():
        values = items if isinstance(items, list | tuple) else [items]
        headers.extend([str(name), _header_value(v)] for v in values)
    for cookie in value.get("cookies") or ():
        headers.append(["set-cookie", str(cookie)])

    raw_body = value.get("body")
    if raw_body is None:
        body = b""
    elif isinstance(raw_body, bytes | bytearray):
        body = bytes(raw_body)
    elif isinstance(raw_body, str):
        if value.get("isBase64Encoded"):
            try:
                body = base64.b64decode(raw_body, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(
                    "the handler returned isBase64Encoded true but body is not valid base64"
                ) from None
        else:
            body = raw_body.encode("utf-8")
    else:
        # API Gateway wants a string here; serialising a structured body is the obvious intent.
        body = json.dumps(raw_body).encode("utf-8")
    return _response(status, headers, body)
