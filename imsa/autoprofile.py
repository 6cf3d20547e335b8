"""Per-directory profiles: a ``.imsa.json`` in a project selects one of the user's own profiles, once trusted.

``imsa exec auto``, ``imsa export auto`` and ``imsa credential-process auto`` look for AUTO_FILE in the working
directory and each parent. The walk stops after the home directory, before any directory of
IMSA_CEILING_DIRECTORIES (as git's GIT_CEILING_DIRECTORIES), and at a filesystem boundary: a file further up was
not put there by the project.

The file only *selects*: ``{"profile": NAME, "mode": "ecs"|"static"}``, and NAME must be a profile of the user's own
configuration (~/.imsa or ~/.aws/config). Anything else (a role ARN, a server, a provider) is refused, so a cloned
repository cannot point the user's MFA session at a role of its choosing, even after a careless "yes".

Trust: the first use of a file, and any change of its bytes or of where it really is, is shown and asked about on
the terminal; without one the command fails with the exact command that confirms the digest. The digest is
SHA-384 over a version tag, the file's real path and its raw bytes. Trust records are 0600 files in a 0700
directory under ``$XDG_STATE_HOME/imsa`` (default ``~/.local/state/imsa``), one per real path, written atomically.
"""

import base64
import datetime
import hashlib
import json
import os
import stat

from imsa.errors import ConfigError
from imsa.files import replace_atomically
from imsa.paths import xdg_dir

AUTO_NAME = "auto"
AUTO_FILE = ".imsa.json"
CEILING_VARIABLE = "IMSA_CEILING_DIRECTORIES"
# Domain separation and a version: a digest of another format, or of this one after a change, never matches.
DIGEST_TAG = b"imsa.auto.v1\0\0"
RECORD_TAG = b"imsa.trust-path.v1\0\0"
KEYS = ("profile", "mode")
MODES = ("ecs", "static")
# A project file is a few lines; anything bigger is not one.
MAX_BYTES = 4096
TRUST_DIR_MODE = 0o700
RECORD_MODE = 0o600
# How many answers other than yes/no the prompt takes before giving up.
PROMPT_ATTEMPTS = 3


class Untrusted(ConfigError):
    """The per-directory file is not trusted as it is now (never trusted, changed, moved, or the answer was no)."""


class AutoFile:
    """One ``.imsa.json`` as read: its real path, raw bytes, the profile it selects, the mode, and its digest."""

    def __init__(self, path, raw, profile, mode):
        self.path = path
        self.raw = raw
        self.profile = profile
        self.mode = mode
        self.digest = digest(path, raw)
        # What the profile is in the user's configuration (its role and file), once checked.
        self.details = None

    def describe(self):
        """What the file asks for, in one line for people."""
        details = f" ({self.details})" if self.details else ""
        mode = f", mode {self.mode}" if self.mode else ""
        return f"{self.path} selects profile {self.profile!r}{details}{mode}"


def digest(path, raw):
    """The trust digest of the file at real *path* with bytes *raw*: base64url, unpadded, of SHA-384."""
    value = hashlib.sha384(DIGEST_TAG + os.fsencode(path) + b"\0\0" + raw).digest()
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")


def ceilings(environ=None):
    """The real paths the walk never enters: IMSA_CEILING_DIRECTORIES (colon-separated, absolute entries only)."""
    environ = os.environ if environ is None else environ
    entries = environ.get(CEILING_VARIABLE, "").split(":")
    return {os.path.realpath(entry) for entry in entries if entry and os.path.isabs(entry)}


def find(start=None, environ=None, home=None):
    """The real path of the nearest AUTO_FILE from *start* (default the working directory) up, or None."""
    environ = os.environ if environ is None else environ
    directory = os.path.realpath(start or os.getcwd())
    home = os.path.realpath(home or os.path.expanduser("~"))
    stop = ceilings(environ)
    device = os.stat(directory).st_dev
    while True:
        candidate = os.path.join(directory, AUTO_FILE)
        if os.path.lexists(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if directory == home or parent == directory or parent in stop:
            return None
        try:
            if os.stat(parent).st_dev != device:  # another filesystem: a mount point ends the project
                return None
        except OSError:
            return None
        directory = parent


def read(candidate, uid=None):
    """The AutoFile at *candidate*: its real path, checked bytes and selection; ConfigError when it is unsafe or
    asks for more than a profile and a mode."""
    uid = os.geteuid() if uid is None else uid
    path = os.path.realpath(candidate)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        # What is checked is what is read: the same descriptor, not the path a second time.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if info.st_uid != uid:
            raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to you: imsa uses only your own {AUTO_FILE}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{path} can be changed by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                              f"run chmod go-w {path}")
        raw = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_BYTES} bytes: not a {AUTO_FILE}")
    profile, mode = parse(path, raw)
    return AutoFile(path, raw, profile, mode)


def parse(path, raw):
    """(profile, mode or None) from the bytes of *path*; ConfigError naming the file for anything else."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must be a JSON object: {{"profile": "NAME"}}')
    extra = sorted(key for key in data if key not in KEYS)
    if extra:
        raise ConfigError(
            f"{path} may only select one of your profiles (keys: {', '.join(KEYS)}), not set {', '.join(extra)}: "
            "roles, servers and providers come from your own ~/.imsa or ~/.aws/config"
        )
    profile, mode = data.get("profile"), data.get("mode")
    if not isinstance(profile, str) or not profile or not profile.isprintable() or profile == AUTO_NAME:
        raise ConfigError(f'{path} must name a profile of yours: {{"profile": "NAME"}}')
    if profile.startswith("arn:"):
        raise ConfigError(f"{path} names a role ARN ({profile}); it may only select a profile of your own "
                          "~/.imsa or ~/.aws/config")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"{path}: mode must be one of {', '.join(MODES)}, not {mode!r}")
    return profile, mode


# --- trust records ---


def trust_dir(environ=None):
    """The directory of trust records: ``$XDG_STATE_HOME/imsa/trust`` (default ``~/.local/state/imsa/trust``)."""
    return xdg_dir("XDG_STATE_HOME", "trust", environ=environ)


def record_path(path, environ=None):
    """The trust record of the file at real *path*: named by a hash of the path, never the path itself."""
    name = hashlib.sha256(RECORD_TAG + os.fsencode(path)).hexdigest()
    return os.path.join(trust_dir(environ), f"trust.{name}.json")


def _checked_dir(directory, create):
    """*directory* when it is ours and 0700 (made so when *create*); None when missing; ConfigError when unsafe."""
    if create:
        os.makedirs(os.path.dirname(directory), mode=TRUST_DIR_MODE, exist_ok=True)
        try:
            os.mkdir(directory, TRUST_DIR_MODE)
        except FileExistsError:
            pass
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{directory} must be a directory of yours with mode 0700 (it holds what you trust): "
                          f"run chmod 700 {directory}, or remove it")
    return directory


def trusted_digest(path, environ=None):
    """The digest recorded for the file at real *path*, or None (never trusted, or an unreadable record)."""
    if _checked_dir(trust_dir(environ), create=False) is None:
        return None
    try:
        fd = os.open(record_path(path, environ), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            record = json.loads(handle.read(65536).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("path") != path:
        return None
    value = record.get("digest")
    return value if isinstance(value, str) else None


def record_trust(auto, environ=None, now=None):
    """Record that *auto* (as it is now) is trusted: a 0600 file replaced atomically in the 0700 trust directory."""
    _checked_dir(trust_dir(environ), create=True)  # made 0700 if missing, refused if it is not private
    target = record_path(auto.path, environ)
    moment = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"path": auto.path, "digest": auto.digest, "profile": auto.profile, "mode": auto.mode,
                       "trusted_at": moment}, indent=2) + "\n"
    replace_atomically(target, body, RECORD_MODE)


# --- the decision ---


def confirm_command(command, digest_value):
    """The exact command line that confirms *digest_value*: *command* is a format string with ``{options}``.

    Written ``--confirm-trust=DIGEST``: a base64url digest may start with ``-``, which argparse would take for an
    option after a space.
    """
    return command.format(options=f"--confirm-trust={digest_value}")


def ask(auto, why, prompt):
    """Ask through *prompt* (text -> the line typed) whether to trust *auto*; True for yes, False for no."""
    question = (f"imsa: {why}: {auto.describe()}\n"
                + "".join(f"imsa:   | {line}\n" for line in auto.raw.decode("utf-8", "replace").splitlines())
                + f"imsa: trust this directory to use profile {auto.profile!r} (yes/no)? ")
    for _ in range(PROMPT_ATTEMPTS):
        answer = prompt(question).strip().lower()
        if answer in ("yes", "no"):
            return answer == "yes"
        question = "imsa: please answer yes or no: "
    return False


def terminal_prompt():
    """A prompt on the controlling terminal (text -> the line typed; end of input answers no), or None without one.

    Never stdin or stdout: ``eval "$(imsa export auto)"`` and credential_process keep stdout for data.
    """
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return None

    def ask_terminal(text):
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        with os.fdopen(fd, "r+b", buffering=0) as tty:
            tty.write(text.encode("utf-8"))
            line = tty.readline()
            if not line:
                tty.write(b"\n")
        return line.decode("utf-8", "replace") if line else "no"

    return ask_terminal


def resolve(command, confirm_trust=None, prompt=None, check=None, start=None, environ=None):
    """The AutoFile that applies here, trusted; Untrusted or ConfigError otherwise.

    *command* is the command to show for confirming without a terminal (``{options}`` where --confirm-trust goes),
    *prompt* asks on the terminal (None: there is none), *confirm_trust* is the digest given on the command line,
    *check* is called with the AutoFile before anything is trusted (ConfigError when its profile is not the user's).
    """
    candidate = find(start, environ)
    if candidate is None:
        raise ConfigError(f"no {AUTO_FILE} in this directory or its parents (up to your home directory, a filesystem "
                          f"boundary or {CEILING_VARIABLE}); write one: {{\"profile\": \"NAME\"}}")
    auto = read(candidate)
    if check is not None:
        auto.details = check(auto)
    known = trusted_digest(auto.path, environ)
    if known == auto.digest:
        return auto
    why = "first use of" if known is None else "changed since you trusted it"
    if confirm_trust is not None:
        if confirm_trust != auto.digest:
            raise Untrusted(f"--confirm-trust {confirm_trust} does not match {auto.describe()} ({why}); read it, "
                            f"then run: {confirm_command(command, auto.digest)}")
        record_trust(auto, environ)
        return auto
    if prompt is None:
        raise Untrusted(f"{auto.describe()} is not trusted ({why}); read it, then run: "
                        f"{confirm_command(command, auto.digest)}")
    if not ask(auto, why, prompt):
        raise Untrusted(f"{auto.path} not trusted: nothing recorded, nothing run")
    record_trust(auto, environ)
    return auto
