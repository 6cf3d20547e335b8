"""``imsa exec`` and ``imsa credential-process``: one profile's credentials for one process, from the service's session.

In ecs mode ``imsa exec`` serves its command itself (server/container.py) on a port it keeps bound for the command's
whole life, and fetches each answer from the service over the control socket; the service only records which
profile the running exec uses (server/execs.py), to keep it rotated.

Plain functions returning exit codes, like every command: no argparse, no sys.exit, no Flask.
"""

import json
import logging
import os
import shlex
import signal
import subprocess
import threading

from imsa import sts
from imsa.client import Client
from imsa.commands import fence
from imsa.commands.common import (
    Io, auto_profile, default_profile_has_keys, describe_left, ensure_session, load_profile, mfa_codes,
    profile_credentials, warn_if_ending,
)
from imsa.credentials import Credentials, format_time
from imsa.errors import EXIT_OK, ImsaError, MfaError, ServiceNotRunning, UsageError
from imsa.shell import HOOK_VARIABLE

log = logging.getLogger(__name__)

MODES = ("ecs", "static")
# Removed from the child's environment: each would make an SDK use other credentials than the ones imsa hands it.
# Environment keys and web identity come before container credentials in every SDK's chain; AWS_PROFILE picks a
# profile of ~/.aws/config first; RELATIVE_URI wins over FULL_URI and a token file over the token variable.
SHADOWING = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "IMSA_PROFILE_EXPIRATION",
)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126
# What ``imsa exec PROFILE`` runs without a command when $SHELL is not set.
DEFAULT_SHELL = "/bin/sh"


class CommandNotRun(ImsaError):
    """The command given to ``imsa exec`` could not be started; exit 127 (not found) or 126, as shells do."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def child_environment(base, profile, values):
    """*base* without the variables that would shadow *values*, plus *values*, IMSA_PROFILE and the region."""
    env = {key: value for key, value in base.items() if key not in SHADOWING}
    # The region hook (imsa shell-init) of a shell inside the command must leave this profile's region alone: without
    # its mark, the region variables are someone else's to it.
    env.pop(HOOK_VARIABLE, None)
    env.update(values)
    env["IMSA_PROFILE"] = profile.name
    if profile.region:
        env["AWS_REGION"] = profile.region
        env["AWS_DEFAULT_REGION"] = profile.region
    return env


def _terminal_delivers_sigint():
    """True when a terminal's Ctrl-C reaches the child by itself: it shares our process group, the foreground one.

    Forwarding it as well would interrupt the child twice (a second KeyboardInterrupt inside its clean-up).
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run_child(command, env, popen=subprocess.Popen, pass_fds=()):
    """Run *command* with *env* (and the descriptors *pass_fds*), forwarding SIGINT/SIGTERM; its exit status, or
    128+N when signal N ended it."""
    state = {"child": None, "pending": []}

    def forward(signum, _frame):
        child = state["child"]
        if child is None:
            state["pending"].append(signum)
            return
        if signum == signal.SIGINT and _terminal_delivers_sigint():
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        try:
            state["child"] = popen(command, env=env, pass_fds=pass_fds) if pass_fds else popen(command, env=env)
        except FileNotFoundError:
            raise CommandNotRun(f"command not found: {command[0]}", EXIT_NOT_FOUND) from None
        except PermissionError:
            raise CommandNotRun(f"cannot run {command[0]}: permission denied", EXIT_CANNOT_RUN) from None
        except OSError as error:
            raise CommandNotRun(f"cannot run {command[0]}: {error.strerror or error}", EXIT_CANNOT_RUN) from None
        for signum in state["pending"]:  # arrived while the child was being started: it gets them now
            forward(signum, None)
        code = state["child"].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code if code >= 0 else 128 - code


def exec_command(name, argv, mode=None, mfa_token=None, io=None, client=None, prompt=None, sts_factory=None,
                 environ=None, popen=subprocess.Popen, confirm_trust=None):
    """Run the command *argv* with profile *name*'s role (ecs *mode* unless it, or a ``.imsa.json``, says
    otherwise); its exit status is ours."""
    io = io or Io()
    environ = os.environ if environ is None else environ
    if mode is not None and mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    again = "imsa exec {options}" + (f" --mode {mode}" if mode else "") + " auto" + (
        f" -- {shlex.join(argv)}" if argv else "")
    name, auto_mode = auto_profile(name, confirm_trust, io, again)
    mode = mode or auto_mode or MODES[0]
    profile = load_profile(name, io)
    shell_only = not argv  # as aws-vault does: a shell with the role, until it exits
    if shell_only:
        argv = [environ.get("SHELL") or DEFAULT_SHELL]
    fence.confirm(profile, f"imsa exec {name} -- {shlex.join(argv)}")
    outer = environ.get("IMSA_PROFILE")
    if outer:
        io.say(f"imsa: nested exec: {name} (inner) wins over {outer} (outer) for this command")
    credentials_file = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    if default_profile_has_keys(credentials_file):
        io.say(f"imsa: warning: {credentials_file} has keys in [default]: SDKs in the command use them before imsa's")
    client = client or Client()

    if mode == "static":
        profile, creds = profile_credentials(name, mfa_token, io, client, prompt, sts_factory, way="exec")
        io.say(
            f"imsa: static credentials for {name}, valid until {format_time(creds.expiration)} "
            f"({describe_left(creds.expiration)}) and not refreshed; use --mode ecs for longer commands"
        )
        warn_if_ending(io, f"the credentials of {name}", creds.expiration,
                       "they are not refreshed; use --mode ecs for a command that runs longer")
        values = dict(creds.to_env(), IMSA_PROFILE_EXPIRATION=format_time(creds.expiration))
        if shell_only:
            io.say(f"imsa: starting {argv[0]} with {name}'s role; exit it to come back")
        return run_child(argv, child_environment(environ, profile, values), popen)

    try:
        client.status()  # fail fast (exit 5) before asking for an MFA code
    except ServiceNotRunning as error:
        raise ServiceNotRunning(
            f"{error}; or run with --mode static (plain AWS_* variables, not refreshed)"
        ) from None
    ensure_session(profile, client, mfa_codes(profile, mfa_token, prompt), io, sts_factory)
    from imsa.server import container

    spec = profile.role_spec()
    source = ServiceCredentials(client, spec)
    source.register()  # STS errors surface now, not in the command's first call
    try:
        with container.Endpoint(source, profile.name, role_arn=spec["role_arn"]) as endpoint:
            log.info("%s: container credentials endpoint %s", name, endpoint.url)
            values = {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint.url,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": endpoint.token,
            }
            if shell_only:
                io.say(f"imsa: starting {argv[0]} with {name}'s role; exit it to come back")
            # The command holds the listening socket too: its port cannot be taken by anyone while it runs.
            return run_child(argv, child_environment(environ, profile, values), popen, pass_fds=(endpoint.fileno(),))
    finally:
        source.revoke()


class ServiceCredentials:
    """The profile's credentials as the service holds them, asked for on each request of the command's SDK.

    While the command runs the service has a binding for it (server/execs.py), so it keeps the role rotated and
    ``imsa status`` shows it; a service started again meanwhile gets a new binding on the next request.
    """

    def __init__(self, client, spec):
        self._client = client
        self._spec = spec
        self._lock = threading.Lock()
        self._binding = None

    def register(self):
        """Tell the service this process runs the profile (it pins it); StsError when it cannot make credentials."""
        with self._lock:
            if self._binding is None:
                self._binding = self._client.create_binding(self._spec)["id"]

    def revoke(self):
        """End the binding; a service that is gone has ended it already."""
        with self._lock:
            binding, self._binding = self._binding, None
        if binding is None:
            return
        try:
            self._client.revoke_binding(binding)
        except ImsaError as error:
            log.info("revoking binding %s: %s", binding, error)

    def __call__(self, served=None):
        """Credentials for the profile now; container.Unavailable with the command to run when there are none.
        *served* is the connection of the command's request, for the service's delivery log."""
        from imsa.server.container import Unavailable

        name = self._spec["profile"]
        try:
            self.register()
            return Credentials.from_json(self._client.credentials(self._spec, way="exec", served=served))
        except ServiceNotRunning:
            with self._lock:
                self._binding = None  # whatever service starts next knows nothing of this exec
            raise Unavailable(f"the imsa service is not running; run: imsa start, then imsa assume {name}") from None
        except (ImsaError, ValueError) as error:
            message = str(error)
            if "imsa assume" not in message:
                message = f"imsa has no valid credentials for profile {name!r} ({message}); run: imsa assume {name}"
            raise Unavailable(message) from None


# --- credential_process ---


class TerminalOnlyPrompt:
    """Asks on /dev/tty only: a credential_process's stdout is data for the SDK, and its stderr is captured."""

    def __init__(self, profile_name):
        self.profile_name = profile_name

    def __call__(self, text):
        """Show *text* on the terminal and return the line typed; MfaError (exit 4) when there is no terminal."""
        tty = sts.open_terminal()
        if tty is None:
            raise MfaError(
                f"profile {self.profile_name} needs an MFA code and there is no terminal to ask on; "
                f"run `imsa assume {self.profile_name}` in a terminal first"
            )
        return sts.ask_terminal(tty, text)


def _terminal_available():
    tty = sts.open_terminal()
    if tty is None:
        return False
    tty.close()
    return True


def process_json(profile, creds):
    """The credential_process Version 1 object (PROTOCOL.md §3.1), with AccountId when the role names it."""
    body = creds.to_process()
    if profile.role_arn:
        body["AccountId"] = profile.role_arn.split(":")[4]
    return body


def credential_process(name, io=None, client=None, prompt=None, sts_factory=None, confirm_trust=None):
    """Print profile *name*'s credentials as credential_process JSON, from the service's session."""
    io = io or Io()
    name, _mode = auto_profile(name, confirm_trust, io, "imsa credential-process {options} auto")
    profile = load_profile(name, io)
    fence.confirm(profile, f"imsa credential-process {name}")
    client = client or Client()
    mfa = mfa_codes(profile, None, prompt or TerminalOnlyPrompt(name))
    factory = sts_factory or sts.sts_client
    try:
        ensure_session(profile, client, mfa, io, factory)
        creds = Credentials.from_json(client.credentials(profile.role_spec(), way="credential-process"))
    except ServiceNotRunning as error:
        needs_person = profile.source.needs_person
        if needs_person and prompt is None and not _terminal_available():
            raise ServiceNotRunning(f"{error}, then run `imsa assume {name}` in a terminal") from None
        io.say("imsa: the service is not running, so nothing is cached: asking STS directly (start it: imsa start)")
        session = profile.source.new_session(mfa, None, factory)
        from imsa.commands.common import mint

        creds = mint(profile, session, profile.role_spec(), factory) if profile.role_arn else session
    io.data(json.dumps(process_json(profile, creds)) + "\n")
    return EXIT_OK
