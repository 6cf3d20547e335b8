"""What every OAuth 2.0 login of imsa's sources shares: the PKCE pair (RFC 7636), the loopback listener of the
browser's redirect (RFC 8252), whether a browser can open here, and where the person is told things.

The redirect goes to ``http://127.0.0.1:PORT/…``, the authorization code is bound to the login by PKCE (S256), and
the redirect is taken only with the ``state`` this login sent. The sources' own modules (imsa/sources/sso_login.py,
oidc_login.py, cred_server_login.py) speak their services' token endpoints; none of this module sends anything
anywhere.
"""

import base64
import hashlib
import os
import secrets
import sys
import time
import urllib.parse

# How long the browser login may take before imsa gives up waiting for the redirect.
BROWSER_TIMEOUT = 600
CALLBACK_PATH = "/oauth/callback"
# How often the listener looks up from a wait for its one request (its deadline is checked between looks).
LISTEN_TICK = 0.2


def say_on_stderr(text):
    """Tell the person something: stderr, never stdout (``eval $(imsa export p)`` must stay clean)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def has_browser(environ=None):
    """True when a browser can be opened here: BROWSER names one, or there is a display."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY"))


def pkce_pair():
    """(code verifier, its S256 challenge) of RFC 7636."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return verifier, challenge


def open_in_browser(url, open_url=None):
    """Open *url* in the person's browser without waiting: a browser command may wait until its window closes,
    and the listener must serve meanwhile."""
    import threading
    import webbrowser

    threading.Thread(target=open_url or webbrowser.open, args=(url,), daemon=True).start()


class CallbackListener:
    """The loopback listener of the browser's redirect: ``GET /oauth/callback?code=…&state=…`` (or ``error=…``)
    with the state this login sent; anything else is answered 400 and ignored. It listens on 127.0.0.1 only, on
    *port* (0: one the system picks), for the redirect to *path*."""

    def __init__(self, state, port=0, path=CALLBACK_PATH):
        import http.server

        listener = self
        self.state, self.code, self.error = state, None, None

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                if parts.path != path or not secrets.compare_digest(query.get("state", ""), listener.state):
                    self._answer(400, "This is not the sign-in imsa is waiting for.")
                    return
                if query.get("error"):
                    listener.error = query["error"][:200]
                    self._answer(200, "The sign-in was refused; see the terminal.")
                elif query.get("code"):
                    listener.code = query["code"]
                    self._answer(200, "Signed in: you may close this window and return to the terminal.")
                else:
                    self._answer(400, "The redirect carries no code.")

            def _answer(self, status, text):
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # the query holds the code: never in a log
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        self.server.timeout = LISTEN_TICK
        self.port = self.server.server_address[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}{path}"

    def wait(self, timeout):
        """(code, error) once the redirect came, or (None, None) after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while self.code is None and self.error is None and time.monotonic() < deadline:
            self.server.handle_request()
        return self.code, self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.server_close()
