"""Where the control socket and the background log live, and how both sides make sure that place is safe.

The service creates its run directory only after dropping root, as the user it serves: every path here is
opened with that user's rights, so a symlink or a directory planted by someone else can fail the start but never
make root write anywhere. The client checks the directory, the socket and finally the server process itself
(SO_PEERCRED) before it sends a session or believes an answer, so a socket another user put in a candidate path
is an error, never a service it talks to (README, "Security").
"""

import os
import pwd
import stat

from imsa.errors import EXIT_SERVICE, ImsaError, UsageError

SOCKET_NAME = "control.sock"
LOG_NAME = "imsa.log"


class UnsafeRunDir(ImsaError):
    """The control socket or its directory is not the expected user's own (exit 5: no trusted service)."""

    exit_code = EXIT_SERVICE


def candidates(uid=None):
    """Where a service of *uid* may have put its control socket, most specific first."""
    explicit = os.environ.get("IMSA_CONTROL_SOCKET")
    if explicit:
        return [explicit]
    uid = os.getuid() if uid is None else uid
    found = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.getuid() == uid:
        found.append(os.path.join(runtime, "imsa", SOCKET_NAME))
    for path in (f"/run/user/{uid}/imsa/{SOCKET_NAME}", f"/run/imsa/{SOCKET_NAME}", f"/tmp/imsa-{uid}/{SOCKET_NAME}"):
        if path not in found:
            found.append(path)
    return found


def client_path(uid=None):
    """The socket a client should use: the first candidate that exists, else where a new service would put it.

    The first one that exists is the answer even when it turns out not to be trustworthy: the client then refuses
    it with an error rather than trying the next path, so a planted socket cannot redirect anything.
    """
    for path in candidates(uid):
        if os.path.lexists(path):
            return path
    return _preferred(uid)


def service_path(uid=None):
    """Where a service for *uid* puts its socket: ``$IMSA_CONTROL_SOCKET``, the runtime dir, else /tmp/imsa-UID.

    Called by the service only after it dropped root, so these environment paths are used with the user's rights.
    """
    if os.geteuid() == 0:
        raise AssertionError("root never picks the run directory: it may come from the user's environment")
    return _preferred(uid)


def _preferred(uid=None):
    explicit = os.environ.get("IMSA_CONTROL_SOCKET")
    if explicit:
        return explicit
    uid = os.getuid() if uid is None else uid
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.getuid() == uid and os.path.isdir(runtime):
        return os.path.join(runtime, "imsa", SOCKET_NAME)
    if os.path.isdir(f"/run/user/{uid}"):
        return f"/run/user/{uid}/imsa/{SOCKET_NAME}"
    return f"/tmp/imsa-{uid}/{SOCKET_NAME}"


def expected_service_uid():
    """The uid the client expects its service to run as: ``$IMSA_SERVICE_USER`` (a name or a uid), else its own."""
    wanted = os.environ.get("IMSA_SERVICE_USER")
    if not wanted:
        return os.getuid()
    if wanted.isdigit():
        return int(wanted)
    try:
        return pwd.getpwnam(wanted).pw_uid
    except KeyError:
        raise UsageError(f"IMSA_SERVICE_USER names no user: {wanted!r}") from None


def _owner_name(uid):
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def changeable_by_others(path, trusted_uids):
    """The first place from / down to *path* (symlinks resolved) that a user outside *trusted_uids* can change: one
    that belongs to such a user, or that group or others may write (a sticky directory excepted). Returns (place,
    its stat) or None. The one rule behind the run directory's parents and the code root runs."""
    real = os.path.realpath(path)
    places = [real]
    while places[-1] != os.path.dirname(places[-1]):
        places.append(os.path.dirname(places[-1]))
    for place in reversed(places):
        info = os.lstat(place)
        sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_uid not in trusted_uids or (stat.S_IMODE(info.st_mode) & 0o022 and not sticky_dir):
            return place, info
    return None


def check_parents(directory, uid):
    """Every directory above *directory* must be root's or *uid*'s, and writable by others only if sticky.

    Otherwise someone else could swap the run directory for their own between our checks and our use of it.
    """
    found = changeable_by_others(os.path.dirname(os.path.abspath(directory)), (0, uid))
    if found is None:
        return
    place, info = found
    if info.st_uid not in (0, uid):
        raise UnsafeRunDir(f"refusing {directory}: {place} belongs to {_owner_name(info.st_uid)}")
    raise UnsafeRunDir(f"refusing {directory}: {place} is writable by other users")


def check_dir(directory, uid, info=None):
    """*directory* must be a real directory (not a symlink) of *uid* that no one else can enter or write."""
    info = info or os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeRunDir(f"refusing {directory}: not a directory (a symlink or a file is there)")
    if info.st_uid != uid:
        raise UnsafeRunDir(f"refusing {directory}: it belongs to {_owner_name(info.st_uid)}, not {_owner_name(uid)}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UnsafeRunDir(f"refusing {directory}: mode {stat.S_IMODE(info.st_mode):04o}, not 0700")


def check_socket(path, uid):
    """The client's check before connecting: safe parents and directory, and a socket of *uid* at *path*.

    FileNotFoundError when nothing is there (the service is not running).
    """
    directory = os.path.dirname(os.path.abspath(path))
    check_dir(directory, uid)
    check_parents(directory, uid)
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeRunDir(f"refusing {path}: not a socket")
    if info.st_uid != uid:
        raise UnsafeRunDir(f"refusing {path}: it belongs to {_owner_name(info.st_uid)}, not {_owner_name(uid)}")


def make_dir(directory):
    """Create the run directory 0700 as the calling (non-root) user, or accept an existing one that is its own.

    An existing directory with loose permissions is tightened through a descriptor (no path is followed twice);
    one that belongs to someone else, or is a symlink, is refused.
    """
    if os.geteuid() == 0:
        raise AssertionError("the run directory is made after the privilege drop, never as root")
    uid = os.geteuid()
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(directory), 0o700, exist_ok=True)
        os.mkdir(directory, 0o700)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # a symlink (ELOOP) or a file (ENOTDIR) where the directory should be
        check_dir(directory, uid)
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != uid:
            check_dir(directory, uid, info)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    check_parents(directory, uid)
    return directory


def open_log(directory):
    """The background log in the run directory, opened as the user: append-only, 0600, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(os.path.join(directory, LOG_NAME), flags, 0o600)
