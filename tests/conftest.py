"""Shared fixtures: an isolated environment, moto's server as a strict STS, and a live imsa service.

Every network peer here is on loopback (or inside a network namespace a test creates itself).

Under CI (``CI`` set, as CI services set it): hypothesis runs derandomized, so a property test fails the same way
on every run; and a skipped security test (marked ``security``, or skipped because it needs root, another uid or
a network namespace) fails the run, since CI runs as root and such a skip means the test silently did not run.
"""

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
import urllib.parse

import pytest
from hypothesis import settings

from imsa.client import Client
from imsa.errors import ServiceNotRunning

HERE = os.path.dirname(os.path.abspath(__file__))
MFA_CODE = "123456"
MFA_SERIAL = "arn:aws:iam::123456789012:mfa/alice"

# Variables that would make a test talk to something other than what it set up.
_SCRUB = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_DISABLED", "AWS_REGION",
    "AWS_DEFAULT_REGION", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "IMSA_CONFIG", "IMSA_CONTROL_SOCKET", "IMSA_SERVICE_USER", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "IMSA_SIGNIN_URL",
    # A suite started with sudo: the CLI, run as root, would become that user (imsa/sudo.py).
    "SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND",
    # A suite started by a systemd unit: the service's log format would follow the journal's.
    "JOURNAL_STREAM",
    # How STS is reached (imsa/sts_settings.py): a test sets what it means to use.
    "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    # How IAM Identity Center is reached, and whether its login opens a browser (imsa/sources/sso_login.py).
    "AWS_ENDPOINT_URL_SSO", "AWS_ENDPOINT_URL_SSO_OIDC", "BROWSER", "DISPLAY", "WAYLAND_DISPLAY",
)


# Tests may run as root; the service refuses to serve root, so it then serves this user.
SERVICE_USER = "nobody"
SERVICE_UID = 65534


def in_ci():
    """True when the suite runs under CI: ``CI`` is set (CI services set it to true)."""
    return bool(os.environ.get("CI"))


# A property test that fails in CI must fail again on the next run, and print how to reproduce it locally
# (``@reproduce_failure``); failing examples worth keeping become ``@example``s. Recent hypothesis versions load
# a profile like this one by themselves; settings a test passes explicitly still win, so none passes derandomize.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if in_ci():
    settings.load_profile("ci")

# The skip reasons of tests that need what CI has (it runs as root): root, another uid, a network namespace.
SECURITY_SKIP = re.compile(r"\broot\b|\buid\b|network namespace", re.IGNORECASE)
# Security tests skipped in this run (nodeid, reason); only collected under CI.
_security_skips = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "security: a security test; under CI a skip of it fails the run (see the README, Tests)")


def skip_reason(report):
    """The reason a skipped test report gives."""
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def is_security_skip(report):
    """Whether *report* is a skipped security test: marked ``security``, or skipped for want of root/netns."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return False
    return "security" in report.keywords or bool(SECURITY_SKIP.search(skip_reason(report)))


def pytest_runtest_logreport(report):
    if in_ci() and is_security_skip(report):
        _security_skips.append((report.nodeid, skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if _security_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _security_skips:
        terminalreporter.section("security tests skipped under CI", red=True, bold=True)
        for nodeid, reason in _security_skips:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line(f"{len(_security_skips)} security test(s) did not run; CI runs as root so that they "
                              "do: this run fails", red=True, bold=True)


def shared_tmpdir(prefix):
    """A temporary directory the service's unprivileged user can traverse (tests may run as root)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o711)
    return path


def service_run_dir(prefix="imsa-test-"):
    """A directory the service's user owns, so that it can make its run directory there after dropping root."""
    path = shared_tmpdir(prefix)
    if os.geteuid() == 0:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    return path


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """A fresh HOME, config and control socket path; no real AWS credentials and no proxies."""
    for name in _SCRUB:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text("")
    (home / ".aws" / "credentials").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("IMSA_CONFIG", str(home / ".imsa"))
    # The machine's /etc/imsa (an organisation's defaults) never reaches a test; a test that needs one makes it here.
    # Its parent is open to every user (as /etc is), so the CLI run as another local user finds it absent, not
    # unreadable; pytest's tmp_path is root's alone.
    system_parent = tempfile.mkdtemp(prefix="imsa-etc-")
    os.chmod(system_parent, 0o755)
    monkeypatch.setenv("IMSA_SYSTEM_CONFIG_DIR", os.path.join(system_parent, "etc-imsa"))
    run_dir = service_run_dir()
    monkeypatch.setenv("IMSA_CONTROL_SOCKET", os.path.join(run_dir, "run", "control.sock"))
    if os.geteuid() == 0:  # the CLI, run as root here, expects the service of the user it serves
        monkeypatch.setenv("IMSA_SERVICE_USER", SERVICE_USER)
    yield home
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(system_parent, ignore_errors=True)


class StsServer:
    """The running fake STS: its endpoint, users' keys, role ARNs, and the requests it recorded."""

    def __init__(self, process, info, recording):
        self.process = process
        self.endpoint = info["endpoint"]
        self.users = info["users"]
        self.roles = info["roles"]
        self.account = info["account"]
        self.recording = recording

    def stop(self):
        """Stop the server (by its PID) and remove its recording."""
        stop_process(self.process)
        try:
            os.unlink(self.recording)
        except OSError:
            pass

    def mark(self):
        """A position in the recording; calls() counts only what came after it."""
        try:
            return os.path.getsize(self.recording)
        except OSError:
            return 0

    def requests(self, since=0):
        """The form parameters (a dict, ``Action`` included) of every request recorded after *since*."""
        found = []
        try:
            with open(self.recording, "rb") as handle:
                handle.seek(since)
                lines = handle.read().decode().splitlines()
        except OSError:
            return found
        for line in lines:
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            found.append({name: values[0] for name, values in urllib.parse.parse_qs(body).items()})
        return found

    def actions(self, since=0):
        """The STS/IAM Action of every request recorded after *since*."""
        return [params.get("Action") for params in self.requests(since)]

    def calls(self, action, since=0):
        """How many *action* requests reached STS after *since*."""
        return self.actions(since).count(action)


def start_sts(mfa_code=MFA_CODE, extra_args=()):
    """Start tests/sts_server.py as its own process and wait for its JSON line; *extra_args* are its knobs
    (``--role-lifetime``, ``--session-lifetime``, ``--issued-log``: see its docstring). Stop it by its PID."""
    recording = tempfile.NamedTemporaryFile(prefix="imsa-sts-", suffix=".jsonl", delete=False).name
    env = dict(os.environ, MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=recording)
    argv = [sys.executable, os.path.join(HERE, "sts_server.py")]
    if mfa_code:
        argv += ["--mfa-code", mfa_code]
    argv += list(extra_args)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError("the fake STS did not start")
    return StsServer(process, json.loads(line), recording)


def stop_process(process):
    """Stop a process this suite started, by its PID."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def sts_server():
    """moto's server, strict, as STS for the whole run."""
    server = start_sts()
    yield server
    server.stop()


@pytest.fixture
def sts_env(sts_server, monkeypatch):
    """Point every boto3 client (the CLI's and the service's) at the fake STS."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts_server.endpoint)
    return sts_server


def alice_profiles(sts_server, **roles):
    """Profiles on alice's keys and MFA device: 'base' with them, and for each NAME=(ROLE, SESSION NAME) of *roles* a
    profile NAME extending it, for the fake STS's role ROLE (e.g. ``a=("role-a", "tester-a")``)."""
    alice = sts_server.users["alice"]
    profiles = {"base": {"aws_access_key_id": alice["aws_access_key_id"],
                         "aws_secret_access_key": alice["aws_secret_access_key"], "mfa_serial_number": MFA_SERIAL}}
    for name, (role, session_name) in roles.items():
        profiles[name] = {"extends": "base", "role_arn": sts_server.roles[role], "role_session_name": session_name}
    return profiles


def write_profiles(path, profiles, owner=None, mode=0o600):
    """*profiles* as YAML at *path* (str or Path), mode *mode*, owned by *owner* (uid, gid) when given."""
    import yaml

    with open(path, "w") as handle:
        yaml.safe_dump(profiles, handle)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)
    return path


def write_config(home, sts_server, extra=None, mode=0o600):
    """A ~/.imsa with profiles a..d (roles A..D), all sharing alice's keys and MFA device."""
    profiles = alice_profiles(sts_server, **{name: (f"role-{name}", f"tester-{name}") for name in "abcd"})
    profiles.update(extra or {})
    return write_profiles(home / ".imsa", profiles, mode=mode)


class Service:
    """A live imsa service started by a test (``imsa start --foreground`` in its own process)."""

    def __init__(self, process, status, log_path):
        self.process = process
        self.pid = status["pid"]
        self.host, port = status["listen"].rsplit(":", 1)
        self.port = int(port)
        self.endpoint = status["endpoint"].rstrip("/")
        self.socket = status["control_socket"]
        self.log_path = log_path
        self.client = Client(self.socket)

    def url(self, path):
        """The URL of *path* on the IMDS listener."""
        return f"http://{self.host}:{self.port}{path}"

    def log(self):
        """What the service wrote to its log so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_for_log(self, text, timeout=10):
        """The log once it holds *text* (polled, at most *timeout* seconds); AssertionError with its tail if not."""
        return wait_for_log(self.log_path, text, timeout)


def wait_for_log(path, text, timeout=10):
    """The file at *path* once it holds *text*: polled every 50 ms for at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, encoding="utf-8", errors="replace") as handle:
            content = handle.read()
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout} s: {content[-2000:]}")
        time.sleep(0.05)


def service_user_args():
    """Tests may run as root; the service refuses root, so it serves 'nobody' then."""
    return ["--user", SERVICE_USER] if os.geteuid() == 0 else []


def start_service(extra_args=(), env=None, timeout=15):
    """Start the service on 127.0.0.1:0 and wait until its control socket answers."""
    # The log goes beside the control socket's directory, which whoever set IMSA_CONTROL_SOCKET removes.
    socket_path = (env or os.environ).get("IMSA_CONTROL_SOCKET")
    log_dir = os.path.dirname(os.path.dirname(socket_path)) if socket_path else None
    log = tempfile.NamedTemporaryFile(prefix="imsa-service-", suffix=".log", delete=False, dir=log_dir)
    argv = [sys.executable, "-m", "imsa", "--verbose", "start", "--foreground", "--listen", "127.0.0.1:0"]
    argv += service_user_args() + list(extra_args)
    process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env or dict(os.environ))
    client = Client(timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the service exited: " + open(log.name).read())
        try:
            status = client.status()
        except ServiceNotRunning:
            time.sleep(0.05)
            continue
        if status["pid"] == process.pid:
            return Service(process, status, log.name)
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError("the service did not answer: " + open(log.name).read())


@pytest.fixture
def service(sts_env):
    """A live service whose STS is the fake one."""
    running = start_service()
    yield running
    stop_process(running.process)
    os.unlink(running.log_path)


def run_without_terminal(*args, env=None):
    """Run the CLI in a new session (no controlling terminal, so /dev/tty cannot be opened) with stdin at /dev/null:
    wherever it would ask for an MFA code it fails instead (exit 4)."""
    return subprocess.run(
        [sys.executable, "-m", "imsa", *args], capture_output=True, text=True, env=env or dict(os.environ),
        stdin=subprocess.DEVNULL, start_new_session=True, timeout=60,
    )


def run_imsa(*args, env=None, input=None, timeout=60):
    """Run the imsa CLI as a separate process; returns CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "imsa", *args], capture_output=True, text=True, env=env or dict(os.environ),
        input=input, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
    )


@pytest.fixture
def active_service(isolated_env, service, sts_env):
    """A live service serving profile 'a' (role-a, region us-west-2) from one MFA session."""
    write_config(isolated_env, sts_env, extra={
        "r": {"extends": "base", "role_arn": sts_env.roles["role-d"], "role_session_name": "tester-r", "region": "us-west-2"},
    })
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    return service


def http(host, port, method, path, headers=None, body=b"", host_header=None, source=None, timeout=5):
    """One raw HTTP/1.1 request over a real socket, with exactly the headers given; returns (status, headers, body)."""
    import http.client
    import socket

    sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
    try:
        lines = [f"{method} {path} HTTP/1.1"]
        if host_header is not False:
            lines.append(f"Host: {host_header or f'{host}:{port}'}")
        for name, value in (headers or {}).items():
            values = value if isinstance(value, list) else [value]
            lines.extend(f"{name}: {item}" for item in values)
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.msg, response.read()
    finally:
        sock.close()


def with_terminal(args):
    """Start the imsa CLI with a pseudo-terminal as its controlling terminal (stdout and stderr stay pipes)."""
    master, slave = os.openpty()

    def take_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "imsa", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ), preexec_fn=take_terminal, pass_fds=(slave,),
    )
    os.close(slave)
    return process, master


def read_terminal(master, until, timeout=30):
    """What the program wrote on the terminal, up to *until* (bounded by *timeout*)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    return seen


def control_request(path, request, timeout=10):
    """Send raw bytes to a control socket and read the answer until it closes; returns (status, body)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    try:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def control_post(path, route, body, content_type="application/json"):
    """POST *body* (bytes, or anything JSON) to *route* on a control socket; returns (status, body bytes)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = (f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    return control_request(path, request)


def finish_terminal(process, master):
    """Wait for a CLI started by with_terminal (killing it if it outlives the bound) and close its terminal; its
    (stdout, stderr)."""
    try:
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def answer_on_terminal(args, answers, until=b": "):
    """Run the CLI with a terminal and answer each prompt (what the terminal shows up to *until*) in turn; returns
    (process, prompts seen, stdout, stderr)."""
    process, master = with_terminal(args)
    prompts = []
    try:
        for answer in answers:
            prompts.append(read_terminal(master, until).decode(errors="replace"))
            os.write(master, answer.encode() + b"\n")
    except BaseException:
        finish_terminal(process, master)
        raise
    stdout, stderr = finish_terminal(process, master)
    return process, prompts, stdout, stderr


def one_error_line(done, code):
    """Assert the CLI failed with *code*, printing nothing on stdout and one ``imsa: error:`` line; return it."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imsa: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def needs_root(reason="needs root: it runs processes as other users"):
    """Skip unless root (CI runs as root, so these run there; under CI such a skip fails the run)."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=reason)


class LocalUser:
    """A real account on this machine: name, uid, gid and a private home the test may fill."""

    def __init__(self, name):
        import pwd

        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid

    def run(self, argv, env, cwd="/", timeout=90, **kwargs):
        """Run *argv* as this user (its own groups only), with *env*."""
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv], capture_output=True,
            text=True, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs,
        )

    def popen(self, argv, env, cwd="/", **kwargs):
        """Start *argv* as this user."""
        return subprocess.Popen(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv], env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, **kwargs,
        )


# How long a run's accounts may take to lose their last process before userdel gives up (seconds).
USERDEL_WAIT = 15


@pytest.fixture(scope="session")
def local_users():
    """Two real unprivileged accounts made for this run with useradd and removed after it: the user imsa serves
    ('imsa-owner-PID') and another local user ('imsa-other-PID'). The pid keeps runs on one machine apart."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create local users")
    names = [f"imsa-owner-{os.getpid()}", f"imsa-other-{os.getpid()}"]
    created = []
    try:
        for name in names:
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
            created.append(name)
        yield LocalUser(names[0]), LocalUser(names[1])
    finally:
        # userdel refuses (exit 8) while a process of the user still runs: a service or shell a test stopped may take
        # a moment to be gone. Wait for that, bounded, so that no account outlives the run.
        for name in created:
            deadline = time.monotonic() + USERDEL_WAIT
            while subprocess.run(["userdel", name], capture_output=True).returncode == 8 and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
