"""The container-credentials endpoint of ``imsa exec``: a Flask app on 127.0.0.1 and its table of bindings.

Each ``imsa exec`` gets a binding: a random token bound to one profile and to the pid of the ``imsa exec`` process
that asked for it (SO_PEERCRED on the control socket, so it cannot be claimed for another process). The child gets
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (PROTOCOL.md §2). The service keeps
only a sha256 of each token. A binding ends when ``imsa exec`` revokes it, or when its process is gone (a reaper
thread looks while bindings exist, and every request looks too), so a SIGKILLed ``imsa exec`` leaves nothing usable.

Like imds.py, this module never imports boto3 and never calls STS on a request: the bound profiles are pinned in the
store, whose refresher rotates them; a request reads what the store holds.
"""

import hashlib
import hmac
import json
import logging
import os
import secrets
import select
import threading

from flask import Flask, Response, request

from imsa.credentials import format_time, mask, utcnow
from imsa.peers import is_local_peer

log = logging.getLogger(__name__)

EXEC_HOST = "127.0.0.1"
CREDENTIALS_PATH = "/credentials"
# The table is bounded; dead owners are reaped before a new binding is refused, so only live ones count.
MAX_BINDINGS = 1024
# While bindings exist, the reaper looks for owners that died without revoking this often; with none it sleeps.
REAP_EVERY = 2.0
TOKEN_BYTES = 32


class BindingError(Exception):
    """A binding cannot be made (no owner pid, table full)."""


class _Binding:
    """One exec's token digest, profile and owner; the owner is watched through a pidfd where Linux offers one."""

    __slots__ = ("id", "digest", "spec", "pid", "pidfd", "created")

    def __init__(self, binding_id, digest, spec, pid, pidfd, created):
        self.id = binding_id
        self.digest = digest
        self.spec = spec
        self.pid = pid
        self.pidfd = pidfd
        self.created = created

    def owner_alive(self):
        """True while the ``imsa exec`` process that made the binding exists."""
        if self.pidfd is not None:
            # A pidfd names one process for good: it becomes readable when that process exits, and a recycled pid
            # cannot make a dead owner look alive.
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, but runs as another uid (root ran imsa exec against this service)
            return True
        return True


def _digest(token):
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _open_pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or the pid is already gone
        return None


class BindingTable:
    """Tokens of live ``imsa exec`` processes, each bound to a RoleSpec that is pinned in the store meanwhile."""

    def __init__(self, store, limit=MAX_BINDINGS, reap_every=REAP_EVERY, clock=utcnow):
        self._store = store
        self._limit = limit
        self._reap_every = reap_every
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._bindings = {}
        self._stopping = False
        self._thread = None

    def create(self, spec, pid):
        """Bind a new token to *spec* for the process *pid*; returns (binding id, token). The caller made the creds."""
        if not isinstance(pid, int) or pid <= 0:
            raise BindingError("the caller's pid is unknown (SO_PEERCRED); cannot watch it, so no binding")
        self.reap()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        binding_id = secrets.token_hex(8)
        binding = _Binding(binding_id, _digest(token), spec, pid, _open_pidfd(pid), self._clock())
        # Pin before the binding can be found (and so revoked): an unpin must never come before its pin.
        self._store.pin(spec)
        with self._lock:
            full = len(self._bindings) >= self._limit
            if not full:
                self._bindings[binding_id] = binding
                self._changed.notify_all()
        if full:
            if binding.pidfd is not None:
                os.close(binding.pidfd)
            self._store.unpin(spec)
            raise BindingError(f"too many exec bindings ({self._limit}); end some imsa exec commands")
        log.info("exec binding %s for %s (pid %d)", binding_id, spec.profile, pid)
        return binding_id, token

    def revoke(self, binding_id, reason="revoked"):
        """End a binding; False when there is no such binding (already gone)."""
        with self._lock:
            binding = self._bindings.pop(binding_id, None)
            # Closed under the lock: owner checks poll pidfds under it too, so none polls a recycled fd number.
            if binding is not None and binding.pidfd is not None:
                os.close(binding.pidfd)
                binding.pidfd = None
        if binding is None:
            return False
        self._store.unpin(binding.spec)
        log.info("exec binding %s for %s ended: %s", binding_id, binding.spec.profile, reason)
        return True

    def lookup(self, token):
        """The binding of *token*, or None; every digest is compared in constant time, and a dead owner's is ended."""
        if not token:
            return None
        candidate = _digest(token)
        found = None
        with self._lock:
            for binding in self._bindings.values():
                if hmac.compare_digest(candidate, binding.digest):
                    found = binding
            if found is None or found.owner_alive():
                return found
        self.revoke(found.id, f"imsa exec (pid {found.pid}) is gone")
        return None

    def reap(self):
        """End every binding whose ``imsa exec`` process is gone; returns how many."""
        with self._lock:
            dead = [binding for binding in self._bindings.values() if not binding.owner_alive()]
        for binding in dead:
            self.revoke(binding.id, f"imsa exec (pid {binding.pid}) is gone")
        return len(dead)

    def status(self):
        """The bindings without their digests: id, profile, owner pid, creation time."""
        with self._lock:
            bindings = sorted(self._bindings.values(), key=lambda b: b.created)
        return [
            {"id": b.id, "profile": b.spec.profile, "role_arn": b.spec.role_arn, "pid": b.pid, "created": format_time(b.created)}
            for b in bindings
        ]

    def __len__(self):
        with self._lock:
            return len(self._bindings)

    # --- the reaper ---

    def _run(self):
        while True:
            with self._changed:
                while not self._bindings and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                self._changed.wait(self._reap_every)
                if self._stopping:
                    return
            try:
                self.reap()
            except Exception:  # the reaper must survive anything; it looks again next time
                log.exception("reaping exec bindings failed")

    def start(self):
        """Start the reaper thread."""
        self._thread = threading.Thread(target=self._run, name="imsa-exec-reaper", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the reaper thread and end every binding."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            ids = list(self._bindings)
        for binding_id in ids:
            self.revoke(binding_id, "the service stops")


def endpoint_url(port):
    """The AWS_CONTAINER_CREDENTIALS_FULL_URI of the exec listener: 127.0.0.1 is the one host every SDK accepts."""
    return f"http://{EXEC_HOST}:{port}{CREDENTIALS_PATH}"


def _json(body, status=200):
    return Response(json.dumps(body, indent=2) + "\n", status=status, mimetype="application/json")


def create_app(bindings, cached, port, clock=utcnow):
    """The container-credentials Flask app for a listener on 127.0.0.1:*port*; *cached(spec)* reads the store."""
    app = Flask("imsa.container")
    host = f"{EXEC_HOST}:{port}"

    def refuse(status, code, message):
        # Never log the Authorization header or the query string: either may hold a token.
        log.info("exec endpoint refused %s %s from %s: %s", request.method, request.path, request.remote_addr, message)
        return _json({"Code": code, "Message": message}, status)

    @app.before_request
    def guards():
        # Peer filter: this machine only. The listener is on 127.0.0.1, so this is defence in depth against a
        # packet that reaches it with another source address (another local address, a misrouted container).
        if not is_local_peer(request.environ.get("REMOTE_ADDR", "")):
            return refuse(403, "AccessDenied", "peer address not allowed")
        # Host pin: a DNS-rebinding page sends its own name. The URL handed to the child names 127.0.0.1:PORT.
        if request.environ.get("HTTP_HOST", "").lower() != host:
            return refuse(403, "AccessDenied", "Host header not allowed")
        # Browsers add Origin/Referer; SDKs never do.
        if "HTTP_ORIGIN" in request.environ or "HTTP_REFERER" in request.environ:
            return refuse(403, "AccessDenied", "browser requests not allowed")
        # The token belongs in the Authorization header only: a query string ends up in logs and shell history.
        if request.environ.get("QUERY_STRING"):
            return refuse(400, "InvalidRequest", "no query string allowed; the token goes in the Authorization header")
        return None

    @app.get(CREDENTIALS_PATH)
    def credentials():
        binding = bindings.lookup(request.headers.get("Authorization"))
        if binding is None:
            return refuse(401, "Unauthorized", "missing, wrong or revoked token")
        spec = binding.spec
        creds = cached(spec)
        now = clock()
        if creds is None or creds.expired(now):
            return refuse(
                503, "CredentialsUnavailable",
                f"imsa has no valid credentials for profile {spec.profile}; run: imsa assume {spec.profile}",
            )
        body = {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.session_token,
            "Expiration": format_time(creds.expiration),
        }
        if spec.role_arn:
            body["RoleArn"] = spec.role_arn
            body["AccountId"] = spec.account_id
        log.debug("exec binding %s: served %s", binding.id, mask(creds.access_key_id))
        return _json(body)

    @app.errorhandler(404)
    def not_found(_error):
        return _json({"Code": "NotFound", "Message": f"the only path is {CREDENTIALS_PATH}"}, 404)

    @app.errorhandler(405)
    def not_allowed(_error):
        return _json({"Code": "MethodNotAllowed", "Message": "GET only"}, 405)

    @app.errorhandler(Exception)
    def failure(error):
        if hasattr(error, "code") and isinstance(error.code, int):
            return _json({"Code": "Error", "Message": str(error.code)}, error.code)
        log.exception("exec endpoint request failed")
        return _json({"Code": "InternalError", "Message": "see the service log"}, 500)

    return app
