"""A service with nothing to do sleeps: its event loop is not woken while no connection is open, nor every second
while a keep-alive connection sits idle (waitress's poll timeout woke it once a second, all day), and it still
serves the next request. (A slow client's connection is still closed at its deadline: tests/test_attacks.py.)"""

import socket
import time

from conftest import http

# The window watched; the old loop woke about once a second in it.
IDLE_WINDOW = 3.0
SETTLE = 1.5  # the connections of the request before are gone, and the loop has looked at the map since
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


def switches(pid):
    """How often the service's main thread (its event loop) has been scheduled to run so far."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", encoding="ascii") as handle:
        return int(handle.read().split()[2])


def read_response(sock):
    """One whole response (head and its Content-Length of body) from *sock*, which stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed before the response head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "closed inside the response body"
        body += chunk
    return data


def woken_while_idle(pid):
    """How often the event loop ran during IDLE_WINDOW, after SETTLE."""
    time.sleep(SETTLE)
    before = switches(pid)
    time.sleep(IDLE_WINDOW)
    return switches(pid) - before


def test_an_idle_service_is_not_woken_and_still_answers(active_service):
    service = active_service
    assert http(service.host, service.port, "GET", "/latest/meta-data/instance-id")[0] in (200, 401)
    woken = woken_while_idle(service.pid)
    assert woken <= 1, f"the event loop woke {woken} times in {IDLE_WINDOW} s with nothing to do"
    status, _, _ = http(service.host, service.port, "PUT", "/latest/api/token", headers={TTL_HEADER: "60"})
    assert status == 200


def test_an_idle_keep_alive_connection_does_not_wake_the_service_every_second(active_service):
    service = active_service
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(f"PUT /latest/api/token HTTP/1.1\r\nHost: {service.host}:{service.port}\r\n{TTL_HEADER}: 60\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        assert read_response(sock).startswith(b"HTTP/1.1 200 "), "answered, and the connection is kept"
        woken = woken_while_idle(service.pid)
        assert woken <= 1, f"the event loop woke {woken} times in {IDLE_WINDOW} s beside an idle connection"
        sock.sendall(f"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {service.host}:{service.port}\r\n"
                     "\r\n".encode())
        assert read_response(sock).startswith(b"HTTP/1.1 401 "), "the kept connection still answers (no token sent)"
