"""``imsa assume`` and ``imsa export``: a profile's role for every SDK on the machine, or for one shell."""

import os

from imsa.client import Client
from imsa.commands import fence
from imsa.commands.common import (
    Io, auto_profile, describe_left, endpoint_warnings, ensure_session, load_profile, mfa_codes, profile_credentials,
    record_region, region_advice, shown_path, warn_if_ending,
)
from imsa.credentials import format_time, parse_time
from imsa.errors import EXIT_OK, ConfigError, UsageError


def assume(name, mfa_token=None, io=None, client=None, prompt=None, sts_factory=None):
    """Make profile *name* the role every SDK on the machine gets."""
    io = io or Io()
    client = client or Client()
    if not name:
        from imsa.commands.picker import choose_profile

        name = choose_profile("assume", client)
    profile = load_profile(name, io)
    fence.refuse_global(profile)
    running = client.status()  # fail fast (exit 5) before asking for an MFA code
    ensure_session(profile, client, mfa_codes(profile, mfa_token, prompt), io, sts_factory)
    result = client.activate(profile.role_spec())
    record_region(client, profile.region)
    what = profile.role_arn or "the session credentials"
    expiration = parse_time(result["expiration"])
    io.say(f"imsa: {profile.name} active: {what}, until {format_time(expiration)} ({describe_left(expiration)})")
    held = client.session(profile.fingerprint)
    if held:
        warn_if_ending(io, f"the session from {profile.source.label}", parse_time(held["expiration"]),
                       f"the service serves {profile.name} until then, and imsa assume {profile.name} makes a new one")
    for warning in endpoint_warnings(running) + [region_advice(profile)]:
        if warning:
            io.say(f"imsa: warning: {warning}")
    return EXIT_OK


def export(name, fmt="sh", mfa_token=None, io=None, client=None, prompt=None, sts_factory=None, unset=False,
           confirm_trust=None, to_credentials_file=None, credentials_path=None, erase=None, environ=None):
    """Print profile *name*'s credentials in *fmt* (the global role stays as it is); with *unset*, the lines that
    remove them; with *to_credentials_file*, write them as a profile of a credentials file; *erase* removes one."""
    from imsa import credfile, formats

    io = io or Io()
    environ = os.environ if environ is None else environ
    if credentials_path and to_credentials_file is None and erase is None:
        raise UsageError("--file goes with --to-credentials-file or --erase")
    if unset or erase is not None:
        what = "--unset" if unset else "--erase"
        if name:
            raise UsageError(f"{what} takes no PROFILE: imsa export {what}" + (" NAME" if erase is not None else ""))
    if unset:
        if fmt not in formats.SHELL_FORMATS:
            raise UsageError(f"--unset prints shell lines: --format {', '.join(formats.SHELL_FORMATS)}")
        io.data(formats.unset_lines(fmt))
        return EXIT_OK
    if erase is not None:
        if to_credentials_file is not None:
            raise UsageError("--erase goes alone: imsa export --erase NAME [--file PATH]")
        return _erase(erase, credentials_path or credfile.default_path(environ), io)
    if not name:
        from imsa.commands.picker import choose_profile, has_terminal

        if not has_terminal():
            raise UsageError("name the PROFILE to export (or --unset to remove the exports): imsa export PROFILE")
        name = choose_profile("export", client)
    if to_credentials_file is not None and fmt not in formats.SHELL_FORMATS:
        raise UsageError(f"--to-credentials-file prints shell lines (with --file): --format "
                         f"{', '.join(formats.SHELL_FORMATS)}")
    again = "imsa export {options} auto" + ("" if fmt == "sh" else f" --format {fmt}")
    name, _mode = auto_profile(name, confirm_trust, io, again)
    path = credentials_path or credfile.default_path(environ)
    target = None
    if to_credentials_file is not None:  # checked before an MFA code is asked for
        target = _credentials_target(name, to_credentials_file or name, path, environ)
    profile, creds = profile_credentials(name, mfa_token, io, client, prompt, sts_factory, way="export",
                                         command=f"imsa export {name}")
    again = f"run imsa export {name} again before then" if to_credentials_file is None else \
        "they are not refreshed: write them again before then"
    warn_if_ending(io, f"the credentials of {profile.name}", creds.expiration, again)
    if to_credentials_file is None:
        io.data(formats.render(fmt, profile, creds))
        return EXIT_OK
    note = credfile.write(path, target, profile, creds)
    if note:
        io.say(f"imsa: note: {note}")
    io.say(f"imsa: wrote [{target}] to {shown_path(path)}: {profile.name}'s credentials until "
           f"{format_time(creds.expiration)} ({describe_left(creds.expiration)}); imsa export --erase {target}"
           + (f" --file {path}" if credentials_path else "") + " removes it")
    if credentials_path:
        io.data(formats.shell_lines({"AWS_SHARED_CREDENTIALS_FILE": os.path.abspath(path), "AWS_PROFILE": target}, fmt,
                                    unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")))
    return EXIT_OK


def _erase(name, path, io):
    """``imsa export --erase NAME``: remove imsa's [NAME] from the credentials file at *path*."""
    from imsa import credfile

    if credfile.erase(path, name):
        io.say(f"imsa: removed [{name}] from {shown_path(path)}")
    else:
        io.say(f"imsa: {shown_path(path)} has no [{name}]: nothing to remove")
    return EXIT_OK


def _credentials_target(name, target, path, environ):
    """*target*, once [target] can be imsa's in the credentials file at *path* and SDKs would use its keys."""
    from imsa import credfile
    from imsa.sts_settings import config_file_path

    credfile.check_writable(path, target)
    shadowing = credfile.shadowing_keys(target, config_file_path(environ))
    if shadowing:
        raise ConfigError(f"profile {target} of {config_file_path(environ)} has {', '.join(shadowing)}, which SDKs "
                          f"use before a credentials file's keys; name another: imsa export {name} "
                          f"--to-credentials-file imsa-{name}")
    return target
