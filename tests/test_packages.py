"""Functions bring their own dependencies: resolved and installed by uv at deploy time, stored
once per host, shared, collected when unused; nothing of the daemon's environment leaks in.

Every install here comes from wheels the tests build themselves (tests/wheels.py), served with
``find_links`` and no index; one test tries the real index and is skipped where there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FUNCTIONS, request
from wheels import wheelhouse

from hourai.client import Client
from hourai.packages.requirements import RequirementsError, declared

NO_SPARES = "[defaults]\nspares = 0\n"


def _config(wheels: Path, extra: str = "") -> str:
    return f'keep_versions = 1\n{extra}[packages]\nno_index = true\nfind_links = ["{wheels}"]\n'


def _function(where: Path, requirements: str | None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(FUNCTIONS / "uses_packages.py", where / "handler.py")
    if requirements is not None:
        (where / "requirements.txt").write_text(requirements)
    return where


def _invoke(d, name: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    reply = d.get(f"/{name}/")
    assert reply.status == 200, reply.body
    return json.loads(reply.body)


def _deploy(d, name: str, path: Path) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return json.loads(d.cli("deploy", name, str(path), "--json").stdout)


# ---------------------------------------------------------------------- what a dir declares


def test_requirements_txt_and_pyproject_are_read_by_name_only(tmp_path: Path) -> None:
    assert declared(tmp_path) is None  # nothing declared: the daemon's environment
    (tmp_path / "requirements.txt").write_text("# deps\nflask>=3  # web\n\npydantic[email]\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["jinja2"]\n')
    assert declared(tmp_path) == ["flask>=3", "pydantic[email]", "jinja2"]
    (tmp_path / "pyproject.toml").unlink()
    (tmp_path / "requirements.txt").write_text("")
    assert declared(tmp_path) == []  # declared: no packages at all
    for bad in (
        "--index-url https://evil.example/simple",
        "-e ../mine",
        "foo @ https://evil.example/foo.whl",
        "./local/dir",
        "git+https://example.com/x.git",
        "flask --index-url https://evil.example/simple",
    ):
        (tmp_path / "requirements.txt").write_text(f"{bad}\n")
        with pytest.raises(RequirementsError, match=r"requirements\.txt:1"):
            declared(tmp_path)


def test_the_store_installs_once_and_a_closed_pin_set_needs_no_resolution(tmp_path) -> None:
    from hourai.packages.installer import IndexSettings, Installer, InstallError
    from hourai.packages.store import PackageStore

    wheels = wheelhouse(tmp_path / "wheels")
    settings = IndexSettings(no_index=True, find_links=(str(wheels),), cache_dir=tmp_path / "c")
    store = PackageStore(tmp_path / "store", Installer(settings))
    names = store.provide(["alpha==1.0", "beta==2.1"])  # every pin, as pip freeze writes them
    assert store.provide(["beta>=2"]) == [names[1]]  # the same directory, not a new install
    for wheel in wheels.iterdir():  # nothing to install from any more: only the store knows
        wheel.unlink()
    assert store.provide(["beta==2.1", "alpha==1.0"]) == names
    with pytest.raises(InstallError, match="beta"):
        store.provide(["beta>=2"])  # a range needs uv, and uv finds nothing now
    store.release(names * 3 + [names[1]])
    assert set(store.collect(set())) == set(names)
    assert not any((tmp_path / "store" / "dists").iterdir())


def test_a_distribution_is_named_by_its_content_read_in_blocks(tmp_path) -> None:
    import hashlib

    from bench.wheels import build_wheel
    from hourai.packages.installer import IndexSettings, Installer
    from hourai.packages.store import _NOT_CONTENT, PackageStore, interpreter_tag

    big = "".join(f"{i:07d}\n" for i in range(400_000))  # 3.2 MB: more than one block
    files = {"big/__init__.py": "", "big/data.txt": big}
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "big", "1.0", files)
    settings = IndexSettings(no_index=True, find_links=(str(wheels),), cache_dir=tmp_path / "c")
    (name,) = PackageStore(tmp_path / "store", Installer(settings)).provide(["big==1.0"])
    # the digest's format is the store's: a name once given never changes under an upgrade
    digest = hashlib.sha256(interpreter_tag().encode())
    stored = tmp_path / "store" / "dists" / name
    for path in sorted(p.relative_to(stored) for p in stored.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts or path.name in _NOT_CONTENT:
            continue  # not content: bytecode, what the installer writes about the install
        rel, data = str(path), (stored / path).read_bytes()
        digest.update(len(rel).to_bytes(4, "big") + rel.encode() + len(data).to_bytes(8, "big"))
        digest.update(data)
    assert name == f"big-1.0-{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------- through the daemon


def test_a_function_imports_what_it_declared_and_shares_it(hourai_daemon, tmp_path) -> None:
    wheels = wheelhouse(tmp_path / "wheels")
    # flask even imported by the root zygote: still not for a function that did not ask
    d = hourai_daemon(_config(wheels, 'preload = ["flask"]\n') + NO_SPARES)

    first = _deploy(d, "one", _function(tmp_path / "one", "alpha\n"))
    assert sorted(n.rsplit("-", 1)[0] for n in first["packages"]) == ["alpha-1.0", "beta-2.1"]
    got = _invoke(d, "one")
    assert got["alpha"] == "alpha 1.0" and got["beta"] == "beta 2.1"  # alpha's own dependency
    assert got["gamma"] == "ModuleNotFoundError: No module named 'gamma'"
    # installed in the daemon's (and this test's) environment, but not declared:
    assert got["flask"] == "ModuleNotFoundError: No module named 'flask'"
    # imported by the root zygote for hourai itself, still not the function's:
    assert got["msgpack"] == "ModuleNotFoundError: No module named 'msgpack'"
    assert got["uvloop"] == "ModuleNotFoundError: No module named 'uvloop'"
    # public code, readable by the tenant; nobody but the daemon writes it
    # (EROFS where the state dir is under /tmp: the sandbox binds it back read-only)
    assert got["beta_write"] in ("EACCES", "EROFS")
    beta_dir = Path(got["beta_dir"])
    assert beta_dir.parent == d.state / "packages" / "dists"
    st = (beta_dir / "beta" / "__init__.py").stat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o644

    # a second function with overlapping requirements: beta is the same directory
    t0 = time.perf_counter()
    second = _deploy(d, "two", _function(tmp_path / "two", "beta>=2\ngamma==0.3\nmsgpack==0.0.1\n"))
    elapsed = time.perf_counter() - t0
    got2 = _invoke(d, "two")
    assert got2["beta_dir"] == str(beta_dir)
    assert Path(got2["beta_dir"]).stat().st_ino == beta_dir.stat().st_ino
    assert got2["gamma"] == "gamma 0.3" and got2["alpha"].startswith("ModuleNotFoundError")
    # its own msgpack, while hourai's (which framed this very answer) stays hourai's
    assert got2["msgpack"] == "the tenant msgpack"
    assert set(first["packages"]) & set(second["packages"]) == {beta_dir.name}

    # the same requirements again: nothing to install, a deploy in well under a second
    three = _function(tmp_path / "three", "alpha\n")
    t0 = time.perf_counter()
    third = Client(d.socket).deploy("three", str(three), str(three), {})
    warm = time.perf_counter() - t0
    assert third["packages"] == first["packages"]
    assert warm < 1.0, f"a deploy with every package stored took {warm:.2f}s"
    print(f"packages of the last deploy: {third['packages_ms']:.0f} ms")
    print(
        f"deploy, beta stored, gamma installed: {elapsed * 1e3:.0f} ms; all stored: "
        f"{warm * 1e3:.0f} ms"
    )

    # a restart imports exactly the recorded distributions, without resolving again
    d.stop()
    shutil.rmtree(wheels)
    again = hourai_daemon(_config(wheels) + NO_SPARES)
    assert _invoke(again, "one")["beta"] == "beta 2.1"


def test_an_unresolvable_requirement_is_refused_with_uvs_reason(hourai_daemon, tmp_path) -> None:
    wheels = wheelhouse(tmp_path / "wheels")
    d = hourai_daemon(_config(wheels) + NO_SPARES)
    fn = _function(tmp_path / "fn", "beta==1.0\n")
    out = d.cli("deploy", "fn", str(fn)).stdout
    assert "packages: beta-1.0 (resolved in" in out
    v1 = json.loads(d.cli("show", "fn", "--json").stdout)["active"]
    assert _invoke(d, "fn")["beta"] == "beta 1.0"

    (fn / "requirements.txt").write_text("beta==1.0\nno-such-package>=1\n")
    refused = d.cli("deploy", "fn", str(fn), check=False)
    assert refused.returncode == 1
    assert "requirements cannot be installed: No solution found" in refused.stderr
    # uv's own words (which it wraps to a width of its choosing)
    words = " ".join(refused.stderr.split())
    assert "no-such-package was not found in the provided package locations" in words
    assert f"version {v1} keeps serving" in refused.stderr
    assert _invoke(d, "fn")["beta"] == "beta 1.0"

    (fn / "requirements.txt").write_text("alpha\nbeta<2\n")  # alpha needs beta>=2
    conflict = d.cli("deploy", "fn", str(fn), check=False)
    assert conflict.returncode == 1 and "unsatisfiable" in conflict.stderr
    assert _invoke(d, "fn")["beta"] == "beta 1.0"


def test_unused_distributions_are_collected(hourai_daemon, tmp_path) -> None:
    wheels = wheelhouse(tmp_path / "wheels")
    d = hourai_daemon(_config(wheels) + NO_SPARES)
    dists = d.state / "packages" / "dists"
    fn = _function(tmp_path / "fn", "beta==1.0\n")
    old = _deploy(d, "fn", fn)["packages"]
    other = _deploy(d, "other", _function(tmp_path / "other", "gamma\n"))["packages"]
    assert {p.name for p in dists.iterdir()} == {*old, *other}

    # keep_versions = 1: the old version goes, and with it the distribution only it used
    (fn / "requirements.txt").write_text("beta==2.1\n")
    new = _deploy(d, "fn", fn)["packages"]
    assert _invoke(d, "fn")["beta"] == "beta 2.1"
    assert {p.name for p in dists.iterdir()} == {*new, *other}

    d.cli("rm", "other")
    assert {p.name for p in dists.iterdir()} == set(new)

    # a distribution lost behind the daemon's back: the restart says so, it does not guess
    d.stop()
    shutil.rmtree(dists / new[0])
    again = hourai_daemon(_config(wheels) + NO_SPARES)
    shown = json.loads(again.cli("show", "fn", "--json").stdout)
    assert shown["state"] == "not restored"
    assert f"missing from the package store ({new[0]})" in shown["restore_error"]


def test_hourai_run_installs_a_dirs_requirements(hourai_run, tmp_path) -> None:
    wheels = wheelhouse(tmp_path / "wheels")
    fn = _function(tmp_path / "fn", "alpha\n")
    index = ("--no-index", "--find-links", str(wheels))
    proc = hourai_run(*index, "--reload", str(fn))
    got = json.loads(request(proc.port, "/").body)
    assert got["alpha"] == "alpha 1.0" and got["beta"] == "beta 2.1"
    assert got["flask"].startswith("ModuleNotFoundError")

    # an edit of the requirements is a new version, installed and switched to
    (fn / "requirements.txt").write_text("alpha\ngamma\n")
    proc.wait_for("now serving version")
    assert json.loads(request(proc.port, "/").body)["gamma"] == "gamma 0.3"

    bad = _function(tmp_path / "bad", "no-such-package\n")
    failed = hourai_run(*index, str(bad), wait=False)
    failed.wait_for("the requirements cannot be installed: No solution found")
    failed.wait_for("no-such-package was not found")
    assert failed.proc.wait(60) == 1


def _real_index_problem() -> str | None:
    """Why the real index cannot be used here, or None."""
    from hourai.packages.installer import Installer, InstallError

    try:
        Installer().resolve(["six==1.16.0"])
    except InstallError as exc:
        return f"no package index reachable from this machine: {str(exc)[:200]}"
    except subprocess.SubprocessError as exc:  # pragma: no cover
        return str(exc)
    return None


@pytest.mark.slow
def test_a_package_from_the_real_index(hourai_daemon, tmp_path) -> None:
    problem = _real_index_problem()
    if problem:
        pytest.skip(problem)
    d = hourai_daemon(NO_SPARES)
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "requirements.txt").write_text("six==1.16.0\n")
    (fn / "handler.py").write_text(
        "import six\n\ndef handler(event, context):\n    return six.__version__\n"
    )
    deployed = _deploy(d, "fn", fn)
    assert [p.rsplit("-", 1)[0] for p in deployed["packages"]] == ["six-1.16.0"]
    assert d.get("/fn/").body == b"1.16.0"
