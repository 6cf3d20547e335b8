"""~/.imsa: YAML profiles validated once into frozen Profile objects, and which file a profile name comes from.

A name is looked up in ``~/.imsa`` first, then in ``~/.aws/config`` (imsa/sources/aws_config.py), which is read only
when ~/.imsa does not have the name: the profiles of ~/.imsa never pay for botocore's loader.

Under ~/.imsa lie the organisation's defaults: the ``*.yaml`` files of the system directory
(``imsa.paths.system_config_dir()``, /etc/imsa), in ~/.imsa's form, which a package or an MDM installs. They are
merged under the user's file profile by profile, key by key: the user's value wins, a profile of the organisation's
can be extended by the user's, and every setting remembers the file it came from (``imsa list``).
"""

# difflib, getpass and hashlib are imported where they are used: imsa status and imsa export import this module.

import os
import re
import stat
from dataclasses import dataclass, field

from imsa.errors import ConfigError
from imsa.limits import (
    DEFAULT_ROLE_DURATION, DEFAULT_SESSION_DURATION, MAX_ROLE_DURATION, MAX_SESSION_DURATION, MIN_DURATION, PATTERNS,
)

STRING_KEYS = (
    "aws_access_key_id",
    "aws_secret_access_key",
    "mfa_serial_number",
    "role_arn",
    "role_session_name",
    "region",
    "external_id",
    "mfa_process",
    # IAM Identity Center (imsa/sources/sso.py), named as ~/.aws/config names them.
    "sso_start_url",
    "sso_region",
    "sso_account_id",
    "sso_role_name",
    "sso_registration_scopes",
    "sso_session",
    "sso_cache",
    # An OIDC provider for web identity (imsa/sources/oidc.py).
    "oidc_discovery_url",
    "oidc_client_id",
    "oidc_scopes",
    "oidc_roles_url",
    # Credential-vending servers (imsa/sources/cred_server.py): the server's id or url, and the role to ask it for.
    "server",
    "server_role",
    "extends",
)
INT_KEYS = ("duration_seconds", "session_duration_seconds", "oidc_duration_seconds")
# secret_store: true says the profile's keys are in imsa's secret store (imsa/secrets.py), not in this file.
BOOL_KEYS = ("secret_store",)
# Fencing (imsa/commands/fence.py): imds: false keeps the profile off the global endpoint (imsa assume refuses it);
# confirm: true makes exec, export and credential-process ask on the terminal each time.
FENCE_KEYS = ("imds", "confirm")
KNOWN_KEYS = STRING_KEYS + INT_KEYS + BOOL_KEYS + FENCE_KEYS
# A key that makes a profile (or one it extends) another source's, and that source's module in imsa/sources/: it
# resolves the profile with its own imsa_profile(name, origin, chain, where). Profiles with none of them use keys.
SOURCE_MARKERS = (
    ("server", "cred_server"),
    ("sso_start_url", "sso"),
    ("oidc_discovery_url", "oidc"),
)

RANGES = {
    "duration_seconds": (MIN_DURATION, MAX_ROLE_DURATION),
    "session_duration_seconds": (MIN_DURATION, MAX_SESSION_DURATION),
    # What AssumeRoleWithWebIdentity allows (a role's MaxSessionDuration is at most 12 hours).
    "oidc_duration_seconds": (MIN_DURATION, 12 * 3600),
}
# Keys people carry over from other files, and what ~/.imsa calls them (difflib finds neither).
RENAMED_KEYS = {
    "region_name": "use 'region' (older imsa files called it region_name)",
    "source_profile": "use 'extends' (source_profile is what ~/.aws/config calls it)",
}
# An INI section header and an INI assignment: ~/.aws/credentials pasted where YAML belongs.
_INI_SECTION = re.compile(r"^\[[^\]\n]+\][ \t]*$")
_INI_ASSIGNMENT = re.compile(r"^[ \t]*[A-Za-z_][\w.-]*[ \t]*=")


def config_path():
    """The profile file: ``$IMSA_CONFIG`` or ``~/.imsa``."""
    return os.environ.get("IMSA_CONFIG") or os.path.join(os.path.expanduser("~"), ".imsa")


def default_session_name():
    """``imsa-<user>``, cut to the characters and length STS accepts."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    name = "imsa-" + re.sub(r"[^\w+=,.@-]", "-", user)
    return name[:64]


@dataclass(frozen=True)
class Fence:
    """How a profile's credentials may leave: *imds* False never as the global role; *confirm* True only once the
    person said yes on the terminal."""

    imds: bool = True
    confirm: bool = False


def fence_of(profile):
    """The Fence of any resolved profile (one of ~/.aws/config has none: it cannot carry the keys)."""
    return getattr(profile, "fence", None) or Fence()


@dataclass(frozen=True)
class Profile:
    """One resolved profile (``extends`` applied); repr hides the secret."""

    name: str
    aws_access_key_id: str = None
    aws_secret_access_key: str = field(default=None, repr=False)
    mfa_serial_number: str = None
    role_arn: str = None
    role_session_name: str = None
    region: str = None
    external_id: str = None
    mfa_process: str = None
    duration_seconds: int = DEFAULT_ROLE_DURATION
    session_duration_seconds: int = DEFAULT_SESSION_DURATION
    origin: str = ""
    # The profile whose keys the secret store holds (this one or one it extends), or None: plain keys in the file.
    secret_item: str = None
    fence: Fence = Fence()
    notes = ()

    @property
    def source(self):
        """Where the session comes from: the profile's keys and MFA device (imsa/sources/iam_user.py)."""
        from imsa.sources.iam_user import Keys

        return Keys(self.aws_access_key_id, self.aws_secret_access_key, self.mfa_serial_number, self.mfa_process,
                    self.session_duration_seconds, self.region, self.secret_item)

    @property
    def fingerprint(self):
        """Names the MFA session this profile uses: a hash of key id and MFA serial, never of the secret."""
        return self.source.fingerprint

    @property
    def hops(self):
        """The role assumed from the session: this profile's, if it has one."""
        from imsa.sources import Hop

        return (Hop(self.role_arn, self.session_name, self.duration_seconds, self.external_id),) if self.role_arn else ()

    @property
    def session_name(self):
        """The RoleSessionName sent to STS."""
        return self.role_session_name or default_session_name()

    def role_spec(self):
        """What the service needs to assume this profile's role: no long-term secret in it."""
        from imsa.sources import role_spec

        return role_spec(self)


class Config:
    """All profiles of one file (with the organisation's defaults under it), validated."""

    def __init__(self, path, raw, lines, origins=None):
        self.path = path
        self._raw = raw
        self._lines = lines
        # {(profile, key or None): the file that set it}: the user's file unless the organisation's gave it.
        self._origins = origins or {}
        self.names = sorted(raw)

    def _file_of(self, profile, key=None):
        return self._origins.get((profile, key)) or self._origins.get((profile, None)) or self.path

    def _where(self, profile, key=None):
        path = self._file_of(profile, key)
        line = self._lines.get((path, profile, key)) or self._lines.get((path, profile, None))
        where = f"{path}"
        if line:
            where += f":{line}"
        where += f": profile {profile!r}"
        if key:
            where += f", key {key!r}"
        return where

    def origin(self, name):
        """The file that defines profile *name*: the user's when it sets anything of it, else the organisation's."""
        return self._file_of(name)

    def settings_origins(self, name):
        """{key: the file that set it} of profile *name* with its ``extends`` applied (``imsa list``)."""
        found = {}
        for ancestor in reversed(self._chain(name)):
            for key in self._raw[ancestor]:
                if key != "extends":
                    found[key] = self._file_of(ancestor, key)
        return found

    def get(self, name):
        """The resolved profile *name*; ConfigError if unknown or incomplete."""
        if name not in self._raw:
            import difflib

            hint = difflib.get_close_matches(name, self.names, n=1)
            listed = ", ".join(repr(known) for known in self.names) or "none"
            suffix = f" (did you mean {hint[0]!r}?)" if hint else f" (profiles: {listed})"
            raise ConfigError(f"{self.path}: no profile {name!r}{suffix}")
        fence = self._fence(name)
        for marker, module in SOURCE_MARKERS:
            if any(marker in self._raw[ancestor] for ancestor in self._chain(name)):
                import dataclasses
                import importlib

                source = importlib.import_module(f"imsa.sources.{module}")
                profile = source.imsa_profile(name, self.origin(name), self._chain_without_fence(name), self._where)
                return dataclasses.replace(profile, fence=fence)
        merged = {}
        owner = None  # the nearest profile of the chain that gave the keys, when it keeps them in the store
        for ancestor in reversed(self._chain(name)):
            values = self._raw[ancestor]
            if "aws_secret_access_key" in values:
                owner = None
            if values.get("secret_store"):
                owner = ancestor
            merged.update({k: v for k, v in values.items() if k not in ("extends", "secret_store") + FENCE_KEYS})
        if owner is not None:
            merged.pop("aws_secret_access_key", None)
        for key in ("aws_access_key_id",) if owner else ("aws_access_key_id", "aws_secret_access_key"):
            if not merged.get(key):
                raise ConfigError(f"{self._where(name)}: missing {key!r} (set it here or in a profile it extends)")
        return Profile(name=name, origin=self.origin(name), secret_item=owner, fence=fence, **merged)

    def _chain_without_fence(self, name):
        """[(profile, its settings without the fencing keys)] of *name*'s ``extends`` chain, farthest first."""
        return [(ancestor, {k: v for k, v in self._raw[ancestor].items() if k not in FENCE_KEYS})
                for ancestor in reversed(self._chain(name))]

    def _fence(self, name):
        """The fencing keys of *name*, each from the nearest profile of its ``extends`` chain that sets it."""
        values = {}
        for ancestor in reversed(self._chain(name)):
            values.update({key: value for key, value in self._raw[ancestor].items() if key in FENCE_KEYS})
        return Fence(**values)

    def plain_keys(self):
        """The profiles that hold a secret key in this file, in plain text."""
        return [name for name in self.names if self._raw[name].get("aws_secret_access_key")
                and self._file_of(name, "aws_secret_access_key") == self.path]

    def _chain(self, name):
        chain = [name]
        while "extends" in self._raw[chain[-1]]:
            chain.append(self._raw[chain[-1]]["extends"])
        return chain


def _line_numbers(text):
    """Map (profile, key) and (profile, None) to 1-based line numbers, for error messages.

    Names are the values YAML makes of them (``123:`` is the number 123), as in the loaded mapping.
    """
    import yaml

    lines = {}
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if not isinstance(root, yaml.MappingNode):
            return lines
        for key_node, value_node in root.value:
            profile = _key_value(loader, key_node)
            lines[(profile, None)] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                for sub_key, _ in value_node.value:
                    lines[(profile, _key_value(loader, sub_key))] = sub_key.start_mark.line + 1
    except (yaml.YAMLError, TypeError):
        pass
    finally:
        loader.dispose()
    return lines


def _key_value(loader, node):
    """What YAML makes of a mapping key *node*, or its text when that is not a plain hashable value."""
    import yaml

    try:
        value = loader.construct_object(node, deep=True)
        hash(value)
    except (yaml.YAMLError, TypeError):
        return node.value if isinstance(node, yaml.ScalarNode) else None
    return value


class _DuplicateKey(Exception):
    """A mapping in the file names one key twice (YAML would keep the last one silently)."""

    def __init__(self, key, first, second, top_level, profile=None):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second
        self.top_level, self.profile = top_level, profile


_loader_class = []


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping, with the lines of both (built on first use)."""
    if _loader_class:
        return _loader_class[0]
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            self._root = node
            self._profile_of = {}  # id of a profile's value node -> the profile's name
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, value_node in node.value:
                # "<<" merges are meant to be overridden by the mapping's own keys: only those are compared.
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor itself reports it
                if first is not key_node:
                    raise _DuplicateKey(key, first.start_mark.line + 1, key_node.start_mark.line + 1,
                                        node is self._root, self._profile_of.get(id(node)))
                if node is self._root:
                    self._profile_of[id(value_node)] = key
            return super().construct_mapping(node, deep=deep)

    _loader_class.append(UniqueKeyLoader)
    return UniqueKeyLoader


def _duplicate_message(path, duplicate):
    """The one line that reports *duplicate*, naming both of its lines."""
    lines = f"lines {duplicate.first} and {duplicate.second}"
    if duplicate.top_level:
        return (f"{path}:{duplicate.second}: profile {duplicate.key!r} is defined twice ({lines}); "
                "rename or remove one")
    if duplicate.profile is not None:
        return (f"{path}:{duplicate.second}: profile {duplicate.profile!r}, key {duplicate.key!r}: "
                f"set twice in this profile ({lines}); remove one")
    return f"{path}:{duplicate.second}: key {duplicate.key!r} is given twice in one mapping ({lines}); remove one"


def _ini_line(text):
    """The line of the first section header when *text* reads like an INI file (``[name]`` and ``key = value``)."""
    lines = text.splitlines()
    if not any(_INI_ASSIGNMENT.match(line) for line in lines):
        return None
    for number, line in enumerate(lines, 1):
        if _INI_SECTION.match(line):
            return number
    return None


def _shown(key, value):
    """*value* as an error message may show it: the secret never, a key id cut to its first four characters."""
    if key == "aws_secret_access_key":
        return "(value hidden)"
    if key == "aws_access_key_id":
        return repr(str(value)[:4] + "...")
    return repr(value)


def _check_value(key, value):
    """The problem with one key's value, or None."""
    if key in FENCE_KEYS:
        if not isinstance(value, bool):
            return f"must be true or false, not {_shown(key, value)}"
        return None
    if key in BOOL_KEYS:
        if value is not True:
            return f"must be true (leave it out when the keys are in this file), not {value!r}"
        return None
    if key in INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number of seconds, not {type(value).__name__} {value!r}"
        low, high = RANGES[key]
        if not low <= value <= high:
            why = (
                " (role chaining: STS caps a role assumed with MFA session credentials at one hour)"
                if key == "duration_seconds"
                else ""
            )
            return f"must be between {low} and {high}, not {value}{why}"
        return None
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__} {_shown(key, value)}"
    if not value.strip():
        return "must not be empty"
    if key in PATTERNS:
        pattern, description = PATTERNS[key]
        if not pattern.match(value):
            return f"{_shown(key, value)} is not {description}"
    return None


# The organisation's files: YAML in ~/.imsa's form, directly in the system directory (its subdirectories, such as
# the system mode's own, are not read).
SYSTEM_SUFFIXES = (".yaml", ".yml")


def system_files(environ=None):
    """The organisation's default files, sorted by name (a later file's value wins), each checked to be root's and
    writable by root only; [] when the system directory does not exist."""
    from imsa import paths

    directory = paths.system_config_dir(environ)
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(f"{directory}: cannot read the organisation's defaults: {error.strerror}") from None
    check_system_owner(directory, info)
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise ConfigError(f"{directory}: cannot read the organisation's defaults: {error.strerror}") from None
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(SYSTEM_SUFFIXES) and not name.startswith(".") and os.path.isfile(path):
            found.append(path)
    return found


def check_system_owner(path, info):
    """ConfigError unless *path* (its stat *info*) belongs to root and nobody else may write it.

    The organisation's files choose where people sign in (an OIDC provider's discovery URL, a start URL) and which
    roles they get: a file that another local user, or any process of the user, could rewrite would let it send the
    next sign-in, and the token it yields, to a server of its choosing, under the organisation's name. What a
    package or an MDM installs is root's and 0644 (a directory 0755): that is what is accepted.
    """
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(f"{path}: the organisation's defaults must belong to root and be writable by root only "
                          f"(it is owned by uid {info.st_uid}, mode {mode:04o}); run: sudo chown root: {path} && "
                          f"sudo chmod go-w {path}")


def _read(path, system=False):
    """(text, mode) of the file at *path*; a file of the organisation's must pass check_system_owner."""
    try:
        with open(path, encoding="utf-8") as handle:
            info = os.fstat(handle.fileno())
            if system:
                check_system_owner(path, info)
            return handle.read(), info.st_mode
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def _parse(path, text, system=False):
    """(profiles, {(path, profile, key or None): line}, problems) of one file's *text*; ConfigError for a file
    that is not a YAML mapping at all."""
    import yaml

    try:
        raw = yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as duplicate:
        raise ConfigError(_duplicate_message(path, duplicate)) from None
    except yaml.YAMLError as error:
        _refuse_ini(path, text)
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _refuse_ini(path, text)
        raise ConfigError(f"{path}: must be a mapping of profile names to settings, not {type(raw).__name__}")
    lines = {(path,) + place: line for place, line in _line_numbers(text).items()}
    config = Config(path, {}, lines)
    problems = []
    for name, settings in raw.items():
        if not isinstance(name, str):
            line = lines.get((path, name, None))
            where = f"{path}:{line}" if line else path
            problems.append(f"{where}: this profile name is read by YAML as {type(name).__name__} {name!r}, not as "
                            "text; put it in quotes")
            continue
        if not name.isprintable():
            problems.append(f"{config._where(name)}: a profile name must not contain control characters or line breaks")
            continue
        if not isinstance(settings, dict):
            problems.append(f"{config._where(name)}: must be a mapping of keys to values")
            continue
        for key, value in settings.items():
            if key not in KNOWN_KEYS:
                problems.append(f"{config._where(name, key)}: unknown key{_unknown_key_hint(key)}")
                continue
            problem = _check_value(key, value)
            if problem:
                problems.append(f"{config._where(name, key)}: {problem}")
        if system and "aws_secret_access_key" in settings:
            problems.append(f"{config._where(name, 'aws_secret_access_key')}: the organisation's defaults are "
                            "readable by everyone and must hold no secret key")
        if settings.get("secret_store") and "aws_secret_access_key" in settings:
            problems.append(f"{config._where(name, 'aws_secret_access_key')}: the profile keeps its keys in the "
                            "secret store (secret_store: true); remove the plain-text key")
    return raw, lines, problems


def load(path=None, warn=None, missing_ok=False, environ=None):
    """Read and validate the whole file over the organisation's defaults (system_files); ConfigError names file,
    line, profile and key of the first problem. With *missing_ok* a missing file is no error: the defaults alone,
    or None when there are none either."""
    path = path or config_path()
    layers = []
    for system_path in system_files(environ):
        try:
            text, _ = _read(system_path, system=True)
        except FileNotFoundError:
            continue  # removed since the directory was listed
        layers.append((system_path, _parse(system_path, text, system=True)))
    try:
        text, mode = _read(path)
    except FileNotFoundError:
        if not missing_ok:
            raise ConfigError(f"{path}: no such file; create it with your profiles (see README, Configuration)") \
                from None
        if not layers:
            return None
    else:
        if warn and stat.S_IMODE(mode) & 0o077:
            warn(f"imsa: warning: {path} holds long-term keys and is readable by others; run: chmod 600 {path}")
        layers.append((path, _parse(path, text)))
    raw, lines, origins, problems = {}, {}, {}, []
    for layer_path, (layer_raw, layer_lines, layer_problems) in layers:
        problems.extend(layer_problems)
        lines.update(layer_lines)
        for name, settings in layer_raw.items():
            if not isinstance(name, str) or not isinstance(settings, dict):
                continue  # already a problem
            raw.setdefault(name, {}).update(settings)  # key by key: the later file's value wins
            origins[(name, None)] = layer_path
            origins.update({(name, key): layer_path for key in settings})
    config = Config(path, raw, lines, origins)
    if not problems:
        for name, settings in raw.items():
            parent = settings.get("extends")
            if parent is not None and parent not in raw:
                problems.append(f"{config._where(name, 'extends')}: extends unknown profile {parent!r}")
        if not problems:
            problems.extend(_cycles(config, raw))
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return config


def _refuse_ini(path, text):
    """ConfigError when *text* is an INI file (what ~/.aws/credentials looks like) rather than YAML."""
    line = _ini_line(text)
    if line is not None:
        raise ConfigError(f"{path}:{line}: this looks like an INI file; ~/.imsa is YAML (see README, Configuration)")


def _unknown_key_hint(key):
    """What to write instead of the unknown *key*: a known rename, else the closest known key, else nothing."""
    if key in RENAMED_KEYS:
        return "; " + RENAMED_KEYS[key]
    import difflib

    hint = difflib.get_close_matches(str(key), KNOWN_KEYS, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _cycles(config, raw):
    """One problem line per profile whose ``extends`` chain loops."""
    problems = []
    reported = set()
    for start in raw:
        seen = [start]
        current = start
        while "extends" in raw[current]:
            current = raw[current]["extends"]
            if current in seen:
                loop = seen[seen.index(current):] + [current]
                key = frozenset(loop)
                if key not in reported:
                    reported.add(key)
                    # Point at a profile on the loop, not at one that merely leads into it.
                    cycle = " -> ".join(map(repr, loop))
                    problems.append(f"{config._where(loop[0], 'extends')}: extends cycle {cycle}")
                break
            seen.append(current)
    return problems


# A top-level key written the way profile names are; any other line in column 0 needs the YAML parser.
_PLAIN_KEY = re.compile(r"^([A-Za-z_][\w.@+=-]*)[ \t]*:(?:[ \t].*)?$")
# Plain words that YAML 1.1 reads as booleans or null, not as names.
_YAML_WORDS = frozenset(("y", "yes", "n", "no", "true", "false", "on", "off", "null"))


def _plain_top_level_keys(text):
    """The top-level keys of a plainly written file, or None when some line needs the real YAML parser."""
    names = set()
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "#")):
            continue
        match = _PLAIN_KEY.match(line)
        if not match or match.group(1).lower() in _YAML_WORDS:
            return None
        names.add(match.group(1))
    return names


def profile_names(path=None):
    """Profile names for shell completion, ~/.imsa's and the AWS config files' (only *path*'s when given): a cheap
    parse, never an error.

    Importing PyYAML is about a third of a completion's time (scripts/bench.py), so a plainly written file's
    top-level keys are read line by line; anything unusual goes to the YAML parser.
    """
    if path is not None:
        return _imsa_names(path)
    return sorted(set(_imsa_names()) | set(_system_names()) | set(_aws_names()))


def _system_names():
    """The organisation's profile names (the files' checks are for the commands that use them), or none."""
    try:
        from imsa import paths

        directory = paths.system_config_dir()
        files = [os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(SYSTEM_SUFFIXES)]
    except Exception:  # completion must never fail loudly
        return []
    return [name for path in files for name in _imsa_names(path)]


def _aws_names():
    """The AWS config files' profile names, or none when they cannot be read."""
    try:
        from imsa.sources import aws_config

        return aws_config.load().names
    except Exception:  # completion must never fail loudly
        return []


def _imsa_names(path=None):
    """~/.imsa's profile names (see profile_names)."""
    try:
        with open(path or config_path(), encoding="utf-8") as handle:
            text = handle.read()
        names = _plain_top_level_keys(text)
        if names is None:
            import yaml

            raw = yaml.safe_load(text)
            raw = raw if isinstance(raw, dict) else {}
            names = [name for name in raw if isinstance(name, str) and name.isprintable()]
    except Exception:  # completion must never fail loudly
        return []
    return sorted(names)


# --- one name, two files ---


def input_paths(environ=None):
    """Every file resolve() may read, in order — ~/.imsa, the organisation's directory and its files
    (system_files' names, unchecked here), the AWS config files: the parsed-profile cache (imsa/profile_cache.py)
    is keyed by their identities, so a file added to resolution is added here. The directory itself is there
    because a file added to it, removed or replaced changes it."""
    from imsa import paths
    from imsa.sources import aws_config

    directory = paths.system_config_dir(environ)
    try:
        names = sorted(os.listdir(directory))
    except OSError:  # none (the usual case), or unreadable: resolve() says so
        names = []
    system = [os.path.join(directory, name) for name in names
              if name.endswith(SYSTEM_SUFFIXES) and not name.startswith(".")]
    return [config_path(), directory, *system, *aws_config.file_paths(environ)]


def resolve(name, warn=None, environ=None):
    """Profile *name*: from ~/.imsa when it has it, else from the AWS config files; ConfigError naming both files
    (with the closest name) when neither has it."""
    from imsa.sources import aws_config

    if name.startswith("sso:"):  # a portal role named without a profile (imsa/sources/sso.py)
        from imsa.sources import sso

        return sso.named_role(name, warn, environ)
    path = config_path()
    imsa_config = _load_if_present(path, warn)
    if imsa_config is not None and name in imsa_config.names:
        return imsa_config.get(name)
    files = aws_config.load(environ)
    if name in files.profiles:
        return files.get(name, environ)
    import difflib

    known = sorted(set(imsa_config.names if imsa_config else ()) | set(files.names))
    hint = difflib.get_close_matches(name, known, n=1)
    listed = ", ".join(repr(known_name) for known_name in known) or "none"
    suffix = f" (did you mean {hint[0]!r}?)" if hint else f" (profiles: {listed})"
    where = path if imsa_config is not None else f"{path} (no such file)"
    raise ConfigError(f"no profile {name!r} in {where} or {files.config_path}{suffix}")


def _load_if_present(path, warn):
    """The validated file at *path* over the organisation's defaults, or None when there is neither; a file that is
    there but cannot be read or is invalid is an error (ConfigError), never taken for a missing one."""
    return load(path, warn=warn, missing_ok=True)


def catalog(warn=None, environ=None):
    """Every profile name of both files: a list of (name, the file that defines it, Profile or the ConfigError that
    resolving it gave, the file whose profile of that name it shadows or None, {setting: the file it came from} for
    ~/.imsa's profiles (the organisation's defaults under them) or None). ~/.imsa's own errors stop everything, as they do for
    every command; one bad ~/.aws/config profile is reported in its row."""
    from imsa.sources import aws_config

    path = config_path()
    imsa_config = _load_if_present(path, warn)
    files = aws_config.load(environ)
    rows = []
    for name in sorted(set(imsa_config.names if imsa_config else ()) | set(files.names)):
        in_imsa = imsa_config is not None and name in imsa_config.names
        try:
            profile = imsa_config.get(name) if in_imsa else files.get(name, environ)
        except ConfigError as error:
            profile = error
        shadowed = files.config_path if in_imsa and name in files.profiles else None
        origins = imsa_config.settings_origins(name) if in_imsa else None
        rows.append((name, imsa_config.origin(name) if in_imsa else files.origin(name), profile, shadowed, origins))
    return rows
