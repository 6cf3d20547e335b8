"""IAM Identity Center (AWS SSO) as a source: the session is the SSO access token, roles come from the portal.

The CLI gets an access token for a start URL (from the AWS CLI's shared cache ``~/.aws/sso/cache``, by refreshing
it, or by a login: imsa/sources/sso_login.py) and hands it to the service with the portal's endpoint. The service
mints role credentials with the portal's ``GetRoleCredentials`` — the minter of session kind ``sso`` — and, for a
``~/.aws/config`` chain whose root is an SSO profile, assumes the chain's roles from them with STS.

Profiles come from ``~/.aws/config`` (``sso_session`` or the legacy keys: imsa/sources/aws_config.py), from
``~/.imsa`` (the same keys, with ``extends``: imsa_profile), or from a name alone, ``sso:[SIGNIN:]ACCOUNT:ROLE``
(named_role).

A portal role (an account and a permission set's role name) travels in a role spec as the first role of the chain,
written ``arn:aws:iam::ACCOUNT:role/ROLE_NAME``: the service lists it under ROLE_NAME over IMDS, as an instance
lists its role, and the role spec needs no field of its own. Every later role of the chain is an AssumeRole.

The service's portal client, like its STS clients, reads no environment variable and no config file: the endpoint
the CLI resolved travels with the token, and proxies and CA bundle with the session's STS settings.
"""

import dataclasses
import datetime
import logging
import os
import re
from dataclasses import dataclass, field

from imsa.credentials import Credentials, format_time, utcnow
from imsa.errors import StsError
from imsa.sources import BearerSession, fingerprint

log = logging.getLogger(__name__)

KIND = "sso"
# Every portal call is bounded like an STS call (imsa/sts.py: STS_BUDGET must stay inside the CLI's wait).
PORTAL_CONNECT_TIMEOUT = 3
PORTAL_READ_TIMEOUT = 6
PORTAL_ATTEMPTS = 2
# What the control plane accepts: the portal's bearer tokens are opaque, a few hundred to a few thousand characters.
MAX_TOKEN = 8192
MAX_URL = 2048
ACCOUNT_ID = re.compile(r"^\d{12}$")
# IAM Identity Center's permission set names, which name the roles the portal hands out.
ROLE_NAME = re.compile(r"^[\w+=,.@-]{1,64}$")
PORTAL_ROLE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/([\w+=,.@-]{1,64})$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")


def portal_role_arn(account_id, role_name):
    """How a portal role travels in a role spec: ``arn:aws:iam::ACCOUNT:role/ROLE_NAME``."""
    return f"arn:aws:iam::{account_id}:role/{role_name}"


def portal_role(role_arn):
    """(account id, role name) of a portal role written as portal_role_arn; ValueError otherwise."""
    found = PORTAL_ROLE.match(role_arn or "")
    if not found:
        raise ValueError(f"{role_arn!r} does not name an IAM Identity Center role (arn:aws:iam::ACCOUNT:role/NAME)")
    return found.group(1), found.group(2)


@dataclass(frozen=True)
class SsoToken(BearerSession):
    """The session of an SSO source: an access token (a bearer secret; repr hides it), when it ends, the start URL
    and region it is for, and the portal endpoint the CLI resolved (None: the region's own)."""

    access_token: str = field(repr=False)
    expiration: datetime.datetime
    region: str
    start_url: str
    endpoint_url: str = None

    def __repr__(self):
        return f"SsoToken(start_url={self.start_url!r}, expiration={format_time(self.expiration)!r})"


    @classmethod
    def from_json(cls, data):
        """Build from the control plane's JSON (``to_json``); ValueError names the first bad field."""
        from imsa.sts_settings import url_problem

        if not isinstance(data, dict):
            raise ValueError("the SSO session must be a JSON object")
        token = cls.token_of(data, "access_token", MAX_TOKEN)
        region = data.get("region")
        if not isinstance(region, str) or not REGION.match(region):
            raise ValueError("'region' must be a region name")
        for name in ("start_url", "endpoint_url"):
            value = data.get(name)
            if value is None and name == "endpoint_url":
                continue
            problem = url_problem(value)
            if problem:
                raise ValueError(f"{name!r} {problem}")
        return cls(token, cls.expiration_of(data), region, data["start_url"], data.get("endpoint_url"))

    def to_json(self):
        """The control plane's JSON form (the token included: only ever sent over the owner-only socket)."""
        return {"access_token": self.access_token, "expiration": format_time(self.expiration), "region": self.region,
                "start_url": self.start_url, "endpoint_url": self.endpoint_url}


def client(service, region, endpoint_url, settings):
    """A botocore client of *service* (``sso`` or ``sso-oidc``: unsigned, as their APIs are) for *region* at
    *endpoint_url* (None: the region's own), through the proxies and CA bundle of *settings* (StsSettings). Like
    the STS clients it reads no environment variable and no config file."""
    import botocore.config
    from botocore import UNSIGNED

    from imsa import sts, sts_settings
    from imsa.sts_settings import StsSettings

    settings = settings or StsSettings()
    session = sts._botocore_session()
    verify = sts_settings.verify_for(settings)

    def create(proxies):
        config = botocore.config.Config(
            signature_version=UNSIGNED, connect_timeout=PORTAL_CONNECT_TIMEOUT, read_timeout=PORTAL_READ_TIMEOUT,
            retries={"total_max_attempts": PORTAL_ATTEMPTS, "mode": "standard"}, proxies=proxies,
            ignore_configured_endpoint_urls=True,
        )
        with sts._shared_lock:
            return session.create_client(service, region_name=region, endpoint_url=endpoint_url, verify=verify,
                                         config=config)

    made = create({})
    proxy = settings.proxy_for(made.meta.endpoint_url)
    if proxy:
        made = create({made.meta.endpoint_url.split(":", 1)[0]: proxy})
    return made


def load_models():
    """Load the portal's botocore model now: the service calls this before it drops root, while the Python
    installation is surely readable (imsa.sts.preload does the same for STS)."""
    client("sso", "us-east-1", None, None)


def portal_failure(error, action, profile=None):
    """An StsError with one readable line for a failed portal call; a refused token names the command to run."""
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code", "Error")
        message = (details.get("Message") or "").strip()
        text = f"IAM Identity Center {action} failed: {code}" + (f": {message}" if message else "")
        if code == "UnauthorizedException" or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 401:
            remedy = f"imsa login {profile}" if profile else "imsa login PROFILE"
            return StsError(f"{text} (the SSO token expired or was revoked); run: {remedy}")
        return StsError(text)
    return StsError(f"IAM Identity Center {action} failed: {error}")


def get_role_credentials(token, account_id, role_name, settings=None, profile=None, portal=None, now=utcnow):
    """Credentials of the portal role *role_name* in *account_id*, from GetRoleCredentials with *token*."""
    import botocore.exceptions

    portal = portal or client("sso", token.region, token.endpoint_url, settings)
    log.info("GetRoleCredentials %s in %s", role_name, account_id)
    try:
        answer = portal.get_role_credentials(roleName=role_name, accountId=account_id, accessToken=token.access_token)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise portal_failure(error, "GetRoleCredentials", profile) from error
    role = answer.get("roleCredentials") or {}
    try:
        # The portal gives the expiry in epoch milliseconds, not STS's timestamp.
        expiration = datetime.datetime.fromtimestamp(int(role["expiration"]) / 1000, datetime.timezone.utc)
        return Credentials(role["accessKeyId"], role["secretAccessKey"], role["sessionToken"],
                           expiration.replace(microsecond=0), issued=now().replace(microsecond=0))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise StsError("IAM Identity Center GetRoleCredentials answered without usable credentials") from None


def mint(token, spec, sts_factory=None, portal=None, now=utcnow):
    """The minter of ``sso`` sessions (sources.KINDS): GetRoleCredentials for the chain's first role, then AssumeRole
    through the rest of *spec*'s ``via`` and its final role, as imsa.sts.assume_chain does for a session (and
    called like it: *sts_factory* makes the STS clients)."""
    from imsa import sts

    via = list(spec.get("via") or ())
    first = via[0] if via else spec
    try:
        account_id, role_name = portal_role(first["role_arn"])
    except ValueError as error:
        raise StsError(str(error)) from None
    credentials = get_role_credentials(token, account_id, role_name, spec.get("sts"), spec.get("profile"), portal, now)
    if not via:
        return credentials
    return sts.assume_chain(credentials, dict(spec, via=via[1:]), sts_factory or sts.sts_client, now)


def list_roles(token, settings=None, portal=None, page_size=None):
    """Every account the token may use and its roles: [{accountId, accountName, emailAddress, roles: [names]}],
    from ListAccounts and ListAccountRoles, every page of each."""
    import botocore.exceptions

    portal = portal or client("sso", token.region, token.endpoint_url, settings)
    extra = {"PaginationConfig": {"PageSize": page_size}} if page_size else {}
    accounts = []
    try:
        for page in portal.get_paginator("list_accounts").paginate(accessToken=token.access_token, **extra):
            accounts.extend(page.get("accountList", []))
        for account in accounts:
            roles = []
            for page in portal.get_paginator("list_account_roles").paginate(
                    accessToken=token.access_token, accountId=account["accountId"], **extra):
                roles.extend(role["roleName"] for role in page.get("roleList", []))
            account["roles"] = sorted(roles)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise portal_failure(error, "ListAccounts") from error
    return sorted(accounts, key=lambda account: account["accountId"])


@dataclass(frozen=True)
class Sso:
    """An IAM Identity Center start URL and region as a source: its session is the access token.

    *session_name* is the ``sso-session`` section's name (None for a legacy profile that names the start URL on
    itself): the AWS CLI's cache file of the token is named after it. *scopes* are the registration's scopes;
    *where* says where it is configured, for errors; *first_hop* is the profile's portal role (a sources.Hop), the
    first role of its chain; *shared*: the token is read from and written to the AWS CLI's cache (always for
    ``~/.aws/config``, ``sso_cache: aws`` in ``~/.imsa``), else only the service holds it.
    """

    start_url: str
    region: str
    session_name: str = None
    scopes: tuple = ()
    where: str = None
    first_hop: object = None
    shared: bool = True

    kind = KIND

    @property
    def cache_key(self):
        """What the AWS CLI names the token's cache file after: the sso-session's name, else the start URL."""
        return self.session_name or self.start_url

    @property
    def fingerprint(self):
        """The cache key and region, hashed: every profile on the same login shares one session."""
        return fingerprint("sso", self.cache_key, self.start_url, self.region)

    @property
    def label(self):
        """``IAM Identity Center https://… (sso-session NAME)`` for status and list."""
        return f"IAM Identity Center {self.start_url}" + (
            f" (sso-session {self.session_name})" if self.session_name else "")

    @property
    def needs_person(self):
        """A login may need a person at a browser, unless a token is cached."""
        from imsa.sources import sso_login

        return sso_login.cached_token(self) is None

    def new_session(self, mfa, settings, sts_factory=None):
        """The access token: from the shared cache while valid, refreshed, or from a login (imsa login)."""
        from imsa.sources import sso_login

        return sso_login.obtain(self, settings)



# What ~/.imsa's IAM Identity Center profiles may not have: a sign-in is their source, not keys.
NOT_WITH_SSO = ("aws_access_key_id", "aws_secret_access_key", "mfa_serial_number", "mfa_process",
                "session_duration_seconds")
CACHES = ("aws", "imsa")


def imsa_profile(name, origin, chain, where):
    """Profile *name* of ~/.imsa (a sources.Profile) whose chain of ``extends`` sets ``sso_start_url``.

    *chain* is [(profile name, its raw keys)] from the farthest ancestor to *name*, each applied over the last;
    *where(profile, key)* names a key's place in the file for errors. The portal role is the first hop, the
    profile's ``role_arn`` (if any) is assumed from it.
    """
    from imsa import config
    from imsa.errors import ConfigError
    from imsa.limits import DEFAULT_ROLE_DURATION
    from imsa.sources import Hop, Profile, merged_chain
    from imsa.sts_settings import url_problem

    merged, at = merged_chain(name, chain, where)

    for key in NOT_WITH_SSO:
        if key in merged:
            raise ConfigError(f"{at(key)}: an IAM Identity Center profile (sso_start_url, here or in a profile it "
                              "extends) signs in instead; it has no keys, MFA device or MFA session")
    for key in ("sso_region", "sso_account_id", "sso_role_name"):
        if key not in merged:
            raise ConfigError(f"{where(name, None)}: missing {key!r} (an IAM Identity Center profile needs "
                              "sso_start_url, sso_region, sso_account_id and sso_role_name; set it here or in a "
                              "profile it extends)")
    checks = {"sso_region": (REGION, "a region name like us-east-1"),
              "sso_account_id": (ACCOUNT_ID, "a 12-digit account id"),
              "sso_role_name": (ROLE_NAME, "a role name of 1-64 letters, digits and _+=,.@-"),
              "sso_session": (re.compile(r"^[\w+=,.@-]{1,64}$"), "a name of 1-64 letters, digits and _+=,.@-")}
    for key, (pattern, description) in checks.items():
        if key in merged and not pattern.match(merged[key]):
            raise ConfigError(f"{at(key)}: {merged[key][:80]!r} is not {description}")
    problem = url_problem(merged["sso_start_url"])
    if problem:
        raise ConfigError(f"{at('sso_start_url')}: {problem}")
    cache = merged.get("sso_cache", "imsa")
    if cache not in CACHES:
        raise ConfigError(f"{at('sso_cache')}: must be aws (share the token with the AWS CLI's cache) or imsa (only "
                          f"the service holds it), not {cache[:80]!r}")
    session_name = merged.get("sso_session")
    scopes = tuple(scope.strip() for scope in merged.get("sso_registration_scopes", "").split(",") if scope.strip())
    if not scopes and session_name:  # what aws sso login registers for an sso-session
        scopes = ("sso:account:access",)
    portal = Hop(portal_role_arn(merged["sso_account_id"], merged["sso_role_name"]), config.default_session_name(),
                 DEFAULT_ROLE_DURATION)
    source = Sso(merged["sso_start_url"], merged["sso_region"], session_name, scopes, at("sso_start_url"), portal,
                 shared=cache == "aws")
    hops = [portal]
    if merged.get("role_arn"):
        hops.append(Hop(merged["role_arn"], merged.get("role_session_name") or config.default_session_name(),
                        merged.get("duration_seconds", DEFAULT_ROLE_DURATION), merged.get("external_id")))
    return Profile(name=name, origin=origin, source=source, hops=tuple(hops), region=merged.get("region"))


NAMED_PREFIX = "sso:"


def named_role(text, warn=None, environ=None):
    """The profile ``sso:[SIGNIN:]ACCOUNT:ROLE`` names without a file defining it: the portal role ROLE in ACCOUNT,
    from the sign-in SIGNIN — an ``[sso-session]`` of ~/.aws/config or any IAM Identity Center profile of either
    file — which may be left out when the files configure one start URL only."""
    from imsa import config
    from imsa.errors import ConfigError
    from imsa.sources import Profile, aws_config

    parts = text[len(NAMED_PREFIX):].split(":")
    usage = f"{text!r}: name a role without a profile as sso:ACCOUNT:ROLE, or sso:SIGNIN:ACCOUNT:ROLE"
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(usage)
    account_id, role_name = parts[-2:]
    if not ACCOUNT_ID.match(account_id):
        raise ConfigError(f"{usage}: {account_id[:80]!r} is not a 12-digit account id")
    if not ROLE_NAME.match(role_name):
        raise ConfigError(f"{usage}: {role_name[:80]!r} is not a role name of 1-64 letters, digits and _+=,.@-")
    signins = _signins(config, aws_config, warn, environ)
    if len(parts) == 3:
        if parts[0] not in signins:
            known = ", ".join(sorted(signins)) or "none"
            raise ConfigError(f"{text!r}: no sign-in {parts[0]!r} (an [sso-session] or IAM Identity Center profile; "
                              f"known: {known})")
        origin, source, region = signins[parts[0]]
    else:
        distinct = {(source.start_url, source.region) for _, source, _ in signins.values()}
        if len(distinct) != 1:
            known = ", ".join(sorted(signins)) or "none"
            raise ConfigError(f"{usage}: the files configure {len(distinct) or 'no'} IAM Identity Center start URLs, "
                              f"so name the sign-in (known: {known})")
        origin, source, region = next(iter(signins.values()))
    from imsa.sources import Hop

    hop = Hop(portal_role_arn(account_id, role_name), config.default_session_name(), source.first_hop.duration_seconds
              if source.first_hop else 3600)
    return Profile(name=text, origin=origin, source=dataclasses.replace(source, first_hop=hop), hops=(hop,),
                   region=region)


def _signins(config, aws_config, warn, environ):
    """{name: (file, Sso source, region)} of every sign-in the files configure: ~/.aws/config's [sso-session]
    sections and IAM Identity Center profiles, and ~/.imsa's (whose names win, as profiles' do)."""
    from imsa.errors import ConfigError

    found = {}
    files = aws_config.load(environ)
    for session_name, section in files.sso_sessions.items():
        start_url, region = section.get("sso_start_url"), section.get("sso_region")
        if isinstance(start_url, str) and isinstance(region, str) and REGION.match(region):
            scopes = tuple(scope.strip() for scope in (section.get("sso_registration_scopes") or
                                                       "sso:account:access").split(",") if scope.strip())
            found[session_name] = (files.config_path, Sso(start_url, region, session_name, scopes,
                                                          f"{files.config_path}: [sso-session {session_name}]"), None)
    rows = [(name, files.origin(name), lambda name=name: files.get(name, environ)) for name in files.names]
    path = config.config_path()
    if os.path.exists(path):
        imsa_config = config.load(path, warn=warn)
        rows += [(name, path, lambda name=name: imsa_config.get(name)) for name in imsa_config.names]
    for name, origin, get in rows:
        try:
            profile = get()
        except ConfigError:
            continue
        if profile.source.kind == KIND:
            found[name] = (origin, profile.source, profile.region)
    return found
