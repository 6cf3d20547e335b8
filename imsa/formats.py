"""The shapes ``imsa export`` delivers credentials in, one function per consumer.

- ``sh`` (bash, zsh), ``fish``, ``powershell``: lines a shell evaluates; ``--unset`` has their way back;
- ``json``: the credential_process Version 1 object;
- ``boto`` and ``js``: constructor arguments, as expressions to paste into code: a ``boto3.session.Session(...)``
  call, and the ``{region, credentials: {...}}`` object an AWS SDK for JavaScript v3 client takes;
- ``dotenv``: ``NAME=value`` lines, as ``node --env-file`` and docker's ``--env-file`` read them.

Light on purpose: cli.py imports it for the list of formats, so imsa.credentials is imported only to render.
"""

import json
import re
import shlex

from imsa.shell import EXPORTED_VARIABLES, fish_quote

SHELL_FORMATS = ("sh", "fish", "powershell")
FORMATS = SHELL_FORMATS + ("json", "boto", "js", "dotenv")
# What a dotenv reader takes as it is, without quotes (docker's --env-file knows no quoting at all).
_DOTENV_PLAIN = re.compile(r"^[A-Za-z0-9_+/=.:@,-]*$")


def variables(profile, creds):
    """The variables an export sets, in order: the AWS_* credentials, IMSA_PROFILE(_EXPIRATION) and the region."""
    from imsa.credentials import format_time

    return export_variables(creds.to_env(), profile.name, format_time(creds.expiration), profile.region)


def export_variables(credentials_env, name, expiration, region):
    """variables() from its parts (the AWS_* variables, the profile's name, the expiration as text, the region):
    what the held-session fast path (imsa/commands/fast.py) renders without imsa.credentials."""
    values = dict(credentials_env)
    values["IMSA_PROFILE"] = name
    values["IMSA_PROFILE_EXPIRATION"] = expiration
    if region:
        values["AWS_REGION"] = region
        values["AWS_DEFAULT_REGION"] = region
    return values


def powershell_quote(value):
    """A PowerShell single-quoted string: only the single quote is special, written twice."""
    return "'" + value.replace("'", "''") + "'"


def shell_lines(values, fmt, unset=("AWS_PROFILE",)):
    """Lines that set *values* and remove the variables *unset* in the shell *fmt* (sh, fish or powershell)."""
    if fmt == "fish":
        lines = [f"set -gx {key} {fish_quote(value)};" for key, value in values.items()]
        lines += [f"set -e {name};" for name in unset]
    elif fmt == "powershell":
        lines = [f"$Env:{key} = {powershell_quote(value)}" for key, value in values.items()]
        lines += [f"Remove-Item Env:{name} -ErrorAction SilentlyContinue" for name in unset]
    else:
        lines = [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
        lines += [f"unset {' '.join(unset)}"] if unset else []
    return "\n".join(lines) + "\n"


def unset_lines(fmt):
    """The lines that undo ``imsa export`` in the shell *fmt*."""
    return shell_lines({}, fmt, unset=EXPORTED_VARIABLES)


def boto_text(profile, creds):
    """A ``boto3.session.Session(...)`` call with the credentials (and the region), as Python source."""
    arguments = [
        ("aws_access_key_id", creds.access_key_id),
        ("aws_secret_access_key", creds.secret_access_key),
        ("aws_session_token", creds.session_token),
    ]
    if profile.region:
        arguments.append(("region_name", profile.region))
    # json.dumps of a str is a valid Python string literal for these values (ASCII escapes only).
    inner = "".join(f"    {name}={json.dumps(value)},\n" for name, value in arguments)
    return f"boto3.session.Session(\n{inner})\n"


def js_text(profile, creds):
    """The configuration object of an AWS SDK for JavaScript v3 client, as JavaScript source."""
    from imsa.credentials import format_time

    credentials = {
        "accessKeyId": creds.access_key_id,
        "secretAccessKey": creds.secret_access_key,
        "sessionToken": creds.session_token,
    }
    lines = [f"    {name}: {json.dumps(value)}," for name, value in credentials.items()]
    lines.append(f"    expiration: new Date({json.dumps(format_time(creds.expiration))}),")
    region = f"  region: {json.dumps(profile.region)},\n" if profile.region else ""
    return "{\n" + region + "  credentials: {\n" + "\n".join(lines) + "\n  },\n}\n"


def dotenv_quote(value):
    """*value* as a dotenv value: as it is when plain, else double-quoted with backslash escapes."""
    if _DOTENV_PLAIN.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def render(fmt, profile, creds):
    """The text of ``imsa export --format FMT`` for *profile*'s credentials *creds*."""
    if fmt == "json":
        return json.dumps(creds.to_process(), indent=2) + "\n"
    if fmt == "boto":
        return boto_text(profile, creds)
    if fmt == "js":
        return js_text(profile, creds)
    if fmt == "dotenv":
        return "".join(f"{key}={dotenv_quote(value)}\n" for key, value in variables(profile, creds).items())
    if fmt in SHELL_FORMATS:
        return shell_lines(variables(profile, creds), fmt)
    raise ValueError(f"unknown format {fmt!r}")
