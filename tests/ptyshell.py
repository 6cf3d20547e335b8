"""Real interactive shells on a pseudo-terminal, and the user who runs them, for the tests of the shell set-up.

An interactive shell prints a prompt before each line it reads, so its prompt hooks (bash's PROMPT_COMMAND, zsh's
precmd, fish's fish_prompt event) run as they do for a person; ``PtyShell.run`` types one line and reads until
an end mark the line prints, so that nothing waits on a timer.
"""

import fcntl
import itertools
import os
import pwd
import re
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import time

import pytest

from conftest import alice_profiles, write_profiles

VENV_BIN = os.path.dirname(sys.executable)
IMSA = os.path.join(VENV_BIN, "imsa")
# How each shell is started: interactive, without the machine's or anyone's start-up files.
SHELL_ARGV = {
    "bash": ["bash", "--norc", "--noprofile", "-i"],
    "zsh": ["zsh", "-f", "-i"],
    "fish": ["fish", "--no-config", "-i"],
}


class PtyShell:
    """An interactive shell whose controlling terminal is a pseudo-terminal this test reads and types on."""

    _marks = itertools.count()

    def __init__(self, kind, argv, env, cwd):
        self.kind = kind
        self.master, slave = os.openpty()

        def take_terminal():
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                        preexec_fn=take_terminal, close_fds=True)
        os.close(slave)
        self.pending = b""

    def _read_until(self, mark, timeout):
        deadline = time.monotonic() + timeout
        while mark not in self.pending:
            left = deadline - time.monotonic()
            assert left > 0, f"{mark!r} never came: {self.pending[-3000:].decode(errors='replace')}"
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the shell is gone
                chunk = b""
            assert chunk, f"the shell ended before {mark!r}: {self.pending[-3000:].decode(errors='replace')}"
            self.pending += chunk
        head, _, self.pending = self.pending.partition(mark)
        return head.decode(errors="replace")

    def run(self, line, timeout=90):
        """Type *line* and return (what the terminal showed, the line's exit status).

        The terminal echoes what is typed, so assertions should look for expanded values, never the text typed.
        """
        number = next(self._marks)
        status = "{$status}" if self.kind == "fish" else "$?"
        # The mark is printed in two pieces, so the echo of the typed line never contains it whole.
        os.write(self.master, f"{line}; printf '%s%s\\n' __END{number} _{status}__\n".encode())
        shown = self._read_until(f"__END{number}_".encode(), timeout)
        return shown, int(self._read_until(b"__", timeout))

    def complete(self, text, timeout=90):
        """Type *text* and TAB, as a person asking for completion; return the words the line then holds.

        The shell's line editor handles the keys in order: after the completion, Ctrl-A goes to the start of the
        line and a printf is put in front, so the completed words come back one a line as ``word:WORD``.
        """
        number = next(self._marks)
        status = "{$status}" if self.kind == "fish" else "$?"
        os.write(self.master, text.encode() + b"\t")
        os.write(self.master, b"\x01printf 'word:%s\\n' \x05" + f"; printf '%s%s\\n' __END{number} _{status}__\n".encode())
        shown = self._read_until(f"__END{number}_".encode(), timeout)
        self._read_until(b"__", timeout)
        return re.findall(r"^word:(.*?)\r?$", shown, re.MULTILINE)

    def close(self):
        """End the shell (started by this test, stopped by its PID)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


class ShellUser:
    """Who runs the shells and the CLI: imsa-owner when the suite runs as root (the service never serves root, and
    root writes nothing in a user's run directory), else the user running the suite.

    It has a home of its own with a ~/.imsa holding profiles ``a`` (role-a, no region) and ``r`` (role-d, region
    us-west-2), both from alice's keys and MFA device on the fake STS.
    """

    def __init__(self, name, sts):
        entry = pwd.getpwnam(name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.prefix = [] if os.geteuid() == self.uid else [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]
        self.home = tempfile.mkdtemp(prefix="imsa-shell-home-")
        os.chmod(self.home, 0o755)
        profiles = alice_profiles(sts, a=("role-a", "shell-a"), r=("role-d", "shell-r"))
        profiles["r"]["region"] = "us-west-2"
        config = write_profiles(os.path.join(self.home, ".imsa"), profiles)
        if self.prefix:
            os.chown(self.home, self.uid, self.gid)
            os.chown(config, self.uid, self.gid)
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.home, "IMSA_CONFIG": config,
            "AWS_ENDPOINT_URL_STS": sts.endpoint, "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "TERM": "dumb", "LANG": "C.UTF-8",
            # No SDK here asks 169.254.169.254: a test that wants IMDS names the service's endpoint (with_endpoint).
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        # A run directory of its own (not /tmp/imsa-UID, which other tests of the same account use).
        self.run_dir = tempfile.mkdtemp(prefix="imsa-shell-run-")
        os.chmod(self.run_dir, 0o711)
        if self.prefix:
            os.chown(self.run_dir, self.uid, self.gid)
        self.env["IMSA_CONTROL_SOCKET"] = os.path.join(self.run_dir, "run", "control.sock")

    def run(self, argv, env=None, **kwargs):
        """Run *argv* as this user in its home; CompletedProcess with text output."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.prefix + list(argv), env=env or self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=90, **kwargs)

    def imsa(self, *args, env=None, **kwargs):
        """Run the imsa CLI as this user."""
        return self.run([IMSA, *args], env=env, **kwargs)

    def start_dev_service(self):
        """``imsa start --listen 127.0.0.1:0`` as this user; returns the endpoint it printed."""
        done = self.imsa("start", "--listen", "127.0.0.1:0")
        assert done.returncode == 0, done.stderr
        name, _, endpoint = done.stdout.strip().partition("=")
        assert name == "export AWS_EC2_METADATA_SERVICE_ENDPOINT", done.stdout
        return endpoint

    def with_endpoint(self, endpoint):
        """This user's environment with IMDS at *endpoint* (the service it started) instead of nowhere."""
        env = dict(self.env, AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint)
        del env["AWS_EC2_METADATA_DISABLED"]
        return env

    def shell(self, kind, env=None):
        """An interactive *kind* shell (bash, zsh, fish) as this user, with a plain prompt."""
        if not shutil.which(kind):
            pytest.skip(f"{kind} is not installed (.ci/run installs it)")
        env = dict(env or self.env, SHELL=shutil.which(kind))
        shell = PtyShell(kind, self.prefix + SHELL_ARGV[kind], env, self.home)
        if kind != "fish":  # fish's own prompt is plain enough under TERM=dumb
            shell.run("PS1='$ '")
        return shell

    def close(self):
        """Stop this user's service if a test left it running, and remove its home and run directory."""
        self.imsa("stop")
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def shell_user(request, sts_server):
    """A ShellUser (see there); its service is stopped and its files removed after the test."""
    if os.geteuid() == 0:
        name = request.getfixturevalue("local_users")[0].name  # imsa-owner, made for this run
    else:
        name = pwd.getpwuid(os.geteuid()).pw_name
    user = ShellUser(name, sts_server)
    yield user
    user.close()
