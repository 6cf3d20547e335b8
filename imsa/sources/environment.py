"""``credential_source = Environment``: the CLI's own AWS_* variables start the session (botocore's EnvProvider).

Long-term keys (no AWS_SESSION_TOKEN) are used once for GetSessionToken, and share the session of the same keys
anywhere else. Temporary ones are the session themselves and need AWS_CREDENTIAL_EXPIRATION: imsa must know when
they end.
"""

import os
from dataclasses import dataclass

from imsa.credentials import Credentials, mask, parse_time, utcnow
from imsa.errors import ConfigError
from imsa.sources import fingerprint
from imsa.sources.iam_user import KIND, Keys


@dataclass(frozen=True)
class Environment:
    """The AWS_* variables of this process, read when the profile is resolved; repr hides the secret."""

    where: str
    access_key_id: str
    secret_access_key: str
    session_token: str = None
    expiration: str = None
    mfa_serial_number: str = None
    mfa_process: str = None
    session_duration_seconds: int = 12 * 3600
    region: str = None

    kind = KIND

    def __repr__(self):
        return f"Environment(access_key_id={mask(self.access_key_id)!r})"

    @classmethod
    def read(cls, where, environ=None, **device):
        """The variables of *environ* (default: this process's); ConfigError naming what is missing."""
        environ = os.environ if environ is None else environ
        key_id, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise ConfigError(f"{where}: credential_source = Environment, but AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY are not both set in this environment")
        token = environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN")
        expiration = environ.get("AWS_CREDENTIAL_EXPIRATION")
        if token and not expiration:
            raise ConfigError(f"{where}: credential_source = Environment holds temporary credentials "
                              "(AWS_SESSION_TOKEN) without AWS_CREDENTIAL_EXPIRATION; imsa must know when they end")
        return cls(where, key_id, secret, token, expiration, **device)

    def _keys(self):
        return Keys(self.access_key_id, self.secret_access_key, self.mfa_serial_number, self.mfa_process,
                    self.session_duration_seconds, self.region)

    @property
    def fingerprint(self):
        """Long-term keys: the same as those keys anywhere; temporary ones: their key id."""
        if self.session_token:
            return fingerprint("environment", self.access_key_id)
        return self._keys().fingerprint

    @property
    def label(self):
        """``environment ****WXYZ`` (+ MFA)."""
        return f"environment {mask(self.access_key_id)}" + (
            f" + MFA {self.mfa_serial_number}" if self.mfa_serial_number else "")

    @property
    def needs_person(self):
        """True when long-term keys need an MFA code that no mfa_process gives."""
        return not self.session_token and self._keys().needs_person

    def new_session(self, mfa, settings, sts_factory=None):
        """The temporary credentials as they are, or a GetSessionToken session made from the long-term keys."""
        if not self.session_token:
            return self._keys().new_session(mfa, settings, sts_factory)
        if self.mfa_serial_number:
            raise ConfigError(f"{self.where}: the environment holds temporary credentials, so imsa cannot make an "
                              f"MFA session from them for mfa_serial {self.mfa_serial_number}")
        try:
            ends = parse_time(self.expiration)
        except ValueError:
            raise ConfigError(f"AWS_CREDENTIAL_EXPIRATION is not a time: {self.expiration[:40]!r}") from None
        now = utcnow()
        if ends <= now:
            raise ConfigError(f"the environment's credentials expired at {self.expiration}")
        return Credentials(self.access_key_id, self.secret_access_key, self.session_token, ends,
                           issued=now.replace(microsecond=0))
