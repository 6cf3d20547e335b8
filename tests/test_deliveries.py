"""The delivery log: real clients fetch credentials over real sockets, and ``imsa log --json`` names each of them.

The clients run as the service's own user (the service reads that user's /proc entries only): when the suite runs
as root, that is the service's unprivileged user, through setpriv.
"""

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import MFA_CODE, SERVICE_UID, run_imsa, shared_tmpdir, start_service, stop_process, write_config
from imsa.credentials import Credentials
from imsa.server import deliveries
from imsa.server.store import RoleSpec

# A client that fetches the active role over IMDSv2 on one keep-alive connection (or, with "ecs", from imsa exec's
# endpoint), prints its pid and what it got, and keeps its connection open until a line arrives on stdin.
FETCHER = r"""
import http.client, json, os, signal, socket, sys, urllib.parse
signal.alarm(120)
if sys.argv[1] == "imds":
    conn = http.client.HTTPConnection(sys.argv[2], int(sys.argv[3]), timeout=10)
    conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    headers = {"X-aws-ec2-metadata-token": conn.getresponse().read().decode()}
    path = "/latest/meta-data/iam/security-credentials/"
    conn.request("GET", path, headers=headers)
    role = conn.getresponse().read().decode()
    conn.request("GET", path + role, headers=headers)
    body = json.loads(conn.getresponse().read())
else:
    url = urllib.parse.urlsplit(os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"])
    conn = socket.create_connection((url.hostname, url.port), timeout=10)
    conn.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n\r\n" % (
        url.path, url.netloc, os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"])).encode())
    data = b""
    while True:  # the endpoint ends its side after the answer; this side stays open
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
print(json.dumps({"pid": os.getpid(), "key": body["AccessKeyId"], "secret": body["SecretAccessKey"],
                  "token": body["Token"]}), flush=True)
sys.stdin.readline()
"""
LOG_WAIT = 20


def as_service_user():
    """The prefix that runs a command as the service's user (nothing when the suite is not root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups"]


@pytest.fixture
def client_dir():
    """A directory the service's user owns, holding a copy of the Python interpreter under another name."""
    path = shared_tmpdir("imsa-deliveries-")
    interpreter = os.path.join(path, "role-fetcher")
    shutil.copy2(os.path.realpath(sys.executable), interpreter)
    os.chmod(interpreter, 0o755)
    with open(os.path.join(path, "fetcher.py"), "w") as handle:
        handle.write(FETCHER)
    if os.geteuid() == 0:
        for name in (".", "fetcher.py"):
            os.chown(os.path.join(path, name), SERVICE_UID, SERVICE_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def records(*args):
    done = run_imsa("log", "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def wait_for_record(match, *args):
    """The first record *match* accepts, polled from ``imsa log --json`` for at most LOG_WAIT seconds."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        found = [record for record in records(*args) if match(record)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such record within {LOG_WAIT} s: {records(*args)}")
        time.sleep(0.1)


def start_fetcher(client_dir, argv, env=None):
    """Start *argv* (the fetcher, or imsa exec running it) with a pipe on stdin; its first stdout line, parsed."""
    process = subprocess.Popen(as_service_user() + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=client_dir, env=env or dict(os.environ))
    line = process.stdout.readline()
    if not line:
        stop_process(process)
        raise AssertionError(f"the client printed nothing: {process.stderr.read()}")
    return process, json.loads(line)


def release(process):
    """Let a fetcher end (a line on its stdin), and wait for it."""
    try:
        process.stdin.write("\n")
        process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(timeout=30)
    finally:
        stop_process(process)


def service_user_home(isolated_env, sts_env):
    """The environment of a CLI run as the service's user: its own HOME, ~/.imsa and AWS files."""
    home = shared_tmpdir("imsa-deliveries-home-")
    for name in (".aws",):
        os.makedirs(os.path.join(home, name))
    open(os.path.join(home, ".aws", "config"), "w").close()
    open(os.path.join(home, ".aws", "credentials"), "w").close()
    from pathlib import Path

    write_config(Path(home), sts_env)
    if os.geteuid() == 0:
        for root, dirs, files in os.walk(home):
            for name in [root] + [os.path.join(root, entry) for entry in dirs + files]:
                os.chown(name, SERVICE_UID, SERVICE_UID)
    env = dict(os.environ, HOME=home, IMSA_CONFIG=os.path.join(home, ".imsa"),
               AWS_CONFIG_FILE=os.path.join(home, ".aws", "config"),
               AWS_SHARED_CREDENTIALS_FILE=os.path.join(home, ".aws", "credentials"))
    return home, env


class HoldServer:
    """A local listener that accepts and answers nothing until released: curl, waiting on it, keeps its IMDS
    connection in its connection cache meanwhile."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def test_imsa_log_names_each_client_process_and_executable(active_service, client_dir, isolated_env, sts_env):
    """Two executables fetch the active role over IMDS and one runs under imsa exec: each record has its pid and exe."""
    service = active_service
    interpreter = os.path.join(client_dir, "role-fetcher")
    script = os.path.join(client_dir, "fetcher.py")

    fetcher, fetched = start_fetcher(client_dir, [interpreter, script, "imds", service.host, str(service.port)])
    try:
        record = wait_for_record(lambda r: r["way"] == "imds" and r.get("pid") == fetched["pid"])
        assert record["exe"] == interpreter
        assert record["attributed"] is True and record["profile"] == "a"
        assert record["cmdline"] == f"{interpreter} {script} imds {service.host} {service.port}"
        assert record["uid"] == (SERVICE_UID if os.geteuid() == 0 else os.geteuid())
        assert record["access_key_id"].endswith(fetched["key"][-4:])
        # Never a secret in the log: no whole key id, no secret key, no token.
        text = json.dumps(records())
        for secret in (fetched["key"], fetched["secret"], fetched["token"]):
            assert secret not in text
    finally:
        release(fetcher)

    _, _, token = http_token(service)
    hold = HoldServer()
    curl = subprocess.Popen(
        as_service_user() + ["curl", "-s", "-o", "/dev/null", "-H", f"X-aws-ec2-metadata-token: {token}",
                             service.url("/latest/meta-data/iam/security-credentials/role-a"),
                             f"http://127.0.0.1:{hold.port}/"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=client_dir)
    try:
        record = wait_for_record(lambda r: r["way"] == "imds" and r.get("pid") == curl.pid)
        assert record["exe"] == os.path.realpath(shutil.which("curl"))
        assert record["cmdline"].startswith("curl -s -o /dev/null")
    finally:
        hold.close()
        curl.wait(timeout=30)

    home, env = service_user_home(isolated_env, sts_env)
    try:
        command = [sys.executable, "-m", "imsa", "exec", "a", "--", interpreter, script, "ecs"]
        runner, served = start_fetcher(client_dir, command, env=env)
        try:
            record = wait_for_record(lambda r: r["way"] == "exec" and r.get("pid") == served["pid"])
            assert record["exe"] == interpreter and record["attributed"] is True
            assert record["cmdline"] == f"{interpreter} {script} ecs"
            # The imsa exec that served it, with the command it was given.
            assert record["via"]["pid"] == runner.pid
            assert record["via"]["cmdline"].endswith(f"exec a -- {interpreter} {script} ecs")
        finally:
            release(runner)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    # --profile keeps that profile's records only; status shows the last delivery of each profile.
    assert {record["profile"] for record in records("--profile", "a")} == {"a"}
    assert records("--profile", "b") == []
    done = run_imsa("status")
    assert "delivered:  a by exec at " in done.stdout and f"pid {served['pid']} {interpreter}" in done.stdout


def http_token(service):
    from conftest import http

    status, headers, body = http(service.host, service.port, "PUT", "/latest/api/token",
                                 {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    return status, headers, body.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a client of another uid than the service's")
def test_another_users_process_is_recorded_with_its_uid_only(active_service):
    """The service cannot read root's /proc entries: root's fetch is recorded with uid 0 and the reason."""
    from conftest import http

    _, _, token = http_token(active_service)
    status, _, _ = http(active_service.host, active_service.port, "GET",
                        "/latest/meta-data/iam/security-credentials/role-a", {"X-aws-ec2-metadata-token": token})
    assert status == 200
    record = wait_for_record(lambda r: r["way"] == "imds" and r["uid"] == 0)
    assert record["attributed"] is False and record["pid"] is None and record["exe"] is None
    assert record["note"] == deliveries.OTHER_USER


def test_export_and_credential_process_name_the_cli_and_its_parent(active_service):
    """Control-plane deliveries name the CLI (SO_PEERCRED) and the process that ran it."""
    done = run_imsa("export", "b", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    record = wait_for_record(lambda r: r["way"] == "export" and r["profile"] == "b")
    assert record["uid"] == os.geteuid()
    assert record["pid"] is not None
    if record["attributed"]:  # the CLI may be gone before the lookup; then the record says so
        assert "imsa export b" in record["cmdline"]
    else:
        assert record["note"] == deliveries.NOT_SEEN
    done = run_imsa("credential-process", "c")
    assert done.returncode == 0, done.stderr
    wait_for_record(lambda r: r["way"] == "credential-process" and r["profile"] == "c")


def test_delivery_log_file_is_private_appended_and_holds_no_secret(isolated_env, sts_env):
    """imsa start --delivery-log PATH: each delivery is a JSON line there, in a 0600 file of the service's user."""
    directory = shared_tmpdir("imsa-delivery-file-")
    if os.geteuid() == 0:
        os.chown(directory, SERVICE_UID, SERVICE_UID)
    path = os.path.join(directory, "deliveries.jsonl")
    service = start_service(["--delivery-log", path])
    try:
        write_config(isolated_env, sts_env)
        done = run_imsa("export", "a", "--format", "json", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        exported = json.loads(done.stdout)
        deadline = time.monotonic() + LOG_WAIT
        while not (os.path.exists(path) and os.path.getsize(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(path) as handle:
            lines = [json.loads(line) for line in handle]
        assert [line["way"] for line in lines] == ["export"]
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == (SERVICE_UID if os.geteuid() == 0 else os.geteuid())
        text = open(path).read()
        for value in exported.values():
            if isinstance(value, str) and len(value) > 12:
                assert value not in text
    finally:
        stop_process(service.process)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_symlink_as_delivery_log_is_refused(isolated_env, sts_env, tmp_path):
    """The file is opened without following a symlink: the service does not start rather than write elsewhere."""
    directory = shared_tmpdir("imsa-delivery-link-")
    target = os.path.join(directory, "elsewhere")
    open(target, "w").close()
    os.symlink(target, os.path.join(directory, "deliveries.jsonl"))
    try:
        with pytest.raises(RuntimeError, match="delivery log"):
            start_service(["--delivery-log", os.path.join(directory, "deliveries.jsonl")])
        assert os.path.getsize(target) == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def spec(profile="p"):
    return RoleSpec(profile=profile, fingerprint="0" * 32, role_arn="arn:aws:iam::123456789012:role/r")


def creds():
    from imsa.credentials import utcnow
    import datetime

    return Credentials("ASIAEXAMPLEKEY12WXYZ", "secret-key-value", "session-token-value",
                       utcnow() + datetime.timedelta(hours=1))


def test_ring_is_bounded_and_a_full_queue_records_without_looking(tmp_path):
    """The memory ring keeps the newest records; past the queue's bound a delivery is kept, marked not attributed."""
    log = deliveries.DeliveryLog(limit=5, queue_size=3)
    for number in range(4):
        log.delivered(spec(f"p{number}"), creds(), "export", uid=os.geteuid(), pid=os.getpid())
    with log._lock:
        jobs = list(log._pending)
        log._pending.clear()
    assert [job[0].get("note") for job in jobs] == [None, None, None, deliveries.QUEUE_FULL]
    log.process(jobs)
    kept, last = log.records()
    assert last == 4 and [record["attributed"] for record in kept] == [True, True, True, False]
    assert kept[0]["exe"] == os.path.realpath(f"/proc/{os.getpid()}/exe")
    for number in range(4):
        log.delivered(spec(f"q{number}"), creds(), "export")
    with log._lock:
        jobs = list(log._pending)
        log._pending.clear()
    log.process(jobs)
    kept, last = log.records()
    assert len(kept) == 5 and last == 8 and kept[0]["profile"] == "p3"
    assert log.records(after=7)[0][0]["profile"] == "q3"
    assert log.last_per_profile()["q3"]["seq"] == 8
    assert "ASIAEXAMPLEKEY12WXYZ" not in json.dumps(kept) and "secret-key-value" not in json.dumps(kept)


def test_the_file_is_rotated_by_size(tmp_path):
    """Past max_bytes PATH becomes PATH.1 (and PATH.1 PATH.2); the oldest beyond the backups goes."""
    path = str(tmp_path / "deliveries.jsonl")
    log = deliveries.DeliveryLog(path, max_bytes=600, backups=2)
    log.open_file()
    try:
        for number in range(12):
            log.delivered(spec(f"p{number}"), creds(), "console")
            with log._lock:
                jobs = list(log._pending)
                log._pending.clear()
            log.process(jobs)
    finally:
        log.stop()
    assert os.path.exists(path + ".1") and os.path.exists(path + ".2") and not os.path.exists(path + ".3")
    for name in (path, path + ".1", path + ".2"):
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    newest = []
    for name in (path + ".1", path):  # the write that crossed the size is the last of PATH.1
        with open(name) as handle:
            newest += [json.loads(line)["profile"] for line in handle]
    assert newest[-1] == "p11" and len(set(newest)) == len(newest)


def test_socket_inode_finds_an_open_connection_and_not_a_closed_one():
    """The inode of a live client socket is the one in /proc/self/fd; a closed one has none."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        inode = deliveries.socket_inode(client.getsockname(), server.getsockname())
        assert inode == os.fstat(client.fileno()).st_ino
        ends = (client.getsockname(), server.getsockname())
        client.close()
        assert deliveries.socket_inode(*ends) is None
    finally:
        accepted.close()
        server.close()


def test_a_keep_alive_client_is_found_again_without_a_scan_and_a_closed_one_is_not():
    """The holder of a socket is remembered (one readlink checks it); once the client closes, nothing is claimed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    log = deliveries.DeliveryLog()
    ends = dict(client=client.getsockname(), server=server.getsockname())

    def deliver():
        log.delivered(spec(), creds(), "imds", uid=os.geteuid(), **ends)
        with log._lock:
            jobs = list(log._pending)
            log._pending.clear()
        log.process(jobs)
        return log.records()[0][-1]

    try:
        first = deliver()
        assert first["attributed"] and first["pid"] == os.getpid()
        assert os.fstat(client.fileno()).st_ino in log._known
        scans = []
        log._holders = lambda inodes: scans.append(inodes) or {}
        second = deliver()
        assert second["attributed"] and second["pid"] == os.getpid() and scans == []
        client.close()
        third = deliver()
        assert not third["attributed"] and third["note"] == deliveries.NOT_SEEN
    finally:
        client.close()
        accepted.close()
        server.close()


def test_log_follow_prints_new_deliveries_as_they_come(active_service):
    """imsa log --follow --json: a delivery made after it started appears on its stdout; it is stopped by its pid."""
    follower = subprocess.Popen([sys.executable, "-m", "imsa", "log", "--follow", "--json", "--profile", "b"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        done = run_imsa("export", "b", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        ready, _, _ = select.select([follower.stdout], [], [], LOG_WAIT)
        assert ready, "imsa log --follow printed nothing"
        record = json.loads(follower.stdout.readline())
        assert record["profile"] == "b" and record["way"] == "export"
    finally:
        stop_process(follower)
