"""Loopback stand-ins for the network between imsa and STS: an HTTPS front to the fake STS (which can leave chosen
actions unanswered), a forward proxy that records what went through it, an STS that never answers, and a decoy
that records any connection at all.

Everything listens on 127.0.0.1 and connects only to 127.0.0.1: the proxy refuses any other target.
"""

import datetime
import http.client
import ipaddress
import os
import select
import socket
import socketserver
import ssl
import threading
import urllib.parse

# How long a hung request is held (the tests' STS budget is far shorter) and a relayed tunnel may idle.
HOLD = 60
RELAY_IDLE = 30


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, written to *directory*: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imsa test STS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "sts-cert.pem"), os.path.join(directory, "sts-key.pem")
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(cert_path, 0o644)
    return cert_path, key_path


def _loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_head(sock):
    """The request head (up to the blank line) and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def _read_body(sock, head, rest):
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest


def _action(body):
    return urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", ["?"])[0]


class _Listener:
    """A threaded TCP server on 127.0.0.1 whose connections go to self.handle(sock); close() stops it."""

    def __init__(self, tls=None):
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                if tls is not None:
                    try:
                        sock = tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError) as error:
                        owner.record(("tls-failed", str(error)))
                        return
                sock.settimeout(HOLD)
                try:
                    owner.handle(sock)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.closed = threading.Event()
        self.records = []
        self._lock = threading.Lock()
        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def record(self, entry):
        """Remember *entry* (what came through), in order."""
        with self._lock:
            self.records.append(entry)

    def seen(self):
        """Everything recorded so far."""
        with self._lock:
            return list(self.records)

    def handle(self, sock):
        raise NotImplementedError

    def close(self):
        """Stop accepting, and let go of held requests."""
        self.closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class StsFront(_Listener):
    """The fake STS behind http:// or https://127.0.0.1:PORT; requests whose Action is in *hang* are read and
    never answered (an STS that accepts and hangs). Records (Action, what was done)."""

    def __init__(self, upstream, cert=None, hang=()):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.hang = set(hang)
        tls = None
        if cert is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(*cert)
        self.scheme = "https" if tls else "http"
        super().__init__(tls)

    @property
    def endpoint(self):
        """The URL to give imsa as AWS_ENDPOINT_URL_STS."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def actions(self):
        """The Action of every request that arrived."""
        return [entry[0] for entry in self.seen() if entry[0] != "tls-failed"]

    def handle(self, sock):
        head, rest = _read_head(sock)
        if head is None:
            return
        body = _read_body(sock, head, rest)
        action = _action(body)
        if action in self.hang:
            self.record((action, "hung"))
            self.closed.wait(HOLD)
            return
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() not in ("connection", "content-length"):
                headers[name.strip()] = value.strip()
        upstream = http.client.HTTPConnection(*self.upstream, timeout=HOLD)
        try:
            upstream.request(method, target, body=body, headers=headers)
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        self.record((action, f"forwarded {answer.status}"))
        sock.sendall(
            f"HTTP/1.1 {answer.status} {answer.reason}\r\nContent-Type: {answer.getheader('Content-Type', 'text/xml')}"
            f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )


class ForwardProxy(_Listener):
    """An HTTP proxy on 127.0.0.1: tunnels CONNECT, forwards absolute-URI requests, to loopback targets only.
    Records ("CONNECT", "host:port") and ("POST", "http://host:port/", Action)."""

    @property
    def url(self):
        """The value for HTTPS_PROXY / HTTP_PROXY."""
        return f"http://127.0.0.1:{self.port}"

    def handle(self, sock):
        head, rest = _read_head(sock)
        if head is None:
            return
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            self.record(("CONNECT", target))
            if not _loopback(host.strip("[]")):
                sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            with socket.create_connection((host.strip("[]"), int(port)), timeout=HOLD) as upstream:
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                self._relay(sock, upstream)
            return
        body = _read_body(sock, head, rest)
        parsed = urllib.parse.urlsplit(target)
        self.record((method, target, _action(body)))
        if parsed.scheme != "http" or not _loopback(parsed.hostname or ""):
            sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() not in ("connection", "content-length", "proxy-connection"):
                headers[name.strip()] = value.strip()
        upstream = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=HOLD)
        try:
            upstream.request(method, parsed.path or "/", body=body, headers=headers)
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        sock.sendall(
            f"HTTP/1.1 {answer.status} {answer.reason}\r\nContent-Type: {answer.getheader('Content-Type', 'text/xml')}"
            f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )

    def _relay(self, one, other):
        while not self.closed.is_set():
            ready, _, _ = select.select([one, other], [], [], RELAY_IDLE)
            if not ready:
                return
            for source in ready:
                data = source.recv(65536)
                if not data:
                    return
                (other if source is one else one).sendall(data)

    def connects(self):
        """The targets of every CONNECT so far."""
        return [entry[1] for entry in self.seen() if entry[0] == "CONNECT"]


class Hung(_Listener):
    """Accepts connections and never answers them (they are held until close()); records one entry each."""

    @property
    def endpoint(self):
        """An http:// URL that leads here."""
        return f"http://127.0.0.1:{self.port}"

    def handle(self, sock):
        self.record("accepted")
        self.closed.wait(HOLD)


class Decoy(_Listener):
    """Where the service's own environment points (AWS_ENDPOINT_URL_STS, proxies): any connection is recorded and
    closed at once, so code that still obeys that environment fails fast and the test sees it."""

    @property
    def url(self):
        """An http:// URL that leads here."""
        return f"http://127.0.0.1:{self.port}"

    def handle(self, sock):
        self.record("connected")
