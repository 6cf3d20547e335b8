"""The container-credentials endpoint of ``imsa exec``, served by the ``imsa exec`` process itself to its command.

``imsa exec`` (ecs mode) listens on 127.0.0.1, on a port the kernel picks, and hands its command
``AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/credentials`` and ``AWS_CONTAINER_AUTHORIZATION_TOKEN``
(PROTOCOL.md §2). The token is 32 random bytes that exist only in this process and in the command's environment.
Each request is answered with what the service holds for the profile, asked for over the control socket (the
service keeps the profile rotated while ``imsa exec`` runs: execs.py). Expired credentials are never served: when
the service is gone or has none valid, the answer is a 503 that names the command to run.

Why here and not in the service: a URL in the environment of a command that may run for hours must never come to
belong to someone else. The listening socket is passed to the command (``pass_fds``), so its port stays bound for
as long as the command — or anything it starts that keeps the descriptor — lives: after ``imsa stop`` or a restart
of the service it is still this endpoint, answering 503; after a SIGKILL of ``imsa exec`` nobody answers on it any
more, but nobody else can bind it either. Only this process ever accepts on it.

Guards, in order: the peer address is local; the user owning the client's socket is this process's (the lookup
IMDS uses; an unknown user is refused); ``Host`` is ``127.0.0.1:PORT`` (DNS rebinding); no ``Origin``/``Referer``
(browsers); no query string; ``GET /credentials`` only; the token in ``Authorization``, compared in constant time.
Errors are JSON ``{"Code", "Message"}``.

Standard library only, and small: it runs in the CLI, which never imports Flask.
"""

import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import threading
import time
from http import HTTPStatus

from imsa.credentials import format_time, mask, utcnow
from imsa.errors import ImsaError
from imsa.server.logs import shown
from imsa.server.peers import is_local_peer, peer_uids_visible, tcp_peer_uid

log = logging.getLogger(__name__)

EXEC_HOST = "127.0.0.1"
CREDENTIALS_PATH = "/credentials"
TOKEN_BYTES = 32
# A request's head (request line and headers) must be whole within REQUEST_DEADLINE seconds of the connection and
# fit in MAX_HEAD bytes: SDKs send a few hundred bytes at once, and a slow client must not hold a thread.
REQUEST_DEADLINE = 10
MAX_HEAD = 16384
MAX_HEADERS = 100
# Connections answered at once (a thread each); more are closed unanswered. Any local process can connect.
MAX_CONNECTIONS = 32
BACKLOG = 64
# After answering, what the client still sends is read and dropped (at most DRAIN_BYTES, for DRAIN_SECONDS):
# closing with unread data resets the connection, and a reset can destroy the answer before the client reads it.
DRAIN_BYTES = 65536
DRAIN_SECONDS = 2


class Unavailable(Exception):
    """No valid credentials can be had now; the message says what to run."""


class _Refusal(Exception):
    """A request answered with an error: HTTP status, JSON Code and Message."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def endpoint_url(port):
    """The AWS_CONTAINER_CREDENTIALS_FULL_URI for *port*: 127.0.0.1 is the one host every SDK accepts there."""
    return f"http://{EXEC_HOST}:{port}{CREDENTIALS_PATH}"


def _read_head(sock, deadline):
    """The request line and headers, read until the blank line; (bytes, None), or (bytes so far, HTTP status)."""
    data = b""
    while b"\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_HEAD:
            return data, 431
        left = deadline - time.monotonic()
        if left <= 0:
            return data, 408
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except OSError:  # the deadline passed (socket.timeout), or the client reset the connection
            return data, 408
        if not chunk:
            return data, 400 if data else None
        data += chunk
    end = min(index for index in (data.find(b"\n\r\n"), data.find(b"\n\n")) if index >= 0)
    if end > MAX_HEAD:
        return data, 431
    return data[:end], None


def _parse_head(head):
    """(method, target, {lower-case name: [values]}) of a request head; _Refusal 400 when it is not HTTP/1.x."""
    lines = [line[:-1] if line.endswith("\r") else line for line in head.decode("latin-1").split("\n")]
    words = lines[0].split(" ")
    if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1") or not words[0] or not words[1]:
        raise _Refusal(400, "InvalidRequest", "not an HTTP/1.x request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refusal(431, "InvalidRequest", f"more than {MAX_HEADERS} headers")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # No folded lines, no space before the colon: a header either means one thing or is refused.
        if not colon or not name or name != name.strip() or any(char in name for char in " \t"):
            raise _Refusal(400, "InvalidRequest", "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return words[0], words[1], headers


class Endpoint:
    """One ``imsa exec``'s endpoint: its listening socket, its token and the thread that serves it.

    *fetch()* returns the profile's Credentials, or raises Unavailable with a message naming what to run.
    """

    def __init__(self, fetch, profile, role_arn=None, uid=None, clock=utcnow):
        if not peer_uids_visible():
            raise ImsaError(
                "cannot tell which user connects to a local port here (no sock_diag, no /proc/net/tcp), so the "
                "exec endpoint would serve any user; run with --mode static"
            )
        self._fetch = fetch
        self._profile = profile
        self._role_arn = role_arn
        self._uid = os.geteuid() if uid is None else uid
        self._clock = clock
        self.token = secrets.token_urlsafe(TOKEN_BYTES)
        self._token = self.token.encode("ascii")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # No SO_REUSEADDR/SO_REUSEPORT: while this socket listens, no other socket can take its port.
            self._sock.bind((EXEC_HOST, 0))
            self._sock.listen(BACKLOG)
        except OSError:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self.url = endpoint_url(self.port)
        self._host = f"{EXEC_HOST}:{self.port}"
        self._server = _Server(self._sock, self)
        self._thread = None

    def fileno(self):
        """The listening socket's descriptor: pass it to the command so the port lives as long as the command."""
        return self._sock.fileno()

    def start(self):
        """Serve in a daemon thread until close()."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="imsa-exec-endpoint", daemon=True)
        self._thread.start()

    def close(self):
        """Stop serving and close this process's descriptor (the command's copy keeps the port bound)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *_exc):
        self.close()

    # --- one connection ---

    def serve_connection(self, sock, peer):
        """Read one request from *sock* (a client at *peer*), answer it, and leave the socket to be closed."""
        deadline = time.monotonic() + REQUEST_DEADLINE
        # Who owns the client's socket, looked up first, while the client is surely still connected.
        uid = self._peer_uid(sock, peer)
        head, problem = _read_head(sock, deadline)
        if not head and problem is None:
            return  # connected and closed without a request
        try:
            if problem is not None:
                raise _Refusal(problem, "InvalidRequest", HTTPStatus(problem).phrase)
            status, body = self._answer(peer, uid, *_parse_head(head), ends=_ends(sock))
        except _Refusal as refusal:
            method, path = _request_line(head)
            # Never the token: the query string is left out, and a token a client put in the path is blanked.
            path = path.replace(self.token, "<token>")
            log.info("exec endpoint refused %s %s from %s: %s", shown(method), shown(path), peer, refusal.message)
            status, body = refusal.status, {"Code": refusal.code, "Message": refusal.message}
        _send(sock, status, body)

    def _peer_uid(self, sock, peer):
        try:
            return tcp_peer_uid(sock)
        except Exception as error:  # refused below as an unknown user; the endpoint itself keeps serving
            log.info("exec endpoint: cannot tell which user connected from %s: %s", peer, error)
            return None

    def _answer(self, peer, uid, method, target, headers, ends=None):
        """(status, JSON body) for one parsed request; _Refusal for every rule it breaks. *ends* ((client, server)
        (ip, port) pairs of the connection) go to *fetch*, which passes them on for the service's delivery log."""
        if not is_local_peer(peer):
            # The socket is on 127.0.0.1; this stops a packet that reaches it from another address of this machine.
            raise _Refusal(403, "AccessDenied", "peer address not allowed")
        if uid is None:
            raise _Refusal(403, "AccessDenied", "the user of the connecting process is unknown")
        if uid != self._uid:
            # Any local user can connect to 127.0.0.1; the token alone must not be enough (it may leak, e.g. in a
            # core dump or a log), so only this user's processes are served, as IMDS serves only its owner's.
            raise _Refusal(403, "AccessDenied", f"another user's process (uid {uid})")
        if headers.get("host") != [self._host]:
            raise _Refusal(403, "AccessDenied", "Host header not allowed")  # DNS rebinding sends its own name
        if "origin" in headers or "referer" in headers:
            raise _Refusal(403, "AccessDenied", "browser requests not allowed")  # SDKs never send these
        if "?" in target:
            # The token belongs in the Authorization header only: a query string ends up in logs and shell history.
            raise _Refusal(400, "InvalidRequest", "no query string allowed; the token goes in the Authorization header")
        if target != CREDENTIALS_PATH:
            raise _Refusal(404, "NotFound", f"the only path is {CREDENTIALS_PATH}")
        if method != "GET":
            raise _Refusal(405, "MethodNotAllowed", "GET only")
        given = headers.get("authorization", [])
        if len(given) != 1 or not hmac.compare_digest(given[0].encode("latin-1"), self._token):
            raise _Refusal(401, "Unauthorized", "missing or wrong token")
        try:
            creds = self._fetch(ends) if ends is not None else self._fetch()
        except Unavailable as error:
            raise _Refusal(503, "CredentialsUnavailable", str(error)) from None
        if creds.expired(self._clock()):
            raise _Refusal(
                503, "CredentialsUnavailable",
                f"imsa has no valid credentials for profile {self._profile!r}; run: imsa assume {self._profile}",
            )
        body = {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.session_token,
            "Expiration": format_time(creds.expiration),
        }
        if self._role_arn:
            body["RoleArn"] = self._role_arn
            body["AccountId"] = self._role_arn.split(":")[4]
        log.debug("exec endpoint: served %s", mask(creds.access_key_id))
        return 200, body


def _ends(sock):
    """((client ip, port), (server ip, port)) of an accepted connection, or None when it is gone already."""
    try:
        return tuple(sock.getpeername()[:2]), tuple(sock.getsockname()[:2])
    except OSError:
        return None


def _request_line(head):
    """(method, path without its query string) of a head, for the log; empty strings where there are none."""
    words = head.split(b"\n", 1)[0].decode("latin-1").split(" ")
    method = words[0]
    path = words[1].split("?", 1)[0] if len(words) > 1 else ""
    return method, path


def _send(sock, status, body):
    """Write the answer, end our side, and drain the client's until it closes (bounded)."""
    data = (json.dumps(body, indent=2) + "\n").encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode("ascii")
    try:
        sock.settimeout(REQUEST_DEADLINE)
        sock.sendall(head + data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(DRAIN_SECONDS)
        left = DRAIN_BYTES
        while left > 0:
            chunk = sock.recv(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:  # the client went away, or lingers: nothing more to tell it
        pass


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            self.server.endpoint.serve_connection(self.request, self.client_address[0])
        except Exception as error:  # one bad connection must not end the endpoint; never a traceback in the CLI
            log.error("exec endpoint: a request failed: %s", error)
            log.debug("exec endpoint: a request failed", exc_info=True)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """socketserver on a socket made elsewhere, with at most MAX_CONNECTIONS connections answered at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock, endpoint):
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()  # the one TCPServer made; ours is already bound and listening
        self.socket = sock
        self.endpoint = endpoint
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.info("exec endpoint: %d connections already open; closing one from %s", MAX_CONNECTIONS,
                     client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
