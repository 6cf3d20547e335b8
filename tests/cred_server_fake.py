"""A strict fake credential-vending server (mairu's API: HTTP_API_SPEC.md of sorah/mairu) with its own OAuth 2.0
endpoints, served on 127.0.0.1 in a thread.

What it checks, as a careful real server would:
- ``GET /oauth/authorize``: the configured client, ``response_type=code``, an S256 challenge (plain or none is
  refused), a loopback redirect URI on ``/oauth/callback`` (on the configured port, when there is one), a state;
- ``POST /oauth/token``: form-encoded; codes are single-use, short-lived, need the exact redirect URI and the
  verifier whose S256 is the challenge; the device grant answers ``authorization_pending`` until approved
  (``approve``), ``access_denied`` when denied, ``slow_down`` when polled faster than the interval, and
  ``expired_token`` after the code's lifetime; every token grant is counted;
- ``POST /oauth/device``: the configured client, scope;
- ``POST /assume-role``: the bearer on every call (401 for one it did not issue, or that expired or was revoked),
  a JSON body ``{"Role": …}``, 403 for a role not granted; credentials are minted through moto's AssumeRole (bob's
  keys) at the fake STS, so they authenticate there; a role in ``no_cache`` is answered with ``Mairu.NoCache``;
- ``GET /roles``: the bearer too; when ``roles_api`` is off it answers 404 (or the status ``roles_api_status``).
It is served by ``http.server`` (not WSGI), like the other fakes of bearer APIs.
"""

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse

CLIENT_ID = "imsa-test-client"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class Refusal(Exception):
    """An error answer: HTTP status and the JSON body."""

    def __init__(self, status, error, description=""):
        super().__init__(description or error)
        self.status, self.body = status, {"error": error, "error_description": description}


class FakeCredServer:
    """The fake's state and its server. *roles* maps the strings the server accepts as ``Role`` to the fake STS's
    role names (role-a…)."""

    def __init__(self, sts, roles, token_lifetime=3600, interval=1, advertised_interval=None, local_port=None,
                 roles_api=True, roles_api_status=404, no_cache=(), device_lifetime=600):
        self.sts, self.roles = sts, dict(roles)
        self.token_lifetime, self.interval, self.device_lifetime = token_lifetime, interval, device_lifetime
        self.advertised_interval = interval if advertised_interval is None else advertised_interval
        self.local_port, self.roles_api, self.roles_api_status = local_port, roles_api, roles_api_status
        self.no_cache = set(no_cache)
        self.lock = threading.Lock()
        self.codes, self.devices, self.tokens = {}, {}, {}
        self.deny_authorization = False
        # Where /assume-role sends its caller instead (a 303: urllib would follow it as a GET), to see that the bearer does not follow.
        self.redirect_to = None
        self.calls = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def definition(self, server_id="corp", grants=("code_grant",), **oauth):
        """The servers.d JSON of this server, in mairu's field names."""
        settings = {"client_id": CLIENT_ID, "scope": ["profile", "aws"]}
        for grant in grants:
            settings[grant] = {}
        if self.local_port and "code_grant" in grants:
            settings["code_grant"]["local_port"] = self.local_port
        settings.update(oauth)
        return {"url": self.url, "id": server_id, "oauth": settings}

    # --- what the person does, and what tests read ---

    def approve(self, user_code, state="approved"):
        """Approve (or with state="denied", deny) the device code shown as *user_code*."""
        with self.lock:
            for device in self.devices.values():
                if device["user_code"] == user_code:
                    device["state"] = state
                    return
        raise KeyError(user_code)

    def revoke_all(self):
        """Revoke every access token issued so far."""
        with self.lock:
            for token in self.tokens.values():
                token["revoked"] = True

    def count(self, name, **fields):
        """How many calls named *name* (and with *fields*) came."""
        with self.lock:
            return sum(1 for call in self.calls if call["name"] == name
                       and all(call.get(key) == value for key, value in fields.items()))

    def grants(self):
        """How many access tokens were issued."""
        with self.lock:
            return len(self.tokens)

    # --- OAuth ---

    def _redirect_ok(self, uri):
        parts = urllib.parse.urlsplit(uri)
        return (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost") and parts.port is not None
                and parts.path == "/oauth/callback" and not parts.query and not parts.fragment
                and (self.local_port is None or parts.port == self.local_port))

    def authorize(self, query):
        """The browser's GET: (status, Location)."""
        if query.get("client_id") != CLIENT_ID or not self._redirect_ok(query.get("redirect_uri", "")):
            return 400, None  # never redirect to an unknown client's or a foreign URI
        back = query["redirect_uri"] + "?"
        state = query.get("state", "")
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256" \
                or len(query.get("code_challenge", "")) != 43 or not state:
            return 302, back + urllib.parse.urlencode({"error": "invalid_request", "state": state})
        if self.deny_authorization:
            return 302, back + urllib.parse.urlencode({"error": "access_denied", "state": state})
        code = "code-" + secrets.token_urlsafe(32)
        self.codes[code] = {"redirect_uri": query["redirect_uri"], "challenge": query["code_challenge"],
                            "expires": time.time() + 300}
        return 302, back + urllib.parse.urlencode({"code": code, "state": state})

    def _issue(self):
        access = "at-" + secrets.token_urlsafe(40)
        self.tokens[access] = {"expires": time.time() + self.token_lifetime, "revoked": False}
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.token_lifetime,
                "refresh_token": "rt-" + secrets.token_urlsafe(40)}

    def token(self, form):
        if form.get("client_id") != CLIENT_ID:
            raise Refusal(401, "invalid_client")
        grant = form.get("grant_type")
        if grant == "authorization_code":
            code = self.codes.pop(form.get("code", ""), None)  # single use, even when what follows fails
            if code is None or code["expires"] <= time.time():
                raise Refusal(400, "invalid_grant", "unknown, spent or expired code")
            if form.get("redirect_uri") != code["redirect_uri"]:
                raise Refusal(400, "invalid_grant", "redirect_uri does not match the authorization")
            verifier = form.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(digest, code["challenge"]):
                raise Refusal(400, "invalid_grant", "the code verifier does not match the challenge")
            return self._issue()
        if grant == DEVICE_GRANT:
            device = self.devices.get(form.get("device_code", ""))
            if device is None:
                raise Refusal(400, "invalid_grant", "unknown or spent device code")
            now = time.time()
            if device["expires"] <= now:
                raise Refusal(400, "expired_token")
            too_fast = device["last_poll"] is not None and now - device["last_poll"] < self.interval
            device["last_poll"] = now
            if too_fast:
                device["slowed"] += 1
                raise Refusal(400, "slow_down")
            if device["state"] == "denied":
                del self.devices[form["device_code"]]
                raise Refusal(400, "access_denied")
            if device["state"] != "approved":
                raise Refusal(400, "authorization_pending")
            del self.devices[form["device_code"]]
            return self._issue()
        raise Refusal(400, "unsupported_grant_type")

    def device(self, form):
        if form.get("client_id") != CLIENT_ID:
            raise Refusal(401, "invalid_client")
        device_code = "dc-" + secrets.token_urlsafe(32)
        user_code = f"{secrets.randbelow(10000):04d}-{secrets.randbelow(10000):04d}"
        self.devices[device_code] = {"user_code": user_code, "state": "pending", "last_poll": None, "slowed": 0,
                                     "expires": time.time() + self.device_lifetime}
        return {"device_code": device_code, "user_code": user_code, "verification_uri": self.url + "device",
                "verification_uri_complete": f"{self.url}device?user_code={user_code}",
                "expires_in": self.device_lifetime, "interval": self.advertised_interval}

    # --- the API ---

    def _bearer(self, header):
        scheme, _, value = (header or "").partition(" ")
        token = self.tokens.get(value) if scheme.lower() == "bearer" else None
        if not token or token["revoked"] or token["expires"] <= time.time():
            raise Refusal(401, "unauthorized", "the token is unknown, expired or revoked")

    def assume_role(self, body):
        role = body.get("Role") if isinstance(body, dict) else None
        if set(body or {}) != {"Role"} or not isinstance(role, str):
            raise Refusal(400, "bad_request", 'the body must be {"Role": "…"}')
        if role not in self.roles:
            raise Refusal(403, "forbidden", f"role {role} is not granted")
        made = self._assume(self.roles[role])
        answer = {"Version": 1, "AccessKeyId": made["AccessKeyId"], "SecretAccessKey": made["SecretAccessKey"],
                  "SessionToken": made["SessionToken"],
                  "Expiration": made["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")}
        if role in self.no_cache:
            answer["Mairu"] = {"NoCache": True}
        return answer

    def _assume(self, sts_role):
        import boto3

        bob = self.sts.users["bob"]
        client = boto3.client("sts", endpoint_url=self.sts.endpoint, region_name="us-east-1",
                              aws_access_key_id=bob["aws_access_key_id"],
                              aws_secret_access_key=bob["aws_secret_access_key"])
        return client.assume_role(RoleArn=self.sts.roles[sts_role], RoleSessionName="alice-at-corp",
                                  DurationSeconds=3600)["Credentials"]

    def list_roles(self):
        if not self.roles_api:
            raise Refusal(self.roles_api_status, "not_found")
        return {"Roles": [{"Name": name, "Description": f"as {target}"} for name, target in sorted(self.roles.items())]}

    def _handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _dispatch(self, method):
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    with fake.lock:
                        route = (method, parts.path)
                        fake.calls.append({"name": parts.path, "method": method})
                        if route == ("GET", "/oauth/authorize"):
                            status, location = fake.authorize(dict(urllib.parse.parse_qsl(parts.query)))
                            return self._send(status, b"", {"Location": location} if location else {})
                        if route in (("POST", "/oauth/token"), ("POST", "/oauth/device")):
                            if self.headers.get_content_type() != "application/x-www-form-urlencoded":
                                raise Refusal(400, "invalid_request", "a form body is required")
                            form = dict(urllib.parse.parse_qsl(raw.decode()))
                            if parts.path == "/oauth/token":
                                fake.calls[-1]["grant_type"] = form.get("grant_type")
                                return self._json(200, fake.token(form))
                            return self._json(200, fake.device(form))
                        if route in (("POST", "/assume-role"), ("GET", "/roles")):
                            fake._bearer(self.headers.get("Authorization"))
                            if fake.redirect_to and method == "POST":
                                return self._send(303, b"", {"Location": fake.redirect_to})
                            if method == "GET":
                                return self._json(200, fake.list_roles())
                            if self.headers.get_content_type() != "application/json":
                                raise Refusal(400, "bad_request", "JSON is required")
                            try:
                                body = json.loads(raw)
                            except ValueError:
                                raise Refusal(400, "bad_request", "not JSON") from None
                            fake.calls[-1]["role"] = body.get("Role") if isinstance(body, dict) else None
                        else:
                            raise Refusal(404, "not_found")
                    # Minting goes to the fake STS: outside the lock, so a slow STS never blocks the OAuth endpoints.
                    return self._json(200, fake.assume_role(body))
                except Refusal as refusal:
                    return self._json(refusal.status, refusal.body)

            def do_GET(self):  # noqa: N802
                self._dispatch("GET")

            def do_POST(self):  # noqa: N802
                self._dispatch("POST")

            def _json(self, status, data):
                self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

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
