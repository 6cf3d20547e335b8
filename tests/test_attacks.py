"""Attacks over real sockets, each refused with its documented status and nothing leaked.

tests/test_imds.py already covers DNS rebinding (Host), Origin/Referer, X-Forwarded-For, bad TTLs, tokenless,
forged, truncated and expired tokens, and tests/test_control.py the control socket (another uid, non-JSON
bodies, GET for state changes, no control route on TCP, a stale socket). This module adds what needs more
machinery: flooding the token table, a "container" in a second network namespace, oversized requests and
slow clients. README "Security" lists every attack and the status it gets.
"""

import os
import socket
import threading
import time

import pytest

from conftest import http
from imdsv2 import CREDS, TOKEN, TOKEN_PATH, TTL, put_token, service_credentials
from imsa.server import imds, peers, process
from test_netns import _can_unshare, run_scenario

needs_netns = pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare(1) and ip(8) to make a network namespace")


def rss_kib(pid):
    """Resident memory of *pid* in KiB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def read_response(reader):
    """One HTTP/1.1 response from a buffered reader: (status, body)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return int(status_line.split()[1]), reader.read(length)


def pipelined(host, port, request, count, timeout=60):
    """Send *request* *count* times on one keep-alive connection (a writer thread, so neither side blocks) and
    return the statuses and bodies in order."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        writer = threading.Thread(target=lambda: sock.sendall(request * count), daemon=True)
        writer.start()
        reader = sock.makefile("rb")
        answers = [read_response(reader) for _ in range(count)]
        writer.join(timeout)
        return answers
    finally:
        sock.close()


def flood_tokens(service, count, connections=4):
    """Ask for *count* tokens (TTL 21600, the longest) over a few pipelined connections; the tokens issued."""
    request = (f"PUT {TOKEN_PATH} HTTP/1.1\r\nHost: {service.host}:{service.port}\r\n{TTL}: 21600\r\n"
               "Content-Length: 0\r\n\r\n").encode()
    results = [None] * connections

    def one(index):
        results[index] = pipelined(service.host, service.port, request, count // connections)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    tokens = []
    for answers in results:
        assert answers is not None, "a flooding connection did not finish"
        assert {status for status, _ in answers} == {200}
        tokens.extend(body.decode() for _, body in answers)
    return tokens


# --- the token table ---


def test_a_token_flood_keeps_the_table_and_memory_bounded(active_service):
    svc = active_service
    oldest = put_token(svc.host, svc.port)
    before = rss_kib(svc.pid)
    flood_tokens(svc, 10_000 + 2000)
    assert svc.client.status()["imds_tokens"] == 10_000
    full = rss_kib(svc.pid)
    flood_tokens(svc, 10_000)
    assert svc.client.status()["imds_tokens"] == 10_000
    after = rss_kib(svc.pid)
    # A full table costs a few MB; a second flood of the same size must not add to it.
    assert full - before < 48 * 1024, (before, full)
    assert after - full < 8 * 1024, (full, after)
    # The oldest token made room (its client gets 401 and asks again, as every SDK does); new clients are served.
    assert http(svc.host, svc.port, "GET", CREDS, {TOKEN: oldest})[0] == 401
    assert service_credentials(svc)[0] == "role-a"


# --- a container: a peer in another network namespace ---


@needs_netns
def test_a_container_behind_a_veth_pair_gets_nothing(isolated_env):
    results = run_scenario("container")
    assert "assume" not in results and "client_failed" not in results, results
    assert results["host"] == ["role-a", True], "the host itself is served"
    # The listener takes connections arriving on lo only (SO_BINDTODEVICE): the container is refused by the kernel,
    # so it cannot even hold one of the connection slots the owner's SDKs need.
    for name in ("token", "credentials", "token_as_v1"):
        status, body, leaked = results[name]
        assert status == "no connection" and "ConnectionRefusedError" in body, (name, results[name])
        assert not leaked
    assert results["flood_connected"] == 0
    for name in ("spoofed_listen_address", "spoofed_loopback"):
        status, _, leaked = results[name]
        assert status in ("no connection", "403"), (name, results[name])
        assert not leaked
    assert results["botocore"] == [], "an SDK in the container finds no credentials"
    assert not results["log_peer"] and not results["log_has_secret"]


# --- oversized requests ---


def exchange(connect, request, body_sender=None, timeout=10):
    """Send *request* on a fresh connection (and stream a body from *body_sender* in a thread, ignoring a server
    that closes early); return (status, response bytes)."""
    sock = connect()
    sock.settimeout(timeout)
    try:
        sock.sendall(request)
        if body_sender is not None:
            threading.Thread(target=body_sender, args=(sock,), daemon=True).start()
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and len(data) > 4096:
                break
    finally:
        sock.close()
    return int(data.split(b" ", 2)[1]), data


def _quietly_send(data):
    def send(sock):
        try:
            sock.sendall(data)
        except OSError:
            pass
    return send


def _connect_imds(svc):
    return lambda: socket.create_connection((svc.host, svc.port))


def _connect_control(svc):
    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(svc.socket)
        return sock
    return connect


LISTENERS = {
    # listener: (connect, path, Host, header limit, body limit)
    "imds": (_connect_imds, CREDS, None, 16384,  # the README's 16 KiB and 64 KiB, as literals
             65536),
    "control": (_connect_control, "/activate", "localhost", 16384, 1 << 20),
}


@pytest.mark.parametrize("listener", sorted(LISTENERS))
def test_oversized_headers_get_431(active_service, listener):
    svc = active_service
    connect, path, host, header_limit, _ = LISTENERS[listener]
    _, creds = service_credentials(svc)
    token = put_token(svc.host, svc.port)
    host = host or f"{svc.host}:{svc.port}"
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{TOKEN}: {token}\r\nX-Pad: {'a' * header_limit}\r\n"
               "Connection: close\r\n\r\n").encode()
    status, data = exchange(connect(svc), request)
    assert status == 431
    assert creds["SecretAccessKey"].encode() not in data
    assert svc.client.status()["pid"] == svc.pid


@pytest.mark.parametrize("listener", sorted(LISTENERS))
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_bodies_get_413(active_service, listener, framing):
    svc = active_service
    connect, _, host, _, body_limit = LISTENERS[listener]
    _, creds = service_credentials(svc)
    host = host or f"{svc.host}:{svc.port}"
    method, path = ("PUT", TOKEN_PATH) if listener == "imds" else ("POST", "/activate")
    size = body_limit + 1024
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{TTL}: 60\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        request = (head + f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
        body = b"x" * size
    else:
        request = (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
        chunk = b"x" * 16384
        body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (size // len(chunk) + 1) + b"0\r\n\r\n"
    status, data = exchange(connect(svc), request, _quietly_send(body))
    assert status == 413
    assert creds["SecretAccessKey"].encode() not in data
    assert service_credentials(svc)[1]["AccessKeyId"] == creds["AccessKeyId"]


# --- slow clients ---

HALF_REQUEST = b"PUT /latest/api/token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-aws-ec2-metadata-token-ttl-"


def open_slow_clients(svc, count, send=HALF_REQUEST):
    """*count* connections that send *send* (half a request, or nothing) and then stall."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((svc.host, svc.port), timeout=5)
        if send:
            sock.sendall(send)
        sockets.append(sock)
    return sockets


def closed_by_server(sock):
    """True once the server has closed this connection (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def timed_sequence(svc, budget=1.0):
    """A whole IMDSv2 credentials fetch, which must finish within *budget* seconds (an SDK's timeout is 1 s)."""
    started = time.monotonic()
    role, creds = service_credentials(svc, timeout=budget)
    elapsed = time.monotonic() - started
    assert elapsed < budget * 3, elapsed
    return role, creds


def test_fifty_stalled_half_requests_do_not_stop_others(active_service):
    svc = active_service
    sockets = open_slow_clients(svc, 50)
    try:
        time.sleep(0.3)
        for _ in range(3):
            assert timed_sequence(svc)[0] == "role-a"
        assert svc.client.status()["pid"] == svc.pid
    finally:
        for sock in sockets:
            sock.close()


def test_regression_slow_clients_past_waitress_connection_limit_starved_every_listener(active_service):
    # waitress counts the connections of every listener sharing one event loop against one limit of 100: 100
    # half-sent requests from any local process stopped IMDS *and* the owner's control socket (both timed out).
    svc = active_service
    sockets = open_slow_clients(svc, 150) + open_slow_clients(svc, 150, send=b"")
    try:
        time.sleep(0.3)
        assert timed_sequence(svc)[0] == "role-a"
        assert svc.client.status()["pid"] == svc.pid
    finally:
        for sock in sockets:
            sock.close()


def test_regression_a_trickling_client_held_its_connection_forever(active_service):
    # waitress drops a connection only after channel_timeout of *silence*: one byte every few seconds kept a
    # half-sent request (and its slot) open for good. Now a request must be whole within REQUEST_DEADLINE.
    svc = active_service
    deadline = 10  # REQUEST_DEADLINE, as the README documents it
    sockets = open_slow_clients(svc, 20, send=b"P")
    idle = open_slow_clients(svc, 5, send=b"")
    try:
        started = time.monotonic()
        trickled = 0
        while time.monotonic() - started < deadline + 3:
            for sock in sockets:
                if not closed_by_server(sock):
                    try:
                        sock.send(HALF_REQUEST[1 + trickled:2 + trickled] or b"X")
                    except OSError:
                        pass
            trickled += 1
            assert timed_sequence(svc)[0] == "role-a"
            time.sleep(1)
        assert all(closed_by_server(sock) for sock in sockets), "trickling clients are cut off"
        assert all(closed_by_server(sock) for sock in idle), "connections that never send are cut off too"
    finally:
        for sock in sockets + idle:
            sock.close()


def test_regression_a_full_imds_listener_locked_the_owner_out_of_the_control_socket(active_service):
    # Past IMDS's own connection limit, IMDS may wait (a local denial of service, README "Residual risks"), but
    # the owner must still reach the control socket to see and stop the service, and IMDS must recover.
    svc = active_service
    limit = 500  # IMDS_CONNECTION_LIMIT, as the README documents it
    sockets = open_slow_clients(svc, limit + 20, send=b"")
    try:
        time.sleep(0.5)
        assert svc.client.status()["pid"] == svc.pid
        recovered = time.monotonic() + 10 + 5
        while True:
            try:
                assert timed_sequence(svc)[0] == "role-a"
                break
            except OSError:
                assert time.monotonic() < recovered, "IMDS did not recover once the idle connections were cut"
    finally:
        for sock in sockets:
            sock.close()


# --- other local users ---

OTHER_UID = 12345
OTHER_USER_CLIENT = (
    "import json, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from conftest import http\n"
    "from imdsv2 import CREDS, TOKEN, TOKEN_PATH, TTL\n"
    "host, port = sys.argv[2], int(sys.argv[3])\n"
    "status, _, body = http(host, port, 'PUT', TOKEN_PATH, {TTL: '60'})\n"
    "token = body.decode() if status == 200 else 'x' * 60\n"
    "answers = [[status, body.decode(errors='replace')]]\n"
    "for path in (CREDS, CREDS + 'role-a'):\n"
    "    status, _, body = http(host, port, 'GET', path, {TOKEN: token})\n"
    "    answers.append([status, body.decode(errors='replace')])\n"
    "print(json.dumps(answers))\n"
)


def as_uid(uid, argv):
    import subprocess

    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_regression_another_local_users_process_read_the_owners_credentials(active_service):
    # The peer filter admits any loopback client, and on loopback every local user is a client: any process of
    # any user could PUT a token and read the owner's credentials. Now the owner's processes (and root's) only.
    import json
    import sys

    svc = active_service
    _, creds = service_credentials(svc)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", OTHER_USER_CLIENT, here, svc.host, str(svc.port)]
    stranger = as_uid(OTHER_UID, argv)
    assert stranger.returncode == 0, stranger.stderr
    for status, body in json.loads(stranger.stdout):
        assert status == 403 and "another user" in body, (status, body)
        assert creds["SecretAccessKey"] not in body
    owner = as_uid(65534, argv)  # the service serves 'nobody' when the suite runs as root (conftest)
    assert owner.returncode == 0, owner.stderr
    answers = json.loads(owner.stdout)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert json.loads(answers[2][1])["AccessKeyId"] == creds["AccessKeyId"]
    svc.wait_for_log(f"another user's process (uid {OTHER_UID})")


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                         (socket.AF_INET6, "::ffff:127.0.0.1")])
def test_the_uid_behind_a_local_tcp_connection_is_found(family, host):
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    try:
        assert peers.tcp_peer_uid(accepted) == os.geteuid()
        # Both ways of looking it up: sock_diag, and /proc/net/tcp where netlink is not allowed.
        server_ip, server_port = accepted.getsockname()[:2]
        client_ip, client_port = accepted.getpeername()[:2]
        ends = (peers.unmapped(client_ip), client_port, peers.unmapped(server_ip), server_port)
        assert peers._diag_uid(*ends) == os.geteuid()
        assert peers._proc_uid(*ends) == os.geteuid()
        nowhere = (ends[0], ends[1], ends[2], 1)
        assert peers._diag_uid(*nowhere) is None and peers._proc_uid(*nowhere) is None
    finally:
        client.close()
        accepted.close()
        listener.close()


# A client run as another uid: one connection that sends a request and only shuts down its sending side (still
# open: it has an owner), and one that sends a request and closes (an orphan: no file, no owner); then it waits.
SEND_THEN_CLOSE_CLIENT = (
    "import socket, sys\n"
    "address = (sys.argv[1], int(sys.argv[2]))\n"
    "request = b'PUT /latest/api/token HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n'\n"
    "kept = socket.create_connection(address)\n"
    "kept.sendall(request)\n"
    "kept.shutdown(socket.SHUT_WR)\n"
    "closed = socket.create_connection(address)\n"
    "closed.sendall(request)\n"
    "closed.close()\n"
    "print('sent', flush=True)\n"
    "sys.stdin.readline()\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_regression_a_client_socket_closed_before_accept_looked_like_roots():
    # A socket its process has closed (FIN-WAIT-2) has no file: sock_diag and /proc/net/tcp show inode 0 and uid 0.
    # Another user's "PUT, then close" reached the service as root's and got a token. No inode: no known owner.
    import subprocess
    import sys

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    argv = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", sys.executable, "-c",
            SEND_THEN_CLOSE_CLIENT, *map(str, listener.getsockname())]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    accepted = []
    try:
        assert client.stdout.readline() == "sent\n"  # both sent; the second socket closed before any accept
        for _ in range(2):
            accepted.append(listener.accept()[0])
        kept, closed = accepted
        assert peers.tcp_peer_uid(kept) == OTHER_UID, "the uid of a live client is found"
        assert peers.tcp_peer_uid(closed) is None
        server_ip, server_port = closed.getsockname()[:2]
        client_ip, client_port = closed.getpeername()[:2]
        ends = (peers.unmapped(client_ip), client_port, peers.unmapped(server_ip), server_port)
        assert peers._diag_uid(*ends) is None, "sock_diag"
        assert peers._proc_uid(*ends) is None, "/proc/net/tcp"
    finally:
        client.communicate("\n", timeout=30)
        for sock in accepted:
            sock.close()
        listener.close()


PUT_THEN_CLOSE_CLIENT = (
    "import socket, sys\n"
    "host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "request = ('PUT /latest/api/token HTTP/1.1\\r\\nHost: %s:%d\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\n'\n"
    "           'Content-Length: 0\\r\\nConnection: close\\r\\n\\r\\n' % (host, port)).encode()\n"
    "for _ in range(count):\n"
    "    sock = socket.create_connection((host, port))\n"
    "    sock.sendall(request)\n"
    "    sock.close()\n"
)
# TCP states of a server-side connection still waiting for the service: ESTABLISHED, CLOSE_WAIT (/proc/net/tcp).
_PENDING_STATES = ("01", "08")


def pending_connections(port):
    """How many connections accepted on *port* the server has not closed yet (both /proc/net/tcp tables)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[1].endswith(f":{port:04X}") and fields[3] in _PENDING_STATES:
                        count += 1
        except OSError:
            continue
    return count


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_regression_another_user_got_tokens_by_closing_before_the_service_accepted(active_service):
    # 433 of 500 "PUT, then close at once" from another user got a token: a client socket closed before the
    # service looked it up has no owner (inode 0), and its uid showed as 0, root's. The service now refuses it.
    import sys

    svc = active_service
    service_credentials(svc)
    before = svc.client.status()["imds_tokens"]
    stranger = as_uid(OTHER_UID, [sys.executable, "-c", PUT_THEN_CLOSE_CLIENT, svc.host, str(svc.port), "200"])
    assert stranger.returncode == 0, stranger.stderr
    deadline = time.monotonic() + 30
    while pending_connections(svc.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending_connections(svc.port) == 0, "the service answered every connection"
    assert svc.client.status()["imds_tokens"] == before, "no token was issued to the closed connections"
    assert service_credentials(svc)[0] == "role-a"


def test_a_crash_while_looking_up_the_clients_uid_is_refused_not_taken_for_root(monkeypatch):
    # The IMDS channel looks the client's uid up as it accepts a connection; an exception there must leave the uid
    # unknown (refused, like another user's process), never 0: root is served, so that would serve anyone who can
    # make the lookup fail. The real channel class in waitress, over a real socket; only the lookup is replaced.
    from waitress import wasyncore
    from waitress.server import create_server

    looked_up = []

    def crashing_lookup(sock):
        looked_up.append(sock.getpeername())
        raise RuntimeError("the lookup failed")

    listener = process.bind_tcp("127.0.0.1", 0)
    port = listener.getsockname()[1]
    app = imds.create_app(lambda: None, "127.0.0.1", port, peer_uids={0, os.geteuid()})
    event_map = {}
    server = create_server(app, sockets=[listener], map=event_map, **process.IMDS_SERVER_OPTIONS)
    server.channel_class = process._imds_channel()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            wasyncore.loop(timeout=0.05, map=event_map, use_poll=True, count=1)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    try:
        monkeypatch.setattr(process, "tcp_peer_uid", crashing_lookup)
        status, _, body = http("127.0.0.1", port, "PUT", TOKEN_PATH, {TTL: "60"})
        assert len(looked_up) == 1, "the lookup ran, and crashed"
        assert status == 403 and b"another user" in body, (status, body)
        # The same client, the lookup working again: served (so the refusal above came from the crash alone).
        monkeypatch.setattr(process, "tcp_peer_uid", lambda sock: os.geteuid())
        assert http("127.0.0.1", port, "PUT", TOKEN_PATH, {TTL: "60"})[0] == 200
    finally:
        stop.set()
        loop.join(10)
        server.task_dispatcher.shutdown()
        wasyncore.close_all(event_map)
