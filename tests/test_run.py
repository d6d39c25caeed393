"""`hourai run` end to end: a real daemon process, real HTTP, real forked workers."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import (
    EXAMPLES,
    FUNCTIONS,
    REPO,
    HouraiProcess,
    host_pid,
    request,
    snapshot_processes,
    wait_until,
    worker_processes,
)

BEHAVE = str(FUNCTIONS / "behave.py")


def test_hello_example_answers_over_http(hourai_run) -> None:
    proc = hourai_run(str(EXAMPLES / "hello" / "handler.py"))
    reply = request(proc.port, "/anything?x=1")
    assert reply.status == 200
    assert reply.start in {"spare", "fork", "cold"}
    assert reply.headers["server"].startswith("hourai")
    assert "date" in reply.headers


def test_process_tree_is_daemon_zygote_snapshot_worker(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0")
    info = request(proc.port, "/pid").json()
    worker = psutil.Process(host_pid(proc.proc.pid, info))
    snapshot = worker.parent()
    root_zygote = snapshot.parent()
    assert host_pid(proc.proc.pid, {**info, "pid": info["ppid"]}) == snapshot.pid
    # module-level code ran once, in the snapshot, not in the worker
    assert host_pid(proc.proc.pid, {**info, "pid": info["imported_in"]}) == snapshot.pid
    assert root_zygote.parent().pid == proc.proc.pid
    assert "hourai.snapshot.zygote" in " ".join(root_zygote.cmdline())


@pytest.mark.parametrize("spares", ["0", "1"])
def test_a_worker_starts_with_default_signals_whatever_its_zygote_handled(
    hourai_run, spares: str
) -> None:
    # The zygotes handle SIGCHLD, SIGTERM and others, with a wakeup fd; a worker (forked for
    # the request, or a spare) must not inherit any of it: a function's subprocess needs
    # SIGCHLD's default, and a blocked or handled SIGTERM would outlive a stop.
    proc = hourai_run(BEHAVE, "--spares", spares)
    wait_until(lambda: len(worker_processes(proc)) == int(spares))
    reply = request(proc.port, "/signals")
    assert reply.start == ("spare" if spares == "1" else "fork")
    doc = reply.json()
    default, ignored = int(signal.SIG_DFL), int(signal.SIG_IGN)
    assert doc["handlers"] == {
        "SIGCHLD": default,
        "SIGTERM": default,
        "SIGINT": default,
        "SIGHUP": default,
        "SIGPIPE": ignored,  # as Python starts: a write to a closed pipe raises, not kills
    }
    assert doc["blocked"] == 0
    assert doc["wakeup_fd"] == -1


def test_warm_reuse_then_start_paths(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0")
    first = request(proc.port, "/pid")
    assert first.start == "fork"
    second = request(proc.port, "/pid")
    assert second.start == "warm"
    assert second.json()["pid"] == first.json()["pid"]


def test_spare_is_prefored_and_refilled(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "1")
    wait_until(lambda: len(worker_processes(proc)) == 1)  # the spare, forked after the snapshot
    first = request(proc.port, "/pid")
    assert first.start == "spare"
    # a replacement spare is forked off the request path
    wait_until(lambda: len(worker_processes(proc)) == 2)
    assert request(proc.port, "/pid").start == "warm"


def test_process_mode_async_invocations_share_a_loop_but_not_a_context(hourai_run) -> None:
    # The worker's loop runs for its life (no loop start per invocation), yet each
    # invocation is a task of its own: what one sets in a contextvar the next never sees.
    proc = hourai_run(str(FUNCTIONS / "asgi_context.py"), "--spares", "0")
    replies = [request(proc.port, f"/{i}").json() for i in range(3)]
    assert [r["before"] for r in replies] == [None, None, None]
    assert len({(r["pid"], r["loop"]) for r in replies}) == 1


def test_idle_workers_are_reaped_but_the_snapshot_stays(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0", "--keep-alive", "0.3")
    first = request(proc.port, "/pid").json()
    pid = host_pid(proc.proc.pid, first)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert snapshot_processes(proc), "the snapshot must outlive its idle workers"
    again = request(proc.port, "/pid")
    assert again.start == "fork"
    assert again.json()["pid"] != first["pid"]


def test_timeout_answers_504_and_replaces_the_worker(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0", "--timeout", "0.5")
    reply = request(proc.port, "/sleep?s=30")
    assert reply.status == 504
    assert b"timed out" in reply.body
    assert request(proc.port, "/pid").status == 200


def test_exception_answers_500_with_an_error_id_found_in_the_log(hourai_run) -> None:
    proc = hourai_run(BEHAVE)
    reply = request(proc.port, "/raise")
    assert reply.status == 500
    error_id = reply.headers["x-hourai-error-id"]
    assert error_id.encode() in reply.body
    # what went wrong, and where to read the rest
    assert b"ValueError: deliberate failure" in reply.body and b"hourai logs behave" in reply.body
    proc.wait_for(rf"error {error_id}")
    proc.wait_for(r"ValueError: deliberate failure")
    # the worker survived the exception
    assert request(proc.port, "/pid").start == "warm"


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_worker_dying_mid_request_answers_502_and_is_replaced(hourai_run, how: str) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0")
    reply = request(proc.port, f"/{how}")
    assert reply.status == 502
    assert (b"status 3" if how == "exit" else b"SIGKILL") in reply.body
    again = request(proc.port, "/pid")
    assert again.status == 200
    assert again.start == "fork"


def test_function_output_is_logged_tagged_with_function_and_worker(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0")
    pid = host_pid(proc.proc.pid, request(proc.port, "/pid").json())
    request(proc.port, "/print?msg=marker42")
    # and with the request that printed it
    proc.wait_for(rf"\[behave#{pid} req=[0-9a-f]+-\d+\] out: marker42")
    proc.wait_for(rf"\[behave#{pid} req=[0-9a-f]+-\d+\] err: marker42")


def test_access_log_says_start_path_and_latency(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0")
    request(proc.port, "/pid")
    request(proc.port, "/pid")
    proc.wait_for(r"hourai.access: behave GET /pid 200 fork [\d.]+ms")
    proc.wait_for(r"hourai.access: behave GET /pid 200 warm [\d.]+ms")


def test_environment_holds_what_the_function_was_given(hourai_run, tmp_path) -> None:
    env_file = tmp_path / "fn.env"
    env_file.write_text("# comment\nFROM_FILE='file value'\n")
    proc = hourai_run(
        BEHAVE,
        "--env",
        "GREETING=hi",
        "--env-file",
        str(env_file),
        env={"DAEMON_SECRET": "must-not-leak"},
    )
    env = request(proc.port, "/env").json()
    assert env["GREETING"] == "hi"
    assert env["FROM_FILE"] == "file value"
    assert "DAEMON_SECRET" not in env


def test_reload_switches_versions_and_a_broken_edit_keeps_the_old_one(hourai_run, tmp_path):
    fn = tmp_path / "app.py"
    fn.write_text("def handler(event, context):\n    return 'v1'\n")
    proc = hourai_run(str(fn), "--reload")
    assert request(proc.port, "/").body == b"v1"
    fn.write_text("def handler(event, context)\n    return 'broken'\n")
    proc.wait_for(r"reload refused, the previous version keeps serving: .*SyntaxError")
    assert request(proc.port, "/").body == b"v1"
    fn.write_text("def handler(event, context):\n    return 'v2'\n")
    proc.wait_for(r"now serving version")
    assert request(proc.port, "/").body == b"v2"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests/functions/nope.py", r"no such file"),
        (str(FUNCTIONS / "broken_syntax.py"), r"SyntaxError"),
        (str(FUNCTIONS / "broken_import.py"), r"no_such_module_for_hourai_tests"),
        (str(FUNCTIONS / "no_entry.py"), r"handler, lambda_handler, app, application"),
        (f"{BEHAVE}:missing", r"missing"),
    ],
)
def test_user_errors_print_one_clear_line(target: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hourai", "run", "--port", "0", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("hourai: error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0])
    assert "Traceback" not in result.stderr.split("hourai: error:")[-1]


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "hourai", "run", "--port", str(port), BEHAVE],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1" in result.stderr
    assert "--port" in result.stderr


def test_the_port_answers_only_once_the_function_is_ready(tmp_path) -> None:
    # `hourai run app.py & curl --retry-connrefused ...`: the first answer must be the
    # function's, never "not deployed (yet)" while its snapshot is still being built.
    fn = tmp_path / "slow_init.py"
    fn.write_text(
        "import time\n\ntime.sleep(1)\n\n\ndef handler(event, context):\n    return 'ready'\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = HouraiProcess(["run", "--port", str(port), "--spares", "0", str(fn)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert proc.proc.poll() is None, proc.log
                assert time.monotonic() < deadline, "never listened"
                time.sleep(0.005)
        with conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b"\r\n\r\nready")
        assert "serving handler" in proc.wait_serving().log
    finally:
        proc.stop()


def test_a_failed_deploy_never_listens(tmp_path) -> None:
    fn = tmp_path / "broken.py"
    fn.write_text("import time\n\ntime.sleep(0.5)\nraise RuntimeError('init failed')\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = HouraiProcess(["run", "--port", str(port), str(fn)])
    try:
        answered = []
        deadline = time.monotonic() + 60
        while proc.proc.poll() is None:
            assert time.monotonic() < deadline, "hourai run did not exit"
            with contextlib.suppress(ConnectionRefusedError):
                answered.append(request(port, "/", timeout=5).status)
            time.sleep(0.01)
        assert proc.proc.returncode == 1
        assert answered == []
        proc.wait_for(r"hourai: error: .*init failed")
    finally:
        proc.stop()


def test_sigterm_stops_every_process_of_the_tree(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "2")
    wait_until(lambda: len(worker_processes(proc)) == 2)
    tree = psutil.Process(proc.proc.pid).children(recursive=True)
    assert len(tree) == 4  # root zygote, snapshot, two spares
    assert proc.stop() == 0
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive


@pytest.mark.parametrize("entry", ["concurrent", "concurrent_async"])
def test_thread_mode_runs_invocations_at_once_in_one_worker(hourai_run, entry: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    proc = hourai_run(f"{BEHAVE}:{entry}", "--concurrency", "4", "--max-workers", "1")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: request(proc.port, "/?n=4"), range(4)))
    # each call returns only once all four are inside the function together
    assert [r.status for r in replies] == [200] * 4
    assert len({r.json()["pid"] for r in replies}) == 1


def test_worker_is_recycled_after_max_requests(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0", "--max-requests", "2")
    pids = [request(proc.port, "/pid").json()["pid"] for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]


def test_worker_is_recycled_when_its_memory_grows_past_the_limit(hourai_run) -> None:
    proc = hourai_run(f"{BEHAVE}:leaky", "--spares", "0", "--worker-memory", "64M")
    first = request(proc.port, "/").json()
    pid = host_pid(proc.proc.pid, first)
    request(proc.port, "/")
    request(proc.port, "/")  # now ~72 MiB held, above the limit once idle
    wait_until(lambda: not psutil.pid_exists(pid), timeout=15)
    again = request(proc.port, "/").json()
    assert again["pid"] != first["pid"] and again["held_mib"] == 24


def test_client_going_away_mid_request_costs_only_that_invocation(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--spares", "0", "--max-workers", "1")
    with socket.create_connection(("127.0.0.1", proc.port)) as s:
        s.sendall(b"GET /sleep?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: len(worker_processes(proc)) == 1)  # it reached a worker
    # the only worker finishes (or never got) the abandoned call, then serves the next one
    reply = request(proc.port, "/pid")
    assert reply.status == 200
    assert "Traceback" not in proc.log


def test_rate_limit_answers_429_with_retry_after(hourai_run) -> None:
    proc = hourai_run(BEHAVE, "--rate", "0.5")
    assert request(proc.port, "/pid").status == 200
    limited = request(proc.port, "/pid")
    assert limited.status == 429
    assert int(limited.headers["retry-after"]) >= 1
