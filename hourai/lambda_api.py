"""The Lambda Invoke API, served by hourai: an unmodified ``boto3.client("lambda",
endpoint_url=...)`` invokes hourai functions.

``POST /2015-03-31/functions/{FunctionName}/invocations`` with the event as the body, and the
headers of the AWS API reference ("Invoke"):

- ``X-Amz-Invocation-Type``: ``RequestResponse`` (default: wait, the payload is the answer),
  ``Event`` (queue it, 202 at once; needs an async queue, see ``enqueue``; with tracing on,
  the request's ``traceparent`` is continued and its runs link to it), ``DryRun`` (204 if
  the function exists and may be invoked).
- A function error answers 200 with ``X-Amz-Function-Error: Unhandled`` and Lambda's error
  payload; a timeout or a dead worker are reported the same way, with the ``errorType`` the
  Lambda service uses (``Sandbox.Timedout``, ``Runtime.ExitError``).
- Service errors carry ``x-amzn-ErrorType`` and a JSON body, which botocore turns into its
  exceptions: ``ResourceNotFoundException`` (404), ``InvalidRequestContentException`` (400),
  ``TooManyRequestsException`` (429), ``ServiceException`` (500).

``FunctionName`` may be a name, a partial ARN (``ACCOUNT:function:NAME``) or a full ARN; a
``Qualifier`` other than ``$LATEST`` or the active version is refused. Requests are not
authenticated (no SigV4 check): the API listens where ``lambda_listen`` says, loopback by
default, and whoever can reach it may invoke every function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, unquote

from hourai.ingress import Request, Response
from hourai.registry import FunctionSpec

_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations/?$")
_ARN = re.compile(r"^(?:arn:aws[a-z-]*:lambda:[^:]*:)?(?:[^:]*:)?function:([^:]+)(?::([^:]+))?$")
REGION = "local"
ACCOUNT = "000000000000"

# name -> the active spec (None: not deployed), and whether it is known but not serving
Lookup = Callable[[str], tuple[FunctionSpec | None, bool]]
InvokeEvent = Callable[[FunctionSpec, bytes], Awaitable[Response]]
# (spec, event, the Invoke request: its headers hold the caller's trace context) -> id
Enqueue = Callable[[FunctionSpec, bytes, Request], Awaitable[str]]


def arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


def _error(status: int, kind: str, message: str) -> Response:
    body = json.dumps({"Type": "User" if status < 500 else "Service", "message": message})
    return Response(
        status,
        [("content-type", "application/json"), ("x-amzn-errortype", kind)],
        body.encode(),
    )


def _function_error(kind: str, message: str) -> Response:
    body = json.dumps({"errorType": kind, "errorMessage": message})
    return Response(
        200,
        [
            ("content-type", "application/json"),
            ("x-amz-function-error", "Unhandled"),
            ("x-amz-executed-version", "$LATEST"),
        ],
        body.encode(),
    )


def handler(
    lookup: Lookup, invoke_event: InvokeEvent, enqueue: Enqueue | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """The ingress handler for the Invoke API."""

    async def handle(request: Request) -> Response:
        m = _PATH.match(request.path)
        if m is None:
            return _error(404, "UnknownOperationException", f"no Lambda API at {request.path}")
        if request.method != "POST":
            return _error(405, "UnknownOperationException", "Invoke is a POST")
        name, qualifier = _function_name(unquote(m.group(1)))
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        qualifier = query.get("Qualifier", qualifier)
        spec, known = lookup(name)
        if spec is None:
            if known:
                return _error(
                    409, "ResourceConflictException", f"{arn(name)} is not serving right now"
                )
            return _error(404, "ResourceNotFoundException", f"Function not found: {arn(name)}")
        if qualifier not in (None, "$LATEST", spec.version):
            return _error(
                404,
                "ResourceNotFoundException",
                f"Function not found: {arn(name)}:{qualifier} (serving version {spec.version})",
            )
        event = request.body or b"{}"
        try:
            json.loads(event)
        except ValueError as exc:
            return _error(
                400, "InvalidRequestContentException", f"Could not parse request body: {exc}"
            )
        kind = request.header("x-amz-invocation-type") or "RequestResponse"
        if kind == "DryRun":
            return Response(204, [("x-amz-executed-version", "$LATEST")])
        if kind == "Event":
            if enqueue is None:
                return _error(
                    400,
                    "InvalidParameterValueException",
                    "asynchronous invocation is not available on this hourai",
                )
            invocation_id = await enqueue(spec, event, request)
            return Response(
                202, [("x-amzn-requestid", invocation_id), ("x-amz-executed-version", "$LATEST")]
            )
        if kind != "RequestResponse":
            return _error(
                400,
                "InvalidParameterValueException",
                f"X-Amz-Invocation-Type {kind!r}: use RequestResponse, Event or DryRun",
            )
        return _as_lambda(await invoke_event(spec, event), spec)

    return handle


def _function_name(given: str) -> tuple[str, str | None]:
    m = _ARN.match(given)
    if m is not None:
        return m.group(1), m.group(2)
    name, _, qualifier = given.partition(":")
    return name, qualifier or None


def _as_lambda(response: Response, spec: FunctionSpec) -> Response:
    """hourai's answer to a direct invocation, as the Lambda service gives it."""
    headers = dict(response.headers)
    status = response.status
    if status == 200:
        kept = [("content-type", "application/json"), ("x-amz-executed-version", "$LATEST")]
        if "x-amz-function-error" in headers:
            kept.append(("x-amz-function-error", headers["x-amz-function-error"]))
        if "x-hourai-error-id" in headers:
            kept.append(("x-hourai-error-id", headers["x-hourai-error-id"]))
        return Response(200, kept, response.body)
    text = bytes(response.body).decode("utf-8", "replace").strip()
    if status == 504:
        timeout = spec.limits.timeout
        return _function_error("Sandbox.Timedout", f"Task timed out after {timeout:.2f} seconds")
    if status == 502:
        return _function_error("Runtime.ExitError", f"Runtime exited: {text}")
    if status in (429, 503):
        return _error(429, "TooManyRequestsException", text)
    if status == 413:
        return _error(413, "RequestTooLargeException", text)
    return _error(500 if status >= 500 else 400, "ServiceException", text)
