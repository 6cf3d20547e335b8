"""The control-plane client: JSON over the service's Unix socket, with the standard library only (no proxies).

Before it sends anything, the client checks that the socket and its directory are the expected user's own
(imsa/rundir.py) and, once connected, that the process listening there runs as that user (SO_PEERCRED): a
session is never handed to, and no answer is believed from, a socket someone else put in its path.
"""

import json
import socket

from imsa import rundir
from imsa.errors import ServiceError, ServiceNotRunning, StsError
from imsa.server.peers import peer_credentials

TIMEOUT = 30
# The largest answer accepted from the service; status and credentials are a few kB.
MAX_ANSWER = 1 << 22


class BadAnswer(Exception):
    """The service's answer is not the HTTP/1.1 response waitress writes."""


def exchange(path, method, route, payload=b"", content_type=None, timeout=TIMEOUT, expected_uid=None):
    """One HTTP/1.1 request on a new connection to the Unix socket at *path*; returns (status, body).

    With *expected_uid*, nothing is sent unless the server process runs as that uid (UnsafeRunDir otherwise).

    http.client would do, but importing it (email, ssl) cost about 15 ms of every ``imsa status`` and
    ``imsa export`` (scripts/bench.py); one request per connection, closed by the server, needs only this.
    """
    head = [f"{method} {route} HTTP/1.1", "Host: localhost", "Connection: close", f"Content-Length: {len(payload)}"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if expected_uid is not None:
            _check_server(sock, path, expected_uid)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload)
        chunks, size = [], 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER:
                raise BadAnswer(f"answer larger than {MAX_ANSWER} bytes")
            chunks.append(chunk)
    finally:
        sock.close()
    return parse_answer(b"".join(chunks))


def _check_server(sock, path, expected_uid):
    """The process that listens on *sock* must run as *expected_uid* (the kernel's word, not the file's owner)."""
    _, uid, _ = peer_credentials(sock)
    if uid != expected_uid:
        raise rundir.UnsafeRunDir(
            f"refusing the service at {path}: it runs as uid {uid}, not uid {expected_uid} (someone else's socket)"
        )


def parse_answer(raw):
    """(status, body) of a whole HTTP/1.1 response read until the server closed the connection."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise BadAnswer("not an HTTP response")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":  # waitress never chunks an answer to "Connection: close"
            raise BadAnswer("unexpected Transfer-Encoding")
        if name == b"content-length":
            if not value.strip().isdigit():
                raise BadAnswer("bad Content-Length")
            length = int(value)
    if length is not None:
        if len(body) < length:
            raise BadAnswer("answer cut short")
        body = body[:length]
    return int(status_line[1]), body


def _address(ip):
    """*ip* as it goes in a query: IPv6 in brackets, so that the port after the last colon is unambiguous."""
    return f"[{ip}]" if ":" in str(ip) else str(ip)


class Client:
    """Talks to the service of the current user."""

    def __init__(self, path=None, timeout=TIMEOUT, expected_uid=None):
        self.expected_uid = rundir.expected_service_uid() if expected_uid is None else expected_uid
        self.path = path or rundir.client_path(self.expected_uid)
        self.timeout = timeout

    def _request(self, method, route, body=None):
        payload, content_type = b"", None
        if body is not None:
            payload, content_type = json.dumps(body).encode(), "application/json"
        try:
            rundir.check_socket(self.path, self.expected_uid)
            status, raw = exchange(self.path, method, route, payload, content_type, self.timeout, self.expected_uid)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ServiceNotRunning(f"the imsa service is not running (no service at {self.path}); start it with: imsa start") from None
        except PermissionError:
            raise ServiceNotRunning(f"cannot open {self.path}: permission denied (is the service someone else's?)") from None
        except socket.timeout:
            raise ServiceNotRunning(f"the imsa service at {self.path} did not answer within {self.timeout} s") from None
        except (OSError, BadAnswer) as error:
            raise ServiceNotRunning(f"cannot talk to the imsa service at {self.path}: {error}") from None
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise ServiceError(f"the imsa service answered {status} with a body that is not JSON") from None
        return status, data

    def _call(self, method, route, body=None, missing_ok=False):
        status, data = self._request(method, route, body)
        if status == 200:
            return data
        if missing_ok and status == 404:
            return None
        message = data.get("error", f"HTTP {status}") if isinstance(data, dict) else f"HTTP {status}"
        if status == 502 and data.get("kind") == "sts":
            raise StsError(message)
        raise ServiceError(f"the imsa service refused: {message}")

    def status(self):
        """The service's status JSON."""
        return self._call("GET", "/status")

    def session(self, fingerprint):
        """The session the service holds for *fingerprint* ({fingerprint, expiration}) or None."""
        return self._call("GET", f"/sessions/{fingerprint}", missing_ok=True)

    def put_session(self, fingerprint, credentials, settings, kind="credentials", label=None, warn_before=None):
        """Hand a new session (temporary material only: for *kind* ``credentials``, temporary credentials) to the
        service, with the StsSettings it was made with (the service's calls from it reach STS the same way), the
        *label* that names its source in status, and how long before its end to warn (*warn_before*)."""
        body = {"fingerprint": fingerprint, "kind": kind, "material": credentials.to_json(),
                "sts": settings.to_json()}
        if label:
            body["label"] = label
        if warn_before is not None:
            body["warn_before"] = int(warn_before.total_seconds())
        return self._call("POST", "/sessions", body)

    def forget_sessions(self, fingerprint=None):
        """Make the service forget the session of *fingerprint*, or every session (None): {forgotten: count}."""
        return self._call("POST", "/sessions/forget", {"fingerprint": fingerprint} if fingerprint else {"all": True})

    def session_roles(self, fingerprint):
        """The roles the session of *fingerprint* may ask for ({supported, roles}), or None when none is held."""
        return self._call("POST", "/sessions/roles", {"fingerprint": fingerprint}, missing_ok=True)

    def activate(self, spec):
        """Make the profile of *spec* the one IMDS serves."""
        return self._call("POST", "/activate", spec)

    def credentials(self, spec, way=None, served=None):
        """Credentials for *spec* without changing what IMDS serves. *way* names the command they are for in the
        service's delivery log (export, console, ...); *served*, for ``imsa exec``'s endpoint, is the (client,
        server) pair of (ip, port) of the command's connection, so that the service can tell which process it is."""
        query = []
        if way:
            query.append(f"way={way}")
        if served:
            query += [f"{name}={_address(ip)}:{port}" for name, (ip, port) in zip(("client", "server"), served)]
        return self._call("POST", "/credentials" + ("?" + "&".join(query) if query else ""), spec)

    def deliveries(self, after=0, profile=None):
        """The service's delivery records after number *after* (of *profile* only): {deliveries, last}."""
        from urllib.parse import quote

        route = f"/deliveries?after={int(after)}" + (f"&profile={quote(profile, safe='')}" if profile else "")
        return self._call("GET", route)

    def create_binding(self, spec):
        """Register this process as an ``imsa exec`` running *spec* (the service keeps it rotated): {id, expiration}."""
        return self._call("POST", "/bindings", spec)

    def revoke_binding(self, binding_id):
        """End a binding; None when the service no longer has it."""
        return self._call("POST", "/bindings/revoke", {"id": binding_id}, missing_ok=True)

    def bind_service(self, binding):
        """Make or replace a system service's binding ({name, mode, token_sha256, spec, env_file})."""
        return self._call("POST", "/service-bindings", binding)

    def unbind_service(self, name):
        """Remove binding *name*: {removed, env_file}, or None when the service has none of that name."""
        return self._call("POST", "/service-bindings/remove", {"name": name}, missing_ok=True)

    def stop(self):
        """Ask the service to stop."""
        return self._call("POST", "/stop", {})
