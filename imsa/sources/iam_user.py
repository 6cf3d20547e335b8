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
        from imsa import sts

        return sts.new_session(self, mfa, sts_factory or sts.sts_client, settings=settings)
