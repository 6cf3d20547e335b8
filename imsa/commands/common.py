"""What several commands share: where they write (Io), the profile (or the per-directory one), the service's MFA
session, the shell's region and endpoint.

Commands are plain functions: no argparse, no sys.exit, no Flask. They return an exit code. ``out`` carries data
(exports, JSON) and ``err`` everything meant for people.
"""

import datetime
import logging
import os
import sys

from imsa import config, expiry, shell
from imsa.client import Client
from imsa.credentials import Credentials, format_time, parse_time, utcnow
from imsa.errors import ConfigError, ServiceNotRunning, UsageError

log = logging.getLogger(__name__)

# A session with less than this left is renewed (with MFA) before it is used for a new role.
SESSION_MIN_LEFT = datetime.timedelta(minutes=10)
ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
# Where SDKs look for IMDS when the variable above is not set (process.DEFAULT_LISTEN, without importing the server).
DEFAULT_ADDRESS = "169.254.169.254:80"


class Io:
    """Where a command writes: data to *out*, people's text to *err*."""

    def __init__(self, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def data(self, text):
        """Write to stdout."""
        self.out.write(text)
        self.out.flush()

    def say(self, text):
        """Write one line to stderr."""
        self.err.write(text + "\n")
        self.err.flush()


def load_profile(name, io, pick=True):
    """Profile *name* from ~/.imsa, else from the AWS config files; the permission warning and the profile's notes
    (a duration cut to the role-chaining hour) go to *io*. With *pick*, a profile whose role is picked at sign-in
    (an OIDC profile without role_arn) gets it now; commands that need the source only pass False."""
    from imsa import profile_cache

    expiry.warn_before()  # a bad IMSA_WARN_BEFORE is said before anything is asked or made
    before = profile_cache.key(config.input_paths())  # before reading: a file changed meanwhile misses the cache
    said = []

    def warn(text):
        said.append(text)
        io.say(text)

    profile = config.resolve(name, warn=warn)
    if pick and not profile.role_arn and hasattr(profile.source, "pick_role"):  # a role picked at sign-in (OIDC)
        profile = profile.source.pick_role(profile, io)
    for note in profile.notes:
        io.say(f"imsa: note: {note}")
    if not said:  # a cached answer would skip what was said: only a quiet resolution is cached
        profile_cache.remember(profile, before)
    return profile


def auto_profile(name, confirm_trust, io, command):
    """(profile name, mode or None): *name* itself, or for ``auto`` what the trusted ``.imsa.json`` here selects.

    *command* is how this command is run again with ``{options}`` where --confirm-trust goes, for the error said
    when there is no terminal to ask on.
    """
    from imsa import autoprofile

    # A profile of the user's own named auto keeps working as it did; it is theirs, not a project's.
    if name != autoprofile.AUTO_NAME or autoprofile.AUTO_NAME in config.profile_names():
        if confirm_trust:
            raise UsageError(f"--confirm-trust confirms a {autoprofile.AUTO_FILE}: it goes with the profile "
                             f"{autoprofile.AUTO_NAME}, not {name}")
        return name, None

    def check(auto):
        """The selected profile must be one of the user's own; what it is, for the prompt."""
        try:
            profile = config.resolve(auto.profile, warn=io.say)
        except ConfigError as error:
            raise ConfigError(f"{auto.path}: {error}") from None
        return f"{profile.role_arn or 'the session credentials'}, from {shown_path(profile.origin)}"

    auto = autoprofile.resolve(command, confirm_trust, autoprofile.terminal_prompt(), check)
    io.say(f"imsa: {auto.describe()}")
    return auto.profile, auto.mode


def mfa_codes(profile, mfa_token=None, prompt=None):
    """Where the MFA codes of *profile*'s source come from: --mfa-token, mfa_process, else *prompt*."""
    from imsa import sts

    return sts.MfaSource(profile.source, mfa_token, prompt)


def shown_path(path, home=None):
    """*path* with the home directory written ``~``."""
    home = home or os.path.expanduser("~")
    if path and home != "/" and (path == home or path.startswith(home + os.sep)):
        return "~" + path[len(home):]
    return path


def describe_left(expiration, now=None):
    """How long until *expiration*, for people: ``1h05m left``, ``12m left``, ``40s left`` or ``expired``."""
    text = expiry.left(expiration, now or utcnow())
    return text if text == "expired" else f"{text} left"


def warn_if_ending(io, what, expiration, then, environ=None, now=None):
    """Warn on stderr when *expiration* (of *what*) is within the IMSA_WARN_BEFORE window; *then* says what to do."""
    now = now or utcnow()
    if expiry.ending(expiration, now, expiry.warn_before(environ)):
        io.say(f"imsa: warning: {what}: {expiry.left(expiration, now)} left, until {format_time(expiration)}; {then}")


def ensure_session(profile, client, mfa, io, sts_factory=None):
    """Make sure the service holds a session for *profile*'s source with SESSION_MIN_LEFT; makes one (asking for
    MFA where the source needs it) only if not."""
    from imsa import sts_settings

    held = client.session(profile.fingerprint)
    if held is not None and parse_time(held["expiration"]) - utcnow() >= SESSION_MIN_LEFT:
        return False
    # The STS settings this command uses go with the session: the service reaches STS the same way, whatever
    # environment sudo or systemd gave it.
    settings = sts_settings.resolve()
    window = expiry.warn_before()  # a bad IMSA_WARN_BEFORE is said before an MFA code is asked for
    source = profile.source
    session = source.new_session(mfa, settings, sts_factory)
    client.put_session(profile.fingerprint, session, settings, kind=source.kind, label=source.label,
                       warn_before=window)
    what = "MFA session" if getattr(source, "mfa_serial_number", None) else "session"
    io.say(f"imsa: new {what} from {source.label}, valid until {format_time(session.expiration)}")
    if getattr(profile, "aws_secret_access_key", None) and getattr(io.err, "isatty", lambda: False)():
        # Said to people only, when the plain key was just used: scripts and credential_process keep a clean stderr.
        io.say(f"imsa: warning: {profile.name}'s secret key is in plain text in {profile.origin}; imsa migrate moves "
               "it into the secret store")
    return True


def mint(profile, session, spec, sts_factory):
    """Role credentials made from *session* here, by the minter of *profile*'s session kind (when no service runs)."""
    from imsa import sources

    return sources.minter(profile.source.kind)(session, spec, sts_factory)


def record_region(client, region):
    """Tell the shell hook (imsa shell-init) the served profile's region; a file that cannot be written is logged."""
    try:
        shell.record_region(client.path, region, client.expected_uid)
    except OSError as error:
        log.info("cannot record the region for the shell hook: %s", error)


def config_region(environ=None):
    """The region of the AWS config file's profile this shell selects (AWS_PROFILE, else default), or None."""
    import configparser

    from imsa.sts_settings import config_file_path

    environ = os.environ if environ is None else environ
    path = config_file_path(environ)
    name = environ.get("AWS_PROFILE") or "default"
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    for section in ((name,) if name == "default" else ()) + (f"profile {name}",):
        if parser.has_option(section, "region"):
            return parser.get(section, "region").strip() or None
    return None


def region_advice(profile, environ=None):
    """What to say after ``imsa assume`` when SDKs in this shell would use no region, or another one; or None.

    boto3, botocore and the AWS CLI v1 read the region from the environment and the AWS config file only, never
    from IMDS: without one they fail ("You must specify a region"). Through the shell hook (imsa shell-init, which
    passes IMSA_SHELL_HOOK to the command) the region variables follow the profile, unless someone else set them.
    """
    environ = os.environ if environ is None else environ
    mine = environ.get(shell.HOOK_VARIABLE, "")
    follows = bool(environ.get(shell.HOOK_MARK)) and all(
        environ.get(name, mine) == mine for name in shell.REGION_VARIABLES
    )
    current = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    region = profile.region if follows else current or config_region(environ)
    if not region and profile.region:
        name = os.path.basename(environ.get("SHELL") or "")
        hook = f"imsa shell-init {name} | source" if name == "fish" else \
            f'eval "$(imsa shell-init {name if name in shell.SHELLS else "bash"})"'
        return (f"this shell has no AWS region, and boto3 and the AWS CLI v1 do not read it from IMDS: run "
                f"export AWS_REGION={profile.region} AWS_DEFAULT_REGION={profile.region}, or make the shell follow "
                f"the profile's region with {hook} (README, \"Shell set-up\")")
    if not region:
        return (f"profile {profile.name} names no region and this shell has none: boto3 and the AWS CLI v1 will fail "
                f"with \"You must specify a region\"; add a region to {profile.name} in {profile.origin}, or export "
                "AWS_REGION")
    if profile.region and current and not follows and current != profile.region:
        return (f"this shell's region is {current}, not {profile.region} (the profile's): SDKs here call {current}; "
                f"run export AWS_REGION={profile.region} AWS_DEFAULT_REGION={profile.region} to follow the profile")
    return None


def profile_credentials(name, mfa_token=None, io=None, client=None, prompt=None, sts_factory=None, way=None,
                        command=None):
    """(profile, Credentials) without touching what IMDS serves; direct STS calls when no service runs. *way* names
    the command in the service's delivery log; for a ``confirm: true`` profile, *command* is what the person is
    asked to let have the credentials (imsa/commands/fence.py)."""
    from imsa import sts

    io = io or Io()
    profile = load_profile(name, io)
    if command:
        from imsa.commands import fence

        fence.confirm(profile, command)
    client = client or Client()
    mfa = mfa_codes(profile, mfa_token, prompt)
    factory = sts_factory or sts.sts_client
    try:
        ensure_session(profile, client, mfa, io, factory)
    except ServiceNotRunning:
        from imsa import sts_settings

        settings = sts_settings.resolve()  # a configuration error is said before anything else
        if profile.source.kind == "credentials":
            io.say("imsa: the service is not running, so nothing is cached: MFA is asked every time (start it: imsa "
                   "start)")
        else:
            io.say("imsa: the service is not running: the role's credentials are made here, for this command only "
                   "(start it: imsa start)")
        session = profile.source.new_session(mfa, settings, factory)
        if not profile.role_arn:
            return profile, session
        return profile, mint(profile, session, dict(profile.role_spec(), sts=settings), factory)
    return profile, Credentials.from_json(client.credentials(profile.role_spec(), way=way))


def shadowing_warnings(environ=None, home=None, listen=None):
    """Settings that would make SDKs use other credentials than imsa's, or send IMDS traffic to a proxy.

    *listen* is where the service listens (``HOST:PORT``, default the metadata address): its host is the one that
    must be exempt from the proxy.
    """
    environ = os.environ if environ is None else environ
    host, _, port = (listen or DEFAULT_ADDRESS).rpartition(":")
    warnings = []
    for name in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        if environ.get(name):
            warnings.append(f"{name} is set: SDKs in this shell use it before IMDS")
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        warnings.append("AWS_EC2_METADATA_DISABLED=true: SDKs in this shell never ask IMDS")
    credentials_file = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
        home or os.path.expanduser("~"), ".aws", "credentials"
    )
    if default_profile_has_keys(credentials_file):
        warnings.append(f"{credentials_file} has keys in [default]: SDKs use them before IMDS")
    proxy = environ.get("http_proxy") or environ.get("HTTP_PROXY")
    if proxy and not proxy_exempt(host, port, environ):
        warnings.append(f"HTTP_PROXY is set without NO_PROXY={host}: IMDS requests would go to the proxy")
    return warnings


def proxy_exempt(host, port, environ):
    """True when NO_PROXY exempts ``host:port`` the way SDKs read it (urllib's rule: a name, a domain suffix, or *)."""
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    for entry in (part.strip().lstrip(".") for part in no_proxy.split(",")):
        if entry == "*" or entry in (host, f"{host}:{port}") or host.endswith("." + entry):
            return True
    return False


def endpoint_warnings(running, environ=None):
    """What is wrong with this shell's AWS_EC2_METADATA_SERVICE_ENDPOINT for the service *running* (status JSON)."""
    environ = os.environ if environ is None else environ
    listen, endpoint = running.get("listen"), running.get("endpoint")
    if not listen or not endpoint:
        return []
    host, _, port = listen.rpartition(":")
    configured = environ.get(ENDPOINT_VARIABLE)
    if not configured:
        if listen == DEFAULT_ADDRESS:
            return []
        return [f"{ENDPOINT_VARIABLE} is not set: SDKs in this shell ask 169.254.169.254, not the service on "
                f"{listen}; run: export {ENDPOINT_VARIABLE}={endpoint}"]
    if endpoint_address(configured) == (host.strip("[]"), port):
        return []
    remedy = f"unset {ENDPOINT_VARIABLE}" if listen == DEFAULT_ADDRESS else f"export {ENDPOINT_VARIABLE}={endpoint}"
    return [f"{ENDPOINT_VARIABLE}={configured} is not where the service listens ({listen}): SDKs in this shell ask "
            f"elsewhere; run: {remedy}"]


def endpoint_address(url):
    """(host, port as text) an SDK connects to for the endpoint *url* (``http://HOST[:PORT][/]``); port 80 if none."""
    rest = url.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    netloc = rest.split("/", 1)[0]
    if netloc.startswith("["):
        host, _, tail = netloc[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = netloc.partition(":")
    return host, port or "80"


def default_profile_has_keys(path):
    """True when the AWS credentials file at *path* has keys under [default]."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return False
    return parser.has_option("default", "aws_access_key_id")


