"""Hello, Lambda style: the smallest hourai function.

Run it with ``hourai run examples/hello/handler.py`` and open the URL it prints, e.g.
``curl 'http://127.0.0.1:8080/?name=Ada'``.

``event`` is an API Gateway HTTP API (payload format 2.0) event and ``context`` a Lambda
context, so this file runs unchanged on AWS Lambda too.
"""

import json


def handler(event, context):
    name = (event.get("queryStringParameters") or {}).get("name", "world")
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(
            {
                "message": f"Hello, {name}!",
                "path": event["rawPath"],
                "request_id": context.aws_request_id,
            }
        ),
    }
