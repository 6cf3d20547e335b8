"""The IMDS data plane: a Flask app that answers like EC2's instance metadata service (PROTOCOL.md §1).

Never imports boto3: it reads a snapshot of the store and nothing else, so every answer comes from memory.
"""

import collections
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
import time

from flask import Flask, Response, request

from imsa.credentials import format_time, utcnow
from imsa.server.logs import RefusalLimiter, shown
from imsa.server.peers import is_local_peer

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL = 21600
# The token table is bounded: at this size expired tokens are dropped, then the oldest (its client re-PUTs).
MAX_TOKENS = 10000
# An SDK lists the role, then asks for it by name. A switch (imsa assume) in between answered that second request
# 404 and failed the SDK's whole credential load (tests/test_soak.py), so for this long after a switch the role
# just replaced is still answered by its name, with its own credentials while they are valid.
SWITCH_GRACE = datetime.timedelta(seconds=5)
_TOKEN_ID_LEN = 16
_TTL_VALUE = re.compile(r"^[0-9]{1,5}$")

CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials"
_TOKEN_ENVIRON = "HTTP_" + TOKEN_HEADER.upper().replace("-", "_")
# Real IMDS refuses token requests that went through a proxy or forwarder (SSRF through a local proxy). Proxies
# mark what they forward with one of these, and many common local ones with Via alone.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "Via", "X-Real-IP", "X-Forwarded-Host")
_PROXY_ENVIRON = tuple(("HTTP_" + name.upper().replace("-", "_"), name) for name in PROXY_HEADERS)


class TokenTable:
    """IMDSv2 session tokens: random, expiring with their TTL, checked in constant time, bounded in number."""

    def __init__(self, clock=time.monotonic, limit=MAX_TOKENS):
        self._clock = clock
        self._limit = limit
        self._lock = threading.Lock()
        self._tokens = collections.OrderedDict()
        # No token expires before this (a lower bound), so a full table is swept only once one may have expired:
        # sweeping on every PUT cost O(limit) under the lock once SDKs had asked for MAX_TOKENS tokens.
        self._next_expiry = math.inf

    def issue(self, ttl):
        """A new token valid for *ttl* seconds."""
        token_id = secrets.token_urlsafe(12)
        secret = secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode()).digest()
        now = self._clock()
        expiry = now + ttl
        with self._lock:
            if len(self._tokens) >= self._limit:
                if now >= self._next_expiry:
                    self._drop_expired(now)
                while len(self._tokens) >= self._limit:
                    self._tokens.popitem(last=False)
            self._tokens[token_id] = (digest, expiry)
            self._next_expiry = min(self._next_expiry, expiry)
        return token_id + secret

    def _drop_expired(self, now):
        """Delete expired tokens and note when the next one expires (call with the lock held)."""
        next_expiry = math.inf
        for key, (_, expiry) in list(self._tokens.items()):
            if expiry <= now:
                del self._tokens[key]
            elif expiry < next_expiry:
                next_expiry = expiry
        self._next_expiry = next_expiry

    def valid(self, token):
        """True for an issued token that has not expired."""
        if not token or len(token) <= _TOKEN_ID_LEN:
            return False
        with self._lock:
            entry = self._tokens.get(token[:_TOKEN_ID_LEN])
        if entry is None:
            return False
        digest, expiry = entry
        candidate = hashlib.sha256(token[_TOKEN_ID_LEN:].encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(candidate, digest) and self._clock() < expiry

    def __len__(self):
        with self._lock:
            return len(self._tokens)


def _text(body, status=200, **headers):
    return Response(body, status=status, mimetype="text/plain", headers=headers)


class _CollapseSlashes:
    """Serve ``//latest/...`` as ``/latest/...``: JS SDK v2 and Java build it when the endpoint ends in '/'."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("//"):
            environ["PATH_INFO"] = "/" + path.lstrip("/")
        return self.app(environ, start_response)


def allowed_hosts(host, port):
    """The Host header values a request may carry: the listen address, with or without its port."""
    shown = f"[{host}]" if ":" in host else host
    hosts = {f"{shown}:{port}".lower()}
    if port == 80:
        hosts.add(shown.lower())
    return hosts


def create_app(served, host, port, require_token=True, tokens=None, instance_id=None, clock=utcnow, peer_uids=None,
               on_delivery=None):
    """The IMDS Flask app for a service listening on *host*:*port*; *served* returns the store's snapshot.

    With *peer_uids* (a set), only clients whose socket belongs to one of those uids are served; the service puts
    each connection's uid in the environ as ``imsa.peer_uid``. *on_delivery(snapshot, environ)* is called once each
    credentials answer has been written (the delivery log: imsa/server/deliveries.py).
    """
    app = Flask("imsa.server.imds")
    app.wsgi_app = _CollapseSlashes(app.wsgi_app)
    tokens = tokens if tokens is not None else TokenTable()
    hosts = allowed_hosts(host, port)
    listen_ip = ipaddress.ip_address(host) if _is_ip(host) else None
    # Peers are a handful of addresses (127.0.0.1 nearly always): parse each once, not on every request.
    peer_allowed = functools.lru_cache(maxsize=256)(functools.partial(is_local_peer, listen_ip=listen_ip))
    instance_id = instance_id or "i-" + secrets.token_hex(8)[:17]
    app.config["imsa.tokens"] = tokens

    # A client refused thousands of times a second gets one line per interval and a count (imsa.server.logs).
    refusals = RefusalLimiter(log)

    def refuse(status, rule):
        environ = request.environ
        address, uid = environ.get("REMOTE_ADDR", ""), environ.get("imsa.peer_uid")
        if refusals.allow(address if uid is None else f"{address} (uid {uid})"):
            # The method and path are the client's own bytes: escaped and cut, so that a %0a cannot forge a line.
            log.info("refused %s %s from %s: %s", shown(request.method), shown(request.path), address, rule)
        return _text(f"{status} - {rule}\n", status)

    @app.before_request
    def guards():
        # Every SDK call goes through here: read the WSGI environ once, as a plain dict (scripts/bench.py).
        environ = request.environ
        # Peer filter: only this machine. A local client reaches 169.254.169.254 *from* that address; anything
        # else (a container on a bridge, another host routed here) must never get the owner's credentials.
        if not peer_allowed(environ.get("REMOTE_ADDR", "")):
            return refuse(403, "peer address not allowed")
        # Other local users are peers on loopback too: the owner's credentials are for the owner's processes.
        if peer_uids is not None and environ.get("imsa.peer_uid") not in peer_uids:
            uid = environ.get("imsa.peer_uid")
            return refuse(403, f"another user's process (uid {'unknown' if uid is None else uid})")
        # Host pin: DNS rebinding makes a browser send a page's own name (or another address) as Host.
        if environ.get("HTTP_HOST", "").lower() not in hosts:
            return refuse(403, "Host header not allowed")
        # Browsers add Origin/Referer; SDKs never do. Refusing them stops cross-site requests outright.
        if "HTTP_ORIGIN" in environ or "HTTP_REFERER" in environ:
            return refuse(403, "browser requests not allowed")
        if environ.get("REQUEST_METHOD") == "PUT" or environ.get("PATH_INFO") == "/latest/api/token":
            return None
        token = environ.get(_TOKEN_ENVIRON)
        if token is not None:
            if not tokens.valid(token):
                return refuse(401, "invalid or expired token")
        elif require_token:
            return refuse(401, "token required (IMDSv2)")
        return None

    @app.route("/latest/api/token", methods=["PUT"])
    def token():
        environ = request.environ
        for key, name in _PROXY_ENVIRON:
            if key in environ:
                return refuse(403, f"{name} not allowed on token requests")
        ttl = request.headers.get(TTL_HEADER, "")
        if not _TTL_VALUE.match(ttl) or not 1 <= int(ttl) <= MAX_TTL:
            return refuse(400, f"{TTL_HEADER} must be a whole number from 1 to {MAX_TTL}")
        # Go SDK v2 reads the granted TTL back from this header; without it the token is not used.
        return _text(tokens.issue(int(ttl)), **{TTL_HEADER: ttl})

    @app.route("/<version>/api/token", methods=["PUT"])
    def versioned_token(version):
        return refuse(403, "token requests must use /latest/")

    @app.route("/latest/meta-data/")
    @app.route("/latest/meta-data")
    def meta_data():
        return _text("iam/\ninstance-id\nplacement/")

    @app.route("/latest/meta-data/iam/")
    @app.route("/latest/meta-data/iam")
    def iam():
        return _text("info\nsecurity-credentials/")

    @app.route(CREDENTIALS_PATH + "/")
    @app.route(CREDENTIALS_PATH)
    def role_list():
        snapshot = served()
        if snapshot is None:
            return _text("No role assumed; run: imsa assume PROFILE\n", 404)
        return _text(snapshot.spec.role_name)

    @app.route(CREDENTIALS_PATH + "/<role>")
    def role_credentials(role):
        snapshot = _snapshot_for(served(), role, clock())
        if snapshot is None:
            return _text("Not Found\n", 404)
        creds = snapshot.credentials
        if creds.expired(clock()):
            body = {
                "Code": "CredentialsExpired",
                "LastUpdated": format_time(clock()),
                "Message": f"imsa: the credentials of profile {snapshot.spec.profile} expired at "
                f"{format_time(creds.expiration)}; run: imsa assume {snapshot.spec.profile}",
            }
            return _text(json.dumps(body, indent=2))
        response = _text(credentials_json(snapshot))
        if on_delivery is not None:
            # Called when the server closes the answer, after writing it: the client never waits for the log.
            response.call_on_close(functools.partial(on_delivery, snapshot, request.environ))
        return response

    # The last credentials answer and the snapshot it was made from: json.dumps with indent runs in pure Python
    # and cost more than the rest of the request (scripts/bench.py), so it is made once per snapshot.
    last_rendered = [(None, None)]

    def credentials_json(snapshot):
        seen, body = last_rendered[0]
        if seen is snapshot:
            return body
        body = json.dumps(snapshot.credentials.to_imds(), indent=2)
        if snapshot.credentials.issued is not None:  # else LastUpdated is "now" and changes on every request
            last_rendered[0] = (snapshot, body)
        return body

    @app.route("/latest/meta-data/iam/info")
    def iam_info():
        snapshot = served()
        if snapshot is None or snapshot.credentials.expired(clock()):
            return _text("Not Found\n", 404)
        account = snapshot.spec.account_id or "000000000000"
        body = {
            "Code": "Success",
            "LastUpdated": format_time(snapshot.credentials.issued or clock()),
            "InstanceProfileArn": f"arn:aws:iam::{account}:instance-profile/{snapshot.spec.role_name}",
            "InstanceProfileId": "AIPA" + hashlib.sha256(snapshot.spec.role_name.encode()).hexdigest()[:17].upper(),
        }
        return _text(json.dumps(body, indent=2))

    @app.route("/latest/meta-data/instance-id")
    def instance():
        return _text(instance_id)

    def region():
        snapshot = served()
        return snapshot.spec.region if snapshot else None

    @app.route("/latest/meta-data/placement/region")
    def placement_region():
        name = region()
        return _text(name) if name else _text("Not Found\n", 404)

    @app.route("/latest/meta-data/placement/availability-zone/")
    @app.route("/latest/meta-data/placement/availability-zone")
    def availability_zone():
        # botocore drops the last character of the zone to get the region, so the zone must be <region>a.
        name = region()
        return _text(name + "a") if name else _text("Not Found\n", 404)

    @app.route("/latest/dynamic/instance-identity/document")
    def identity_document():
        snapshot = served()
        if snapshot is None or not snapshot.spec.region:
            return _text("Not Found\n", 404)
        body = {
            "accountId": snapshot.spec.account_id or "000000000000",
            "architecture": "x86_64",
            "availabilityZone": snapshot.spec.region + "a",
            "imageId": "ami-00000000000000000",
            "instanceId": instance_id,
            "instanceType": "t3.micro",
            "pendingTime": format_time(snapshot.credentials.issued or clock()),
            "privateIp": "127.0.0.1",
            "region": snapshot.spec.region,
            "version": "2017-09-30",
        }
        return _text(json.dumps(body, indent=2))

    @app.errorhandler(404)
    def not_found(_error):
        return _text("Not Found\n", 404)

    @app.errorhandler(405)
    def not_allowed(_error):
        return _text("Method Not Allowed\n", 405)

    @app.errorhandler(Exception)
    def failure(error):
        if hasattr(error, "code") and isinstance(error.code, int):
            return _text(f"{error.code}\n", error.code)
        log.exception("IMDS request failed")
        return _text("Internal Server Error\n", 500)

    return app


def _snapshot_for(snapshot, role, now):
    """The snapshot that answers for *role*: the active one, or the one it replaced less than SWITCH_GRACE ago."""
    if snapshot is None or role == snapshot.spec.role_name:
        return snapshot
    previous = snapshot.previous
    if previous is not None and role == previous.spec.role_name and now - snapshot.since <= SWITCH_GRACE:
        return previous
    return None


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
