"""``~/.aws/config`` and ``~/.aws/credentials`` as a source: the profiles people already have, read-only.

Parsed with botocore's own loader (``botocore.configloader``, cheap to import; never ``botocore.session``), the
credentials file merged over the config file as botocore's ``Session.full_config`` does. Chains resolve with
botocore's rules (``AssumeRoleProvider``): ``role_arn`` with exactly one of ``source_profile`` or
``credential_source``; a source profile with static keys uses them even if it has a role; a profile may name itself
as its source only when it has keys; loops are errors.

MFA follows imsa's model, not the SDK's: an ``mfa_serial`` anywhere on a chain means one GetSessionToken with that
device on the root keys, and every role of the chain assumed from that session without MFA — so every profile on
the same keys and device shares one MFA session. Assumed from a session, a role lasts at most one hour (STS's
role-chaining limit): a longer ``duration_seconds`` is served as one hour, and the profile's notes say so.
"""

import os

from imsa.errors import ConfigError
from imsa.sources import Hop, Profile

CONFIG_VARIABLE = "AWS_CONFIG_FILE"
CREDENTIALS_VARIABLE = "AWS_SHARED_CREDENTIALS_FILE"
# STS's own bounds of AssumeRole's DurationSeconds, and the role-chaining cap for roles assumed from a session.
MIN_DURATION = 900
MAX_DURATION = 43200
CHAINED_MAX = 3600
CREDENTIAL_SOURCES = ("Environment", "Ec2InstanceMetadata", "EcsContainer")
STATIC_KEYS = ("aws_access_key_id", "aws_secret_access_key")
SSO_KEYS = ("sso_session", "sso_start_url", "sso_account_id", "sso_role_name", "sso_region")
NOT_YET = {  # keys of a root imsa does not read yet: what it is, so the error says it
    "web_identity_token_file": "web identity (web_identity_token_file)",
    "login_session": "console login (login_session)",
}


def file_paths(environ=None):
    """(config file, credentials file): AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE, or the ~/.aws defaults."""
    environ = os.environ if environ is None else environ
    config = environ.get(CONFIG_VARIABLE) or os.path.join("~", ".aws", "config")
    credentials = environ.get(CREDENTIALS_VARIABLE) or os.path.join("~", ".aws", "credentials")
    return tuple(os.path.expanduser(os.path.expandvars(path)) for path in (config, credentials))


def _parse(path):
    """One INI file through botocore's parser: {section: {key: value}}; {} when it does not exist."""
    import botocore.configloader
    import botocore.exceptions

    try:
        return botocore.configloader.raw_config_parse(path)
    except botocore.exceptions.ConfigNotFound:
        return {}
    except botocore.exceptions.ConfigParseError as error:
        reason = str(error.kwargs.get("error", error)).splitlines()[0]
        raise ConfigError(f"{path}: cannot be parsed: {reason}") from None


class AwsFiles:
    """The profiles of the AWS config and credentials files, merged as botocore merges them."""

    def __init__(self, config_path, credentials_path, config_sections, credentials_sections):
        import botocore.configloader

        self.config_path, self.credentials_path = config_path, credentials_path
        built = botocore.configloader.build_profile_map(config_sections)
        self._config = built["profiles"]
        self.sso_sessions = built.get("sso_sessions", {})
        self._credentials = credentials_sections
        self.profiles = {name: dict(values) for name, values in self._config.items()}
        for name, values in credentials_sections.items():
            self.profiles.setdefault(name, {}).update(values)
        self.names = sorted(self.profiles)

    def origin(self, name):
        """The file that defines profile *name*: the config file, or the credentials file when only it does."""
        return self.config_path if name in self._config else self.credentials_path

    def where(self, name, key=None, in_credentials=None):
        """``FILE: [profile NAME], key 'KEY'`` for an error message: the file that sets *key* (the credentials file
        first, as botocore merges them), or the one *in_credentials* names."""
        if in_credentials is None:
            in_credentials = key in self._credentials.get(name, {}) if key else name not in self._config
        if in_credentials:
            text = f"{self.credentials_path}: [{name}]"
        else:
            section = name if name == "default" else f"profile {name}"
            text = f"{self.config_path}: [{section}]"
        return text + (f", key {key!r}" if key else "")

    def get(self, name, environ=None):
        """Profile *name* resolved into a sources.Profile; ConfigError naming file, section and key otherwise."""
        from imsa import config

        if name not in self.profiles:
            raise ConfigError(f"{self.config_path}: no profile {name!r}")
        if not name or len(name) > 128 or "/" in name or not name.isprintable():
            raise ConfigError(f"{self.where(name)}: imsa serves profiles whose names are 1-128 printable "
                              "characters without '/'")
        root, chain = self._chain(name, [name])
        hops, notes = [], []
        for hop_name in chain:
            hop, note = self._hop(hop_name, config.default_session_name)
            hops.append(hop)
            if note:
                notes.append(note)
        serial, mfa_process = self._device([root[1]] + chain if root[0] == "profile" else chain)
        region = self._value(name, "region", "region")
        device = {"mfa_serial_number": serial, "mfa_process": mfa_process, "region": region}
        source = self._root_source(root, device, environ)
        if getattr(source, "first_hop", None) is not None:  # a source whose own call makes the chain's first role
            hops.insert(0, source.first_hop)
        return Profile(name=name, origin=self.origin(name), source=source, hops=tuple(hops),
                       region=region, notes=tuple(notes))

    # --- botocore's chain rules ---

    @staticmethod
    def _has_role(profile):
        return "role_arn" in profile and "web_identity_token_file" not in profile

    @staticmethod
    def _has_static(profile):
        return any(key in profile for key in STATIC_KEYS)

    def _chain(self, name, visited):
        """(root, names of the profiles whose roles are assumed, in order) for *name*; root is ("profile", NAME)
        — that profile's own credentials — or ("credential_source", NAME)."""
        profile = self.profiles[name]
        if not self._has_role(profile):
            return ("profile", name), []
        source_profile, credential_source = profile.get("source_profile"), profile.get("credential_source")
        if source_profile is not None and credential_source is not None:
            raise ConfigError(f"{self.where(name)}: has both source_profile and credential_source (botocore's "
                              "InvalidConfigError); keep one")
        if source_profile is None and credential_source is None:
            raise ConfigError(f"{self.where(name, 'role_arn')}: a role needs source_profile or credential_source")
        if credential_source is not None:
            if credential_source not in CREDENTIAL_SOURCES:
                raise ConfigError(f"{self.where(name, 'credential_source')}: {credential_source!r} is not a valid "
                                  f"credential source ({', '.join(CREDENTIAL_SOURCES)})")
            return ("credential_source", name), [name]
        if source_profile not in self.profiles:
            raise ConfigError(f"{self.where(name, 'source_profile')}: the source_profile {source_profile!r} does "
                              "not exist")
        if source_profile in visited and (source_profile != name or not self._has_static(self.profiles[name])):
            path = " -> ".join(visited + [source_profile])
            raise ConfigError(f"{self.where(name, 'source_profile')}: infinite loop in the profiles' sources "
                              f"({path}; botocore's InfiniteLoopConfigError)")
        visited.append(source_profile)
        source = self.profiles[source_profile]
        if self._has_static(source) or not self._has_role(source):
            return ("profile", source_profile), [name]
        root, chain = self._chain(source_profile, visited)
        return root, chain + [name]

    def _hop(self, name, default_session_name):
        """The Hop of profile *name*'s role, and a note when its duration is cut to the role-chaining hour."""
        role_arn = self._value(name, "role_arn", "role_arn", required=True)
        session_name = self._value(name, "role_session_name", "role_session_name") or default_session_name()
        external_id = self._value(name, "external_id", "external_id")
        duration, note = CHAINED_MAX, None
        raw = self.profiles[name].get("duration_seconds")
        if raw is not None:
            try:
                asked = int(raw)
            except ValueError:
                raise ConfigError(f"{self.where(name, 'duration_seconds')}: must be a whole number of seconds, "
                                  f"not {raw!r}") from None
            if not MIN_DURATION <= asked <= MAX_DURATION:
                raise ConfigError(f"{self.where(name, 'duration_seconds')}: must be between {MIN_DURATION} and "
                                  f"{MAX_DURATION} (STS's limits), not {asked}")
            if asked > CHAINED_MAX:
                note = (f"profile {name} asks for duration_seconds {asked}, but a role assumed from a session lasts "
                        f"at most {CHAINED_MAX} s (STS's role-chaining limit); imsa renews it before it ends")
            duration = min(asked, CHAINED_MAX)
        return Hop(role_arn, session_name, duration, external_id), note

    def _value(self, name, key, pattern_key, required=False):
        """Profile *name*'s *key*, checked against STS's pattern for it; None when absent."""
        from imsa.limits import PATTERNS

        value = self.profiles[name].get(key)
        if value is None or value == "":
            if required:
                raise ConfigError(f"{self.where(name, key)}: must not be empty")
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(name, key)}: must be a single value, not a nested section")
        pattern, description = PATTERNS[pattern_key]
        if not pattern.match(value):
            raise ConfigError(f"{self.where(name, key)}: {value[:80]!r} is not {description}")
        return value

    def _device(self, names):
        """(mfa_serial, mfa_process) of the chain *names*: one device at most, wherever on the chain it is set."""
        found = {}
        for name in names:
            serial = self._value(name, "mfa_serial", "mfa_serial_number")
            if serial is not None:
                found.setdefault(serial, name)
        if len(found) > 1:
            (first, first_name), (second, second_name) = list(found.items())[:2]
            raise ConfigError(f"{self.where(second_name, 'mfa_serial')}: {second} differs from {first} of profile "
                              f"{first_name} on the same chain; imsa makes one MFA session per chain, with one device")
        process = next((self.profiles[name]["mfa_process"] for name in names
                        if self.profiles[name].get("mfa_process")), None)
        return (next(iter(found), None), process)

    def _root_source(self, root, device, environ):
        """The source that starts the session: keys, a credential_process or the environment."""
        kind, name = root
        if kind == "credential_source":
            credential_source = self.profiles[name]["credential_source"]
            where = self.where(name, "credential_source")
            if credential_source == "Environment":
                from imsa.sources.environment import Environment

                return Environment.read(where, environ, **device)
            if credential_source == "Ec2InstanceMetadata":
                raise ConfigError(f"{where}: Ec2InstanceMetadata is where imsa itself serves credentials; a role "
                                  "cannot start from it here; use source_profile with the keys instead")
            raise ConfigError(f"{where}: {credential_source} is not a source imsa reads; use source_profile")
        profile = self.profiles[name]
        for key, what in NOT_YET.items():
            if key in profile:
                raise ConfigError(f"{self.where(name, key)}: {what} is not a source imsa reads yet")
        if any(key in profile for key in SSO_KEYS):
            return self._sso(name, device["mfa_serial_number"])
        in_file = self._credentials.get(name, {})
        if self._has_static(in_file):  # botocore: the credentials file before credential_process
            return self._keys(name, in_file, device, in_credentials=True)
        if profile.get("credential_process"):
            from imsa.sources import roles_anywhere

            anchor = roles_anywhere.from_process_line(profile["credential_process"],
                                                      self.where(name, "credential_process"), environ)
            if anchor is not None:
                return anchor
            from imsa.sources.process import Process

            return Process(profile["credential_process"], self.where(name, "credential_process"), **device)
        if self._has_static(self._config.get(name, {})):
            return self._keys(name, self._config[name], device, in_credentials=False)
        raise ConfigError(f"{self.where(name)}: has no credentials (keys, role_arn with a source, or "
                          "credential_process)")

    def _sso(self, name, serial):
        """The Sso source of profile *name*, an IAM Identity Center profile — with ``sso_session`` (its [sso-session]
        section names the start URL and region) or in the legacy form (the profile names them itself), botocore's
        rules — its ``first_hop`` the portal role."""
        from imsa import config
        from imsa.sources import sso
        from imsa.sts_settings import url_problem

        profile = self.profiles[name]
        if serial is not None:
            raise ConfigError(f"{self.where(name)}: mfa_serial on a chain from IAM Identity Center: the sign-in is "
                              "the second factor, and imsa makes no MFA session from SSO credentials; remove mfa_serial")
        session_name = profile.get("sso_session")
        scopes = ()
        if session_name is not None:
            if session_name not in self.sso_sessions:
                raise ConfigError(f"{self.where(name, 'sso_session')}: there is no [sso-session {session_name}] "
                                  "section")
            section = self.sso_sessions[session_name]
            where = f"{self.config_path}: [sso-session {session_name}]"
            for key in ("sso_start_url", "sso_region"):
                if key in profile and profile[key] != section.get(key):
                    raise ConfigError(f"{self.where(name, key)}: differs from {key} of [sso-session {session_name}] "
                                      "(botocore refuses it); remove it from the profile")
            # What aws sso login registers for an sso-session without sso_registration_scopes.
            scopes = tuple(scope.strip() for scope in (section.get("sso_registration_scopes") or
                                                       "sso:account:access").split(",") if scope.strip())
        else:
            section, where = profile, self.where(name)
        values = {}
        for key in ("sso_start_url", "sso_region"):
            value = section.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} is missing (IAM Identity Center needs sso_start_url and "
                                  "sso_region)")
            values[key] = value
        problem = url_problem(values["sso_start_url"])
        if problem:
            raise ConfigError(f"{where}, key 'sso_start_url': {problem}")
        if not sso.REGION.match(values["sso_region"]):
            raise ConfigError(f"{where}, key 'sso_region': {values['sso_region'][:80]!r} is not a region name")
        checks = {"sso_account_id": (sso.ACCOUNT_ID, "a 12-digit account id"),
                  "sso_role_name": (sso.ROLE_NAME, "a role name of 1-64 letters, digits and _+=,.@-")}
        for key, (pattern, description) in checks.items():
            value = profile.get(key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{self.where(name, key)}: missing (an IAM Identity Center profile names "
                                  "sso_account_id and sso_role_name)")
            if not pattern.match(value):
                raise ConfigError(f"{self.where(name, key)}: {value[:80]!r} is not {description}")
        hop = Hop(sso.portal_role_arn(profile["sso_account_id"], profile["sso_role_name"]),
                  config.default_session_name(), CHAINED_MAX)
        return sso.Sso(values["sso_start_url"], values["sso_region"], session_name, scopes, where, hop)

    def _keys(self, name, values, device, in_credentials):
        """Keys from one file's section *values*; the errors name that file."""
        from imsa.limits import PATTERNS
        from imsa.sources.iam_user import Keys

        def where(key):
            return self.where(name, key, in_credentials)

        for key in STATIC_KEYS:
            if not values.get(key):
                raise ConfigError(f"{where(key)}: missing (both aws_access_key_id and "
                                  "aws_secret_access_key are needed)")
        if values.get("aws_session_token"):
            raise ConfigError(f"{where('aws_session_token')}: temporary keys in a file carry no expiry, so "
                              "imsa cannot hold them as a session; use long-term keys or credential_process")
        key_id = values["aws_access_key_id"]
        pattern, description = PATTERNS["aws_access_key_id"]
        if not pattern.match(key_id):
            raise ConfigError(f"{where('aws_access_key_id')}: {key_id[:4]!r}... is not {description}")
        return Keys(key_id, values["aws_secret_access_key"], **device)


def load(environ=None):
    """Both files (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE or ~/.aws), parsed; missing files are empty."""
    config_path, credentials_path = file_paths(environ)
    return AwsFiles(config_path, credentials_path, _parse(config_path), _parse(credentials_path))
