"""``credential_process`` as the system mode's session: the command line, run again at every refresh.

In the system mode nobody hands the service a session: what it holds of a ``credential_process`` profile is the
command line (no secret), and its minter runs the command whenever the role needs renewing. The command runs in a
child (``python -I -m imsa.sources.system_process COMMAND``) that reads its output and passes on temporary
credentials only: a process that prints long-term keys (no SessionToken) is refused there, so the network-facing
service never holds an IAM user's keys, not even for one GetSessionToken. The role hops of the profile are then
assumed from the process's credentials, as for any session (sts.assume_chain).
"""

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass

from imsa.sources import fingerprint

KIND = "credential_process"
# The child reads the process's JSON and answers with it; the process itself has process.TIMEOUT.
CHILD_TIMEOUT = 330
OUTPUT_LIMIT = 1 << 20
LONG_TERM = ("credential_process printed long-term keys (no SessionToken): the system mode serves from temporary "
             "credentials only; have the process print a session (GetSessionToken, AssumeRole), or use Roles "
             "Anywhere")


@dataclass(frozen=True)
class Command:
    """The material of a ``credential_process`` session: the command line alone."""

    command: str

    kind = KIND
    needs_person = False

    @property
    def expiration(self):
        """Never: the command is run again at each refresh."""
        from imsa.sources.roles_anywhere import NO_END

        return NO_END

    def expired(self, now=None):
        """Never: the command is run again at each refresh."""
        return False

    @property
    def fingerprint(self):
        """The command line, hashed (as sources.process names the same command)."""
        return fingerprint("credential_process", self.command, None)

    @property
    def label(self):
        """``credential_process PROGRAM`` (its arguments may name secrets: not shown)."""
        try:
            program = shlex.split(self.command)[0]
        except (ValueError, IndexError):
            program = "?"
        return f"credential_process {program.rsplit('/', 1)[-1]}"

    def to_json(self):
        """The persisted form: the command line."""
        return {"command": self.command}

    @classmethod
    def from_json(cls, data):
        """Validate the persisted form; ValueError names the problem."""
        if not isinstance(data, dict) or not isinstance(data.get("command"), str) or not data["command"].strip():
            raise ValueError("'material.command' must be a command line")
        return cls(data["command"])


def credentials(command):
    """Temporary Credentials from running *command* through the guarding child; ProcessFailed says why not."""
    from imsa.sources.process import ProcessFailed, from_output

    try:
        done = subprocess.run([sys.executable, "-I", "-m", __name__, command], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ProcessFailed(f"credential_process did not finish within {CHILD_TIMEOUT} s") from None
    if done.returncode != 0:
        said = [line for line in done.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        raise ProcessFailed(said[-1][:400] if said else f"credential_process failed (exit {done.returncode})")
    try:
        data = json.loads(done.stdout[:OUTPUT_LIMIT].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProcessFailed("credential_process did not print JSON") from None
    creds = from_output(data, "credential_process")
    if not hasattr(creds, "session_token"):  # the child passes on sessions only; never trust that blindly
        raise ProcessFailed(LONG_TERM)
    return creds


def mint(command, spec):
    """The minter of ``credential_process`` sessions (sources.KINDS): run the command now, then the role hops."""
    from imsa import sts

    session = credentials(command.command)
    if not spec.get("role_arn"):
        return session
    return sts.assume_chain(session, spec)


def main(argv):
    """The guarding child: run the command, print its JSON only when it holds temporary credentials."""
    from imsa.errors import ImsaError
    from imsa.sources.process import from_output, run

    try:
        data = run(argv[0], "credential_process")
        creds = from_output(data, "credential_process")
    except ImsaError as error:
        print(str(error), file=sys.stderr)
        return 1
    if isinstance(creds, tuple):
        print(LONG_TERM, file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
