"""``imsa assume`` and ``imsa export``: a profile's role for every SDK on the machine, or for one shell."""

from imsa import shell
from imsa.client import Client
from imsa.commands.common import (
    Io, auto_profile, describe_left, endpoint_warnings, ensure_session, export_lines, load_profile, mfa_codes, profile_credentials,
    record_region, region_advice,
)
from imsa.credentials import format_time, parse_time
from imsa.errors import EXIT_OK, UsageError


def assume(name, mfa_token=None, io=None, client=None, prompt=None, sts_factory=None):
    """Make profile *name* the role every SDK on the machine gets."""
    io = io or Io()
    profile = load_profile(name, io)
    client = client or Client()
    running = client.status()  # fail fast (exit 5) before asking for an MFA code
    ensure_session(profile, client, mfa_codes(profile, mfa_token, prompt), io, sts_factory)
    result = client.activate(profile.role_spec())
    record_region(client, profile.region)
    what = profile.role_arn or "the session credentials"
    expiration = parse_time(result["expiration"])
    io.say(f"imsa: {profile.name} active: {what}, until {format_time(expiration)} ({describe_left(expiration)})")
    for warning in endpoint_warnings(running) + [region_advice(profile)]:
        if warning:
            io.say(f"imsa: warning: {warning}")
    return EXIT_OK


def export(name, fmt="sh", mfa_token=None, io=None, client=None, prompt=None, sts_factory=None, unset=False,
           confirm_trust=None):
    """Print exports for profile *name* (the global role stays as it is); with *unset*, the lines that remove them."""
    io = io or Io()
    if unset:
        if name:
            raise UsageError("--unset takes no PROFILE: it removes whatever imsa export set (imsa export --unset)")
        if fmt == "json":
            raise UsageError("--unset prints shell lines: --format sh or fish")
        io.data(shell.unset_lines(fmt))
        return EXIT_OK
    if not name:
        raise UsageError("name the PROFILE to export (or --unset to remove the exports): imsa export PROFILE")
    again = "imsa export {options} auto" + ("" if fmt == "sh" else f" --format {fmt}")
    name, _mode = auto_profile(name, confirm_trust, io, again)
    profile, creds = profile_credentials(name, mfa_token, io, client, prompt, sts_factory)
    io.data(export_lines(profile, creds, fmt))
    return EXIT_OK
