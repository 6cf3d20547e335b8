"""The control plane: a Flask app served only on the owner's Unix socket (never on the TCP listener).

The service puts the peer's uid (SO_PEERCRED) into the WSGI environ as ``imsa.peer_uid``; only the owner and root
pass. State changes are POST with a JSON body.
"""

import datetime
import json
import logging

from flask import Flask, jsonify, request

from imsa import expiry, sources
from imsa.credentials import format_time
from imsa.errors import StsError
from imsa.server.logs import RefusalLimiter, shown
from imsa.server.store import RoleSpec, SpecError, _is_fingerprint
from imsa.sts_settings import StsSettings

log = logging.getLogger(__name__)

PEER_UID = "imsa.peer_uid"
# The longest warning window a session may carry (POST /sessions "warn_before", seconds).
MAX_WARN_SECONDS = int(expiry.MAX_WARN_BEFORE.total_seconds())


class BadRequest(Exception):
    """A control request that cannot be acted on."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message = message
        self.status = status


def create_app(store, owner_uid, info, on_stop, bindings=None, service_bindings=None, deliveries=None):
    """The control Flask app; *info* is a dict merged into status (a callable value is called each time), *on_stop*
    ends the service; *bindings* (an execs.BindingTable) adds the routes of ``imsa exec``: POST /bindings and
    POST /bindings/revoke; *deliveries* (a deliveries.DeliveryLog) notes each credentials answer and adds
    GET /deliveries."""
    app = Flask("imsa.server.control")
    refusals = RefusalLimiter(log, logging.WARNING)

    @app.before_request
    def owner_only():
        uid = request.environ.get(PEER_UID)
        if uid is None or uid not in (owner_uid, 0):
            # One line per uid per interval, the path escaped and cut: a stranger can neither flood nor forge lines.
            if refusals.allow(f"uid {uid}"):
                log.warning("control socket: refused uid %s (pid %s): %s %s", uid, request.environ.get("imsa.peer_pid"),
                            shown(request.method), shown(request.path))
            return jsonify(error="only the service's owner may use the control socket"), 403
        return None

    def body():
        if request.mimetype != "application/json":
            raise BadRequest("Content-Type must be application/json", 415)
        # JSON is UTF-8 (RFC 8259) and the CLI sends nothing else. Handed bytes, json.loads guesses UTF-16/32 from
        # NUL bytes, and once root is dropped those codecs may be unloadable (LookupError: a 500); deep nesting
        # raises RecursionError. Neither is a ValueError, which is all get_json(silent=True) catches.
        try:
            data = json.loads(request.get_data(cache=False).decode("utf-8"))
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    def spec_from(data):
        try:
            return RoleSpec.from_json(data)
        except SpecError as error:
            raise BadRequest(str(error)) from None

    @app.errorhandler(BadRequest)
    def bad_request(error):
        return jsonify(error=error.message), error.status

    @app.errorhandler(StsError)
    def sts_failed(error):
        return jsonify(error=error.message, kind="sts"), 502

    @app.errorhandler(404)
    def not_found(_error):
        return jsonify(error="no such route"), 404

    @app.errorhandler(405)
    def not_allowed(_error):
        return jsonify(error="method not allowed"), 405

    @app.errorhandler(Exception)
    def failure(error):
        if hasattr(error, "code") and isinstance(error.code, int):
            return jsonify(error=str(error)), error.code
        log.exception("control request failed")
        return jsonify(error="internal error; see the service log"), 500

    @app.get("/status")
    def status():
        data = store.status()
        data.update({key: value() if callable(value) else value for key, value in info.items()})
        return jsonify(data)

    @app.get("/sessions/<fingerprint>")
    def session(fingerprint):
        creds = store.session(fingerprint)
        if creds is None:
            return jsonify(error="no valid session"), 404
        return jsonify(fingerprint=fingerprint, expiration=format_time(creds.expiration))

    @app.post("/sessions")
    def put_session():
        data = body()
        try:
            kind = data.get("kind", "credentials")  # the one kind older clients sent
            # The session's material: "material", or "credentials" as older clients sent it.
            creds = sources.material_class(kind).from_json(data.get("material", data.get("credentials")))
            # How the CLI reached STS for this session; the service's own environment never decides it.
            if "sts" not in data:
                raise ValueError("'sts' (how the session was made: endpoint, region, proxies, CA bundle) is required")
            settings = StsSettings.from_json(data["sts"])
            label = data.get("label")
            if label is not None and (not isinstance(label, str) or not 0 < len(label) <= 256 or not label.isprintable()):
                raise ValueError("'label' must be printable text of 1-256 characters")
            warn_before = data.get("warn_before")
            if warn_before is not None and (type(warn_before) is not int or not 0 <= warn_before <= MAX_WARN_SECONDS):
                raise ValueError(f"'warn_before' must be whole seconds from 0 to {MAX_WARN_SECONDS}")
            store.put_session(data.get("fingerprint"), creds, settings, kind=kind, label=label,
                              warn_before=None if warn_before is None else datetime.timedelta(seconds=warn_before))
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return jsonify(fingerprint=data["fingerprint"], expiration=format_time(creds.expiration))

    @app.post("/sessions/forget")
    def forget_sessions():
        data = body()
        if data.get("all") is True:
            forgotten = store.forget()
        elif _is_fingerprint(data.get("fingerprint")):
            forgotten = store.forget(data["fingerprint"])
        else:
            raise BadRequest("give 'fingerprint' (32 hex characters) or 'all': true")
        return jsonify(forgotten=forgotten)

    @app.post("/sessions/roles")
    def session_roles():
        # The roles a session's source offers (a credential server's GET /roles), asked with the token only the
        # service holds.
        fingerprint = body().get("fingerprint")
        if not _is_fingerprint(fingerprint):
            raise BadRequest("'fingerprint' must be 32 hex characters")
        held = store.session(fingerprint)
        if held is None:
            return jsonify(error="no valid session"), 404
        if held.kind not in sources.LISTERS:
            raise BadRequest(f"a session of kind {held.kind} lists no roles")
        roles = sources.load(sources.LISTERS[held.kind])(held.material, store.settings(fingerprint))
        return jsonify(supported=roles is not None, roles=roles or [])

    @app.post("/activate")
    def activate():
        spec = spec_from(body())
        if not spec.imds:
            # The CLI refuses it first; this stops a CLI that does not know the setting (or any other caller).
            raise BadRequest(f"profile {spec.profile} is kept off the global endpoint (imds: false); use imsa exec "
                             f"{spec.profile} -- COMMAND, or imsa export {spec.profile}", 403)
        creds = store.activate(spec)
        return jsonify(profile=spec.profile, role_arn=spec.role_arn, expiration=format_time(creds.expiration))

    @app.post("/credentials")
    def credentials():
        spec = spec_from(body())
        creds = store.credentials_for(spec)
        response = jsonify(creds.to_json())
        if deliveries is not None:
            # Noted once the answer is written; which command asked is in the query (?way=), from SO_PEERCRED who.
            response.call_on_close(deliveries.control_hook(spec, creds, request.environ, request.args))
        return response

    if deliveries is not None:
        @app.get("/deliveries")
        def delivery_records():
            try:
                after = int(request.args.get("after", "0"))
            except ValueError:
                raise BadRequest("'after' must be a whole number") from None
            records, last = deliveries.records(after, request.args.get("profile"))
            return jsonify(deliveries=records, last=last)

    if bindings is not None:
        from imsa.server.execs import BindingError

        @app.post("/bindings")
        def bind():
            spec = spec_from(body())
            # The binding lives as long as the process that asked for it: its pid comes from SO_PEERCRED, not
            # from the body, so no caller can keep a role pinned for some other long-lived process.
            pid = request.environ.get("imsa.peer_pid")
            if not isinstance(pid, int) or pid <= 0:
                raise BadRequest("the caller's pid is not visible to the service (another pid namespace?); no binding")
            creds = store.credentials_for(spec)  # STS errors surface now (502), not in the command's first call
            try:
                binding_id = bindings.create(spec, pid)
            except BindingError as error:
                raise BadRequest(str(error), 503) from None
            return jsonify(id=binding_id, profile=spec.profile, role_arn=spec.role_arn,
                           expiration=format_time(creds.expiration))

        @app.post("/bindings/revoke")
        def revoke():
            binding_id = body().get("id")
            if not isinstance(binding_id, str) or not binding_id:
                raise BadRequest("'id' must be a binding id")
            if not bindings.revoke(binding_id):
                return jsonify(error="no such binding"), 404
            return jsonify(revoked=binding_id)

    if service_bindings is not None:
        @app.post("/service-bindings")
        def bind_service():
            data = body()
            # The role's credentials first: STS or Roles Anywhere errors now (502), before anything is kept.
            creds = store.credentials_for(spec_from(data.get("spec")))
            try:
                record = service_bindings.add(data, spec_from)
            except ValueError as error:  # BindingError, or the persisted session's material or settings
                raise BadRequest(str(error)) from None
            return jsonify(name=record["name"], mode=record["mode"], expiration=format_time(creds.expiration),
                           persisted_session=record["session"] is not None)

        @app.post("/service-bindings/remove")
        def unbind_service():
            name = body().get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest("'name' must be a binding name")
            record = service_bindings.remove(name)
            if record is None:
                return jsonify(error="no such binding"), 404
            return jsonify(removed=name, env_file=record.get("env_file"))

    @app.post("/stop")
    def stop():
        body()
        on_stop()
        return jsonify(stopping=True)

    return app
