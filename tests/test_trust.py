"""Trust: root only adds the address and binds sockets, and the CLI talks only to its own user's service.

Each test plays the attack of another local user (or of the user's own directory) with real accounts, real files
and real sockets; they need root to make those accounts, and skip with that reason without it.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import MFA_CODE, alice_profiles, write_profiles

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it plays other local users with real accounts")

VENV_BIN = os.path.dirname(sys.executable)
IMSA = os.path.join(VENV_BIN, "imsa")

# A stand-in service run by another user: it records every byte a client sends it and answers anything with a
# plausible JSON body, as a squatter would to harvest a session or inject credentials.
SQUATTER = r"""
import json, os, socket, sys
path, record = sys.argv[1], sys.argv[2]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, 0o777)
listener.listen(8)
print("listening", flush=True)
body = json.dumps({"pid": 1, "listen": "127.0.0.1:1", "fingerprint": "0" * 32, "expiration": "2099-01-01T00:00:00Z",
                   "AccessKeyId": "ASIAINJECTED00000000", "SecretAccessKey": "injected", "SessionToken": "injected",
                   "Expiration": "2099-01-01T00:00:00Z", "profile": "a", "role_arn": None}).encode()
while True:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(2)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        with open(record, "ab") as handle:
            handle.write(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)
"""


def _owner_env(user, sts, home):
    """The owner's own environment: its home and ~/.imsa, the fake STS, and the default control socket path."""
    config = write_profiles(os.path.join(home, ".imsa"), alice_profiles(sts, a=("role-a", "trust-a")),
                            owner=(user.uid, user.gid))
    return {
        "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "IMSA_CONFIG": config,
        "AWS_ENDPOINT_URL_STS": sts.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture
def owner(local_users, sts_server):
    """(user, env): imsa-owner with a home of its own; its default run directory /tmp/imsa-UID is removed after."""
    user = local_users[0]
    home = tempfile.mkdtemp(prefix="imsa-owner-home-")
    os.chown(home, user.uid, user.gid)
    run_dir = f"/tmp/imsa-{user.uid}"
    shutil.rmtree(run_dir, ignore_errors=True)
    yield user, _owner_env(user, sts_server, home)
    user.run([IMSA, "stop"], _owner_env(user, sts_server, home))  # a service a failing test left running
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def other(local_users):
    """Another local user of the machine."""
    return local_users[1]


def _squat(other, path):
    """Start SQUATTER as *other* at *path*; returns (process, record file)."""
    record_dir = tempfile.mkdtemp(prefix="imsa-squat-")
    os.chown(record_dir, other.uid, other.gid)
    record = os.path.join(record_dir, "received")
    process = other.popen([sys.executable, "-c", SQUATTER, path, record], env={"PATH": "/usr/bin:/bin"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "listening", process.stderr.read()
    return process, record


def _received(record):
    try:
        with open(record, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


def _stop(process):
    process.kill()
    process.wait()


def _one_error(done, code, *words):
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imsa: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- finding 3: the client sends nothing to, and believes nothing from, another user's socket ---


def test_a_socket_another_user_planted_in_the_default_path_gets_no_session_and_injects_nothing(owner, other):
    user, env = owner
    run_dir = f"/tmp/imsa-{user.uid}"
    other.run(["mkdir", "-m", "0777", run_dir], env={"PATH": "/usr/bin:/bin"})
    assert os.stat(run_dir).st_uid == other.uid
    squatter, record = _squat(other, f"{run_dir}/control.sock")
    try:
        for argv in (["assume", "a", "--mfa-token", MFA_CODE], ["export", "a", "--mfa-token", MFA_CODE],
                     ["credential-process", "a"], ["status"]):
            done = user.run([IMSA, *argv], env)
            _one_error(done, 5, "refusing", run_dir, other.name)
        assert _received(record) == b""
    finally:
        _stop(squatter)


def test_the_server_process_must_run_as_the_user_even_when_the_files_are_its_own(owner, other):
    # The files pass every check (the owner's 0700 directory, a socket the owner owns), yet the listening process
    # is someone else's: only SO_PEERCRED can tell, and it must.
    user, env = owner
    squat_dir = tempfile.mkdtemp(prefix="imsa-squat-dir-")
    os.chmod(squat_dir, 0o777)
    squatter, record = _squat(other, os.path.join(squat_dir, "control.sock"))
    run_dir = f"/tmp/imsa-{user.uid}"
    try:
        os.mkdir(run_dir, 0o700)
        os.chown(run_dir, user.uid, user.gid)
        os.rename(os.path.join(squat_dir, "control.sock"), os.path.join(run_dir, "control.sock"))
        os.chown(os.path.join(run_dir, "control.sock"), user.uid, user.gid)
        done = user.run([IMSA, "assume", "a", "--mfa-token", MFA_CODE], env)
        _one_error(done, 5, "refusing", f"runs as uid {other.uid}")
        assert _received(record) == b""
    finally:
        _stop(squatter)
        shutil.rmtree(squat_dir, ignore_errors=True)


def test_a_loose_run_directory_of_the_user_is_refused_by_the_client(owner, other):
    user, env = owner
    run_dir = f"/tmp/imsa-{user.uid}"
    os.mkdir(run_dir)
    os.chmod(run_dir, 0o777)
    os.chown(run_dir, user.uid, user.gid)
    squatter, record = _squat(other, f"{run_dir}/control.sock")
    try:
        done = user.run([IMSA, "export", "a", "--mfa-token", MFA_CODE], env)
        _one_error(done, 5, "refusing", "0777")
        assert _received(record) == b""
    finally:
        _stop(squatter)


# --- finding 2 and the ownership rule: the service makes its run directory as the user, never as root ---


def _sudo_start(user, env, *extra, cwd="/"):
    """`sudo imsa start` as *user* would run it: root, with SUDO_UID/SUDO_GID naming the user."""
    root_env = dict(env, SUDO_UID=str(user.uid), SUDO_GID=str(user.gid), SUDO_USER=user.name)
    return subprocess.run([IMSA, "start", "--listen", "127.0.0.1:0", *extra], env=root_env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_run_directory_another_user_made_is_refused_and_left_as_it_is(owner, other):
    user, env = owner
    run_dir = f"/tmp/imsa-{user.uid}"
    other.run(["mkdir", "-m", "0777", run_dir], env={"PATH": "/usr/bin:/bin"})
    done = _sudo_start(user, env)
    _one_error(done, 1, "failed to start", run_dir, other.name)
    info = os.lstat(run_dir)
    assert info.st_uid == other.uid and stat.S_IMODE(info.st_mode) == 0o777
    assert os.listdir(run_dir) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["existing-file", "dangling"])
def test_root_never_follows_a_log_symlink_in_the_run_directory(owner, dangling):
    user, env = owner
    vault = tempfile.mkdtemp(prefix="imsa-root-only-")  # root's 0700 directory: the user cannot reach into it
    target = os.path.join(vault, "secret")
    if not dangling:
        with open(target, "w") as handle:
            handle.write("root's data\n")
        os.chmod(target, 0o600)
    run_dir = f"/tmp/imsa-{user.uid}"
    os.mkdir(run_dir, 0o700)
    os.symlink(target, os.path.join(run_dir, "imsa.log"))
    os.lchown(os.path.join(run_dir, "imsa.log"), user.uid, user.gid)
    os.chown(run_dir, user.uid, user.gid)
    try:
        done = _sudo_start(user, env)
        _one_error(done, 1, "cannot open the log", "imsa.log", "never followed")
        if dangling:
            assert not os.path.lexists(target)
        else:
            info = os.stat(target)
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
            with open(target) as handle:
                assert handle.read() == "root's data\n"
    finally:
        shutil.rmtree(vault, ignore_errors=True)


def test_root_ignores_control_socket_and_runtime_paths_from_the_environment(owner):
    # sudo -E, env_keep or a root shell can carry these: they must not make root create or chown anything.
    user, env = owner
    rootdir = tempfile.mkdtemp(prefix="imsa-root-owned-")
    os.chmod(rootdir, 0o755)
    try:
        done = _sudo_start(user, dict(env, IMSA_CONTROL_SOCKET=f"{rootdir}/made/control.sock",
                                      XDG_RUNTIME_DIR=f"{rootdir}/xdg"))
        _one_error(done, 1, "failed to start", f"{rootdir}/made")
        assert os.listdir(rootdir) == []
    finally:
        shutil.rmtree(rootdir, ignore_errors=True)


def test_the_background_log_is_the_users_0600_file_with_what_the_service_said(owner):
    user, env = owner
    done = _sudo_start(user, env)
    assert done.returncode == 0, done.stderr
    log = f"/tmp/imsa-{user.uid}/imsa.log"
    assert f"log: {log}" in done.stderr
    info = os.lstat(log)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.uid, 0o600)
    directory = os.lstat(os.path.dirname(log))
    assert (directory.st_uid, stat.S_IMODE(directory.st_mode)) == (user.uid, 0o700)
    deadline = time.monotonic() + 10
    while "serving IMDS" not in open(log).read() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = open(log).read().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} imsa\[\d+\] INFO imsa.server.process: serving IMDS", first), first
    stopped = user.run([IMSA, "stop"], env)
    assert stopped.returncode == 0, stopped.stderr


# --- finding 1: no code from the working directory, as root or as the user ---

POISON = "import os\nwith open(os.path.join({marks!r}, '{name}-%d' % os.getuid()), 'w'): pass\n"


def _poisoned_directory():
    """A 1777 directory (like /tmp) where another user left modules that shadow imsa's and the stdlib's."""
    where = tempfile.mkdtemp(prefix="imsa-cwd-")
    os.chmod(where, 0o1777)
    marks = tempfile.mkdtemp(prefix="imsa-marks-")
    os.chmod(marks, 0o1777)
    os.mkdir(os.path.join(where, "imsa"))
    for name, path in (("imsa", "imsa/__init__.py"), ("argparse", "argparse.py"), ("yaml", "yaml.py"),
                       ("flask", "flask.py"), ("json", "json.py"), ("selectors", "selectors.py")):
        with open(os.path.join(where, path), "w") as handle:
            handle.write(POISON.format(marks=marks, name=name))
    return where, marks


@pytest.mark.parametrize("as_root", [True, False], ids=["sudo", "user"])
def test_start_runs_no_code_from_the_working_directory(owner, as_root):
    user, env = owner
    where, marks = _poisoned_directory()
    try:
        if as_root:
            done = _sudo_start(user, env, cwd=where)
        else:
            done = user.run([IMSA, "start", "--listen", "127.0.0.1:0"], env, cwd=where)
        assert os.listdir(marks) == [], done.stderr
        assert done.returncode == 0, done.stderr
        assert "serving on 127.0.0.1:" in done.stderr
    finally:
        user.run([IMSA, "stop"], env)
        shutil.rmtree(where, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)


# --- finding 13: a warning when the code root runs is not root's alone ---


def test_start_as_root_warns_when_another_user_can_change_the_code(owner):
    user, env = owner
    copy = tempfile.mkdtemp(prefix="imsa-user-copy-")
    import imsa

    shutil.copytree(os.path.dirname(imsa.__file__), os.path.join(copy, "imsa"))
    for root, dirs, files in os.walk(copy):
        for name in dirs + files + ["."]:
            os.lchown(os.path.join(root, name), user.uid, user.gid)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from imsa import cli; "
              "sys.exit(cli.main(['start', '--listen', '127.0.0.1:0']))")
    root_env = dict(env, SUDO_UID=str(user.uid), SUDO_GID=str(user.gid))
    try:
        done = subprocess.run([sys.executable, "-I", "-c", script, copy], env=root_env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, cwd="/")
        assert done.returncode == 0, done.stderr
        assert f"warning: imsa runs as root from code another user can change ({copy} belongs to uid {user.uid})" \
            in done.stderr
    finally:
        user.run([IMSA, "stop"], env)
        shutil.rmtree(copy, ignore_errors=True)


def test_start_as_root_from_a_root_owned_install_warns_of_nothing(owner):
    user, env = owner
    done = _sudo_start(user, env)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert user.run([IMSA, "stop"], env).returncode == 0


# --- finding 4 (outside a network namespace, only what fails before any address is touched) ---


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "10.1.2.3:80", "[::]:8080", "192.168.1.10:80"])
def test_listen_refuses_addresses_that_would_serve_other_machines(listen):
    done = subprocess.run([IMSA, "start", "--listen", listen, "--user", "nobody"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    _one_error(done, 2, "--listen", "loopback")
