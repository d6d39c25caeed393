"""A bare WSGI application (PEP 3333), no framework.

Run it with ``hourai run examples/wsgi_plain/app.py`` and open the URL it prints. hourai
finds ``application``, sees it takes ``(environ, start_response)`` and serves it as WSGI.
"""


def application(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    text = (
        f"{environ['REQUEST_METHOD']} {environ['SCRIPT_NAME']}{environ['PATH_INFO']}"
        f"?{environ['QUERY_STRING']} ({len(body)} bytes)\n"
    )
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode("utf-8")]
