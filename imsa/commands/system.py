"""The system-wide mode for servers: ``imsa serve-system`` (what imsa-system.service runs) and ``imsa bind
--system`` / ``imsa unbind --system`` (root writes a binding into the system configuration directory).

The directory (default /etc/imsa/system) is root's alone: it, every directory above it and every file read from it
must be owned by root and not writable by group or others (a directory above may be a sticky one like /tmp,
whose root-owned entries others cannot replace); anything else is refused. It holds:

- ``config``: profiles in ~/.aws/config's format (its ``[default]`` section says how STS is reached). A bound
  profile's source must need no person: Roles Anywhere (``aws_signing_helper credential-process …``) or a
  ``credential_process`` without ``mfa_serial``; static keys, MFA and the environment are refused.
- ``bindings/NAME.json``: {profile, mode, token_sha256}, written by ``imsa bind --system`` (mode 0644: no secret).
- ``env/NAME``: the bound unit's EnvironmentFile= (0600, root's: systemd reads it as root), with the token.

Root writes only there; the service, as its own user, only reads there. Plain functions returning exit codes.
"""

import json
import os
import secrets
import stat

from imsa.commands.common import Io
from imsa.errors import EXIT_OK, ConfigError, ServiceError, UsageError

SYSTEM_DIR = "/etc/imsa/system"
CONFIG_NAME = "config"
BINDINGS_NAME = "bindings"
ENV_NAME = "env"
# imsa-system.socket's listeners: loopback for full URIs, ECS's address for relative ones.
SYSTEM_LISTEN = "127.0.0.1:7223"
ECS_LISTEN = "169.254.170.2:80"
SERVED_KINDS = ("roles_anywhere", "credential_process")
MAX_FILE = 1 << 20
BINDING_MODE = 0o644
ENV_MODE = 0o600
DIR_MODE = 0o755


def untrusted(info, allow_sticky=False):
    """Why a file or directory with stat *info* is not root's alone, or None."""
    if info.st_uid != 0:
        return f"it belongs to uid {info.st_uid}, not root"
    if info.st_mode & 0o022 and not (allow_sticky and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        return f"group or others may write to it (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def check_directory(path):
    """Refuse *path* (ConfigError) unless it and every directory above it are root's alone."""
    path = os.path.abspath(path)
    current = path
    while True:
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise ConfigError(f"the system configuration directory {path} does not exist (sudo imsa bind --system "
                              "makes it)") from None
        if stat.S_ISLNK(info.st_mode) and current == path:
            raise ConfigError(f"refusing {path}: it is a symlink")
        problem = untrusted(info, allow_sticky=current != path)
        if problem:
            raise ConfigError(f"refusing the system configuration directory {path}: {current}: {problem}")
        if current == "/":
            return path
        current = os.path.dirname(current)


def read_trusted(path):
    """The bytes of *path*, opened without following a symlink and refused unless it is root's alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        problem = untrusted(info) or (None if stat.S_ISREG(info.st_mode) else "it is not a regular file")
        if problem:
            raise ConfigError(f"refusing {path}: {problem}")
        return handle.read(MAX_FILE)


def config_environ(directory, environ=None):
    """The environment profiles are resolved with: the directory's config file, no credentials file."""
    environ = dict(os.environ if environ is None else environ)
    environ["AWS_CONFIG_FILE"] = os.path.join(directory, CONFIG_NAME)
    environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(directory, "credentials-are-never-read")
    return environ


def served_profile(name, directory, environ):
    """Profile *name* of the directory's config, refused (ConfigError) unless its source needs no person."""
    from imsa.sources import aws_config
    from imsa.sources.process import Process

    read_trusted(environ["AWS_CONFIG_FILE"])  # its owner and mode; the parser then reads the same file
    files = aws_config.load(environ)
    if name not in files.profiles:
        raise ConfigError(f"no profile {name!r} in {environ['AWS_CONFIG_FILE']}")
    profile = files.get(name, environ)
    source = profile.source
    where = f"{environ['AWS_CONFIG_FILE']}: profile {name}"
    if source.needs_person:
        raise ConfigError(f"{where} needs a person (an MFA code) to make its session; the system mode starts at "
                          "boot with nobody present: use Roles Anywhere or a credential_process without mfa_serial")
    if source.kind == "roles_anywhere":
        return profile
    if isinstance(source, Process):
        return profile
    raise ConfigError(f"{where}: its source ({source.label}) is not served by the system mode, which takes Roles "
                      "Anywhere or a credential_process only (never an IAM user's keys)")


def session_of(profile, settings):
    """The session the service holds for *profile*: the Roles Anywhere paths and ARNs, or the command line."""
    from imsa.sources.process import Process
    from imsa.sources.system_process import Command

    source = profile.source
    if isinstance(source, Process):
        material = Command(source.command)
    else:
        material = source.new_session(None, settings)  # checks the files now, so a wrong path stops the start
    return {"fingerprint": profile.fingerprint, "kind": material.kind, "material": material,
            "settings": settings, "label": source.label}


def spec_of(profile):
    """The role spec of *profile*, keyed by the fingerprint of the session this mode holds for it."""
    from imsa.sources.process import Process
    from imsa.sources.system_process import Command

    spec = profile.role_spec()
    if isinstance(profile.source, Process):
        spec["fingerprint"] = Command(profile.source.command).fingerprint
    return spec


def load_bindings(directory, environ=None):
    """(sessions, bindings) the service serves, from the checked system configuration *directory*."""
    from imsa import sts_settings
    from imsa.server.bound import MODES, NAME, TOKEN_DIGEST

    directory = check_directory(directory)
    environ = config_environ(directory, environ)
    read_trusted(environ["AWS_CONFIG_FILE"])  # before its [default] says how STS is reached
    settings = sts_settings.resolve(environ)
    bindings_dir = os.path.join(directory, BINDINGS_NAME)
    names = []
    if os.path.isdir(bindings_dir):
        check_directory(bindings_dir)
        names = sorted(entry[:-5] for entry in os.listdir(bindings_dir) if entry.endswith(".json"))
    sessions, bindings, profiles = {}, [], {}
    for name in names:
        path = os.path.join(bindings_dir, f"{name}.json")
        try:
            data = json.loads(read_trusted(path).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{path}: not a binding (JSON: profile, mode, token_sha256)") from None
        if not NAME.match(name) or not isinstance(data, dict) or data.get("mode") not in MODES \
                or not isinstance(data.get("token_sha256"), str) or not TOKEN_DIGEST.match(data["token_sha256"]) \
                or not isinstance(data.get("profile"), str):
            raise ConfigError(f"{path}: not a binding (JSON: profile, mode, token_sha256)")
        profile = profiles.get(data["profile"]) or served_profile(data["profile"], directory, environ)
        profiles[profile.name] = profile
        spec = spec_of(profile)
        if spec["fingerprint"] not in sessions:
            sessions[spec["fingerprint"]] = session_of(profile, settings)
        bindings.append({"name": name, "mode": data["mode"], "token_sha256": data["token_sha256"], "spec": spec,
                         "env_file": os.path.join(directory, ENV_NAME, name)})
    return list(sessions.values()), bindings


def serve_system(config_dir=None, io=None):
    """What imsa-system.service runs: serve the directory's bindings on the sockets systemd passed, as the unit's
    own user (never root)."""
    from imsa.server import process, system

    if os.geteuid() == 0 or 0 in os.getresuid():
        raise UsageError("serve-system never runs as root: imsa-system.service runs it as its own user (User=imsa)")
    process.configure_logging()
    sockets = system.inherited_sockets()
    sessions, bindings = load_bindings(config_dir or SYSTEM_DIR)
    return system.run(sockets, sessions, bindings)


def _ensure_dir(path, mode):
    """Make *path* (root's, *mode*) unless it exists; then refuse it unless it is root's alone."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    return check_directory(path)


def _write_root_file(directory, name, data, mode):
    """Replace *directory*/*name* with *data*, *mode*, through a new file renamed over it (never through a link)."""
    path = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.new")
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
    return path


def bind_system(binding, name, mode="ecs-full", config_dir=None, listen=None, io=None):
    """As root: bind *binding* to profile *name* of the system configuration (its file and the unit's environment
    file in the directory); the running imsa-system.service serves it once restarted."""
    from imsa.commands.bind import environment
    from imsa.server.bound import NAME, token_digest

    io = io or Io()
    if os.geteuid() != 0:
        raise UsageError("bind --system writes the system configuration and needs root: sudo imsa bind --system …")
    if not NAME.match(binding):
        raise UsageError("a binding's name is 1-128 characters from letters, digits and _.@- (not first)")
    directory = os.path.abspath(config_dir or SYSTEM_DIR)
    if not os.path.isdir(directory):
        os.makedirs(directory, DIR_MODE)
    check_directory(directory)
    served_profile(name, directory, config_environ(directory))  # a profile the service would refuse, refused now
    token = secrets.token_urlsafe(32)
    values = environment(mode, binding, token, [listen or SYSTEM_LISTEN, ECS_LISTEN])
    record = {"profile": name, "mode": mode, "token_sha256": token_digest(token)}
    bindings_dir = _ensure_dir(os.path.join(directory, BINDINGS_NAME), DIR_MODE)
    env_dir = _ensure_dir(os.path.join(directory, ENV_NAME), 0o700)
    env_path = _write_root_file(env_dir, binding, "".join(f"{k}={v}\n" for k, v in values.items()).encode(),
                                ENV_MODE)
    _write_root_file(bindings_dir, f"{binding}.json", json.dumps(record).encode(), BINDING_MODE)
    io.say(f"imsa: binding {binding}: profile {name} ({mode}), environment file {env_path}; "
           "sudo systemctl restart imsa-system.service to serve it")
    return EXIT_OK


def unbind_system(binding, config_dir=None, io=None):
    """As root: remove *binding* from the system configuration (its file and its environment file)."""
    io = io or Io()
    if os.geteuid() != 0:
        raise UsageError("unbind --system writes the system configuration and needs root")
    directory = check_directory(config_dir or SYSTEM_DIR)
    removed = False
    for path in (os.path.join(directory, BINDINGS_NAME, f"{binding}.json"), os.path.join(directory, ENV_NAME, binding)):
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            pass
    if not removed:
        raise ServiceError(f"the system configuration has no binding {binding!r}")
    io.say(f"imsa: binding {binding} removed; sudo systemctl restart imsa-system.service to end its token")
    return EXIT_OK
