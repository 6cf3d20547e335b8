"""Signing in at an OIDC provider for web identity: discovery, the authorization code with PKCE in a browser, the
ID token's checks, and the roles API with its picker.

The flow is written out here and only the signature check is delegated (PyJWT, on ``cryptography``):
- discovery: ``GET`` the configured document; its ``issuer`` must be the configured issuer (OpenID Connect
  Discovery §4.3), so that a document cannot point the checks at another issuer;
- the browser goes to ``authorization_endpoint`` with ``state``, ``nonce`` and an S256 PKCE challenge; the redirect
  comes back to a listener on 127.0.0.1 (imsa/sources/loopback.py) and is taken only with this login's state;
- the code is exchanged at ``token_endpoint`` (a public client: ``client_id``, ``code_verifier``, the exact
  ``redirect_uri``);
- the ID token must be signed by a key of the provider's JWKS (``kid`` matched, the JWKS fetched again once for an
  unknown one), with an algorithm of ALGORITHMS only (never ``none`` or an HMAC a public key could forge), and name
  the issuer, the client as its audience, a future ``exp`` and this login's ``nonce``.

STS checks the token again before it mints anything; the checks here keep a token that is not the person's (a
replayed or injected one) out of the service, and make each failure one line that says what was wrong.
"""

import json
import logging
import secrets
import urllib.error
import urllib.parse
import urllib.request

from imsa.credentials import format_time
from imsa.errors import StsError, UsageError
from imsa.sources import oidc
from imsa.sources.oauth import BROWSER_TIMEOUT, CallbackListener, open_in_browser, pkce_pair, say_on_stderr

log = logging.getLogger(__name__)

# Asymmetric algorithms only: with an HMAC algorithm allowed, the provider's public key would verify a forgery.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384")
# How long one request to the provider may take.
HTTP_TIMEOUT = 10
# Clock skew allowed on exp/iat/nbf between this machine and the provider.
LEEWAY = 60
# Answers larger than this are not a discovery document, a JWKS, a token answer or a list of roles.
MAX_ANSWER = 1024 * 1024
# The roles a picker shows at most (a roles API answering more is cut, and says so).
MAX_ROLES = 500

# ID tokens this process got from a sign-in, by source fingerprint: a role picked at sign-in and the session
# handed to the service then come from one login. In memory only, for this command.
_fresh = {}


class LoginError(StsError):
    """The sign-in did not give a usable ID token (refused, expired, wrongly signed): exit 4, like STS."""


def _get_json(url, what, headers=None, data=None):
    """The JSON object at *url* (POST *data* when given); LoginError naming *what* when it cannot be had."""
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}, Accept="application/json"))
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:
            body = answer.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as error:
        detail = ""
        try:
            problem = json.loads(error.read(MAX_ANSWER))
            if isinstance(problem, dict) and problem.get("error"):
                detail = f": {str(problem['error'])[:100]}"
                if problem.get("error_description"):
                    detail += f": {str(problem['error_description'])[:200]}"
        except (ValueError, OSError):
            pass
        raise LoginError(f"{what} failed: HTTP {error.code}{detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise LoginError(f"{what} failed: cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from None
    if len(body) > MAX_ANSWER:
        raise LoginError(f"{what} failed: the answer is larger than {MAX_ANSWER // 1024} KiB")
    try:
        value = json.loads(body)
    except ValueError:
        raise LoginError(f"{what} failed: the answer is not JSON") from None
    if not isinstance(value, dict):
        raise LoginError(f"{what} failed: the answer is not a JSON object")
    return value


def discover(source):
    """The provider's discovery document, checked: its issuer is the configured one and its endpoints are URLs an
    ID token may travel to."""
    document = _get_json(source.discovery_url, f"the OIDC discovery at {source.discovery_url}")
    if document.get("issuer") != source.issuer:
        raise LoginError(f"the OIDC discovery at {source.discovery_url} names the issuer "
                         f"{str(document.get('issuer'))[:200]!r}, not {source.issuer!r}")
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        problem = oidc.url_problem(document.get(name))
        if problem:
            raise LoginError(f"the OIDC discovery at {source.discovery_url}: {name} {problem}")
    return document


class Keys:
    """The provider's signing keys (its JWKS), fetched when first needed and once more for a ``kid`` not in them
    (a provider rotating its keys)."""

    def __init__(self, jwks_uri):
        self.jwks_uri = jwks_uri
        self._keys = None

    def _fetch(self):
        import jwt

        data = _get_json(self.jwks_uri, f"fetching the provider's keys at {self.jwks_uri}")
        keys = {}
        for entry in data.get("keys") or ():
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK.from_dict(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue  # a key of a type or curve this library does not know cannot sign what we accept
            keys[entry.get("kid")] = key
        return keys

    def find(self, kid):
        """The key named *kid*; LoginError when the provider publishes none by that name."""
        if self._keys is None or kid not in self._keys:
            self._keys = self._fetch()
        if kid not in self._keys:
            raise LoginError(f"the ID token is signed with a key the provider does not publish (kid {str(kid)[:64]!r} "
                             f"is not in {self.jwks_uri})")
        return self._keys[kid]


def verify(id_token, source, keys, nonce):
    """The claims of *id_token* once its signature, algorithm, issuer, audience, expiry and *nonce* are checked;
    LoginError saying which check failed."""
    import jwt

    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.PyJWTError:
        raise LoginError("the provider's ID token is not a JWT") from None
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        raise LoginError(f"the ID token is signed with {str(algorithm)[:20]!r}, not one of {', '.join(ALGORITHMS)}")
    key = keys.find(header.get("kid"))
    try:
        claims = jwt.decode(id_token, key.key, algorithms=[algorithm], audience=source.client_id, issuer=source.issuer,
                            leeway=LEEWAY, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
    except jwt.ExpiredSignatureError:
        raise LoginError("the provider's ID token has already expired (is this machine's clock right?)") from None
    except jwt.InvalidAudienceError:
        raise LoginError(f"the provider's ID token is not for this client: its audience is not {source.client_id!r}"
                         " (check oidc_client_id)") from None
    except jwt.InvalidIssuerError:
        raise LoginError(f"the provider's ID token names another issuer than {source.issuer!r}") from None
    except jwt.InvalidSignatureError:
        raise LoginError("the provider's ID token has a signature that does not verify with the provider's key "
                         f"{str(header.get('kid'))[:64]!r}") from None
    except jwt.MissingRequiredClaimError as error:
        raise LoginError(f"the provider's ID token has no {error.claim!r} claim") from None
    except jwt.PyJWTError as error:
        raise LoginError(f"the provider's ID token is not valid: {str(error)[:200]}") from None
    if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
        raise LoginError("the provider's ID token does not carry this sign-in's nonce (a replayed or injected token)")
    return claims


def login(source, say=say_on_stderr, open_url=None, timeout=BROWSER_TIMEOUT):
    """A verified ID token (an oidc.IdToken) from a sign-in in the browser."""
    import datetime

    document = discover(source)
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with CallbackListener(state) as listener:
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": source.client_id, "redirect_uri": listener.redirect_uri,
            "scope": " ".join(source.scopes), "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        })
        endpoint = document["authorization_endpoint"]
        url = f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"
        say(f"imsa: to sign in to {source.issuer}, a browser opens; if none does, open: {url}")
        open_in_browser(url, open_url)
        code, error = listener.wait(timeout)
    if error:
        raise LoginError(f"the sign-in to {source.issuer} was refused in the browser: {error}")
    if code is None:
        raise LoginError(f"no sign-in came back from the browser within {timeout} s")
    answer = _get_json(document["token_endpoint"], f"exchanging the authorization code at {document['token_endpoint']}",
                       {"Content-Type": "application/x-www-form-urlencoded"},
                       urllib.parse.urlencode({"grant_type": "authorization_code", "code": code,
                                               "redirect_uri": listener.redirect_uri, "client_id": source.client_id,
                                               "code_verifier": verifier}).encode())
    id_token = answer.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise LoginError(f"the provider's token endpoint answered without an ID token "
                         f"({str(answer.get('error') or 'no id_token')[:100]})")
    # A refresh token in the answer is dropped here: imsa keeps none (imsa/sources/oidc.py).
    claims = verify(id_token, source, Keys(document["jwks_uri"]), nonce)
    expiration = datetime.datetime.fromtimestamp(int(claims["exp"]), datetime.timezone.utc)
    token = oidc.IdToken(id_token, expiration, source.issuer, str(claims["sub"])[:oidc.MAX_TEXT],
                         source.duration_seconds)
    say(f"imsa: signed in to {source.issuer} as {claims.get('email') or claims['sub']}; the ID token is valid until "
        f"{format_time(expiration)}")
    return token


def obtain(source, say=say_on_stderr):
    """*source*'s ID token: the one this command signed in for already (to pick a role), else a new sign-in."""
    token = _fresh.get(source.fingerprint)
    if token is not None and not token.expired():
        return token
    token = login(source, say)
    _fresh[source.fingerprint] = token
    return token


def roles(source, token):
    """(role ARNs, {account id: [aliases]}) the roles API offers for *token*: ``GET oidc_roles_url`` with the ID
    token as the bearer, answering ``{"roles": [ARN…], "aliases": {ACCOUNT: [NAME…]}}`` as the Mozilla AWS CLI's
    ``idtoken_for_roles_url`` does."""
    answer = _get_json(source.roles_url, f"the roles API at {source.roles_url}",
                       {"Authorization": f"Bearer {token.id_token}"})
    arns = answer.get("roles")
    if not isinstance(arns, list):
        raise LoginError(f"the roles API at {source.roles_url} answered without a list of roles")
    found = sorted({arn for arn in arns if isinstance(arn, str) and oidc.ROLE_ARN.match(arn)})
    aliases = answer.get("aliases") if isinstance(answer.get("aliases"), dict) else {}
    return found[:MAX_ROLES], {str(account): [str(name) for name in names if isinstance(name, str)]
                               for account, names in aliases.items() if isinstance(names, list)}


def choices(arns, aliases):
    """The numbered lines the picker shows: ``N) ARN (account alias)``."""
    lines = []
    for number, arn in enumerate(arns, 1):
        account = arn.split(":")[4]
        alias = ", ".join(aliases.get(account, ()))
        lines.append(f"{number:>3}) {arn}" + (f"  ({alias})" if alias else ""))
    return lines


def ask(arns, aliases, prompt=None):
    """The role the person picks by its number on the terminal; UsageError with the roles when there is none."""
    from imsa import sts
    from imsa.errors import MfaError

    prompt = prompt or sts.TerminalPrompt()
    menu = "\n".join(choices(arns, aliases))
    for _ in range(sts.MFA_TYPOS):
        try:
            answer = prompt(f"{menu}\nrole number (1-{len(arns)})> ")
        except MfaError:
            raise UsageError("no role was picked: set role_arn in the profile, or run the command in a terminal to "
                             f"pick one of: {', '.join(arns)}") from None
        if answer.strip().isdigit() and 1 <= int(answer) <= len(arns):
            return arns[int(answer) - 1]
    raise UsageError(f"no role was picked (answer with a number from 1 to {len(arns)})")


def pick_role(source, profile, io, prompt=None):
    """*profile* with the role the person picks from the roles API after signing in (the sign-in's ID token is kept
    for this command's session)."""
    import dataclasses

    from imsa import config
    from imsa.sources import Hop

    token = obtain(source, io.say)
    arns, aliases = roles(source, token)
    if not arns:
        raise LoginError(f"the roles API at {source.roles_url} offers {token.subject} no role")
    chosen = arns[0] if len(arns) == 1 else ask(arns, aliases, prompt)
    io.say(f"imsa: role {chosen}")
    hop = Hop(chosen, config.default_session_name(), oidc.FALLBACK_DURATION)
    return dataclasses.replace(profile, hops=(hop,))
