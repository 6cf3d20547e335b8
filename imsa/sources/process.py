"""``credential_process`` at the root of a ``~/.aws/config`` chain: the process's credentials start the session.

Run the way botocore runs it (split like a shell would, no shell, this process's environment), its stdout read as
the Version 1 JSON of PROTOCOL.md §3.1. Temporary credentials (a SessionToken and an Expiration) are the session
themselves; long-term keys (no SessionToken) are used once for GetSessionToken, as keys from a file would be.
On a terminal the process's stderr goes to it, so a process that asks someone something can be seen; otherwise
it is captured, and its last line is part of the error when the process fails.
"""

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from imsa.credentials import Credentials, parse_time, utcnow
from imsa.errors import ConfigError, StsError
from imsa.sources import fingerprint
from imsa.sources.iam_user import KIND, Keys

# A process may wait for a person (a password manager's unlock, a browser login): bounded, but generously.
TIMEOUT = 300
OUTPUT_LIMIT = 1 << 20
# Set in the environment of every credential_process imsa runs. A profile whose credential_process is imsa itself
# (``credential_process = imsa credential-process SAME``) would otherwise start imsa after imsa without end.
NESTED = "IMSA_IN_CREDENTIAL_PROCESS"


class ProcessFailed(StsError):
    """The credential_process failed or printed something that is not its JSON (exit 4, like STS)."""


@dataclass(frozen=True)
class Process:
    """A credential_process command line and the MFA device its keys go with (if they are long-term)."""

    command: str
    where: str
    mfa_serial_number: str = None
    mfa_process: str = None
    session_duration_seconds: int = 12 * 3600
    region: str = None

    kind = KIND

    @property
    def fingerprint(self):
        """The command line and MFA serial, hashed: the process need not run to find the session it made."""
        return fingerprint("credential_process", self.command, self.mfa_serial_number)

    @property
    def label(self):
        """``credential_process PROGRAM`` (its arguments are not shown: they may name secrets)."""
        try:
            program = shlex.split(self.command)[0]
        except (ValueError, IndexError):
            program = "?"
        return f"credential_process {os.path.basename(program)}" + (
            f" + MFA {self.mfa_serial_number}" if self.mfa_serial_number else "")

    @property
    def needs_person(self):
        """True when long-term keys from the process would need an MFA code from a person."""
        return bool(self.mfa_serial_number and not self.mfa_process)

    def new_session(self, mfa, settings, sts_factory=None):
        """Run the process; its temporary credentials, or a GetSessionToken session made from its keys."""
        if os.environ.get(NESTED):
            raise ConfigError(f"{self.where}: imsa was started by a credential_process and would run one again; a "
                              "profile whose credential_process is imsa cannot also be imsa's source (a loop)")
        data = run(self.command, self.where)
        creds = from_output(data, self.where)
        if isinstance(creds, Credentials):
            if self.mfa_serial_number:
                raise ConfigError(
                    f"{self.where}: credential_process gives temporary credentials, so imsa cannot make an MFA "
                    f"session from them for mfa_serial {self.mfa_serial_number}; remove mfa_serial from the chain "
                    f"or have the process print long-term keys")
            return creds
        keys = Keys(creds[0], creds[1], self.mfa_serial_number, self.mfa_process, self.session_duration_seconds,
                    self.region)
        return keys.new_session(mfa, settings, sts_factory)


def run(command, where):
    """Run *command* and return its parsed JSON; ProcessFailed with one readable line otherwise."""
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise ConfigError(f"{where}: credential_process cannot be parsed: {error}") from None
    if not argv:
        raise ConfigError(f"{where}: credential_process is empty")
    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=None if on_terminal else subprocess.PIPE,
                              timeout=TIMEOUT, check=False, env=dict(os.environ, **{NESTED: "1"}))
    except FileNotFoundError:
        raise ProcessFailed(f"{where}: credential_process: command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ProcessFailed(f"{where}: credential_process did not finish within {TIMEOUT} s") from None
    except OSError as error:
        raise ProcessFailed(f"{where}: credential_process: cannot run {argv[0]}: {error.strerror}") from None
    if done.returncode != 0:
        said = [line.strip() for line in (done.stderr or b"").decode("utf-8", "replace").splitlines() if line.strip()]
        reason = f": {said[-1][:300]!r}" if said else ""
        raise ProcessFailed(f"{where}: credential_process {os.path.basename(argv[0])} failed with exit status "
                            f"{done.returncode}{reason}")
    try:
        data = json.loads(done.stdout[:OUTPUT_LIMIT].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProcessFailed(f"{where}: credential_process {os.path.basename(argv[0])} did not print JSON") from None
    return data


def from_output(data, where, now=None):
    """Credentials (temporary) or (key id, secret) (long-term) from a credential_process's JSON *data*."""
    if not isinstance(data, dict) or data.get("Version") != 1:
        raise ProcessFailed(f"{where}: credential_process printed no Version 1 object")
    key_id, secret = data.get("AccessKeyId"), data.get("SecretAccessKey")
    if not isinstance(key_id, str) or not key_id or not isinstance(secret, str) or not secret:
        raise ProcessFailed(f"{where}: credential_process printed no AccessKeyId and SecretAccessKey")
    token, expiration = data.get("SessionToken"), data.get("Expiration")
    if not token:
        return key_id, secret
    if not isinstance(token, str) or not isinstance(expiration, str):
        raise ProcessFailed(f"{where}: credential_process printed a SessionToken without an Expiration; imsa "
                            "must know when the session ends")
    try:
        ends = parse_time(expiration)
    except ValueError:
        raise ProcessFailed(f"{where}: credential_process printed an Expiration that is not a time: "
                            f"{expiration[:40]!r}") from None
    if ends <= (now or utcnow()):
        raise ProcessFailed(f"{where}: credential_process printed credentials that expired at {expiration}")
    return Credentials(key_id, secret, token, ends, issued=(now or utcnow()).replace(microsecond=0))
