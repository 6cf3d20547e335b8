"""A strict fake OIDC provider, and a strict web-identity STS front before moto, both on 127.0.0.1 in threads.

FakeOidc does what a provider does for a native public client, and refuses what a real one refuses:
- ``/.well-known/openid-configuration`` and ``/jwks`` (RSA 2048, ``kid``);
- ``/authorize`` auto-approves the configured user, for a known client only, a redirect to
  ``http://127.0.0.1|[::1]:PORT/…`` only (RFC 8252), ``response_type=code``, the ``openid`` scope and an S256 PKCE
  challenge required; it redirects with a 60 s code and the request's state;
- ``/token``: the code is spent on its first presentation, right or wrong (RFC 6749 §4.1.2: used twice is refused);
  the client, the exact ``redirect_uri`` and the verifier of the challenge are required;
- ``/roles``: the roles API (the Mozilla AWS CLI's ``idtoken_for_roles_url``), for a valid ID token as the bearer.
Hooks for the failures: ``next_token`` (claims to override in the next ID token: ``aud``, ``exp``…, or
``sign_with="foreign"`` to sign it with a key the provider does not publish), ``deny`` (the person refuses).

StrictSts verifies AssumeRoleWithWebIdentity as STS does before anything is minted: the token's issuer is a
registered provider, its signature verifies against that provider's JWKS (fetched through its discovery document),
its ``aud`` is a registered client id, its ``exp`` is in the future, and the role trusts its ``sub``; a
DurationSeconds above the role's maximum gets STS's ValidationError. Only then does it mint through moto (an
AssumeRole of the role, which moto checks) and answer with AssumeRoleWithWebIdentity's shape. Every other request
goes to moto unchanged. moto's own AssumeRoleWithWebIdentity accepts any string: without this front a test of the
token would prove nothing.
"""

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from xml.sax.saxutils import escape

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

CODE_LIFETIME = 60
TOKEN_LIFETIME = 3600
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]")
STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


def _key(kid):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    public.update(kid=kid, use="sig", alg="RS256")
    return private, public


class _Server:
    """A threaded stdlib HTTP server on 127.0.0.1:0 whose requests go to *handle(method, path, query, headers,
    body)* → (status, headers, body bytes)."""

    def __init__(self, handle):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = handle(self.command, parts.path, dict(urllib.parse.parse_qsl(parts.query)),
                                                  self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve  # noqa: N815 (http.server's names)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _json(status, value):
    return status, {"Content-Type": "application/json", "Cache-Control": "no-store"}, json.dumps(value).encode()


class FakeOidc:
    """The fake provider (see the module's docstring). *user* is the claims of the person it approves."""

    def __init__(self, client_id="imsa-cli", user=None, roles=(), aliases=None):
        self.client_id = client_id
        self.user = dict(user or {"sub": "ad|alice", "email": "alice@example.com"})
        self.roles, self.aliases = list(roles), dict(aliases or {})
        self.private, self.public = _key("k1")
        self.foreign_private, _ = _key("k1")  # same kid, another key: a forgery under the provider's name
        self.codes = {}
        self.calls = []
        self.issued = []  # every token the token endpoint gave, for tests that look for them on disk
        self.next_token = {}
        self.deny = False
        self.lock = threading.Lock()
        self.server = _Server(self._handle)
        self.issuer = f"http://127.0.0.1:{self.server.port}"
        self.discovery_url = self.issuer + "/.well-known/openid-configuration"

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

    def count(self, path):
        """How many requests reached *path*."""
        return sum(1 for call in self.calls if call["path"] == path)

    def id_token(self, nonce=None, sign_with=None, **overrides):
        """An ID token for the configured user: RS256 under kid k1; *overrides* replace claims (None removes one)."""
        now = int(time.time())
        claims = dict(self.user, iss=self.issuer, aud=self.client_id, iat=now, exp=now + TOKEN_LIFETIME)
        if nonce is not None:
            claims["nonce"] = nonce
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        key = self.foreign_private if sign_with == "foreign" else self.private
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})

    def _handle(self, method, path, query, headers, body):
        with self.lock:
            self.calls.append({"method": method, "path": path})
        if path == "/.well-known/openid-configuration" and method == "GET":
            return _json(200, {
                "issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"], "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
            })
        if path == "/jwks" and method == "GET":
            return _json(200, {"keys": [self.public]})
        if path == "/authorize" and method == "GET":
            return self._authorize(query)
        if path == "/token" and method == "POST":
            return self._token(dict(urllib.parse.parse_qsl(body.decode())))
        if path == "/roles" and method == "GET":
            return self._roles(headers.get("Authorization") or "")
        return _json(404, {"error": "not_found"})

    def _authorize(self, query):
        redirect = query.get("redirect_uri", "")
        parts = urllib.parse.urlsplit(redirect)
        if parts.scheme != "http" or parts.netloc.rsplit(":", 1)[0] not in LOOPBACK_HOSTS or not parts.port:
            return _json(400, {"error": "invalid_request", "error_description": "redirect_uri must be loopback"})
        if query.get("client_id") != self.client_id:
            return _json(400, {"error": "unauthorized_client"})
        if query.get("response_type") != "code" or "openid" not in query.get("scope", "").split():
            return _json(400, {"error": "invalid_request", "error_description": "code flow with openid only"})
        if query.get("code_challenge_method") != "S256" or len(query.get("code_challenge", "")) != 43:
            return _json(400, {"error": "invalid_request", "error_description": "S256 PKCE is required"})
        if self.deny:
            target = {"error": "access_denied", "state": query.get("state", "")}
        else:
            code = secrets.token_urlsafe(24)
            with self.lock:
                self.codes[code] = {"client_id": query["client_id"], "redirect_uri": redirect,
                                    "challenge": query["code_challenge"], "nonce": query.get("nonce"),
                                    "expires": time.monotonic() + CODE_LIFETIME}
            target = {"code": code, "state": query.get("state", "")}
        return 302, {"Location": redirect + "?" + urllib.parse.urlencode(target)}, b""

    def _token(self, form):
        if form.get("grant_type") != "authorization_code":
            return _json(400, {"error": "unsupported_grant_type"})
        with self.lock:
            grant = self.codes.pop(form.get("code", ""), None)  # spent now, whatever follows
        if grant is None or grant["expires"] < time.monotonic():
            return _json(400, {"error": "invalid_grant", "error_description": "the code is unknown, used or expired"})
        if form.get("client_id") != grant["client_id"]:
            return _json(401, {"error": "invalid_client"})
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return _json(400, {"error": "invalid_grant", "error_description": "redirect_uri differs"})
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge, grant["challenge"]):
            return _json(400, {"error": "invalid_grant", "error_description": "PKCE verification failed"})
        overrides, self.next_token = self.next_token, {}
        answer = {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer", "expires_in": TOKEN_LIFETIME,
                  "refresh_token": secrets.token_urlsafe(24), "id_token": self.id_token(nonce=grant["nonce"], **overrides)}
        self.issued.extend((answer["access_token"], answer["refresh_token"], answer["id_token"]))
        return _json(200, answer)

    def _roles(self, authorization):
        if not authorization.startswith("Bearer "):
            return _json(401, {"error": "invalid_token"})
        try:
            jwt.decode(authorization[7:], self.private.public_key(), algorithms=["RS256"], audience=self.client_id,
                       issuer=self.issuer)
        except jwt.PyJWTError:
            return _json(401, {"error": "invalid_token"})
        return _json(200, {"roles": self.roles, "aliases": self.aliases})


class StrictSts:
    """The strict web-identity STS front before moto (see the module's docstring).

    *sts* is the moto server (conftest.StsServer); *signer* the moto user whose keys mint through AssumeRole;
    *trust* maps a role ARN to the (issuer, sub) pairs it trusts; *max_duration* a role ARN to its
    MaxSessionDuration (3600 unless given)."""

    def __init__(self, sts, providers, trust, max_duration=None, signer="bob"):
        import boto3

        self.sts = sts
        self.providers = {provider.issuer: provider for provider in providers}
        self.trust, self.max_duration = trust, dict(max_duration or {})
        keys = sts.users[signer]
        self.moto = boto3.client("sts", endpoint_url=sts.endpoint, region_name="us-east-1",
                                 aws_access_key_id=keys["aws_access_key_id"],
                                 aws_secret_access_key=keys["aws_secret_access_key"])
        self.calls = []
        self.lock = threading.Lock()
        self.server = _Server(self._handle)
        self.endpoint = f"http://127.0.0.1:{self.server.port}"

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop()

    def outcomes(self):
        """(role, DurationSeconds, outcome code or "ok") of every AssumeRoleWithWebIdentity, in order."""
        return [(call["role"], call["duration"], call["outcome"]) for call in self.calls]

    def _handle(self, method, path, query, headers, body):
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"))) if method == "POST" else query
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return self._forward(method, path, headers, body)
        role, duration = form.get("RoleArn", ""), int(form.get("DurationSeconds") or 3600)
        try:
            claims = self._verify(form.get("WebIdentityToken", ""), role, duration)
            answer = self.moto.assume_role(RoleArn=role, RoleSessionName=form.get("RoleSessionName", "web"),
                                           DurationSeconds=duration)
        except _StsRefusal as refusal:
            with self.lock:
                self.calls.append({"role": role, "duration": duration, "outcome": refusal.code})
            return self._error(refusal)
        with self.lock:
            self.calls.append({"role": role, "duration": duration, "outcome": "ok"})
        return self._answer(answer, claims)

    def _verify(self, token, role, duration):
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _StsRefusal("InvalidIdentityToken", "The token is not a valid JWT.") from None
        provider = self.providers.get(unverified.get("iss"))
        if provider is None:
            raise _StsRefusal("InvalidIdentityToken", "No OpenIDConnect provider found in your account for "
                              f"{unverified.get('iss')}")
        discovery = json.loads(urllib.request.urlopen(provider.discovery_url, timeout=10).read())
        jwks = json.loads(urllib.request.urlopen(discovery["jwks_uri"], timeout=10).read())
        keys = {entry["kid"]: jwt.PyJWK.from_dict(entry) for entry in jwks["keys"]}
        if header.get("alg") != "RS256" or header.get("kid") not in keys:
            raise _StsRefusal("InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider")
        try:
            claims = jwt.decode(token, keys[header["kid"]].key, algorithms=["RS256"], audience=provider.client_id,
                                issuer=provider.issuer, options={"require": ["exp", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise _StsRefusal("ExpiredTokenException", "Token expired") from None
        except jwt.InvalidAudienceError:
            raise _StsRefusal("InvalidIdentityToken", "Incorrect token audience") from None
        except jwt.PyJWTError:
            raise _StsRefusal("InvalidIdentityToken", "The web identity token is invalid") from None
        if (claims["iss"], claims["sub"]) not in self.trust.get(role, ()):
            raise _StsRefusal("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403)
        if duration > self.max_duration.get(role, 3600):
            raise _StsRefusal("ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set "
                              "for this role.")
        return claims

    def _answer(self, answer, claims):
        creds, user = answer["Credentials"], answer["AssumedRoleUser"]
        expiration = creds["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")
        xml = (f'<AssumeRoleWithWebIdentityResponse xmlns="{STS_NS}"><AssumeRoleWithWebIdentityResult>'
               f"<SubjectFromWebIdentityToken>{escape(claims['sub'])}</SubjectFromWebIdentityToken>"
               f"<Audience>{escape(claims['aud'])}</Audience>"
               f"<AssumedRoleUser><Arn>{escape(user['Arn'])}</Arn><AssumedRoleId>{escape(user['AssumedRoleId'])}"
               f"</AssumedRoleId></AssumedRoleUser><Credentials><AccessKeyId>{creds['AccessKeyId']}</AccessKeyId>"
               f"<SecretAccessKey>{creds['SecretAccessKey']}</SecretAccessKey>"
               f"<SessionToken>{creds['SessionToken']}</SessionToken><Expiration>{expiration}</Expiration>"
               f"</Credentials><Provider>{escape(claims['iss'])}</Provider></AssumeRoleWithWebIdentityResult>"
               f"<ResponseMetadata><RequestId>{secrets.token_hex(8)}</RequestId></ResponseMetadata>"
               "</AssumeRoleWithWebIdentityResponse>")
        return 200, {"Content-Type": "text/xml"}, xml.encode()

    def _error(self, refusal):
        xml = (f'<ErrorResponse xmlns="{STS_NS}"><Error><Type>Sender</Type><Code>{refusal.code}</Code>'
               f"<Message>{escape(refusal.message)}</Message></Error><RequestId>{secrets.token_hex(8)}</RequestId>"
               "</ErrorResponse>")
        return refusal.status, {"Content-Type": "text/xml"}, xml.encode()

    def _forward(self, method, path, headers, body):
        request = urllib.request.Request(self.sts.endpoint + path, data=body if method == "POST" else None,
                                         method=method,
                                         # The Host header stays the client's: it is part of what SigV4 signed.
                                         headers={name: value for name, value in headers.items()
                                                  if name.lower() not in ("content-length", "connection")})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, {"Content-Type": answer.headers.get("Content-Type", "text/xml")}, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, {"Content-Type": error.headers.get("Content-Type", "text/xml")}, error.read()


class _StsRefusal(Exception):
    def __init__(self, code, message, status=400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
