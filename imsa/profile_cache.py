"""A cache of resolved profiles, so that ``imsa export P`` and ``imsa credential-process P`` with a held session
read no YAML and no INI file (and import no parser) at the start of every shell and every SDK process.

The file (``$XDG_STATE_HOME/imsa/profiles.json``, 0600, in a 0700 directory) is keyed by every input file of
profile resolution — ``config.input_paths()``, each as (path, identity) with identity = (device, inode, size,
mtime_ns, mode, owner) or None when the file is absent — and by the environment variables resolution reads
(``KEY_VARIABLES``). Any difference and the whole file is ignored (and rewritten by the next full resolution).

It holds no secret: per profile only what the service is asked with (the fingerprint, a hash of the source; the
role spec) and what an export shows (name, region, role ARN). Only profiles whose source is long-term keys
(iam_user) are cached: their resolution depends on the files and KEY_VARIABLES alone, and the secret store is
read only when a new session is made, on the full path. Standard library only, and little of it (os, json).
"""

import json
import os

VERSION = 1
CACHE_NAME = "profiles.json"
# Everything besides the input files that resolution (and the role spec: the default session name) reads from the
# environment. Values only of these, never the whole environment (it may hold AWS_SECRET_ACCESS_KEY).
KEY_VARIABLES = (
    "HOME", "IMSA_CONFIG", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "IMSA_SYSTEM_CONFIG_DIR",
    "XDG_CONFIG_HOME", "XDG_STATE_HOME", "LOGNAME", "USER", "LNAME", "USERNAME",
)
# Profile fields kept per entry: none of them is a secret.
ENTRY_FIELDS = ("name", "fingerprint", "region", "role_arn", "spec")


def cache_path(environ=None):
    """Where the cache lives: ``$XDG_STATE_HOME/imsa/profiles.json`` (default ``~/.local/state/imsa``)."""
    from imsa.paths import xdg_dir

    return xdg_dir("XDG_STATE_HOME", CACHE_NAME, environ=environ)


def identity(path):
    """(device, inode, size, mtime_ns, mode, owner) of the file at *path*, None when there is none, or
    ["unreadable", errno] when it cannot be looked at (resolution says why; the key only has to differ). Never raises.

    A replaced file has a new inode, an edited one a new size or mtime; mode and owner are there because they
    decide the warning about a ~/.imsa others can read, which a cached answer would otherwise skip.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:  # a directory on the way we may not search: resolve() names the file and the cause
        return ["unreadable", error.errno]
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode, info.st_uid]


def key(paths, environ=None):
    """The cache key: each input path with its identity, and the values of KEY_VARIABLES."""
    environ = os.environ if environ is None else environ
    return {
        "uid": os.getuid(),
        "env": {name: environ.get(name) for name in KEY_VARIABLES},
        "inputs": [[path, identity(path)] for path in paths],
    }


def _read(path):
    """The cache's JSON when it is this user's own file, private and of this VERSION; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None  # not ours, or others could have changed it: not trusted
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def lookup(name, environ=None):
    """The cached entry of profile *name* ({name, fingerprint, region, role_arn, spec}), or None when there is none
    or any input file or key variable changed since it was written."""
    environ = os.environ if environ is None else environ
    data = _read(cache_path(environ))
    if data is None:
        return None
    entry = data.get("profiles", {}).get(name)
    stored = data.get("key")
    if not isinstance(entry, dict) or not isinstance(stored, dict) or not isinstance(stored.get("inputs"), list):
        return None
    paths = [item[0] for item in stored["inputs"] if isinstance(item, list) and len(item) == 2]
    if stored != key(paths, environ):
        return None
    return entry


def remember(profile, before, environ=None):
    """Add resolved *profile* to the cache, keyed by *before* (``key(config.input_paths())`` taken before resolving:
    a file changed meanwhile makes the entry stale at once, never wrong). Only long-term-key profiles with nothing
    to say (no notes) and no question to ask (not ``confirm: true``); a cache that cannot be written is left as it
    is."""
    from imsa.sources.iam_user import Keys

    from imsa.config import fence_of

    environ = os.environ if environ is None else environ
    if not isinstance(profile.source, Keys) or profile.notes:
        return
    if fence_of(profile).confirm:  # asked on the terminal at every use: the fast path never answers for it
        return
    path = cache_path(environ)
    entry = {"name": profile.name, "fingerprint": profile.fingerprint, "region": profile.region,
             "role_arn": profile.role_arn, "spec": profile.role_spec()}
    try:
        data = _read(path)
        if data is None or data.get("key") != before:
            data = {"version": VERSION, "key": before, "profiles": {}}
        if data["profiles"].get(profile.name) == entry:
            return
        data["profiles"][profile.name] = entry
        from imsa.files import replace_atomically

        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        replace_atomically(path, json.dumps(data, sort_keys=True))
    except (OSError, TypeError, ValueError):
        pass  # a cache that cannot be written costs speed, never a command
