"""The daemon's config: defaults, overrides, and every bad key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from hourai.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hourai.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    config = load_config(None)
    assert config == Config()
    assert config.socket_path == Path("/var/lib/hourai/control.sock")
    monkeypatch.setenv("STATE_DIRECTORY", "/run/x")
    assert load_config(None).state_dir == Path("/run/x")
    path = write(
        tmp_path, 'listen = ["0.0.0.0:80"]\nmemory_budget = "2G"\n[defaults]\nspares = 2\n'
    )
    config = load_config(path, listen=["127.0.0.1:9000"], state_dir=tmp_path)
    assert config.listen == ("127.0.0.1:9000",)  # the flag wins
    assert config.memory_budget == 2 << 30 and config.defaults.spares == 2
    assert config.state_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("lisen = []", "'lisen'"),
        ('listen = ["nope"]', "listen"),
        ('cgroup_backend = "v3"', "cgroup_backend"),
        ("uid_range = [5, 1]", "uid_range"),
        ('memory_budget = "lots"', "memory_budget"),
        ("drain_timeout = -1", "drain_timeout"),
        ("[defaults]\nspars = 1", "defaults.spars"),
        ("[defaults]\nspares = 1.5", "defaults.spares"),
        ('log_format = "xml"', "log_format"),
        ("this is not toml", "hourai.toml"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(write(tmp_path, text))


def test_daemon_refuses_a_bad_config_at_start(tmp_path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "colour = 'blue'\n")
    result = subprocess.run(
        [sys.executable, "-m", "hourai", "daemon", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown key 'colour'" in result.stderr
