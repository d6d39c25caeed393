"""A bare ASGI 3 application, no framework.

Run it with ``hourai run examples/asgi_plain/app.py`` and open the URL it prints. hourai
finds ``app``, sees an async callable taking ``(scope, receive, send)`` and serves it as ASGI.
This app speaks only HTTP: it refuses the lifespan protocol, so hourai skips lifespan.
"""


async def app(scope, receive, send):
    assert scope["type"] == "http", "this app only speaks HTTP"
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    query = scope["query_string"].decode("latin-1")
    text = f"{scope['method']} {scope['path']}?{query} ({len(body)} bytes)\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode("utf-8")})
