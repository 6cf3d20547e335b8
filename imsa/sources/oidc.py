"""An OIDC provider as a source (web identity): the session is the person's ID token, roles come from
``sts:AssumeRoleWithWebIdentity``.

The CLI signs in at the provider (authorization code + PKCE in a browser, imsa/sources/oidc_login.py), checks the ID
token it gets (signature against the provider's JWKS, ``iss``, ``aud``, ``exp``, ``nonce``) and hands it to the
service. The service holds it while it is valid and mints role credentials from it with AssumeRoleWithWebIdentity
— the minter of session kind ``web_identity`` — in its refresher thread; after the token's ``exp`` nothing more is
minted until the person signs in again. A refresh token the provider may give is never kept: neither on disk nor in
the service (the service's sessions end with their material; a new sign-in is the renewal).

Profiles come from ``~/.imsa`` (keys ``oidc_*``, with ``extends``: imsa_profile), typically a provider defined once
— in the organisation's defaults (README, "Organisation defaults") or in ~/.imsa — and extended by profiles that name
a ``role_arn``. A profile without a role has one picked at sign-in from the provider's roles API
(``oidc_roles_url``, the Mozilla AWS CLI's ``idtoken_for_roles_url``).

Duration, as the Mozilla AWS CLI does it: ask for ``oidc_duration_seconds`` (12 hours unless set), and when STS
answers that it exceeds the role's MaxSessionDuration, ask again for one hour.
"""

import datetime
import ipaddress
import logging
import re
import urllib.parse
from dataclasses import dataclass, field

from imsa.credentials import Credentials, format_time, utcnow
from imsa.errors import StsError
from imsa.sources import BearerSession, fingerprint

log = logging.getLogger(__name__)

KIND = "web_identity"
# ID tokens are a few hundred to a few thousand characters; what the control plane accepts.
MAX_TOKEN = 16384
MAX_TEXT = 2048
# What the Mozilla AWS CLI asks for first, and what it falls back to when the role allows less.
DEFAULT_DURATION = 12 * 3600
FALLBACK_DURATION = 3600
MIN_DURATION = 900
MAX_DURATION = 12 * 3600
# STS's own words when DurationSeconds is above the role's maximum (the Mozilla AWS CLI matches the same text).
DURATION_TOO_LONG = "exceeds the MaxSessionDuration set for this role"
WELL_KNOWN = "/.well-known/openid-configuration"
DEFAULT_SCOPES = ("openid",)
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")


def url_problem(value):
    """Why *value* is not a URL an ID token may be sent to or fetched from, or None: https, or http to loopback
    only (a provider on this machine); a token sent over plain http elsewhere could be read on the way."""
    from imsa.sts_settings import url_problem as basic_problem

    problem = basic_problem(value)
    if problem:
        return problem
    parts = urllib.parse.urlsplit(value)
    if parts.scheme == "https":
        return None
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return None if loopback else "must be an https:// URL (http:// only to 127.0.0.1, ::1 or localhost)"


def issuer_of(discovery_url):
    """The issuer a discovery document at *discovery_url* must name (OpenID Connect Discovery 1.0, §4.3)."""
    if discovery_url.endswith(WELL_KNOWN):
        return discovery_url[:-len(WELL_KNOWN)]
    return discovery_url.rstrip("/")


def discovery_url_of(configured):
    """The discovery document's URL for the configured ``oidc_discovery_url``: as it is when it ends in
    ``/.well-known/openid-configuration``, else the issuer's (the Mozilla AWS CLI's ``well_known_url`` takes either)."""
    if configured.endswith(WELL_KNOWN):
        return configured
    return configured.rstrip("/") + WELL_KNOWN


@dataclass(frozen=True)
class IdToken(BearerSession):
    """The session of a web-identity source: the ID token (a bearer secret; repr hides it), when it ends (its
    ``exp``), its issuer and subject (for status), and the duration to ask STS for."""

    id_token: str = field(repr=False)
    expiration: datetime.datetime
    issuer: str
    subject: str
    duration_seconds: int = DEFAULT_DURATION

    def __repr__(self):
        return f"IdToken(issuer={self.issuer!r}, subject={self.subject!r}, expiration={format_time(self.expiration)!r})"


    @classmethod
    def from_json(cls, data):
        """Build from the control plane's JSON (``to_json``); ValueError names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("the web-identity session must be a JSON object")
        token = data.get("id_token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or not token.isascii() \
                or not token.isprintable() or token.count(".") != 2:
            raise ValueError(f"'id_token' must be a JWT of 1-{MAX_TOKEN} characters")
        for name in ("issuer", "subject"):
            value = data.get(name)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
                raise ValueError(f"{name!r} must be printable text of 1-{MAX_TEXT} characters")
        duration = data.get("duration_seconds", DEFAULT_DURATION)
        if isinstance(duration, bool) or not isinstance(duration, int) or not MIN_DURATION <= duration <= MAX_DURATION:
            raise ValueError(f"'duration_seconds' must be a whole number from {MIN_DURATION} to {MAX_DURATION}")
        return cls(token, cls.expiration_of(data), data["issuer"], data["subject"], duration)

    def to_json(self):
        """The control plane's JSON form (the token included: only ever sent over the owner-only socket)."""
        return {"id_token": self.id_token, "expiration": format_time(self.expiration), "issuer": self.issuer,
                "subject": self.subject, "duration_seconds": self.duration_seconds}


def _failure(error, profile=None):
    """An StsError with one readable line for a failed AssumeRoleWithWebIdentity."""
    import botocore.exceptions

    from imsa import sts

    text = str(sts._sts_failure(error, "AssumeRoleWithWebIdentity"))
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("ExpiredTokenException", "InvalidIdentityToken", "InvalidIdentityTokenException"):
            text += f" (sign in again: imsa assume {profile or 'PROFILE'})"
    return StsError(text)


def assume_role_with_web_identity(token, role_arn, session_name, settings=None, profile=None, client_factory=None,
                                  now=utcnow):
    """Credentials of *role_arn* for *token*: AssumeRoleWithWebIdentity (unsigned, as the API is) asking for the
    token's duration, and for FALLBACK_DURATION when STS says the role allows less."""
    import botocore.exceptions

    from imsa import sts

    client = (client_factory or sts.sts_client)(None, None, None, settings)
    duration = token.duration_seconds
    while True:
        log.info("AssumeRoleWithWebIdentity %s as %s for %d s", role_arn, session_name, duration)
        try:
            answer = client.assume_role_with_web_identity(RoleArn=role_arn, RoleSessionName=session_name,
                                                          WebIdentityToken=token.id_token, DurationSeconds=duration)
        except botocore.exceptions.ClientError as error:
            details = error.response.get("Error", {})
            if duration > FALLBACK_DURATION and details.get("Code") == "ValidationError" \
                    and DURATION_TOO_LONG in (details.get("Message") or ""):
                log.info("%s allows less than %d s; asking for %d s", role_arn, duration, FALLBACK_DURATION)
                duration = FALLBACK_DURATION
                continue
            raise _failure(error, profile) from error
        except botocore.exceptions.BotoCoreError as error:
            raise _failure(error, profile) from error
        return Credentials.from_sts(answer["Credentials"], now())


def mint(token, spec, sts_factory=None, now=utcnow):
    """The minter of ``web_identity`` sessions (sources.KINDS): AssumeRoleWithWebIdentity for the chain's first
    role, then AssumeRole through the rest of *spec*'s ``via`` and its final role (imsa.sts.assume_chain)."""
    from imsa import sts, sts_settings

    via = list(spec.get("via") or ())
    first = via[0] if via else spec
    if not first.get("role_arn"):
        raise StsError("a web-identity session serves roles only: the profile names no role_arn")
    settings = (spec.get("sts") or sts_settings.resolve()).for_region(spec.get("region"))
    credentials = assume_role_with_web_identity(token, first["role_arn"], first["role_session_name"], settings,
                                                spec.get("profile"), sts_factory, now)
    if not via:
        return credentials
    return sts.assume_chain(credentials, dict(spec, via=via[1:]), sts_factory or sts.sts_client, now)


@dataclass(frozen=True)
class WebIdentity:
    """An OIDC provider and client as a source: its session is the person's ID token.

    *discovery_url* is the provider's discovery document; *roles_url* the optional roles API; *where* says where it
    is configured, for errors."""

    discovery_url: str
    client_id: str
    scopes: tuple = DEFAULT_SCOPES
    roles_url: str = None
    duration_seconds: int = DEFAULT_DURATION
    where: str = None

    kind = KIND
    needs_person = True  # every session is a sign-in in a browser: no ID token is kept on disk

    @property
    def issuer(self):
        """The issuer the provider's discovery document and ID tokens must name."""
        return issuer_of(self.discovery_url)

    @property
    def fingerprint(self):
        """The provider, client, scopes and duration, hashed: every profile on the same sign-in shares one session."""
        return fingerprint(KIND, self.discovery_url, self.client_id, " ".join(self.scopes), str(self.duration_seconds))

    @property
    def label(self):
        """``OIDC https://issuer (client ID)`` for status and list."""
        return f"OIDC {self.issuer} (client {self.client_id})"

    def new_session(self, mfa, settings, sts_factory=None):
        """The ID token: from a sign-in at the provider (the one this command just made to pick a role, if any)."""
        from imsa.sources import oidc_login

        return oidc_login.obtain(self)

    def pick_role(self, profile, io):
        """*profile* with the role the person picks from the roles API (imsa/sources/oidc_login.py)."""
        from imsa.sources import oidc_login

        return oidc_login.pick_role(self, profile, io)


# What ~/.imsa's OIDC profiles may not have: a sign-in is their source, not keys.
NOT_WITH_OIDC = ("aws_access_key_id", "aws_secret_access_key", "mfa_serial_number", "mfa_process",
                 "session_duration_seconds", "secret_store", "sso_start_url")


def imsa_profile(name, origin, chain, where):
    """Profile *name* of ~/.imsa (a sources.Profile) whose chain of ``extends`` sets ``oidc_discovery_url``.

    *chain* is [(profile name, its raw keys)] from the farthest ancestor to *name*, each applied over the last;
    *where(profile, key)* names a key's place in the files for errors. The profile's ``role_arn`` is assumed with
    the ID token; without one, a role is picked at sign-in from ``oidc_roles_url``.
    """
    from imsa import config
    from imsa.errors import ConfigError
    from imsa.sources import Hop, Profile, merged_chain

    merged, at = merged_chain(name, chain, where)

    for key in NOT_WITH_OIDC:
        if key in merged:
            raise ConfigError(f"{at(key)}: an OIDC profile (oidc_discovery_url, here or in a profile it extends) "
                              "signs in at its provider instead; it has no keys, MFA device or MFA session")
    if "oidc_client_id" not in merged:
        raise ConfigError(f"{where(name, None)}: missing 'oidc_client_id' (an OIDC profile needs oidc_discovery_url "
                          "and oidc_client_id; set it here or in a profile it extends)")
    for key in ("oidc_discovery_url", "oidc_roles_url"):
        problem = url_problem(merged[key]) if key in merged else None
        if problem:
            raise ConfigError(f"{at(key)}: {problem}")
    duration = merged.get("oidc_duration_seconds", DEFAULT_DURATION)
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise ConfigError(f"{at('oidc_duration_seconds')}: must be between {MIN_DURATION} and {MAX_DURATION}, not "
                          f"{duration}")
    scopes = tuple(scope for scope in merged.get("oidc_scopes", "").replace(",", " ").split() if scope)
    if "openid" not in scopes:  # an ID token is only issued for the openid scope
        scopes = ("openid",) + scopes
    if not merged.get("role_arn") and not merged.get("oidc_roles_url"):
        raise ConfigError(f"{where(name, None)}: an OIDC profile needs role_arn, or oidc_roles_url to pick a role "
                          "from at sign-in (set it here or in a profile it extends)")
    source = WebIdentity(discovery_url_of(merged["oidc_discovery_url"]), merged["oidc_client_id"], scopes,
                         merged.get("oidc_roles_url"), duration, at("oidc_discovery_url"))
    hops = ()
    if merged.get("role_arn"):
        hops = (Hop(merged["role_arn"], merged.get("role_session_name") or config.default_session_name(),
                    merged.get("duration_seconds", FALLBACK_DURATION), merged.get("external_id")),)
    return Profile(name=name, origin=origin, source=source, hops=hops, region=merged.get("region"))
