"""STS calls (GetSessionToken, AssumeRole) and MFA codes; the client factory, clock and prompt are injected.

Clients reach STS exactly as an StsSettings value says (imsa/sts_settings.py) and nothing else: the botocore
session behind them reads no environment variable and no config file, so the CLI's GetSessionToken and the
service's AssumeRole from that session go the same way, whatever environment the service was started with.
"""

import logging
import math
import os
import re
import shlex
import subprocess
import threading
import time

from imsa.credentials import Credentials, mask, utcnow
from imsa.errors import MfaError, StsError

log = logging.getLogger(__name__)

MFA_CODE = re.compile(r"^[0-9]{6}$")
MFA_ATTEMPTS = 3
# How often a code that is not 6 digits is asked for again before giving up.
MFA_TYPOS = 5
MFA_PROCESS_TIMEOUT = 60
# mfa_process is split like a shell would but run without one: "a | b", "> f", "~" and "$X" are plain arguments.
NO_SHELL = "mfa_process runs without a shell; for pipes, redirections, ~ or $VARIABLES use: sh -c '...'"
# Every STS call is bounded: STS_ATTEMPTS tries, each with these connect and read timeouts (a real STS answers
# in well under a second). STS_BUDGET is the most one call can take, with the standard retry mode's backoff
# before the second try (under 1 s). It must stay well inside client.TIMEOUT, the 30 s the CLI waits for the
# service: an STS that accepts and never answers is then reported as STS's failure (exit 4) by the service too,
# not as a service that did not answer (exit 5). tests/test_sts_settings.py checks the two numbers.
STS_CONNECT_TIMEOUT = 3
STS_READ_TIMEOUT = 6
STS_ATTEMPTS = 2
STS_BUDGET = STS_ATTEMPTS * (STS_CONNECT_TIMEOUT + STS_READ_TIMEOUT) + 1


class MfaRejected(StsError):
    """STS refused the MFA code."""


_shared = {}
_shared_lock = threading.Lock()


def _botocore_session(regional_endpoints=None):
    """A botocore session that reads no environment variable and no config file, one per STS regional-endpoint
    mode (a session-wide setting in botocore); its loader caches the STS model after the first client."""
    key = ("session", regional_endpoints)
    with _shared_lock:
        if key not in _shared:
            import botocore.session

            # Every variable keeps botocore's default and loses its environment variable and config-file key:
            # no AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL_STS, AWS_CA_BUNDLE... of this process counts.
            isolated = {
                name: (None, None, default, convert)
                for name, (_, _, default, convert) in botocore.session.Session.SESSION_VARIABLES.items()
            }
            isolated["config_file"] = (None, None, os.devnull, None)
            isolated["credentials_file"] = (None, None, os.devnull, None)
            if regional_endpoints:
                isolated["sts_regional_endpoints"] = (None, None, regional_endpoints, None)
            _shared[key] = botocore.session.Session(session_vars=isolated)
        return _shared[key]


def sts_client(access_key_id, secret_access_key, session_token=None, settings=None):
    """An STS client with explicit credentials that reaches STS as *settings* say (None: as this process's own
    environment and AWS config file say, sts_settings.resolve()); nothing else changes where it goes."""
    import botocore.config

    from imsa import sts_settings

    settings = settings or sts_settings.resolve()
    session = _botocore_session(settings.sts_regional_endpoints)
    verify = sts_settings.verify_for(settings)

    def create(proxies):
        config = botocore.config.Config(
            connect_timeout=STS_CONNECT_TIMEOUT, read_timeout=STS_READ_TIMEOUT,
            retries={"total_max_attempts": STS_ATTEMPTS, "mode": "standard"}, proxies=proxies,
            use_fips_endpoint=settings.use_fips_endpoint, use_dualstack_endpoint=settings.use_dualstack_endpoint,
            ignore_configured_endpoint_urls=True,
        )
        with _shared_lock:
            return session.create_client(
                "sts",
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                verify=verify,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                config=config,
            )

    client = create({})  # proxies={}: botocore would otherwise read them from this process's environment
    proxy = settings.proxy_for(client.meta.endpoint_url)
    if proxy:  # the endpoint is known only once botocore has resolved it; NO_PROXY is matched against it
        client = create({client.meta.endpoint_url.split(":", 1)[0]: proxy})
    return client


# Endpoints resolved for status, by the settings that decide them; a handful of distinct ones in practice.
_endpoints = {}
ENDPOINT_CACHE = 64


def endpoint_for(settings):
    """The endpoint botocore resolves from *settings* (no request is made), or None if it cannot say."""
    import dataclasses

    key = (settings.region, settings.endpoint_url, settings.sts_regional_endpoints, settings.use_fips_endpoint,
           settings.use_dualstack_endpoint)
    if key not in _endpoints:
        # Proxies and the CA bundle do not change the endpoint: leave them out, no in-memory file is made for it.
        bare = dataclasses.replace(settings, http_proxy=None, https_proxy=None, ca_bundle=None)
        try:
            url = sts_client("AKIAENDPOINT00000000", "endpoint", None, bare).meta.endpoint_url
        except Exception:  # status must answer whatever botocore thinks of a region
            log.debug("cannot resolve the STS endpoint of %r", settings, exc_info=True)
            return None
        if len(_endpoints) >= ENDPOINT_CACHE:
            _endpoints.clear()
        _endpoints[key] = url
    return _endpoints[key]


def describe(settings):
    """*settings* for ``imsa status --json``, with the endpoint botocore resolves from them (no secret)."""
    return settings.describe(endpoint_for(settings))


def preload():
    """Before the privilege drop, while the interpreter's files are surely readable: import what an STS call needs,
    load the STS model, and keep botocore's default CA bundle in memory.

    After the drop the served user may not be able to read the Python installation (an interpreter under /root):
    certifi could then not even say where its bundle is, and OpenSSL could not read it. The service's clients use
    the copy kept here (sts_settings.verify_for) unless the session's settings bring a bundle of their own. A bundle
    that cannot be read now stops the start with the reason.
    """
    import encodings.idna  # noqa: F401  (socket.getaddrinfo needs the codec; imported lazily otherwise)

    import botocore.httpsession

    from imsa import sts_settings
    from imsa.errors import ServiceError

    path = botocore.httpsession.get_cert_path(True)
    try:
        pem = sts_settings.read_bundle(path, "botocore's default CA bundle")
    except sts_settings.ConfigError as error:
        raise ServiceError(f"{error}; the service needs it to reach STS over TLS") from None
    sts_settings.keep_default_bundle(pem)
    try:
        os.stat(sts_settings.ca_file(pem))
    except OSError as error:
        raise ServiceError(f"cannot keep a CA bundle in memory ({error.strerror}: is /proc mounted?); the service "
                           f"needs one to reach STS over TLS") from None
    sts_client("AKIAPRELOAD000000000", "preload", None, sts_settings.StsSettings())


def _sts_failure(error, action, elapsed=None):
    """Turn a botocore exception into an StsError with one readable line."""
    import botocore.exceptions

    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code", "Error")
        message = (details.get("Message") or str(error)).strip()
        if "MultiFactorAuthentication" in message or code == "InvalidClientTokenId" and "MFA" in message:
            return MfaRejected(f"STS refused the MFA code ({code}: {message})")
        return StsError(f"STS {action} failed: {code}: {message}")
    if isinstance(error, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        waited = f"within {math.ceil(elapsed)} s" if elapsed is not None else f"within {STS_BUDGET} s"
        endpoint = error.kwargs.get("endpoint_url") or "its endpoint"
        return StsError(f"STS did not answer {waited} ({action} at {endpoint}, {STS_ATTEMPTS} attempts); "
                        f"check the endpoint, proxy and network (README, \"How imsa reaches STS\")")
    if isinstance(error, botocore.exceptions.NoRegionError):
        return StsError(f"STS {action} failed: no region")
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return StsError(f"STS {action} failed: {error}")
    return StsError(f"STS {action} failed: {error}")


def get_session_token(profile, code, client_factory=sts_client, now=utcnow, settings=None):
    """GetSessionToken with the profile's long-term keys (and MFA code, if it has a device), reaching STS as
    *settings* say (None: as this process's environment says) in the profile's region."""
    import botocore.exceptions

    from imsa import sts_settings

    settings = (settings or sts_settings.resolve()).for_region(profile.region)
    client = client_factory(profile.aws_access_key_id, profile.aws_secret_access_key, None, settings)
    params = {"DurationSeconds": profile.session_duration_seconds}
    if profile.mfa_serial_number:
        params["SerialNumber"] = profile.mfa_serial_number
        params["TokenCode"] = code
    log.info("GetSessionToken for %s", mask(profile.aws_access_key_id))
    started = time.monotonic()
    try:
        answer = client.get_session_token(**params)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise _sts_failure(error, "GetSessionToken", time.monotonic() - started) from error
    return Credentials.from_sts(answer["Credentials"], now())


def assume_role(session, spec, client_factory=sts_client, now=utcnow):
    """AssumeRole from MFA-session credentials; *spec* is a Profile.role_spec() dict. Its ``sts`` entry (the
    StsSettings the session was made with) says how to reach STS; without one, this process's environment does."""
    import botocore.exceptions

    from imsa import sts_settings

    settings = (spec.get("sts") or sts_settings.resolve()).for_region(spec.get("region"))
    client = client_factory(session.access_key_id, session.secret_access_key, session.session_token, settings)
    params = {
        "RoleArn": spec["role_arn"],
        "RoleSessionName": spec["role_session_name"],
        "DurationSeconds": spec["duration_seconds"],
    }
    if spec.get("external_id"):
        params["ExternalId"] = spec["external_id"]
    log.info("AssumeRole %s as %s", spec["role_arn"], spec["role_session_name"])
    started = time.monotonic()
    try:
        answer = client.assume_role(**params)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        raise _sts_failure(error, "AssumeRole", time.monotonic() - started) from error
    return Credentials.from_sts(answer["Credentials"], now())


def assume_chain(session, spec, client_factory=sts_client, now=utcnow):
    """The minter of sessions of AWS credentials (sources.KINDS): AssumeRole through each hop of *spec*'s ``via``
    (a ~/.aws/config chain), then the final role, every call signed by the credentials the previous one returned."""
    credentials = session
    for hop in spec.get("via") or ():
        credentials = assume_role(credentials, dict(spec, **hop), client_factory, now)
    return assume_role(credentials, spec, client_factory, now)


def open_terminal():
    """The controlling terminal, unbuffered binary (a text-mode "r+" open of /dev/tty fails: it cannot seek); or None."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    return os.fdopen(fd, "r+b", buffering=0)


def ask_terminal(tty, text):
    """Write *text* on *tty* and return the line typed there (MfaError at end of input).

    Ctrl-C or Ctrl-D leave the cursor after the prompt: the line is ended there first, so that the message that
    follows (``imsa: interrupted``, ``imsa: error: …``) starts a line of its own.
    """
    with tty:
        try:  # the prompt too: a Ctrl-C typed as soon as it shows may be handled before readline is reached
            tty.write(text.encode("utf-8"))
            line = tty.readline()
        except KeyboardInterrupt:
            tty.write(b"\n")
            raise
        if not line:
            tty.write(b"\n")
    if not line:
        raise MfaError("no MFA code entered")
    return line.decode("utf-8", "replace").strip()


class TerminalPrompt:
    """Asks on /dev/tty; with no terminal device, on stderr when stdin is a terminal; else refuses."""

    def __call__(self, text):
        """Show *text* and return the line typed."""
        tty = open_terminal()
        if tty is not None:
            return ask_terminal(tty, text)
        import sys

        if sys.stdin is not None and sys.stdin.isatty():
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                sys.stderr.write("\n")
                raise
            if not line:
                sys.stderr.write("\n")
                raise MfaError("no MFA code entered")
            return line.strip()
        raise MfaError("an MFA code is needed but there is no terminal to ask on; pass --mfa-token CODE or set mfa_process")


def run_mfa_process(command):
    """Run the profile's mfa_process (no shell) and return the code it prints."""
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise MfaError(f"mfa_process cannot be parsed: {error}") from None
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MFA_PROCESS_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise MfaError(f"mfa_process: command not found: {argv[0]} ({NO_SHELL})") from None
    except subprocess.TimeoutExpired:
        raise MfaError(f"mfa_process did not finish within {MFA_PROCESS_TIMEOUT} s") from None
    except OSError as error:  # not executable, a directory, ...
        raise MfaError(f"mfa_process: cannot run {argv[0]}: {error.strerror} ({NO_SHELL})") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise MfaError(f"mfa_process failed: {reason} ({NO_SHELL})")
    code = done.stdout.strip()
    if not MFA_CODE.match(code):
        raise MfaError(f"mfa_process did not print a 6-digit code ({NO_SHELL})")
    return code


class MfaSource:
    """Yields MFA codes for a profile: --mfa-token, then mfa_process, then the prompt (re-asked on typos)."""

    def __init__(self, profile, given=None, prompt=None):
        self.profile = profile
        self.given = given
        self.prompt = prompt or TerminalPrompt()

    @property
    def can_retry(self):
        """A refused code can be asked for again only from a person or a process, not from --mfa-token."""
        return self.given is None

    def code(self):
        """One 6-digit code."""
        if self.given == "-":  # one line from stdin: a code in argv is visible to every user in ps
            import sys

            self.given = (sys.stdin.readline() if sys.stdin is not None else "").strip()
            if not MFA_CODE.match(self.given):
                raise MfaError("--mfa-token -: the line read from stdin is not a 6-digit MFA code")
        if self.given is not None:
            if not MFA_CODE.match(self.given):
                raise MfaError("--mfa-token must be 6 digits, or - to read the code from stdin")
            return self.given
        if self.profile.mfa_process:
            return run_mfa_process(self.profile.mfa_process)
        text = f"MFA code for {self.profile.mfa_serial_number}: "
        for _ in range(MFA_TYPOS):
            answer = self.prompt(text)
            if MFA_CODE.match(answer):
                return answer
            text = f"An MFA code is 6 digits. MFA code for {self.profile.mfa_serial_number}: "
        raise MfaError(f"no 6-digit MFA code after {MFA_TYPOS} tries")


def new_session(profile, mfa, client_factory=sts_client, now=utcnow, settings=None):
    """GetSessionToken, asking again for a refused MFA code up to MFA_ATTEMPTS times; *settings* as in
    get_session_token."""
    from imsa import sts_settings

    settings = settings or sts_settings.resolve()
    if not profile.mfa_serial_number:
        return get_session_token(profile, None, client_factory, now, settings)
    attempts = MFA_ATTEMPTS if mfa.can_retry else 1
    for attempt in range(1, attempts + 1):
        try:
            return get_session_token(profile, mfa.code(), client_factory, now, settings)
        except MfaRejected as error:
            if not mfa.can_retry:
                raise MfaError(f"{error}; run the command again with the current code") from None
            if attempt == attempts:
                raise MfaError(f"{error}; gave up after {attempts} attempts") from None
            log.warning("%s; try again", error)
    raise AssertionError("unreachable")
