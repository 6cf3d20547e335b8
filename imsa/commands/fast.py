"""``imsa export PROFILE`` and ``imsa credential-process PROFILE`` while the service holds the profile's session:
the profile from the cache (imsa/profile_cache.py), two requests on the control socket, the answer printed.

They run at the start of every shell and every SDK process whose profile uses credential_process, so they skip
what the full commands cost at each start: the parser (argparse), logging, the YAML and INI loaders, dataclasses.
Whatever this path does not answer exactly as the full command would — an option it does not know, a profile not
in the cache, no session or one the full path would renew, a warning to give, any error — returns None, and the
full command runs instead and says and does everything as always (the requests made here only read).
"""

import os

from imsa.errors import EXIT_OK, ImsaError

# commands.common.SESSION_MIN_LEFT, in seconds: a session with less left is renewed by the full path.
SESSION_MIN_LEFT_SECONDS = 600
# The formats answered here; the others (boto, js, dotenv) take the full path.
SHELL_FORMATS = ("sh", "fish", "powershell")
FAST_FORMATS = SHELL_FORMATS + ("json",)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # imsa.credentials.TIME_FORMAT
# Names the full path resolves in ways the cache does not hold: a trusted .imsa.json, IAM Identity Center roles.
NOT_CACHED = ("auto",)
NOT_CACHED_PREFIXES = ("sso:",)


def parse(argv):
    """(command, profile, format) of an *argv* this path answers, else None."""
    if len(argv) < 2 or argv[0] not in ("export", "credential-process"):
        return None
    command, name, rest = argv[0], argv[1], list(argv[2:])
    if not name or name.startswith("-") or name in NOT_CACHED or name.startswith(NOT_CACHED_PREFIXES):
        return None
    fmt = "sh"
    if command == "export" and len(rest) == 2 and rest[0] == "--format":
        fmt, rest = rest[1], []
    elif command == "export" and len(rest) == 1 and rest[0].startswith("--format="):
        fmt, rest = rest[0][len("--format="):], []
    if rest or fmt not in FAST_FORMATS:
        return None
    return command, name, fmt


def run(argv, out):
    """Answer *argv* on *out* and return EXIT_OK, or return None: the full command must run."""
    parsed = parse(argv)
    if parsed is None or (os.geteuid() == 0 and os.environ.get("SUDO_UID")):
        return None  # through sudo: the full path becomes the invoking user (imsa/sudo.py) first
    command, name, fmt = parsed
    # Imported only now: cli.main asks this module first for every command, and the others need none of it.
    from imsa import expiry, profile_cache
    from imsa.client import Client

    try:
        entry = profile_cache.lookup(name)
        if entry is None:
            return None
        window = expiry.warn_before()
        client = Client()
        held = client.session(entry["fingerprint"])
        now = expiry.now()
        if held is None or (expiry.parse(held["expiration"]) - now).total_seconds() < SESSION_MIN_LEFT_SECONDS:
            return None
        answer = client.credentials(entry["spec"])
        expiration = expiry.parse(answer["expiration"])
        if command == "export" and expiry.ending(expiration, now, window):
            return None  # the full path warns about it
        text = render(command, fmt, entry, answer, expiration.strftime(TIME_FORMAT))
    except (ImsaError, OSError, AttributeError, KeyError, TypeError, ValueError):
        return None
    out.write(text)
    out.flush()
    return EXIT_OK


def render(command, fmt, entry, answer, expiration):
    """What the full command prints for *entry*'s credentials *answer* (control-socket JSON) in *fmt*."""
    keys = {"AccessKeyId": answer["access_key_id"], "SecretAccessKey": answer["secret_access_key"],
            "SessionToken": answer["session_token"]}
    if not all(isinstance(value, str) and value for value in keys.values()):
        raise ValueError("credentials need non-empty strings")
    if command == "credential-process" or fmt == "json":
        import json

        body = {"Version": 1, **keys, "Expiration": expiration}  # Credentials.to_process()
        if command == "export":
            return json.dumps(body, indent=2) + "\n"
        if entry["role_arn"]:  # commands.exec.process_json
            body["AccountId"] = entry["role_arn"].split(":")[4]
        return json.dumps(body) + "\n"
    from imsa import formats

    credentials_env = {  # Credentials.to_env()
        "AWS_ACCESS_KEY_ID": keys["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": keys["SecretAccessKey"],
        "AWS_SESSION_TOKEN": keys["SessionToken"], "AWS_CREDENTIAL_EXPIRATION": expiration,
    }
    return formats.shell_lines(formats.export_variables(credentials_env, entry["name"], expiration, entry["region"]),
                               fmt)
