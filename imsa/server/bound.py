"""Credential bindings for system services: named container-credentials endpoints the service keeps, and the app
that serves them.

``imsa bind NAME PROFILE`` makes a binding: the profile's role spec, a mode, and the SHA-256 of a random token whose
clear text exists only in the environment file the CLI writes for the bound service (a systemd unit's
``EnvironmentFile=``). The service pins the role (its refresher keeps it rotated) and answers
``GET /bindings/NAME`` on its bindings listener(s) with the container-credentials JSON (PROTOCOL.md §2).

Modes (needroleshere's names):
- ``ecs-full``: ``AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:PORT/bindings/NAME`` and the token in
  ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (the ``Authorization`` header);
- ``ecs-full-query``: the same URL with ``?token=…`` (for SDKs that send no token header);
- ``ecs-relative`` / ``ecs-relative-query``: ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/bindings/NAME[?token=…]``,
  which SDKs send to 169.254.170.2:80, as on ECS.
A binding whose token goes in the header refuses a token in the query string, and a ``-query`` binding refuses
one in the header: a token where it does not belong has leaked into a URL, a log or a proxy.

Bindings persist across restarts of the service: one 0600 JSON file per binding in the state directory (token
hash, mode, role spec and — for sources that need no person, Roles Anywhere — the session's material: paths and
ARNs, never a key). A restarted service serves them at once; a binding on an MFA session answers 503 until someone
runs ``imsa assume`` again.

Guards, in order: a local peer; ``Host`` the listener's address; no ``Origin``/``Referer``; ``GET`` only; the
binding exists; the token where the mode puts it, compared in constant time. Any local user's process can connect
(a system service runs as its own user): the token is the key, as on ECS.
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading

from flask import Flask, jsonify, request

from imsa.credentials import format_time, mask, utcnow
from imsa.errors import StsError
from imsa.server.logs import RefusalLimiter, shown
from imsa.server.peers import is_local_peer

log = logging.getLogger(__name__)

MODES = ("ecs-full", "ecs-full-query", "ecs-relative", "ecs-relative-query")
PATH_PREFIX = "/bindings/"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
TOKEN_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_BINDINGS = 1024
# Sessions persisted with a binding: only kinds that need no person to be made again.
PERSISTED_KINDS = ("roles_anywhere",)
# Where a relative URI is sent by every SDK (ECS's address).
ECS_ADDRESS = "169.254.170.2"
ECS_IP = ipaddress.ip_address(ECS_ADDRESS)


class BindingError(ValueError):
    """A binding request that cannot be acted on."""


def token_digest(token):
    """The SHA-256 (hex) the service keeps of a binding's token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def uses_query(mode):
    """True for the modes that carry the token in the URL's query string."""
    return mode.endswith("-query")


class ServiceBindings:
    """The named bindings: kept in memory, pinned in the store, persisted as files under *directory*."""

    def __init__(self, store, directory):
        self._store = store
        self._directory = directory
        self._lock = threading.Lock()
        self._bindings = {}

    def _path(self, name):
        return os.path.join(self._directory, f"{name}.json")

    def load(self, spec_from):
        """Read every persisted binding (at start, as the user); a bad file is logged and skipped."""
        if not self._directory or not os.path.isdir(self._directory):
            return
        for entry in sorted(os.listdir(self._directory)):
            if not entry.endswith(".json"):
                continue
            try:
                fd = os.open(os.path.join(self._directory, entry), os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as handle:
                    data = json.loads(handle.read(1 << 20).decode("utf-8"))
                self._add(data, spec_from, persist=False)
            except (OSError, ValueError, StsError) as error:
                log.warning("binding file %s skipped: %s", shown(entry), error)

    def add(self, data, spec_from, persist=True):
        """Make or replace the binding *data* describes (name, mode, token_sha256, spec); persist it unless told not
        to (the system mode's bindings live in its configuration directory)."""
        return self._add(data, spec_from, persist=persist)

    def _add(self, data, spec_from, persist):
        if not isinstance(data, dict):
            raise BindingError("a binding must be a JSON object")
        name, mode, digest = data.get("name"), data.get("mode"), data.get("token_sha256")
        if not isinstance(name, str) or not NAME.match(name):
            raise BindingError("'name' must be 1-128 characters from letters, digits and _.@- (not first)")
        if mode not in MODES:
            raise BindingError(f"'mode' must be one of {', '.join(MODES)}")
        if not isinstance(digest, str) or not TOKEN_DIGEST.match(digest):
            raise BindingError("'token_sha256' must be 64 hex characters")
        env_file = data.get("env_file")
        if env_file is not None and (not isinstance(env_file, str) or not env_file.startswith("/")):
            raise BindingError("'env_file' must be an absolute path")
        spec = spec_from(data.get("spec"))
        session = data.get("session")
        if session is not None:
            self._restore_session(spec, session)
        elif persist:
            session = self._session_to_keep(spec)
        record = {"name": name, "mode": mode, "token_sha256": digest, "spec": data.get("spec"),
                  "env_file": env_file, "session": session}
        with self._lock:
            if name not in self._bindings and len(self._bindings) >= MAX_BINDINGS:
                raise BindingError(f"at most {MAX_BINDINGS} bindings")
            old = self._bindings.get(name)
            self._bindings[name] = (record, spec)
        self._store.pin(spec)
        if old is not None:
            self._store.unpin(old[1])
        if persist:
            self._write(record)
        log.info("binding %s: profile %s, mode %s", name, spec.profile, mode)
        return record

    def _session_to_keep(self, spec):
        """The session of *spec* as the file keeps it, when its kind can be made again with no person."""
        held = self._store.session(spec.fingerprint)
        if held is None or held.kind not in PERSISTED_KINDS:
            return None
        settings = self._store.settings(spec.fingerprint)
        return {"kind": held.kind, "material": held.material.to_json(), "label": held.label,
                "sts": settings.to_json() if settings is not None else None}

    def _restore_session(self, spec, session):
        from imsa import sources
        from imsa.sts_settings import StsSettings

        kind = session.get("kind")
        if kind not in PERSISTED_KINDS:
            raise BindingError(f"a persisted session of kind {kind!r} is not made again by the service")
        if self._store.session(spec.fingerprint) is not None:
            return
        material = sources.material_class(kind).from_json(session.get("material"))
        settings = StsSettings.from_json(session["sts"]) if session.get("sts") else StsSettings()
        self._store.put_session(spec.fingerprint, material, settings, kind=kind, label=session.get("label"))

    def _write(self, record):
        os.makedirs(self._directory, mode=0o700, exist_ok=True)
        path = self._path(record["name"])
        temporary = path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(temporary, path)

    def remove(self, name):
        """End binding *name* (its file too); the record it had, or None."""
        with self._lock:
            found = self._bindings.pop(name, None)
        if found is None:
            return None
        self._store.unpin(found[1])
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        log.info("binding %s removed", name)
        return found[0]

    def get(self, name):
        """(record, spec) of binding *name*, or None."""
        with self._lock:
            return self._bindings.get(name)

    def status(self):
        """For ``imsa status``: each binding's name, mode and profile (no token, no hash)."""
        with self._lock:
            return [{"name": record["name"], "mode": record["mode"], "profile": spec.profile,
                     "role_arn": spec.role_arn} for record, spec in self._bindings.values()]


class _Refusal(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def create_app(store, bindings, hosts):
    """The bindings listener's Flask app; *hosts* are the Host header values it answers to (its addresses)."""
    app = Flask("imsa.server.bound")
    refusals = RefusalLimiter(log, logging.INFO)

    def refuse(status, code, message):
        raise _Refusal(status, code, message)

    @app.errorhandler(_Refusal)
    def refused(error):
        if refusals.allow(request.remote_addr or "?"):
            # Never the query string: it may hold a token.
            log.info("binding endpoint refused %s %s from %s: %s", shown(request.method), shown(request.path),
                     request.remote_addr, error.message)
        return jsonify(Code=error.code, Message=error.message), error.status

    @app.errorhandler(404)
    def not_found(_error):
        return jsonify(Code="NotFound", Message="no such binding"), 404

    @app.errorhandler(405)
    def not_allowed(_error):
        return jsonify(Code="MethodNotAllowed", Message="GET only"), 405

    @app.get("/bindings/<name>")
    def credentials(name):
        # A local client of 169.254.170.2 arrives from that address itself (the listener takes only what arrives
        # on lo: process.bind_tcp with device lo).
        if not is_local_peer(request.remote_addr or "", ECS_IP):
            refuse(403, "AccessDenied", "peer address not allowed")
        if request.headers.get("Host") not in hosts:
            refuse(403, "AccessDenied", "Host header not allowed")  # DNS rebinding names its own host
        if request.headers.get("Origin") is not None or request.headers.get("Referer") is not None:
            refuse(403, "AccessDenied", "browser requests not allowed")
        found = bindings.get(name)
        if found is None:
            refuse(404, "NotFound", "no such binding")
        record, spec = found
        header = request.headers.get("Authorization")
        query = request.args.getlist("token")
        if uses_query(record["mode"]):
            if header is not None:
                refuse(400, "InvalidRequest", "this binding takes its token in the URL, not in Authorization")
            given = query[0] if len(query) == 1 else None
        else:
            if query or request.query_string:
                refuse(400, "InvalidRequest", "this binding takes its token in Authorization, never in the URL")
            given = header
        if given is None or not hmac.compare_digest(token_digest(given), record["token_sha256"]):
            refuse(401, "Unauthorized", "missing or wrong token")
        try:
            creds = store.credentials_for(spec)
        except StsError as error:
            refuse(503, "CredentialsUnavailable", str(error))
        if creds.expired(utcnow()):
            refuse(503, "CredentialsUnavailable", f"no valid credentials for binding {name}")
        body = {"AccessKeyId": creds.access_key_id, "SecretAccessKey": creds.secret_access_key,
                "Token": creds.session_token, "Expiration": format_time(creds.expiration)}
        if spec.role_arn:
            body["RoleArn"] = spec.role_arn
            body["AccountId"] = spec.account_id
        log.debug("binding %s: served %s", name, mask(creds.access_key_id))
        return jsonify(body)

    return app
