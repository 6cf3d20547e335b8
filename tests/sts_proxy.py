"""A test-owned HTTP proxy on 127.0.0.1 between imsa and the fake STS, to make STS fail on demand.

Point AWS_ENDPOINT_URL_STS at ``proxy.endpoint``. Modes: ``forward()`` (to the fake STS, Host header kept so SigV4
still verifies), ``refuse()`` (the listener is closed: connection refused; ``forward()`` listens again on the same
port), ``fail(code)`` (answer an STS error document: Throttling 400, AccessDenied 403, ...). Every request is
recorded with its time, STS Action and what the proxy did with it.
"""

import http.client
import http.server
import threading
import time
import urllib.parse

ERRORS = {
    "Throttling": (400, "Sender", "Rate exceeded"),
    "AccessDenied": (403, "Sender", "User: arn:aws:sts::123456789012:assumed-role/x is not authorized to perform: "
                                    "sts:AssumeRole on resource: arn:aws:iam::123456789012:role/role-a"),
    "ServiceUnavailable": (503, "Receiver", "Service is unavailable"),
}


def error_document(code):
    """(status, XML body) of an STS error answer, as STS sends it."""
    status, kind, message = ERRORS[code]
    body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>{kind}</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>imsa-test</RequestId></ErrorResponse>")
    return status, body.encode()


class StsProxy:
    """See the module docstring."""

    def __init__(self, upstream):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.port = 0
        self.mode = "forward"
        self.requests = []  # (monotonic time, Action, what was done)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._listen()

    @property
    def endpoint(self):
        """The URL to put in AWS_ENDPOINT_URL_STS."""
        return f"http://127.0.0.1:{self.port}"

    def forward(self):
        """Pass requests to the fake STS (listening again if refused)."""
        self.mode = "forward"
        if self._server is None:
            self._listen()

    def fail(self, code):
        """Answer every request with the STS error *code* (a key of ERRORS)."""
        self.mode = code
        if self._server is None:
            self._listen()

    def refuse(self):
        """Close the listener: connections are refused until forward() or fail()."""
        self.mode = "refused"
        self._close()

    def close(self):
        """Stop for good."""
        self._close()

    def actions(self, since=0.0):
        """[(time, Action, outcome)] of requests after monotonic time *since*."""
        with self._lock:
            return [entry for entry in self.requests if entry[0] >= since]

    def _record(self, action, outcome):
        with self._lock:
            self.requests.append((time.monotonic(), action, outcome))

    def _listen(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: refuse() really cuts everyone off

            def log_message(self, *_args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", ["?"])[0]
                mode = proxy.mode
                if mode in ERRORS:
                    status, payload = error_document(mode)
                    proxy._record(action, mode)
                    self._answer(status, payload, "text/xml")
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {name: value for name, value in self.headers.items() if name.lower() != "connection"}
                    upstream.request("POST", self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    proxy._record(action, f"forwarded {answer.status}")
                    self._answer(answer.status, payload, answer.getheader("Content-Type", "text/xml"))
                finally:
                    upstream.close()

            def _answer(self, status, payload, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def _close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
