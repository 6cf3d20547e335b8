"""Logging in to IAM Identity Center, and the token cache imsa shares with the AWS CLI and the SDKs.

Two logins, as ``aws sso login`` has them: the authorization code with PKCE (a browser, and a listener on
127.0.0.1 for its redirect), and the device authorization (``--no-browser``, and wherever there is no display):
the verification URL and code go to stderr, never stdout, and the token endpoint is polled as the service asks
(``authorization_pending``, ``slow_down``, the code's expiry). Client registrations are cached and reused until
they expire.

The token is kept where the AWS CLI keeps it, in its format: ``~/.aws/sso/cache/<sha1 of the sso-session name, or
of the start URL>.json``, 0600, written atomically; read from there when ``aws sso login`` made it, and refreshed
with its refresh token under a lock, the file read again once the lock is held, so that two imsa commands never
spend the same single-use refresh token.
"""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
import urllib.parse

from imsa.credentials import format_time, parse_time, utcnow
from imsa.errors import ConfigError, StsError
from imsa.sources import sso
# The browser login's pieces are shared with the other OAuth sources (imsa/sources/oauth.py).
from imsa.sources.oauth import (  # noqa: F401 (say_on_stderr, has_browser, pkce_pair: named here for callers)
    BROWSER_TIMEOUT, CALLBACK_PATH, CallbackListener, has_browser, open_in_browser, pkce_pair, say_on_stderr,
)

log = logging.getLogger(__name__)

# botocore refreshes a cached token this long before it ends; imsa does the same, so both use it alike.
REFRESH_WINDOW = datetime.timedelta(minutes=15)
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628: poll every `interval` seconds (5 if the service names none), 5 s more after each slow_down.
DEFAULT_INTERVAL = 5
SLOW_DOWN_STEP = 5
# What aws-cli registers: a loopback redirect without a port, which the service matches for any port (RFC 8252).
REGISTERED_REDIRECT = "http://127.0.0.1" + CALLBACK_PATH
PKCE_GRANTS = ("authorization_code", "refresh_token")
# The cache lock is held for one refresh (bounded portal calls); a writer that waits longer gives up.
LOCK_TIMEOUT = 60
ENDPOINT_VARIABLES = {"sso-oidc": "AWS_ENDPOINT_URL_SSO_OIDC", "sso": "AWS_ENDPOINT_URL_SSO"}
IGNORE_ENDPOINTS = "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"


class LoginError(StsError):
    """The login did not give a token (denied, expired, refused): exit 4, like STS."""


def endpoint(service, environ=None):
    """The endpoint URL of *service* (``sso`` or ``sso-oidc``) as botocore configures it from the environment:
    AWS_ENDPOINT_URL_SSO(_OIDC), else AWS_ENDPOINT_URL; None for the region's own."""
    from imsa.sts_settings import url_problem

    environ = os.environ if environ is None else environ
    if environ.get(IGNORE_ENDPOINTS, "").lower() == "true":
        return None
    for name in (ENDPOINT_VARIABLES[service], "AWS_ENDPOINT_URL"):
        value = environ.get(name)
        if value:
            problem = url_problem(value)
            if problem:
                raise ConfigError(f"{name} {problem}")
            return value
    return None


# --- the shared cache ---


def cache_dir():
    """``~/.aws/sso/cache``, from HOME as it is now (botocore fixes it when it is imported)."""
    return os.path.join(os.path.expanduser("~"), ".aws", "sso", "cache")


def token_path(source):
    """The token's file, named as botocore names it: sha1 of the sso-session's name, or of the start URL."""
    return os.path.join(cache_dir(), hashlib.sha1(source.cache_key.encode("utf-8")).hexdigest() + ".json")


def registration_path(source, flow):
    """The client registration's file for *flow* (``device`` or ``pkce``): imsa's own, beside the tokens."""
    key = json.dumps({"tool": "imsa", "flow": flow, "startUrl": source.start_url, "region": source.region,
                      "scopes": list(source.scopes), "session_name": source.session_name}, sort_keys=True)
    return os.path.join(cache_dir(), hashlib.sha1(key.encode("utf-8")).hexdigest() + ".json")


def read_json(path):
    """The JSON object in the cache file *path*, or None when it is missing or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path, data):
    """Write *data* to *path* as botocore's JSONFileCache does: a 0600 temporary file, fsync, then rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".imsa-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path, timeout=LOCK_TIMEOUT):
    """Hold an exclusive lock for the cache file *path* (on ``PATH.lock``: the file itself is replaced on write)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise LoginError(f"{path}: another process holds its lock for more than {timeout} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _expiry(value):
    """A cache file's timestamp (``…Z``, ``…+00:00``, or older aws-cli's ``…UTC``) as an aware datetime, or None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("UTC"):
        text = text[:-3].strip() + "Z"
    try:
        return parse_time(text)
    except ValueError:
        return None


def token_from(data, source, endpoint_url, must_last_until):
    """The SsoToken in cache record *data* if it is for *source*'s start URL and lasts past *must_last_until*."""
    if not data or data.get("startUrl") not in (None, source.start_url):
        return None
    access_token, expiration = data.get("accessToken"), _expiry(data.get("expiresAt"))
    if not isinstance(access_token, str) or not access_token or expiration is None or expiration <= must_last_until:
        return None
    return sso.SsoToken(access_token, expiration, data.get("region") or source.region, source.start_url,
                        endpoint_url)


def cached_token(source, now=None, environ=None):
    """The token cached for *source* with more than REFRESH_WINDOW left, or None (always for a source that does
    not share the AWS CLI's cache)."""
    if not source.shared:
        return None
    return token_from(read_json(token_path(source)), source, endpoint("sso", environ),
                      (now or utcnow()) + REFRESH_WINDOW)


def _refreshable(data, now):
    """True when the cache record *data* holds what a refresh needs, with a registration still valid."""
    if not data or not all(isinstance(data.get(key), str) and data.get(key)
                           for key in ("refreshToken", "clientId", "clientSecret", "registrationExpiresAt")):
        return False
    ends = _expiry(data["registrationExpiresAt"])
    return ends is not None and ends > now


def record(source, answer, client_id, client_secret, registration_expires, now):
    """The cache record botocore reads (and refreshes from) for CreateToken's *answer*."""
    data = {
        "startUrl": source.start_url,
        "region": source.region,
        "accessToken": answer["accessToken"],
        "expiresAt": format_time(now + datetime.timedelta(seconds=int(answer["expiresIn"]))),
        "clientId": client_id,
        "clientSecret": client_secret,
        "registrationExpiresAt": registration_expires,
    }
    if answer.get("refreshToken"):
        data["refreshToken"] = answer["refreshToken"]
    return data


def oidc_failure(error, action):
    """A LoginError with one readable line for a failed sso-oidc call."""
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code", "Error")
        message = (details.get("Message") or error.response.get("error_description") or "").strip()
        return LoginError(f"IAM Identity Center {action} failed: {code}" + (f": {message}" if message else ""))
    return LoginError(f"IAM Identity Center {action} failed: {error}")


def refresh(source, data, oidc, now):
    """A new cache record from CreateToken with the refresh token in *data* (the token and the refresh token both
    change: the old refresh token is spent)."""
    import botocore.exceptions

    log.info("refreshing the SSO token of %s", source.start_url)
    try:
        answer = oidc.create_token(grantType="refresh_token", clientId=data["clientId"],
                                   clientSecret=data["clientSecret"], refreshToken=data["refreshToken"])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise oidc_failure(error, "CreateToken (refresh)") from error
    return record(source, answer, data["clientId"], data["clientSecret"], data["registrationExpiresAt"], now)


def obtain(source, settings, say=say_on_stderr, no_browser=None, force=False, environ=None, now=utcnow):
    """*source*'s access token: the shared cache's while it has more than REFRESH_WINDOW left, else refreshed,
    else from a login (always, with *force*). A token imsa gets is written to the shared cache. A source that does
    not share it signs in every time it is asked: only the service keeps its token, and its refresh token is kept
    nowhere."""
    oidc_url, portal_url = endpoint("sso-oidc", environ), endpoint("sso", environ)
    path = token_path(source)
    oidc = None
    if not force and source.shared:
        with locked(path):
            data = read_json(path)
            token = token_from(data, source, portal_url, now() + REFRESH_WINDOW)
            if token is not None:
                return token
            if _refreshable(data, now()):
                oidc = sso.client("sso-oidc", source.region, oidc_url, settings)
                try:
                    data = refresh(source, data, oidc, now())
                except LoginError as error:
                    log.info("%s; a login is needed", error)
                else:
                    write_json(path, data)
                    return token_from(data, source, portal_url, now())
    oidc = oidc or sso.client("sso-oidc", source.region, oidc_url, settings)
    data = login(source, oidc, say, no_browser, environ, now)
    if source.shared:
        with locked(path):
            write_json(path, data)
    token = token_from(data, source, portal_url, now())
    say(f"imsa: signed in to {source.start_url}; the SSO token is valid until {format_time(token.expiration)}")
    return token


# --- logins ---


def login(source, oidc, say=say_on_stderr, no_browser=None, environ=None, now=utcnow):
    """A new cache record from a login: in a browser (PKCE) where one can open, else with a device code."""
    flow = "device" if no_browser or not has_browser(environ) else "pkce"
    client_id, client_secret, registration_expires = register(source, oidc, flow, now)
    if flow == "device":
        answer = device_login(source, oidc, client_id, client_secret, say)
    else:
        answer = browser_login(source, oidc, client_id, client_secret, say)
    if not isinstance(answer.get("accessToken"), str) or not answer.get("expiresIn"):
        raise LoginError("IAM Identity Center CreateToken answered without a token")
    return record(source, answer, client_id, client_secret, registration_expires, now())


def register(source, oidc, flow, now=utcnow):
    """(client id, client secret, when the registration ends) of a registration for *flow*: the cached one while it
    has more than REFRESH_WINDOW left, else a new RegisterClient, cached."""
    import botocore.exceptions

    path = registration_path(source, flow)
    cached = read_json(path)
    if cached and isinstance(cached.get("clientId"), str) and isinstance(cached.get("clientSecret"), str):
        ends = _expiry(cached.get("expiresAt"))
        if ends is not None and ends > now() + REFRESH_WINDOW:
            return cached["clientId"], cached["clientSecret"], cached["expiresAt"]
    request = {"clientName": f"imsa-{source.session_name or 'sso'}"[:64], "clientType": "public"}
    if source.scopes:
        request["scopes"] = list(source.scopes)
    if flow == "pkce":
        request.update(grantTypes=list(PKCE_GRANTS), redirectUris=[REGISTERED_REDIRECT], issuerUrl=source.start_url)
    try:
        answer = oidc.register_client(**request)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise oidc_failure(error, "RegisterClient") from error
    ends = format_time(datetime.datetime.fromtimestamp(int(answer["clientSecretExpiresAt"]), datetime.timezone.utc))
    write_json(path, {"clientId": answer["clientId"], "clientSecret": answer["clientSecret"], "expiresAt": ends,
                      "scopes": list(source.scopes)})
    return answer["clientId"], answer["clientSecret"], ends


def device_login(source, oidc, client_id, client_secret, say, sleep=time.sleep, clock=time.monotonic):
    """CreateToken's answer once the person approved the device code shown on stderr; polled politely."""
    import botocore.exceptions

    try:
        started = oidc.start_device_authorization(clientId=client_id, clientSecret=client_secret,
                                                  startUrl=source.start_url)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise oidc_failure(error, "StartDeviceAuthorization") from error
    say(f"imsa: to sign in to {source.start_url}, open {started['verificationUri']} and enter the code "
        f"{started['userCode']}")
    if started.get("verificationUriComplete"):
        say(f"imsa: (or open {started['verificationUriComplete']})")
    interval = started.get("interval")
    interval = DEFAULT_INTERVAL if interval is None else int(interval)
    deadline = clock() + int(started.get("expiresIn") or BROWSER_TIMEOUT)
    expired = LoginError(f"the sign-in code {started['userCode']} expired before it was approved; run the command "
                         "again to get a new one")
    while clock() < deadline:
        sleep(interval)
        try:
            return oidc.create_token(grantType=DEVICE_GRANT, deviceCode=started["deviceCode"], clientId=client_id,
                                     clientSecret=client_secret)
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code == "AuthorizationPendingException":
                continue
            if code == "SlowDownException":
                interval += SLOW_DOWN_STEP
                continue
            if code == "ExpiredTokenException":
                raise expired from None
            if code == "AccessDeniedException":
                raise LoginError(f"the sign-in to {source.start_url} was denied") from None
            raise oidc_failure(error, "CreateToken") from error
        except botocore.exceptions.BotoCoreError as error:
            raise oidc_failure(error, "CreateToken") from error
    raise expired


def browser_login(source, oidc, client_id, client_secret, say, open_url=None, timeout=BROWSER_TIMEOUT):
    """CreateToken's answer for the authorization code the browser brings back to a listener on 127.0.0.1."""
    import botocore.exceptions

    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(32)
    with CallbackListener(state) as listener:
        redirect_uri = f"http://127.0.0.1:{listener.port}{CALLBACK_PATH}"
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state,
            "code_challenge_method": "S256", "scopes": " ".join(source.scopes), "code_challenge": challenge,
        })
        url = f"{oidc.meta.endpoint_url.rstrip('/')}/authorize?{query}"
        say(f"imsa: to sign in to {source.start_url}, a browser opens; if none does, open: {url}")
        open_in_browser(url, open_url)
        code, error = listener.wait(timeout)
    if error:
        raise LoginError(f"the sign-in to {source.start_url} was refused in the browser: {error}")
    if code is None:
        raise LoginError(f"no sign-in came back from the browser within {timeout} s")
    try:
        return oidc.create_token(grantType="authorization_code", clientId=client_id, clientSecret=client_secret,
                                 code=code, codeVerifier=verifier, redirectUri=redirect_uri)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise oidc_failure(error, "CreateToken") from error
