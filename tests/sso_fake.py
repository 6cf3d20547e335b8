"""A strict fake of IAM Identity Center's two JSON APIs (sso-oidc and the portal), served on 127.0.0.1 in a thread.

moto has neither service. The fake checks what the real ones check (botocore's models ``sso-oidc/2019-06-10`` and
``sso/2019-06-10``; ../shared/SOURCES.md §1):
- the client secret (and that the registration has not expired) on every sso-oidc call;
- device codes: single-use, expiring, ``AuthorizationPendingException`` until approved (``approve``), an approval
  that can be denied (``deny``), ``SlowDownException`` when polled faster than the interval it gave;
- ``/authorize``: a registered client, S256 only, a redirect URI that is registered (a loopback one without a
  port matches any port, RFC 8252 §7.3); the code is single-use, short-lived, and needs the exact redirect URI and
  the verifier whose S256 is the challenge;
- refresh tokens rotate: each is single-use and belongs to its client;
- the portal: 401 ``UnauthorizedException`` for a bearer it did not issue, that expired or was revoked; 403 for a
  role not assigned; ``TooManyRequestsException`` while throttled; pagination of both listings.
Role credentials are minted through moto's AssumeRole (bob's keys) at the fake STS, so they authenticate there.

It is served by ``http.server``, not a WSGI server: waitress and Werkzeug drop request headers whose names contain
``_``, and the portal's bearer arrives in ``x-amz-sso_bearer_token``.
"""

import base64
import datetime
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse

# Two accounts, three roles: the fake STS's roles named by the portal as (account, permission set).
ASSIGNMENTS = {
    ("111111111111", "Developer"): "role-a",
    ("111111111111", "ReadOnly"): "role-b",
    ("222222222222", "Admin"): "role-c",
}
ACCOUNT_NAMES = {"111111111111": "dev", "222222222222": "prod"}
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class FakeSso:
    """The fake's state and its server. Tests approve device codes, revoke tokens and read the calls it got."""

    def __init__(self, sts, region="us-east-1", token_lifetime=8 * 3600, device_lifetime=600, interval=1,
                 advertised_interval=None, role_lifetime=None, registration_lifetime=90 * 86400, refresh_delay=0):
        self.sts, self.region = sts, region
        self.token_lifetime, self.device_lifetime = token_lifetime, device_lifetime
        self.interval = interval
        self.advertised_interval = interval if advertised_interval is None else advertised_interval
        self.role_lifetime, self.registration_lifetime = role_lifetime, registration_lifetime
        self.refresh_delay = refresh_delay
        self.lock = threading.Lock()
        self.clients, self.devices, self.codes = {}, {}, {}
        self.tokens, self.refresh_tokens = {}, {}
        self.deny_authorization = False
        self.throttle = 0
        self.calls = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # --- what the person at the browser does ---

    def approve(self, user_code):
        """Approve the device code shown as *user_code*."""
        with self.lock:
            for device in self.devices.values():
                if device["user_code"] == user_code:
                    device["state"] = "approved"
                    return
        raise KeyError(f"no device code with user code {user_code}")

    def deny(self, user_code):
        """Deny the device code shown as *user_code*."""
        with self.lock:
            for device in self.devices.values():
                if device["user_code"] == user_code:
                    device["state"] = "denied"
                    return
        raise KeyError(user_code)

    def revoke_all(self):
        """Revoke every access token issued so far (a sign-out, or an administrator's revocation)."""
        with self.lock:
            for token in self.tokens.values():
                token["revoked"] = True

    def signed_in(self, scopes=("sso:account:access",)):
        """What an earlier ``aws sso login`` left: a registration and a token issued to it (clientId, clientSecret,
        clientSecretExpiresAt, accessToken, expiresIn, refreshToken when there are scopes)."""
        with self.lock:
            registration = self.register_client({"clientName": "botocore-client-corp", "clientType": "public",
                                                 "scopes": list(scopes)})
            return dict(registration, **self._issue(registration["clientId"], list(scopes)))

    # --- what tests read ---

    def count(self, name, **fields):
        """How many calls named *name* (and with *fields*) came."""
        with self.lock:
            return sum(1 for call in self.calls if call["name"] == name
                       and all(call.get(key) == value for key, value in fields.items()))

    def token_valid(self, access_token):
        """True when the portal would accept *access_token* now."""
        with self.lock:
            return self._bearer_ok(access_token)

    def refresh_valid(self, refresh_token):
        """True when *refresh_token* could still be spent."""
        with self.lock:
            return refresh_token in self.refresh_tokens

    # --- the APIs ---

    def _bearer_ok(self, value):
        token = self.tokens.get(value or "")
        return bool(token and not token["revoked"] and token["expires"] > time.time())

    def _client(self, body):
        client = self.clients.get(body.get("clientId"))
        if client is None or not secrets.compare_digest(client["secret"], str(body.get("clientSecret", ""))):
            raise Refusal(401, "InvalidClientException", "invalid client")
        if client["expires"] <= time.time():
            raise Refusal(401, "InvalidClientException", "the client registration expired")
        return client

    def _issue(self, client_id, scopes):
        access, refresh = "at-" + secrets.token_urlsafe(48), "rt-" + secrets.token_urlsafe(48)
        self.tokens[access] = {"expires": time.time() + self.token_lifetime, "revoked": False, "client": client_id}
        answer = {"accessToken": access, "tokenType": "Bearer", "expiresIn": self.token_lifetime}
        if scopes:  # like the real service: a refresh token only for a registration with scopes
            self.refresh_tokens[refresh] = {"client": client_id, "scopes": scopes}
            answer["refreshToken"] = refresh
        return answer

    def register_client(self, body):
        if body.get("clientType") != "public" or not body.get("clientName"):
            raise Refusal(400, "InvalidRequestException", "clientName and clientType public are required")
        client_id, secret = "client-" + secrets.token_hex(8), "secret-" + secrets.token_urlsafe(32)
        expires = int(time.time() + self.registration_lifetime)
        self.clients[client_id] = {"secret": secret, "expires": expires, "scopes": body.get("scopes") or [],
                                   "grants": body.get("grantTypes") or [DEVICE_GRANT, "refresh_token"],
                                   "redirects": body.get("redirectUris") or []}
        return {"clientId": client_id, "clientSecret": secret, "clientIdIssuedAt": int(time.time()),
                "clientSecretExpiresAt": expires}

    def start_device_authorization(self, body):
        client = self._client(body)
        if DEVICE_GRANT not in client["grants"]:
            raise Refusal(400, "UnauthorizedClientException", "the client may not use the device grant")
        if not body.get("startUrl"):
            raise Refusal(400, "InvalidRequestException", "startUrl is required")
        device_code = "dc-" + secrets.token_urlsafe(32)
        user_code = f"{secrets.randbelow(10000):04d}-{secrets.randbelow(10000):04d}"
        self.devices[device_code] = {"client": body["clientId"], "user_code": user_code, "state": "pending",
                                     "expires": time.time() + self.device_lifetime, "last_poll": None}
        uri = f"{self.endpoint}/device"
        return {"deviceCode": device_code, "userCode": user_code, "verificationUri": uri,
                "verificationUriComplete": f"{uri}?user_code={user_code}", "expiresIn": self.device_lifetime,
                "interval": self.advertised_interval}

    def create_token(self, body):
        client = self._client(body)
        grant = body.get("grantType")
        if grant not in client["grants"]:
            raise Refusal(400, "UnauthorizedClientException", f"the client may not use {grant}")
        if grant == DEVICE_GRANT:
            device = self.devices.get(body.get("deviceCode"))
            if device is None or device["client"] != body["clientId"]:
                raise Refusal(400, "InvalidGrantException", "unknown or spent device code")
            now = time.time()
            if device["expires"] <= now:
                del self.devices[body["deviceCode"]]
                raise Refusal(400, "ExpiredTokenException", "the device code expired")
            too_fast = device["last_poll"] is not None and now - device["last_poll"] < self.interval
            device["last_poll"] = now
            if too_fast:
                raise Refusal(400, "SlowDownException", "slow down")
            if device["state"] == "denied":
                del self.devices[body["deviceCode"]]
                raise Refusal(400, "AccessDeniedException", "the user denied the request")
            if device["state"] != "approved":
                raise Refusal(400, "AuthorizationPendingException", "authorization pending")
            del self.devices[body["deviceCode"]]  # single use
            return self._issue(body["clientId"], client["scopes"])
        if grant == "authorization_code":
            code = self.codes.pop(body.get("code") or "", None)  # single use, even when what follows fails
            if code is None or code["client"] != body["clientId"] or code["expires"] <= time.time():
                raise Refusal(400, "InvalidGrantException", "unknown, spent or expired code")
            if body.get("redirectUri") != code["redirect_uri"]:
                raise Refusal(400, "InvalidGrantException", "redirect_uri does not match the authorization")
            verifier = str(body.get("codeVerifier") or "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(digest, code["challenge"]):
                raise Refusal(400, "InvalidGrantException", "the code verifier does not match the challenge")
            return self._issue(body["clientId"], client["scopes"])
        if grant == "refresh_token":
            if self.refresh_delay:
                self.lock.release()  # let a concurrent refresh reach the same check meanwhile
                try:
                    time.sleep(self.refresh_delay)
                finally:
                    self.lock.acquire()
            refresh = self.refresh_tokens.pop(body.get("refreshToken") or "", None)  # rotated: single use
            if refresh is None or refresh["client"] != body["clientId"]:
                raise Refusal(400, "InvalidGrantException", "unknown or spent refresh token")
            return self._issue(body["clientId"], refresh["scopes"])
        raise Refusal(400, "UnsupportedGrantTypeException", f"grant type {grant!r}")

    def authorize(self, query):
        """The browser's GET /authorize: (status, Location) — a redirect back with a code, or an error page."""
        client = self.clients.get(query.get("client_id", ""))
        redirect_uri = query.get("redirect_uri", "")
        if client is None or "authorization_code" not in client["grants"]:
            return 400, None
        if not any(_redirect_matches(registered, redirect_uri) for registered in client["redirects"]):
            return 400, None  # never redirect to an unregistered URI
        back = redirect_uri + "?"
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256" \
                or not query.get("code_challenge"):
            return 302, back + urllib.parse.urlencode({"error": "invalid_request", "state": query.get("state", "")})
        if self.deny_authorization:
            return 302, back + urllib.parse.urlencode({"error": "access_denied", "state": query.get("state", "")})
        code = "code-" + secrets.token_urlsafe(32)
        self.codes[code] = {"client": query["client_id"], "redirect_uri": redirect_uri,
                            "challenge": query["code_challenge"], "expires": time.time() + 300}
        return 302, back + urllib.parse.urlencode({"code": code, "state": query.get("state", "")})

    def portal(self, path, query, bearer):
        if not self._bearer_ok(bearer):
            raise Refusal(401, "UnauthorizedException", "Session token not found or invalid")
        if self.throttle > 0:
            self.throttle -= 1
            raise Refusal(429, "TooManyRequestsException", "rate exceeded")
        if path == "/assignment/accounts":
            accounts = [{"accountId": account, "accountName": name, "emailAddress": f"{name}@example.com"}
                        for account, name in sorted(ACCOUNT_NAMES.items())]
            return _page(accounts, "accountList", query)
        if path == "/assignment/roles":
            roles = [{"roleName": role, "accountId": account} for account, role in sorted(ASSIGNMENTS)
                     if account == query.get("account_id")]
            return _page(roles, "roleList", query)
        if path == "/federation/credentials":
            role = ASSIGNMENTS.get((query.get("account_id"), query.get("role_name")))
            if role is None:
                raise Refusal(403, "ForbiddenException", "No access")
            return {"roleCredentials": self._role_credentials(role)}
        raise Refusal(404, "ResourceNotFoundException", "no such route")

    def _role_credentials(self, role):
        import boto3

        bob = self.sts.users["bob"]
        client = boto3.client("sts", endpoint_url=self.sts.endpoint, region_name="us-east-1",
                              aws_access_key_id=bob["aws_access_key_id"],
                              aws_secret_access_key=bob["aws_secret_access_key"])
        made = client.assume_role(RoleArn=self.sts.roles[role], RoleSessionName="alice@example.com",
                                  DurationSeconds=3600)["Credentials"]
        expiration = made["Expiration"]
        if self.role_lifetime is not None:
            expiration = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=self.role_lifetime)
        return {"accessKeyId": made["AccessKeyId"], "secretAccessKey": made["SecretAccessKey"],
                "sessionToken": made["SessionToken"], "expiration": int(expiration.timestamp()) * 1000}

    def _handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _dispatch(self, method):
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    with fake.lock:
                        if method == "GET" and parts.path == "/authorize":
                            fake.calls.append({"name": "authorize"})
                            status, location = fake.authorize(query)
                            return self._send(status, b"", {"Location": location} if location else {})
                        if method == "POST" and parts.path in ROUTES:
                            try:
                                body = json.loads(raw or b"{}")
                            except ValueError:
                                raise Refusal(400, "InvalidRequestException", "not JSON") from None
                            name = ROUTES[parts.path]
                            fake.calls.append({"name": name, "grantType": body.get("grantType")})
                            return self._json(200, getattr(fake, name)(body))
                        if method == "GET" and parts.path.startswith(("/assignment/", "/federation/")):
                            fake.calls.append({"name": parts.path, **query})
                            bearer = self.headers.get("x-amz-sso_bearer_token")
                            return self._json(200, fake.portal(parts.path, query, bearer))
                    raise Refusal(404, "ResourceNotFoundException", "no such route")
                except Refusal as refusal:
                    body = {"error": refusal.code, "error_description": refusal.message, "message": refusal.message}
                    return self._json(refusal.status, body, {"x-amzn-ErrorType": refusal.code})

            def do_GET(self):  # noqa: N802
                self._dispatch("GET")

            def do_POST(self):  # noqa: N802
                self._dispatch("POST")

            def _json(self, status, data, headers=None):
                self._send(status, json.dumps(data).encode(), dict(headers or {}, **{"Content-Type": "application/json"}))

            def _send(self, status, body, headers):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler


ROUTES = {"/client/register": "register_client", "/device_authorization": "start_device_authorization",
          "/token": "create_token"}


class Refusal(Exception):
    """An error answer: HTTP status, the exception name botocore maps, and its message."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _redirect_matches(registered, used):
    """A registered redirect URI matches itself; a loopback one without a port matches it on any port."""
    if registered == used:
        return True
    mine, theirs = urllib.parse.urlsplit(registered), urllib.parse.urlsplit(used)
    return (mine.scheme == theirs.scheme == "http" and mine.hostname == theirs.hostname == "127.0.0.1"
            and mine.port is None and mine.path == theirs.path and not theirs.query and theirs.port is not None)


def _page(items, key, query):
    """One page of *items* by the portal's max_result / next_token."""
    size = int(query.get("max_result") or 1)  # one item a page unless asked: every listing is paginated
    start = int(query.get("next_token") or 0)
    page = {key: items[start:start + size]}
    if start + size < len(items):
        page["nextToken"] = str(start + size)
    return page
