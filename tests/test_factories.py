"""Application factories: `PATH:create_app()` (gunicorn) and `--factory` (uvicorn), called
once in the snapshot; and a factory is never mistaken for a Lambda handler."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import HouraiProcess, request

from hourai.isolate.loader import LoadError, TargetError, load, resolve_target

FACTORY = textwrap.dedent(
    """
    import os
    from flask import Flask

    CALLS = []

    def create_app(test_config=None, *, debug=False):
        CALLS.append(os.getpid())
        app = Flask(__name__)

        @app.route("/")
        def index():
            return {"config": test_config, "debug": debug, "factory_ran_in": CALLS}

        return app
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(FACTORY)
    return tmp_path


def test_a_factory_named_bare_is_refused_with_what_to_write(app_dir: Path) -> None:
    target = resolve_target(f"{app_dir}/app.py:create_app")
    with pytest.raises(LoadError, match=r"application factory, deploy .*app.py:create_app\(\)"):
        load(target)


def test_gunicorn_notation_calls_the_factory_with_literal_arguments(app_dir: Path) -> None:
    invoker = load(resolve_target(f"{app_dir}/app.py:create_app('prod', debug=True)"))
    assert invoker.kind == "wsgi" and invoker.attr == "create_app('prod', debug=True)"
    with pytest.raises(TargetError, match="must be literals"):
        resolve_target(f"{app_dir}/app.py:create_app(os.environ)")


def test_a_failing_factory_says_so(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("def create_app():\n    raise RuntimeError('no db')\n")
    with pytest.raises(LoadError, match=r"the factory create_app\(\) raised RuntimeError: no db"):
        load(resolve_target(f"{tmp_path}/app.py:create_app()"))


def test_hourai_run_factory_calls_it_once_in_the_snapshot(app_dir: Path) -> None:
    proc = HouraiProcess(["run", "--port", "0", "--spares", "0", f"{app_dir}/app.py", "--factory"])
    try:
        proc.wait_serving()
        first = request(proc.port, "/").json()
        assert first["config"] is None and len(first["factory_ran_in"]) == 1
        # a second worker is another fork of the same snapshot: no second call
        assert request(proc.port, "/").json()["factory_ran_in"] == first["factory_ran_in"]
    finally:
        proc.stop()


def test_deploy_factory_through_the_daemon(hourai_daemon, app_dir: Path) -> None:
    d = hourai_daemon("[defaults]\nspares = 0\n")
    out = d.cli("deploy", "shop", f"{app_dir}/app.py:create_app", "--factory").stdout
    assert "wsgi 'create_app()'" in out
    assert d.get("/shop/").json()["config"] is None
    # without the flag the same target is refused, and says what to do
    bad = d.cli("deploy", "nope", f"{app_dir}/app.py:create_app", check=False)
    assert bad.returncode != 0 and "--factory" in bad.stderr
