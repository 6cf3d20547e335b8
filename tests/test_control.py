"""The control plane over its real Unix socket: owner only, JSON only, never a 500, and a clean lifecycle."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from conftest import control_post as post, control_request, run_imsa, service_user_args, start_service, stop_process
from imsa.client import Client
from imsa.errors import ServiceNotRunning

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
OTHER_UID = 12345


def test_socket_is_0600_in_a_0700_directory_owned_by_the_served_user(service):
    info = os.stat(service.socket)
    directory = os.stat(os.path.dirname(service.socket))
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(directory.st_mode) == 0o700
    expected = 65534 if service_user_args() else os.geteuid()
    assert info.st_uid == expected and directory.st_uid == expected


# The raw exchange, without the client's own checks of the socket: what the server itself lets through.
CLIENT = (
    "import sys\n"
    "from imsa.client import exchange\n"
    "try:\n"
    "    status, body = exchange(sys.argv[1], 'GET', '/status', timeout=5)\n"
    "    print('ERROR' if status != 200 else 'OK', body.decode())\n"
    "except OSError as e:\n"
    "    print('ERROR', e)\n"
)


def as_other_user(path):
    return subprocess.run(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", sys.executable, "-c", CLIENT, path],
        capture_output=True, text=True, timeout=30, cwd="/",
    )


@pytest.mark.security
@needs_root
def test_another_uid_cannot_even_open_the_socket(service):
    done = as_other_user(service.socket)
    assert "ERROR" in done.stdout and "Permission denied" in done.stdout
    assert "pid" not in done.stdout


@pytest.mark.security
@needs_root
def test_another_uid_is_refused_by_peer_credentials_even_if_the_file_is_opened_up(service):
    # Defence in depth: were the socket's mode ever loosened, SO_PEERCRED still refuses the stranger.
    os.chmod(os.path.dirname(service.socket), 0o755)
    os.chmod(service.socket, 0o666)
    done = as_other_user(service.socket)
    assert "ERROR" in done.stdout and "only the service's owner" in done.stdout
    service.wait_for_log(f"refused uid {OTHER_UID}")


STRANGER_REQUESTS = (
    "import socket, sys\n"
    "path, count = sys.argv[1], int(sys.argv[2])\n"
    "request = b'GET /status%0a2024-01-01T00:00:00+0000%20imsa[1]%20INFO%20forged HTTP/1.1\\r\\nHost: localhost\\r\\n'\n"
    "request += b'Connection: close\\r\\n\\r\\n'\n"
    "for _ in range(count):\n"
    "    sock = socket.socket(socket.AF_UNIX)\n"
    "    sock.connect(path)\n"
    "    sock.sendall(request)\n"
    "    print(sock.recv(100).split()[1].decode())\n"
    "    sock.close()\n"
)


@needs_root
def test_a_stranger_on_an_opened_up_socket_gets_one_escaped_log_line(service):
    # The refusal line shows the path escaped (a %0a cannot start a line of its own) and is written once per uid
    # per interval, however many requests the stranger sends.
    os.chmod(os.path.dirname(service.socket), 0o755)
    os.chmod(service.socket, 0o666)
    done = subprocess.run(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", sys.executable, "-c",
         STRANGER_REQUESTS, service.socket, "200"], capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert done.stdout.split() == ["403"] * 200, done.stderr
    log = service.wait_for_log(f"refused uid {OTHER_UID}")
    lines = [line for line in log.splitlines() if f"uid {OTHER_UID}" in line]
    assert len(lines) == 1, lines
    assert "'/status\\n2024-01-01T00:00:00+0000 imsa[1] INFO forged'" in lines[0], lines
    assert not [line for line in log.splitlines() if line.startswith("2024-01-01")]


def test_root_or_the_owner_is_allowed(service):
    assert service.client.status()["pid"] == service.pid


ROLE_A = "arn:aws:iam::123456789012:role/role-a"


def _spec(**fields):
    """A spec body with a valid role, then *fields* (None removes one)."""
    body = {"profile": "a", "fingerprint": "0" * 32, "role_arn": ROLE_A, "role_session_name": "ab"}
    body.update(fields)
    return json.dumps({key: value for key, value in body.items() if value is not None}).encode()


@pytest.mark.parametrize("content_type,body,status", [
    ("text/plain", b'{"fingerprint": "0"}', 415),
    ("application/x-www-form-urlencoded", b"a=b", 415),
    ("application/json", b"{not json", 400),
    ("application/json", b"[1, 2]", 400),
    ("application/json", b"null", 400),
    ("application/json", b'"text"', 400),
    ("application/json", b"{}", 400),
    ("application/json", b'{"profile": "a"}', 400),
    ("application/json", b'{"profile": "a", "fingerprint": "zz"}', 400),
    ("application/json", b'{"profile": "a", "fingerprint": "' + b"0" * 32 + b'", "duration_seconds": 99999}', 400),
    ("application/json", b'{"profile": "a", "fingerprint": "' + b"0" * 32 + b'", "role_arn": "nope"}', 400),
    ("application/json", b'{"profile": "a", "fingerprint": "' + b"0" * 32 + b'", "extra": 1}', 400),
    ("application/json", b'{"profile": "a", "fingerprint": "' + b"0" * 32 + b'", "duration_seconds": true}', 400),
    # ~/.aws/config chains: the hops before the role are checked as strictly as the role
    ("application/json", _spec(via=[{"role_arn": "nope", "role_session_name": "ab"}]), 400),
    ("application/json", _spec(via=[{"role_arn": ROLE_A, "role_session_name": "ab", "mfa": "123456"}]), 400),
    ("application/json", _spec(via=[{"role_arn": ROLE_A}]), 400),
    ("application/json", _spec(via=[{"role_arn": ROLE_A, "role_session_name": "ab"}] * 9), 400),
    ("application/json", _spec(via=[{"role_arn": ROLE_A, "role_session_name": "ab"}], role_arn=None), 400),
    ("application/json", _spec(origin="a\nforged line"), 400),
])
@pytest.mark.parametrize("route", ["/activate", "/credentials"])
def test_bad_bodies_get_a_json_error_never_a_500(service, route, content_type, body, status):
    got, payload = post(service.socket, route, body, content_type)
    assert got == status
    assert "error" in json.loads(payload)


@pytest.mark.parametrize("body", [
    b"{}", b'{"fingerprint": "' + b"a" * 32 + b'"}', b'{"fingerprint": "' + b"a" * 32 + b'", "credentials": 5}',
    b'{"fingerprint": "' + b"a" * 32 + b'", "credentials": {"access_key_id": "A", "secret_access_key": "B", '
    b'"session_token": "C", "expiration": "yesterday"}}',
    b'{"fingerprint": "' + b"a" * 32 + b'", "credentials": {"access_key_id": "A", "secret_access_key": "B", '
    b'"session_token": "C", "expiration": "2001-01-01T00:00:00Z"}}',
])
def test_bad_sessions_are_refused_with_400(service, body):
    got, payload = post(service.socket, "/sessions", body)
    assert got == 400 and "error" in json.loads(payload)


def test_a_role_without_a_session_is_a_clear_502(service):
    body = {"profile": "a", "fingerprint": "b" * 32, "role_arn": "arn:aws:iam::123456789012:role/role-a",
            "role_session_name": "tester"}
    got, payload = post(service.socket, "/activate", body)
    assert got == 502
    assert "imsa assume a" in json.loads(payload)["error"]


def test_state_changes_need_post(service):
    for route in ("/activate", "/credentials", "/sessions", "/stop"):
        got, _ = control_request(service.socket, f"GET {route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        assert got == 405
    assert service.process.poll() is None


def test_sigterm_stops_cleanly_and_removes_the_socket(service):
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=10) == 0
    assert not os.path.exists(service.socket)


def test_stop_command_stops_the_service(service):
    done = run_imsa("stop")
    assert done.returncode == 0, done.stderr
    assert service.process.wait(timeout=10) == 0
    assert not os.path.exists(service.socket)
    assert run_imsa("status").returncode == 5


def test_a_second_service_on_the_same_socket_is_refused(service):
    with pytest.raises(RuntimeError, match="already running"):
        start_service()
    assert service.client.status()["pid"] == service.pid


def test_a_stale_socket_left_by_sigkill_is_replaced(isolated_env, sts_env):
    first = start_service()
    first.process.kill()
    first.process.wait()
    assert os.path.exists(first.socket)
    with pytest.raises(ServiceNotRunning):
        Client(first.socket, timeout=2).status()
    done = run_imsa("status")
    assert done.returncode == 5 and "not running" in done.stderr
    second = start_service()
    try:
        assert second.client.status()["pid"] == second.pid != first.pid
    finally:
        stop_process(second.process)
