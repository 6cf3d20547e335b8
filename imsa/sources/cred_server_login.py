"""Logging in to a credential server: OAuth 2.0 as a public client, the two grants mairu's API names.

- The authorization code with PKCE (RFC 7636, S256) and ``state``: a browser, and a listener on 127.0.0.1 for its
  redirect (imsa/sources/oauth.py), on the server's ``code_grant.local_port`` when it names one.
- The device authorization grant (RFC 8628), where the server configures it, and where no browser can open or
  ``--no-browser`` asks for it: the verification URL and code go to stderr, never stdout, and the token endpoint is
  polled as the server asks (``authorization_pending``, ``slow_down``, the code's expiry).

The token goes to the service only. A refresh token in the answer is dropped: nothing on disk, nothing kept in
memory after the login; when the token ends, the next use logs in again.
"""

import datetime
import json
import logging
import secrets
import time
import urllib.parse

from imsa.credentials import format_time, utcnow
from imsa.errors import StsError
from imsa.sources import cred_server
from imsa.sources.oauth import (
    BROWSER_TIMEOUT, CALLBACK_PATH, CallbackListener, has_browser, open_in_browser, pkce_pair, say_on_stderr,
)

log = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628: poll every `interval` seconds (5 if the server names none), 5 s more after each slow_down.
DEFAULT_INTERVAL = 5
SLOW_DOWN_STEP = 5
# A token whose answer has no expires_in is held this long at most (a 401 from the server ends it sooner).
UNSTATED_LIFETIME = datetime.timedelta(hours=8)
# A token that ends sooner than this is useless to the service (it rotates role credentials ahead of their end).
MIN_LIFETIME = datetime.timedelta(minutes=1)


class LoginError(StsError):
    """The login did not give a token (denied, expired, refused): exit 4, like STS."""


def obtain(server, settings, say=say_on_stderr, no_browser=None, environ=None, now=utcnow):
    """An access token for *server* (a cred_server.ServerToken) from a new login: the device grant where the server
    has it and a browser cannot open here (or *no_browser*), else the server's default grant."""
    grant = server.default_grant
    if "device" in server.grants and (no_browser or not has_browser(environ)):
        grant = "device"
    if grant == "device":
        answer = device_login(server, settings, say)
    else:
        answer = browser_login(server, settings, say)
    token = token_from(answer, server, now)
    say(f"imsa: signed in to the credential server {server.id}; the token is valid until "
        f"{format_time(token.expiration)}")
    return token


def token_from(answer, server, now=utcnow):
    """The ServerToken of a token endpoint's *answer*; LoginError when it holds no usable bearer token."""
    access_token, token_type = answer.get("access_token"), answer.get("token_type")
    if not isinstance(access_token, str) or not access_token or not access_token.isprintable() or \
            len(access_token) > cred_server.MAX_TOKEN:
        raise LoginError(f"the credential server {server.id} answered the login without an access token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise LoginError(f"the credential server {server.id} gave a token of type {str(token_type)[:40]!r}, not "
                         "Bearer")
    lifetime = UNSTATED_LIFETIME
    expires_in = answer.get("expires_in")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            raise LoginError(f"the credential server {server.id} gave an expires_in that is not a number")
        lifetime = datetime.timedelta(seconds=int(expires_in))
    if lifetime < MIN_LIFETIME:
        raise LoginError(f"the credential server {server.id} gave a token that ends in {int(expires_in)} s")
    return cred_server.ServerToken(access_token, (now() + lifetime).replace(microsecond=0), server.id, server.url)


def post_form(server, url, fields, settings):
    """(HTTP status, JSON object answered) of a form POST to the OAuth endpoint *url* (the client secret, where the
    file has one, as HTTP Basic: RFC 6749 §2.3.1); LoginError when the server cannot be reached or answers no JSON."""
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if server.client_secret:
        pair = f"{urllib.parse.quote(server.client_id, safe='')}:{urllib.parse.quote(server.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        fields = dict(fields, client_id=server.client_id)
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST",
                                     headers=headers)
    try:
        with cred_server.opener(url, settings).open(request, timeout=cred_server.SERVER_TIMEOUT) as answer:
            status, raw = answer.status, answer.read(cred_server.MAX_ANSWER)
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read(cred_server.MAX_ANSWER)
        error.close()
    except (OSError, ValueError) as error:
        raise LoginError(f"cannot reach the credential server {server.id}'s sign-in at {url}: "
                         f"{getattr(error, 'reason', None) or error}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LoginError(f"the credential server {server.id}'s sign-in at {url} answered {status} without JSON")
    return status, data


def _oauth_error(data):
    """``CODE`` or ``CODE: description`` of an OAuth error answer, printable and cut."""
    code = data.get("error") if isinstance(data.get("error"), str) else "error"
    description = data.get("error_description")
    text = code + (f": {description}" if isinstance(description, str) and description else "")
    return "".join(c if c.isprintable() else " " for c in text)[:cred_server.MAX_SAID]


def exchange(server, fields, settings):
    """The token endpoint's answer to *fields*; LoginError naming the server's error otherwise."""
    status, data = post_form(server, server.token_endpoint, fields, settings)
    if status != 200:
        raise LoginError(f"the credential server {server.id} refused the sign-in: {_oauth_error(data)}")
    return data


def browser_login(server, settings, say, open_url=None, timeout=BROWSER_TIMEOUT):
    """The token endpoint's answer for the authorization code the browser brings back to 127.0.0.1."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(32)
    try:
        listener = CallbackListener(state, server.local_port)
    except OSError as error:
        raise LoginError(f"cannot listen on 127.0.0.1:{server.local_port} for the browser's redirect "
                         f"({error.strerror}); the server's code_grant.local_port is taken") from None
    with listener:
        host = "localhost" if server.use_localhost else "127.0.0.1"
        redirect_uri = f"http://{host}:{listener.port}{CALLBACK_PATH}"
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": server.client_id, "redirect_uri": redirect_uri, "state": state,
            "scope": " ".join(server.scope), "code_challenge": challenge, "code_challenge_method": "S256",
        })
        separator = "&" if urllib.parse.urlsplit(server.authorization_endpoint).query else "?"
        url = f"{server.authorization_endpoint}{separator}{query}"
        say(f"imsa: to sign in to the credential server {server.id}, a browser opens; if none does, open: {url}")
        open_in_browser(url, open_url)
        code, error = listener.wait(timeout)
    if error:
        raise LoginError(f"the sign-in to the credential server {server.id} was refused in the browser: {error}")
    if code is None:
        raise LoginError(f"no sign-in came back from the browser within {timeout} s")
    return exchange(server, {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                             "code_verifier": verifier}, settings)


def device_login(server, settings, say, sleep=time.sleep, clock=time.monotonic):
    """The token endpoint's answer once the person approved the device code shown on stderr; polled politely."""
    status, started = post_form(server, server.device_authorization_endpoint, {"scope": " ".join(server.scope)},
                                settings)
    if status != 200:
        raise LoginError(f"the credential server {server.id} refused the device sign-in: {_oauth_error(started)}")
    device_code, user_code = started.get("device_code"), started.get("user_code")
    uri = started.get("verification_uri")
    if not all(isinstance(value, str) and value and value.isprintable() for value in (device_code, user_code, uri)):
        raise LoginError(f"the credential server {server.id} answered the device sign-in without device_code, "
                         "user_code and verification_uri")
    say(f"imsa: to sign in to the credential server {server.id}, open {uri} and enter the code {user_code}")
    complete = started.get("verification_uri_complete")
    if isinstance(complete, str) and complete.isprintable():
        say(f"imsa: (or open {complete})")
    interval = started.get("interval")
    interval = interval if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0 \
        else DEFAULT_INTERVAL
    lifetime = started.get("expires_in")
    lifetime = lifetime if isinstance(lifetime, int) and not isinstance(lifetime, bool) and lifetime > 0 \
        else BROWSER_TIMEOUT
    deadline = clock() + lifetime
    expired = LoginError(f"the sign-in code {user_code} expired before it was approved; run the command again to get "
                         "a new one")
    while clock() < deadline:
        sleep(interval)
        status, data = post_form(server, server.token_endpoint, {"grant_type": DEVICE_GRANT,
                                                                 "device_code": device_code}, settings)
        if status == 200:
            return data
        error = data.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        if error == "expired_token":
            raise expired
        if error == "access_denied":
            raise LoginError(f"the sign-in to the credential server {server.id} was denied")
        raise LoginError(f"the credential server {server.id} refused the sign-in: {_oauth_error(data)}")
    raise expired
