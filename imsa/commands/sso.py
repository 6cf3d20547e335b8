"""``imsa login`` and ``imsa list --sso``: signing in to IAM Identity Center, and the accounts and roles it offers."""

import json

from imsa.client import Client
from imsa.commands.common import Io, load_profile
from imsa.credentials import format_time
from imsa.errors import EXIT_OK, ServiceNotRunning, UsageError


def sso_profile(name, io):
    """Profile *name*, which must have an IAM Identity Center source; UsageError naming its source otherwise."""
    profile = load_profile(name, io)
    if profile.source.kind != "sso":
        raise UsageError(f"profile {name} does not sign in to IAM Identity Center (its source: {profile.source.label}); "
                         f"imsa assume {name} makes its session")
    return profile


def login(name, no_browser=False, io=None, client=None):
    """Sign in to profile *name*'s IAM Identity Center (always a new login), keep the token in the shared cache
    (~/.aws/sso/cache) when the profile shares it, and hand it to the service."""
    from imsa import sts_settings
    from imsa.sources import sso_login

    io = io or Io()
    profile = sso_profile(name, io)
    source = profile.source
    settings = sts_settings.resolve()
    token = sso_login.obtain(source, settings, say=io.say, no_browser=no_browser, force=True)
    try:
        (client or Client()).put_session(profile.fingerprint, token, settings, kind=source.kind, label=source.label)
    except ServiceNotRunning:
        if source.shared:
            io.say("imsa: the service is not running; the token waits in ~/.aws/sso/cache for imsa assume (and the "
                   "AWS CLI)")
            return EXIT_OK
        raise ServiceNotRunning("the service is not running, and this profile's token is kept only by the service "
                                "(sso_cache: imsa); start it (imsa start), then sign in again") from None
    io.say(f"imsa: the service holds the token of {source.start_url} until {format_time(token.expiration)}; "
           f"every profile on it needs no other login")
    return EXIT_OK


def list_roles(name, as_json=False, io=None):
    """Print the accounts and roles profile *name*'s IAM Identity Center login may use (ListAccounts and
    ListAccountRoles); a login first if no token is cached."""
    from imsa import sts_settings
    from imsa.sources import sso, sso_login

    io = io or Io()
    profile = sso_profile(name, io)
    settings = sts_settings.resolve()
    token = sso_login.obtain(profile.source, settings, say=io.say)
    accounts = sso.list_roles(token, settings)
    if as_json:
        io.data(json.dumps(accounts, indent=2) + "\n")
        return EXIT_OK
    table = [("ACCOUNT", "NAME", "ROLE")]
    for account in accounts:
        for role in account["roles"] or ["-"]:
            table.append((account["accountId"], account.get("accountName") or "-", role))
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    io.data("\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                      for line in table) + "\n")
    return EXIT_OK
