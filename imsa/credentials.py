"""The Credentials value object: made from STS answers, rendered for IMDS, exports and credential_process."""

import datetime
from dataclasses import dataclass

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow():
    """The current time, timezone-aware UTC (the default clock everywhere)."""
    return datetime.datetime.now(datetime.timezone.utc)


def format_time(moment):
    """An aware datetime as the whole-second ``YYYY-MM-DDTHH:MM:SSZ`` every SDK parses."""
    return moment.astimezone(datetime.timezone.utc).strftime(TIME_FORMAT)


def parse_time(text):
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` (or any ISO 8601 with offset) into an aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError("a timestamp must be a string")
    value = text.strip()
    if value.endswith("Z") or value.endswith("z"):
        value = value[:-1] + "+00:00"
    moment = datetime.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    try:
        return moment.astimezone(datetime.timezone.utc)
    except OverflowError:  # e.g. year 1 at +01:00 is before year 1 in UTC; the control socket answered 500
        raise ValueError(f"timestamp {text!r} is out of range") from None


def mask(key_id):
    """Show only the last four characters of a key id: ``****WXYZ``."""
    if not key_id:
        return ""
    return "****" + key_id[-4:]


@dataclass(frozen=True)
class Credentials:
    """Temporary AWS credentials; repr never shows the secret or the token."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime.datetime
    issued: datetime.datetime = None

    def __repr__(self):
        return f"Credentials(access_key_id={mask(self.access_key_id)!r}, expiration={format_time(self.expiration)!r})"

    __str__ = __repr__

    @classmethod
    def from_sts(cls, answer, now=None):
        """Build from the ``Credentials`` member of a GetSessionToken or AssumeRole answer."""
        expiration = answer["Expiration"]
        if isinstance(expiration, str):
            expiration = parse_time(expiration)
        elif expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=datetime.timezone.utc)
        return cls(
            access_key_id=answer["AccessKeyId"],
            secret_access_key=answer["SecretAccessKey"],
            session_token=answer["SessionToken"],
            expiration=expiration.astimezone(datetime.timezone.utc),
            issued=(now or utcnow()).replace(microsecond=0),
        )

    @classmethod
    def from_json(cls, data):
        """Build from the control plane's JSON (``to_json``); raises ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("credentials must be a JSON object")
        fields = {}
        for name in ("access_key_id", "secret_access_key", "session_token", "expiration"):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"credentials need a non-empty string {name!r}")
            fields[name] = value
        issued = data.get("issued")
        return cls(
            access_key_id=fields["access_key_id"],
            secret_access_key=fields["secret_access_key"],
            session_token=fields["session_token"],
            expiration=parse_time(fields["expiration"]),
            issued=parse_time(issued) if isinstance(issued, str) else None,
        )

    def to_json(self):
        """The control plane's JSON form (secrets included: only ever sent over the owner-only socket)."""
        data = {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
            "expiration": format_time(self.expiration),
        }
        if self.issued is not None:
            data["issued"] = format_time(self.issued)
        return data

    def remaining(self, now=None):
        """Time left before expiry (negative once expired)."""
        return self.expiration - (now or utcnow())

    def expired(self, now=None):
        """True once the expiry has been reached."""
        return self.remaining(now) <= datetime.timedelta(0)

    def to_imds(self):
        """The seven-field JSON object that IMDS serves for a role (PROTOCOL.md §1.3)."""
        return {
            "Code": "Success",
            "LastUpdated": format_time(self.issued or utcnow()),
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": format_time(self.expiration),
        }

    def to_process(self):
        """The credential_process Version 1 object (PROTOCOL.md §3.1)."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": format_time(self.expiration),
        }

    def to_env(self):
        """The standard AWS_* environment variables for these credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_CREDENTIAL_EXPIRATION": format_time(self.expiration),
        }
