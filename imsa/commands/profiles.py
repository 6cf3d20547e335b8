"""``imsa list``: every profile imsa can use, from which file, on which source, and whether a session is held."""

import json

from imsa import config
from imsa.client import Client
from imsa.commands.common import Io, describe_left, shown_path
from imsa.credentials import parse_time
from imsa.errors import EXIT_OK, ConfigError, ServiceNotRunning


def held_sessions(client):
    """{fingerprint: expiration text} of the valid sessions the service holds; None when it is not running."""
    try:
        status = client.status()
    except ServiceNotRunning:
        return None
    return {held["fingerprint"]: held["expiration"] for held in status.get("sessions", []) if held.get("valid")}


def rows(sessions, warn=None, environ=None):
    """One JSON-ready row per profile name of ~/.imsa and the AWS config files (no secret in any)."""
    found = []
    for name, origin, profile, shadows, settings in config.catalog(warn=warn, environ=environ):
        row = {"name": name, "origin": origin, "shadows": shadows, "settings": settings}
        if isinstance(profile, ConfigError):
            row["error"] = str(profile)
        else:
            row.update(
                source=profile.source.label, kind=profile.source.kind,
                role_arn=profile.role_arn, via=[hop.role_arn for hop in profile.hops[:-1]], region=profile.region,
                session=(sessions or {}).get(profile.fingerprint), error=None,
            )
        found.append(row)
    return found


def organisation_notes(row):
    """What *row*'s profile takes from files other than its own (the organisation's defaults): one note per file."""
    by_file = {}
    for key, path in sorted((row.get("settings") or {}).items()):
        if path != row["origin"]:
            by_file.setdefault(path, []).append(key)
    return [f"{row['name']}: {', '.join(keys)} from {shown_path(path)} (the organisation's defaults)"
            for path, keys in by_file.items()]


def list_profiles(as_json=False, io=None, client=None, environ=None, sso=None, server=None):
    """Print every usable profile: its file, source, role, region and held session (``--json``: a list); with
    *sso* (a profile), the accounts and roles its IAM Identity Center login may use instead; with *server*, the
    roles that credential server offers."""
    io = io or Io()
    if server is not None:
        from imsa.commands.cred_server import list_roles as server_roles

        return server_roles(server, as_json, io, client)
    if sso is not None:
        from imsa.commands.sso import list_roles

        return list_roles(sso, as_json, io)
    sessions = held_sessions(client or Client())
    listed = rows(sessions, warn=io.say, environ=environ)
    if as_json:
        io.data(json.dumps(listed, indent=2) + "\n")
        return EXIT_OK
    table = [("PROFILE", "FROM", "SOURCE", "ROLE", "REGION", "SESSION")]
    notes = []
    for row in listed:
        if row["error"]:
            table.append((row["name"], shown_path(row["origin"]), "error: see below", "", "", ""))
            notes.append(f"{row['name']}: {row['error']}")
            continue
        session = "-"
        if row["session"]:
            session = f"held ({describe_left(parse_time(row['session']))})"
        role = row["role_arn"] or "(the session's own credentials)"
        if row["via"]:
            role += f" (via {len(row['via'])} role{'s' if len(row['via']) > 1 else ''})"
        table.append((row["name"], shown_path(row["origin"]), row["source"], role, row["region"] or "-", session))
        if row["shadows"]:
            notes.append(f"{row['name']} in {shown_path(row['shadows'])} is shadowed by {shown_path(row['origin'])}")
        notes.extend(organisation_notes(row))
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)
    io.data(text + "\n")
    for note in notes:
        io.say(f"imsa: {note}")
    if sessions is None:
        io.say("imsa: the service is not running, so no session is held (start it: imsa start)")
    return EXIT_OK
