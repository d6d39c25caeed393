"""Which function a request is for: path prefix, Host name, or the one function of `run`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hourai.daemon import Router
from hourai.ingress import Request
from hourai.isolate.loader import Target
from hourai.registry import FunctionSpec

SPECS = {
    name: FunctionSpec(name, Target("/code", "handler", None, "x.py"), "v1")
    for name in ("hello", "api")
}


def req(path: str, host: str | None = None) -> Request:
    headers = [("host", host)] if host else []
    return Request("GET", path, path, "", headers, b"", "1.1", ("127.0.0.1", 1), ("", 0), True)


def test_path_prefix_mounts_the_function_and_strips_its_name() -> None:
    router = Router(SPECS)
    spec, root, path = router.route(req("/hello/a/b"))  # type: ignore[misc]
    assert (spec.name, root, path) == ("hello", "/hello", "/a/b")
    assert router.route(req("/hello"))[1:] == ("/hello", "/")  # type: ignore[index]
    assert router.route(req("/nope/x")) is None
    assert router.route(req("/")) is None


def test_host_name_under_the_domain_selects_the_function() -> None:
    router = Router(SPECS, domain="fn.example")
    spec, root, path = router.route(req("/a", host="api.fn.example:8080"))  # type: ignore[misc]
    assert (spec.name, root, path) == ("api", "", "/a")
    # other hosts fall back to the path prefix
    assert router.route(req("/hello/x", host="elsewhere"))[0].name == "hello"  # type: ignore[index]


def test_single_function_is_served_at_the_root() -> None:
    router = Router(SPECS, single="hello")
    spec, root, path = router.route(req("/api/x"))  # type: ignore[misc]
    assert (spec.name, root, path) == ("hello", "", "/api/x")


@given(st.sampled_from(sorted(SPECS)), st.lists(st.text("abc%-_.", max_size=5), max_size=4))
def test_prefix_routing_keeps_the_rest_of_the_path(name: str, parts: list[str]) -> None:
    rest = "/" + "/".join(parts)
    spec, root, path = Router(SPECS).route(req(f"/{name}{rest}"))  # type: ignore[misc]
    assert spec.name == name and root == f"/{name}"
    assert path == rest
