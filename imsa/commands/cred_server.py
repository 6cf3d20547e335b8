"""``imsa login`` for every source that signs in, and ``imsa list --server``: the roles a credential server offers."""

import json

from imsa.client import Client
from imsa.commands.common import Io, load_profile
from imsa.credentials import format_time
from imsa.errors import EXIT_OK, ServiceNotRunning


def login(name, no_browser=False, io=None, client=None):
    """Sign in to profile *name*'s credential server (always a new login) and hand the token to the service; a
    profile of any other source goes to its own login (IAM Identity Center: imsa/commands/sso.py)."""
    from imsa import sts_settings
    from imsa.sources import cred_server, cred_server_login

    io = io or Io()
    profile = load_profile(name, io)
    if profile.source.kind != cred_server.KIND:
        from imsa.commands import sso

        return sso.login(name, no_browser, io, client)
    source = profile.source
    settings = sts_settings.resolve()
    client = client or Client()
    client.status()  # only the service keeps the token: a login without it would be thrown away
    token = cred_server_login.obtain(source.server, settings, say=io.say, no_browser=no_browser)
    client.put_session(profile.fingerprint, token, settings, kind=source.kind, label=source.label)
    io.say(f"imsa: the service holds the token of the credential server {source.server.id} until "
           f"{format_time(token.expiration)}; every profile on it needs no other login")
    return EXIT_OK


def list_roles(server, as_json=False, io=None, client=None):
    """Print the roles credential server *server* (its id or url) offers to the signed-in person (``GET
    {url}/roles``, asked by the service with the token it holds; a login first when it holds none). The listing is
    optional in the API: a server without it is said so on stderr, and nothing is printed."""
    from imsa import sts_settings
    from imsa.sources import cred_server, cred_server_login
    from imsa.sources.cred_server import CredServer

    io = io or Io()
    found = cred_server.find(server)
    source = CredServer(found)
    client = client or Client()
    settings = sts_settings.resolve()
    try:
        answer = client.session_roles(source.fingerprint)
        if answer is None:
            token = cred_server_login.obtain(found, settings, say=io.say)
            client.put_session(source.fingerprint, token, settings, kind=source.kind, label=source.label)
            answer = client.session_roles(source.fingerprint)
        supported, roles = answer["supported"], answer["roles"]
    except ServiceNotRunning:
        io.say("imsa: the service is not running: this login serves this listing only (start it: imsa start)")
        token = cred_server_login.obtain(found, settings, say=io.say)
        roles = cred_server.list_roles(token, settings)
        supported = roles is not None
    if not supported:
        io.say(f"imsa: the credential server {found.id} does not list roles (GET {found.endpoint('roles')} answered "
               "404 or 405: the listing is optional in its API); ask its administrators which roles to name in "
               "server_role")
        return EXIT_OK
    if as_json:
        io.data(json.dumps(roles, indent=2) + "\n")
        return EXIT_OK
    table = [("ROLE", "DESCRIPTION")] + [(role["name"], role["description"] or "-") for role in roles]
    width = max(len(line[0]) for line in table)
    io.data("\n".join(f"{line[0].ljust(width)}  {line[1]}".rstrip() for line in table) + "\n")
    return EXIT_OK
