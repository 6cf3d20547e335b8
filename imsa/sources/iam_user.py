"""IAM user keys (+ an MFA device): the CLI makes one GetSessionToken, the service assumes roles from it.

The long-term keys stay in the CLI process; the session is the temporary credentials GetSessionToken returns.
Profiles of ``~/.imsa`` and ``~/.aws/config`` whose chains end in the same keys and MFA device share it.
"""

from dataclasses import dataclass, field

from imsa.credentials import mask
from imsa.sources import fingerprint

KIND = "credentials"


@dataclass(frozen=True)
class Keys:
    """Long-term keys and the MFA device that goes with them; repr hides the secret.

    *region* is where GetSessionToken goes (the region of the profile that first needed the session).
    """

    aws_access_key_id: str
    aws_secret_access_key: str = field(repr=False)
    mfa_serial_number: str = None
    mfa_process: str = None
    session_duration_seconds: int = 12 * 3600
    region: str = None
    # The profile whose keys are in the secret store (imsa/secrets.py), read only when a session is made.
    secret_item: str = None

    kind = KIND

    @property
    def fingerprint(self):
        """Key id and MFA serial, hashed; never the secret."""
        return fingerprint(self.aws_access_key_id, self.mfa_serial_number)

    @property
    def label(self):
        """``keys ****WXYZ + MFA arn:…`` for status and list."""
        text = f"keys {mask(self.aws_access_key_id)}"
        return text + (f" + MFA {self.mfa_serial_number}" if self.mfa_serial_number else "")

    @property
    def needs_person(self):
        """True when a session needs an MFA code that no mfa_process gives."""
        return bool(self.mfa_serial_number and not self.mfa_process)

    def new_session(self, mfa, settings, sts_factory=None):
        """GetSessionToken with these keys (and a code from *mfa*), reaching STS as *settings* say."""
        import dataclasses

        from imsa import sts

        keys = self
        if self.secret_item:
            keys = dataclasses.replace(self, aws_secret_access_key=stored_secret(self.secret_item, self.aws_access_key_id))
        return sts.new_session(keys, mfa, sts_factory or sts.sts_client, settings=settings)


def stored_secret(profile, access_key_id):
    """The secret key of *profile* from the secret store; it must belong to *access_key_id* (the file's)."""
    from imsa import secrets
    from imsa.errors import ConfigError

    stored_id, secret = secrets.get_keys(profile)
    if stored_id != access_key_id:
        raise ConfigError(f"the secret store holds key {mask(stored_id)} for profile {profile!r}, but its "
                          f"aws_access_key_id is {mask(access_key_id)}; store the right one: imsa add {profile}")
    return secret
