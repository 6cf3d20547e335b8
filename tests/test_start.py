"""`imsa start` in the background, `stop`, `status` warnings, and shell completion."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MFA_CODE, run_imsa, service_user_args, write_config
from imsa.commands import shadowing_warnings


def test_background_start_returns_once_serving_and_prints_the_endpoint(isolated_env, sts_env):
    done = run_imsa("start", "--listen", "127.0.0.1:0", *service_user_args())
    assert done.returncode == 0, done.stderr
    try:
        assert done.stdout.startswith("export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:")
        assert done.stdout.strip().endswith("/")
        assert "serving on 127.0.0.1:" in done.stderr
        status = run_imsa("status", "--json")
        data = json.loads(status.stdout)
        assert status.returncode == 1 and data["active"] is None
        write_config(isolated_env, sts_env)
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
        assert run_imsa("status").returncode == 0
        again = run_imsa("start", "--listen", "127.0.0.1:0", *service_user_args())
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = run_imsa("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert run_imsa("status").returncode == 5


def test_start_reports_why_the_service_failed(isolated_env):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = run_imsa("start", "--listen", f"127.0.0.1:{port}", *service_user_args())
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert "failed to start" in done.stderr and "already in use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_listen_values_are_usage_errors(isolated_env):
    for value in ("nowhere", "localhost:80", "127.0.0.1:99999", "127.0.0.1"):
        done = run_imsa("start", "--foreground", "--listen", value)
        assert done.returncode == 2, value
        assert "--listen" in done.stderr


def test_port_80_as_a_user_fails_clearly(isolated_env):
    argv = [sys.executable, "-m", "imsa", "start", "--foreground", "--listen", "127.0.0.1:80"]
    if os.geteuid() == 0:  # become an ordinary user first
        argv = ["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    assert done.returncode == 1, done.stderr
    assert "permission denied" in done.stderr and "sudo imsa start" in done.stderr and "--listen 127.0.0.1:PORT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the root path")
def test_root_without_a_target_user_refuses(isolated_env, monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    done = run_imsa("start", "--foreground", "--listen", "127.0.0.1:0")
    assert done.returncode == 2
    assert "refusing to serve credentials as root" in done.stderr


def test_status_warns_about_what_would_shadow_imds(tmp_path):
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = AKIAEXAMPLE\n")
    env = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_PROFILE": "x", "HTTP_PROXY": "http://proxy:3128"}
    warnings = "\n".join(shadowing_warnings(env, home=str(tmp_path)))
    for word in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "[default]", "NO_PROXY=169.254.169.254"):
        assert word in warnings
    assert shadowing_warnings({"HTTP_PROXY": "http://p", "NO_PROXY": "localhost,169.254.169.254"}, home=str(tmp_path / "none")) == []


def test_status_prints_the_warnings_on_stderr(isolated_env, service, sts_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "other")
    done = run_imsa("status")
    assert "warning: AWS_PROFILE is set" in done.stderr
    assert "AWS_PROFILE" not in done.stdout


def test_completion_lists_profile_names(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE="imsa assume ", COMP_POINT="12",
               _ARGCOMPLETE_SUPPRESS_SPACE="0")
    read, write = os.pipe()
    saved = os.dup(8) if _fd_open(8) else None
    os.dup2(write, 8)  # argcomplete writes completions to fd 8
    try:
        done = subprocess.run([sys.executable, "-m", "imsa"], env=env, pass_fds=(8,), capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
        if saved is None:
            os.close(8)
        else:
            os.dup2(saved, 8)
            os.close(saved)
    with os.fdopen(read) as handle:
        names = handle.read().split("\n")
    assert done.returncode == 0
    assert sorted(name for name in names if not name.startswith("-")) == ["a", "b", "base", "c", "d"]


def _fd_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
