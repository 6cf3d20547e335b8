"""A profile of temporary credentials written into an AWS shared credentials file, and erased again.

``imsa export PROFILE --to-credentials-file [NAME]`` writes ``[NAME]`` into ``~/.aws/credentials`` (or the file of
AWS_SHARED_CREDENTIALS_FILE, or ``--file``); ``imsa export --erase NAME`` removes it. The file is edited as lines,
never re-serialised: every other profile, comment and blank line keeps its bytes. What imsa writes starts with
MARKER on the line above the section header, so that imsa only ever replaces or removes its own sections: a
``[NAME]`` without it is the user's and is refused. The file is replaced atomically, 0600 (it holds secrets).
"""

import os
import re
import stat

from imsa.credentials import format_time
from imsa.errors import ConfigError, ImsaError
from imsa.files import replace_atomically

MARKER = "# imsa export:"
KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
# botocore's section header and key lines (configparser's rules, as its raw config parser reads the file).
_HEADER = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]\s*$")
_KEY = re.compile(r"^\s*([^=:\s][^=:]*?)\s*[=:]")
# Keys of an AWS config profile that make SDKs ignore the credentials file's keys for a profile of that name.
_SHADOWING_KEYS = ("role_arn", "credential_process", "sso_start_url", "sso_session", "web_identity_token_file",
                   "credential_source")


class NotImsas(ImsaError):
    """The section is not one imsa wrote (or was edited since): imsa leaves it alone."""


def default_path(environ=None):
    """The shared credentials file SDKs read: AWS_SHARED_CREDENTIALS_FILE, else ``~/.aws/credentials``."""
    environ = os.environ if environ is None else environ
    return os.path.expanduser(environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join("~", ".aws", "credentials"))


def check_name(name):
    """ConfigError when *name* cannot be a section name that SDKs read back as that profile."""
    if not name or name != name.strip() or any(char in name for char in "[]\n\r") or not name.isprintable():
        raise ConfigError(f"{name!r} cannot be a profile name in a credentials file")


def _header(line):
    found = _HEADER.match(line)
    return found.group(1) if found else None


def _key(line):
    found = _KEY.match(line)
    return found.group(1).strip().lower() if found and not line.lstrip().startswith(("#", ";")) else None


def _section(lines, name, path):
    """(start, end) of imsa's section *name* in *lines* (marker to last key written), None when there is none;
    NotImsas when *name* is there but not imsa's, or was edited."""
    headers = [index for index, line in enumerate(lines) if _header(line) == name]
    if not headers:
        return None
    if len(headers) > 1:
        raise NotImsas(f"{path} has [{name}] {len(headers)} times; imsa leaves it alone")
    index = headers[0]
    if index == 0 or not lines[index - 1].startswith(MARKER):
        raise NotImsas(f"[{name}] in {path} was not written by imsa; imsa leaves it alone (name another profile)")
    end = index + 1
    while end < len(lines) and _key(lines[end]) in KEYS:
        end += 1
    rest = end
    while rest < len(lines) and _header(lines[rest]) is None:
        if _key(lines[rest]) is not None:
            raise NotImsas(f"[{name}] in {path} was edited since imsa wrote it ({_key(lines[rest])} added); "
                           "imsa leaves it alone")
        rest += 1
    return index - 1, end


def _read(path):
    """The file's lines (line ends kept) and its mode; ([], None) when it does not exist."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
    except FileNotFoundError:
        return [], None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; imsa edits only what it can read") from None
    return text.splitlines(keepends=True), mode


def _replace(path, lines):
    """Write *lines* to *path* atomically (a temporary file beside it, fsync, rename), mode 0600."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    replace_atomically(path, "".join(lines), FILE_MODE)


def shadowing_keys(name, config_path):
    """The keys of profile *name* in the AWS config file at *config_path* that would make SDKs ignore the keys
    written for *name* in a credentials file (a role_arn there wins over them)."""
    import configparser

    parser = configparser.RawConfigParser(strict=False)
    try:
        parser.read(config_path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return []
    section = "default" if name == "default" else f"profile {name}"
    if not parser.has_section(section):
        return []
    return [key for key in _SHADOWING_KEYS if parser.has_option(section, key)]


def check_writable(path, name):
    """NotImsas (or ConfigError) now, before any credentials are made, when ``[name]`` could not be written."""
    check_name(name)
    lines, _mode = _read(os.path.realpath(path))
    _section(lines, name, path)


def write(path, name, profile, creds):
    """Write (or replace imsa's own) ``[name]`` with *creds* in the credentials file at *path*; returns a note when
    the file's mode was tightened, else None."""
    check_name(name)
    target = os.path.realpath(path)  # a linked ~/.aws/credentials stays a link; its target is edited
    lines, mode = _read(target)
    block = [
        f"{MARKER} profile {profile.name}, valid until {format_time(creds.expiration)}; "
        f"imsa export --erase {name} removes it\n",
        f"[{name}]\n",
        f"aws_access_key_id = {creds.access_key_id}\n",
        f"aws_secret_access_key = {creds.secret_access_key}\n",
        f"aws_session_token = {creds.session_token}\n",
    ]
    found = _section(lines, name, path)
    if found:
        start, end = found
        lines[start:end] = block
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.extend(block)
    _replace(target, lines)
    if mode is not None and mode & 0o077:
        return f"{path} was readable by others (mode {mode:04o}); it holds secrets now, so it is 0600"
    return None


def erase(path, name):
    """Remove imsa's ``[name]`` from the credentials file at *path*; False when there was none."""
    check_name(name)
    target = os.path.realpath(path)
    lines, _mode = _read(target)
    found = _section(lines, name, path)
    if not found:
        return False
    start, end = found
    del lines[start:end]
    _replace(target, lines)
    return True
