"""Credential-vending servers (mairu's API) as a source: the session is the server's OAuth access token.

A server is defined by one JSON file in mairu's field names (``url``, ``id``, ``oauth.client_id``,
``oauth.token_endpoint``, ``oauth.scope``, ``oauth.code_grant`` with ``local_port``, ``oauth.device_grant``,
``oauth.default_grant_type``), in ``servers.d/`` under the user's configuration directory
(``$XDG_CONFIG_HOME/imsa/servers.d``) or the organisation's (``/etc/imsa/servers.d``); the user's file wins for
the same server id. The CLI logs in (imsa/sources/cred_server_login.py: authorization code with PKCE, or the device
grant) and hands the access token to the service, which alone holds it; a refresh token is kept nowhere, a new login
replaces the token. The service mints role credentials with ``POST {url}/assume-role`` ``{"Role": …}`` (the
minter of session kind ``cred_server``); ``GET {url}/roles`` lists the roles a token may ask for, where the server
offers it.

A server's role is any string the server accepts (often a role ARN). It travels in a role spec as the chain's first
role: a role ARN as itself, any other name as ``arn:aws:iam::000000000000:role/NAME`` (no AWS account has that
id), and the minter sends the server the string the profile named. Later roles of the chain are AssumeRoles.

``NoCache`` in an answer is honoured: those credentials are marked (NoCacheCredentials), and the service asks the
server again for each delivery through its control socket (export, credential-process, exec, console) instead of
handing out the ones it holds. IMDS still serves what the last rotation made: it answers from memory and never waits
on a server.

The URL joins follow mairu's (RFC 3986 relative resolution): ``https://host/api/`` gives
``https://host/api/assume-role``, ``https://host/api`` gives ``https://host/assume-role``.
"""

import dataclasses
import datetime
import json
import logging
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, field

from imsa.credentials import Credentials, format_time, parse_time, utcnow
from imsa.errors import ConfigError, StsError
from imsa.sources import BearerSession, fingerprint

log = logging.getLogger(__name__)

KIND = "cred_server"
SERVERS_DIR = "servers.d"
# Every call to a server is bounded like an STS call (imsa/sts.py: STS_BUDGET must stay inside the CLI's wait).
SERVER_TIMEOUT = 6
MAX_TOKEN = 8192
MAX_ANSWER = 64 * 1024
MAX_ROLES = 10000
MAX_SERVER_ID = 256
# What a server's error body may add to imsa's line about it.
MAX_SAID = 200
# The account of the role spec's stand-in ARN for a server role that is not a role ARN.
NAME_ACCOUNT = "000000000000"
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/([\w+=,.@/-]{1,512})$")
ROLE_NAME = re.compile(r"^[\w+=,.@/-]{1,512}$")
DEFAULT_SCOPE = ("profile",)
# mairu's names of the two grants, as default_grant_type and as the two objects that configure them.
GRANT_NAMES = {"code": "code", "code_grant": "code", "device_code": "device", "device-code": "device",
               "device_grant": "device", "device_code_grant": "device"}
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class ServerRefused(StsError):
    """A server answered with an error status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


# --- server definitions ---


@dataclass(frozen=True)
class Server:
    """One credential server's definition (a file of servers.d). Its client secret, if the file has one, is hidden
    from repr."""

    id: str
    url: str
    client_id: str
    path: str
    token_endpoint: str
    scope: tuple = DEFAULT_SCOPE
    # The grants the file configures: "code" and/or "device", and the one used unless told otherwise.
    grants: tuple = ("code",)
    default_grant: str = "code"
    authorization_endpoint: str = None
    device_authorization_endpoint: str = None
    local_port: int = 0
    use_localhost: bool = False
    client_secret: str = field(default=None, repr=False)

    def endpoint(self, name):
        """``{url}NAME`` joined as mairu joins it (``assume-role``, ``roles``, ``oauth/token``…)."""
        return urllib.parse.urljoin(self.url, name)


def user_servers_dir(environ=None):
    """``$XDG_CONFIG_HOME/imsa/servers.d``: the user's server definitions."""
    from imsa import paths

    return paths.xdg_dir("XDG_CONFIG_HOME", SERVERS_DIR, environ=environ)


def system_servers_dir(environ=None):
    """``/etc/imsa/servers.d`` (``$IMSA_SYSTEM_CONFIG_DIR/servers.d``): the organisation's server definitions."""
    from imsa import paths

    return os.path.join(paths.system_config_dir(environ), SERVERS_DIR)


def _url_problem(value, what):
    """Why *value* cannot be a server URL that bearer tokens go to (https, or http on loopback only), or None."""
    from imsa.sts_settings import url_problem

    problem = url_problem(value)
    if problem:
        return f"{what} {problem}"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "https" and parts.hostname not in LOOPBACK_HOSTS:
        return f"{what} must be https:// (tokens and credentials travel on it); http:// only to this machine"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{what} must have no query, fragment or user name"
    return None


def _parse(path, data):
    """The Server that the JSON object *data* of file *path* defines; ConfigError naming the file and the field."""

    def bad(what):
        return ConfigError(f"{path}: {what}")

    if not isinstance(data, dict):
        raise bad("must be a JSON object (a server definition)")
    url = data.get("url")
    problem = _url_problem(url, "'url'")
    if problem:
        raise bad(problem)
    server_id = data.get("id", url)
    if not isinstance(server_id, str) or not 0 < len(server_id) <= MAX_SERVER_ID or not server_id.isprintable():
        raise bad(f"'id' must be printable text of 1-{MAX_SERVER_ID} characters")
    if "oauth" not in data and "aws_sso" in data:
        raise bad("an aws_sso server: imsa reads IAM Identity Center from ~/.aws/config or sso_* keys in ~/.imsa "
                  "(README, \"IAM Identity Center\")")
    oauth = data.get("oauth")
    if not isinstance(oauth, dict):
        raise bad("'oauth' must be an object with client_id and code_grant or device_grant")
    client_id = oauth.get("client_id")
    if not isinstance(client_id, str) or not client_id or not client_id.isprintable():
        raise bad("'oauth.client_id' must be text")
    secret = oauth.get("client_secret")
    if secret is not None and (not isinstance(secret, str) or not secret.isprintable()):
        raise bad("'oauth.client_secret' must be text")
    scope = oauth.get("scope", list(DEFAULT_SCOPE))
    if not isinstance(scope, list) or not all(isinstance(item, str) and item and " " not in item for item in scope):
        raise bad("'oauth.scope' must be a list of scope names")
    endpoints = {"token_endpoint": oauth.get("token_endpoint")}
    grants = []
    code = oauth.get("code_grant")
    local_port, use_localhost = 0, False
    if code is not None:
        if not isinstance(code, dict):
            raise bad("'oauth.code_grant' must be an object ({} when every default fits)")
        grants.append("code")
        endpoints["authorization_endpoint"] = code.get("authorization_endpoint")
        local_port = code.get("local_port", 0) or 0
        if isinstance(local_port, bool) or not isinstance(local_port, int) or not 0 <= local_port <= 65535:
            raise bad("'oauth.code_grant.local_port' must be a port number (1-65535)")
        use_localhost = code.get("use_localhost", False)
        if not isinstance(use_localhost, bool):
            raise bad("'oauth.code_grant.use_localhost' must be true or false")
    # mairu's README calls it device_grant, its code device_code_grant: either is read.
    device_key = "device_grant" if "device_grant" in oauth else "device_code_grant"
    device = oauth.get(device_key)
    if device is not None:
        if not isinstance(device, dict):
            raise bad(f"'oauth.{device_key}' must be an object ({{}} when every default fits)")
        grants.append("device")
        endpoints["device_authorization_endpoint"] = device.get("device_authorization_endpoint")
    for name in ("token_endpoint", "authorization_endpoint", "device_authorization_endpoint"):
        if endpoints.get(name) is not None:
            problem = _url_problem(endpoints[name], f"'{name}'")
            if problem:
                raise bad(problem)
    if not grants:
        raise bad("'oauth' needs code_grant or device_grant (an empty object {} says the server supports it)")
    default = oauth.get("default_grant_type")
    if default is None:
        default_grant = grants[0]
    elif default in GRANT_NAMES and GRANT_NAMES[default] in grants:
        default_grant = GRANT_NAMES[default]
    else:
        raise bad(f"'oauth.default_grant_type' must name a grant the file configures ({', '.join(grants)}), "
                  f"not {str(default)[:40]!r}")
    server = Server(id=server_id, url=url, client_id=client_id, path=path, token_endpoint="", scope=tuple(scope),
                    grants=tuple(grants), default_grant=default_grant, local_port=local_port,
                    use_localhost=use_localhost, client_secret=secret)
    # mairu's defaults: the OAuth endpoints under the server's url.
    return dataclasses.replace(
        server,
        token_endpoint=endpoints["token_endpoint"] or server.endpoint("oauth/token"),
        authorization_endpoint=endpoints.get("authorization_endpoint") or server.endpoint("oauth/authorize"),
        device_authorization_endpoint=endpoints.get("device_authorization_endpoint") or server.endpoint("oauth/device"),
    )


def _check_writers(path, info, system):
    """ConfigError when someone other than the definition's owner could rewrite *path* (its stat *info*).

    A definition says where the sign-in and the bearer token go: a file another local user could rewrite would send
    them to a server of that user's choosing. The organisation's must be root's and writable by root only (as its
    ~/.imsa defaults, imsa/config.py); the user's must be the user's (or root's) and writable by no one else."""
    if system:
        from imsa.config import check_system_owner

        check_system_owner(path, info)
    elif info.st_uid not in (0, os.getuid()) or stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigError(f"{path}: a server definition must be yours and writable by you only (owned by uid "
                          f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); run: chmod go-w {path}")


def _read_dir(directory, system=False):
    """{server id: Server} of the ``*.json`` files in *directory* (none when it does not exist); a file that cannot
    be read or is invalid, or that others could rewrite (_check_writers), or two files with one id, is a
    ConfigError naming the file. aws_sso definitions (mairu's other kind) are passed over: imsa reads IAM Identity
    Center elsewhere."""
    try:
        _check_writers(directory, os.stat(directory), system)
        names = sorted(name for name in os.listdir(directory) if name.endswith(".json"))
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(f"{directory}: cannot list: {error.strerror}") from None
    found = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as handle:
                _check_writers(path, os.fstat(handle.fileno()), system)
                data = json.load(handle)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({str(error)[:MAX_SAID]})") from None
        if isinstance(data, dict) and "aws_sso" in data and "oauth" not in data:
            continue
        server = _parse(path, data)
        if server.id in found:
            raise ConfigError(f"{path}: server id {server.id!r} is also defined in {found[server.id].path}; "
                              "one file per server")
        found[server.id] = server
    return found


def servers(environ=None):
    """{server id: Server} of every definition: the organisation's, then the user's over them."""
    found = _read_dir(system_servers_dir(environ), system=True)
    found.update(_read_dir(user_servers_dir(environ)))
    return found


def find(query, environ=None):
    """The Server whose id is *query*, else the one whose url is; ConfigError naming the directories otherwise."""
    known = servers(environ)
    if query in known:
        return known[query]
    by_url = [server for server in known.values() if server.url == query]
    if len(by_url) == 1:
        return by_url[0]
    if by_url:
        raise ConfigError(f"{len(by_url)} server definitions have the url {query!r}; name one by its id")
    listed = ", ".join(sorted(known)) or "none"
    raise ConfigError(f"no credential server {query!r} in {user_servers_dir(environ)} or "
                      f"{system_servers_dir(environ)} (servers: {listed})")


# --- roles in a role spec ---


def spec_role_arn(role):
    """How the server role *role* travels in a role spec: itself when it is a role ARN, else a stand-in ARN."""
    return role if ROLE_ARN.match(role) else f"arn:aws:iam::{NAME_ACCOUNT}:role/{role}"


def server_role(role_arn):
    """The string the server is asked for, from a role spec's *role_arn* (spec_role_arn's inverse)."""
    found = ROLE_ARN.match(role_arn or "")
    if not found:
        raise StsError(f"{role_arn!r} does not name a credential server's role")
    return found.group(2) if found.group(1) == NAME_ACCOUNT else role_arn


# --- the session and the minter (service side) ---


@dataclass(frozen=True)
class ServerToken(BearerSession):
    """The session of a credential server: its access token (a bearer secret; repr hides it), when it ends, and the
    server it is for (id and url: the minter needs nothing else)."""

    access_token: str = field(repr=False)
    expiration: datetime.datetime
    server_id: str
    url: str

    def __repr__(self):
        return f"ServerToken(server_id={self.server_id!r}, expiration={format_time(self.expiration)!r})"


    @classmethod
    def from_json(cls, data):
        """Build from the control plane's JSON (``to_json``); ValueError names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("the credential server session must be a JSON object")
        token = cls.token_of(data, "access_token", MAX_TOKEN)
        server_id = data.get("server_id")
        if not isinstance(server_id, str) or not 0 < len(server_id) <= MAX_SERVER_ID or not server_id.isprintable():
            raise ValueError(f"'server_id' must be printable text of 1-{MAX_SERVER_ID} characters")
        problem = _url_problem(data.get("url"), "'url'")
        if problem:
            raise ValueError(problem)
        return cls(token, cls.expiration_of(data), server_id, data["url"])

    def to_json(self):
        """The control plane's JSON form (the token included: only ever sent over the owner-only socket)."""
        return {"access_token": self.access_token, "expiration": format_time(self.expiration),
                "server_id": self.server_id, "url": self.url}


@dataclass(frozen=True, repr=False)
class NoCacheCredentials(Credentials):
    """Credentials a server marked ``NoCache``: the service asks it again for each delivery instead of reusing them
    (imsa/server/store.py reads ``no_cache``)."""

    no_cache = True


def opener(url, settings):
    """A urllib opener for *url* through the proxy and CA bundle of *settings* (StsSettings, None: direct, the
    system's CA) and no proxy from the environment: the service reads none, the CLI resolved them into *settings*."""
    import ssl
    import urllib.request

    from imsa import sts_settings

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        """Redirects are not followed: urllib would carry the bearer token (or the client secret) to wherever the
        ``Location`` points. A redirect is answered as the error it then is (HTTPError with its 3xx status)."""

        def redirect_request(self, *args):
            return None

    proxy = settings.proxy_for(url) if settings is not None else None
    handlers = [urllib.request.ProxyHandler({urllib.parse.urlsplit(url).scheme: proxy} if proxy else {}),
                _NoRedirect()]
    if url.startswith("https:"):
        verify = sts_settings.verify_for(settings) if settings is not None else True
        context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def call(server_id, url, token, method, name, body=None, settings=None, profile=None):
    """The JSON answer of ``METHOD {url}NAME`` with *token* as the bearer; ServerRefused for an error status (a 401
    names the login to run), StsError when the server cannot be reached or answers no JSON object."""
    import urllib.error
    import urllib.request

    target = urllib.parse.urljoin(url, name)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json", "Content-Type": "application/json"})
    what = f"the credential server {server_id}"
    try:
        with opener(target, settings).open(request, timeout=SERVER_TIMEOUT) as answer:
            raw = answer.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as error:
        said = _said(error)
        error.close()
        remedy = f"imsa login {profile}" if profile else "imsa login PROFILE"
        if error.code == 401:
            raise ServerRefused(f"{what} refused the sign-in token ({method} {name}: 401{said}: it ended or was "
                                f"revoked); run: {remedy}", 401) from None
        raise ServerRefused(f"{what} refused {method} {name}: {error.code}{said}", error.code) from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise StsError(f"cannot reach {what} at {target}: {reason}") from None
    if len(raw) > MAX_ANSWER:
        raise StsError(f"{what} answered {method} {name} with more than {MAX_ANSWER // 1024} KiB")
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise StsError(f"{what} answered {method} {name} with something that is not a JSON object")
    return answer


def _said(error):
    """``: <the server's words>`` from an error answer's body (its ``message`` or ``error``), cut and printable."""
    try:
        data = json.loads(error.read(MAX_ANSWER))
    except (OSError, ValueError):
        return ""
    said = data.get("message") or data.get("error_description") or data.get("error") if isinstance(data, dict) \
        else None
    if not isinstance(said, str) or not said.strip():
        return ""
    text = "".join(c if c.isprintable() else " " for c in said.strip())[:MAX_SAID]
    return f" ({text})"


def credentials_from(answer, server_id, now=utcnow):
    """Credentials of an ``/assume-role`` answer (credential_process's JSON: Version 1), NoCacheCredentials when
    the server set ``Mairu.NoCache``; StsError naming what is missing."""
    what = f"the credential server {server_id}"
    if answer.get("Version") != 1:
        raise StsError(f"{what} answered /assume-role without \"Version\": 1 (credential_process's format)")
    try:
        fields = [answer[name] for name in ("AccessKeyId", "SecretAccessKey", "SessionToken")]
        expiration = parse_time(answer["Expiration"])
    except (KeyError, ValueError):
        raise StsError(f"{what} answered /assume-role without temporary credentials (AccessKeyId, SecretAccessKey, "
                       "SessionToken and Expiration)") from None
    if not all(isinstance(value, str) and value for value in fields):
        raise StsError(f"{what} answered /assume-role with empty credentials")
    extension = answer.get("Mairu")
    no_cache = isinstance(extension, dict) and extension.get("NoCache") is True
    made = NoCacheCredentials if no_cache else Credentials
    return made(*fields, expiration.replace(microsecond=0), issued=now().replace(microsecond=0))


def assume(token, role, settings=None, profile=None, now=utcnow):
    """Credentials for the server role *role*: ``POST {url}/assume-role {"Role": role}`` with *token*."""
    log.info("assume-role %s at credential server %s", role, token.server_id)
    answer = call(token.server_id, token.url, token.access_token, "POST", "assume-role", {"Role": role}, settings,
                  profile)
    return credentials_from(answer, token.server_id, now)


def mint(token, spec, sts_factory=None, now=utcnow):
    """The minter of ``cred_server`` sessions (sources.KINDS): the server's role for the chain's first role, then
    AssumeRole through the rest of *spec*'s ``via`` and its final role, as imsa.sts.assume_chain does."""
    from imsa import sts

    via = list(spec.get("via") or ())
    first = via[0] if via else spec
    credentials = assume(token, server_role(first["role_arn"]), spec.get("sts"), spec.get("profile"), now)
    if not via:
        return credentials
    return sts.assume_chain(credentials, dict(spec, via=via[1:]), sts_factory or sts.sts_client, now)


def list_roles(token, settings=None):
    """The roles *token* may ask for (``GET {url}/roles``): [{name, description}], or None when the server does not
    offer the listing (404 or 405: it is optional in the API)."""
    try:
        answer = call(token.server_id, token.url, token.access_token, "GET", "roles", None, settings)
    except ServerRefused as refused:
        if refused.status in (404, 405):
            return None
        raise
    roles = answer.get("Roles")
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise StsError(f"the credential server {token.server_id} answered /roles without a list of \"Roles\"")
    listed = []
    for role in roles:
        name = role.get("Name") if isinstance(role, dict) else None
        if isinstance(name, str) and name.isprintable() and name:
            description = role.get("Description")
            listed.append({"name": name, "description": description if isinstance(description, str) and
                           description.isprintable() else None})
    return sorted(listed, key=lambda role: role["name"])


# --- the source and its profiles (CLI side) ---


@dataclass(frozen=True)
class CredServer:
    """A credential server as a source: its session is the server's access token. *where* says where the profile
    names it, for errors; *first_hop* is the profile's server role (a sources.Hop), the chain's first role."""

    server: Server
    where: str = None
    first_hop: object = field(default=None, compare=False)

    kind = KIND
    # The login needs a person at a browser or at another device, unless the service already holds the token.
    needs_person = True

    @property
    def fingerprint(self):
        """The server's id, url and client: every profile on the same server shares one session."""
        return fingerprint(KIND, self.server.id, self.server.url, self.server.client_id)

    @property
    def label(self):
        """``credential server ID (URL)`` for status and list."""
        return f"credential server {self.server.id} ({self.server.url})"

    def new_session(self, mfa, settings, sts_factory=None):
        """The access token, from a login (only the service keeps it)."""
        from imsa.sources import cred_server_login

        return cred_server_login.obtain(self.server, settings)


# What ~/.imsa's credential-server profiles may not have: a sign-in is their source, not keys.
NOT_WITH_SERVER = ("aws_access_key_id", "aws_secret_access_key", "mfa_serial_number", "mfa_process",
                   "session_duration_seconds", "secret_store", "sso_start_url")


def imsa_profile(name, origin, chain, where, environ=None):
    """Profile *name* of ~/.imsa (a sources.Profile) whose chain of ``extends`` sets ``server``: the server's role
    ``server_role`` is the first hop, the profile's ``role_arn`` (if any) is assumed from it.

    *chain* is [(profile name, its raw keys)] from the farthest ancestor to *name*; *where(profile, key)* names a
    key's place in the file for errors.
    """
    from imsa import config
    from imsa.limits import DEFAULT_ROLE_DURATION
    from imsa.sources import Hop, Profile, merged_chain

    merged, at = merged_chain(name, chain, where)

    for key in NOT_WITH_SERVER:
        if key in merged:
            raise ConfigError(f"{at(key)}: a credential server profile (server, here or in a profile it extends) "
                              "signs in instead; it has no keys, MFA device or other sign-in")
    if "server_role" not in merged:
        raise ConfigError(f"{where(name, None)}: missing 'server_role' (the role to ask the credential server "
                          f"{merged['server']!r} for; imsa list --server {merged['server']} lists them where the "
                          "server offers it)")
    role = merged["server_role"]
    if not (ROLE_ARN.match(role) or ROLE_NAME.match(role)):
        raise ConfigError(f"{at('server_role')}: {role[:80]!r} is not a role: a role ARN, or a name of 1-512 "
                          "letters, digits and _+=,.@/-")
    try:
        server = find(merged["server"], environ)
    except ConfigError as error:
        raise ConfigError(f"{at('server')}: {error}") from None
    first = Hop(spec_role_arn(role), config.default_session_name(), DEFAULT_ROLE_DURATION)
    source = CredServer(server, at("server"), first)
    hops = [first]
    if merged.get("role_arn"):
        hops.append(Hop(merged["role_arn"], merged.get("role_session_name") or config.default_session_name(),
                        merged.get("duration_seconds", DEFAULT_ROLE_DURATION), merged.get("external_id")))
    return Profile(name=name, origin=origin, source=source, hops=tuple(hops), region=merged.get("region"))
