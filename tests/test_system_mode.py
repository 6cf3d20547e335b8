"""The system-wide mode (imsa serve-system, imsa bind --system): started the way systemd starts it (the listening
socket handed over as fd 3 with LISTEN_FDS/LISTEN_PID), as a real dedicated user, from a root-owned configuration
directory with a Roles Anywhere profile; a bound process gets the role with boto3. All on loopback."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import needs_root, one_error_line, run_imsa, stop_process
from roles_anywhere_fake import PROFILE_ARN, TRUST_ANCHOR_ARN, FakeRolesAnywhere, Pki
from test_bindings import boto3_arn, http_get, read_env_file, service_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(sys.executable)
# bash puts the listening socket at fd 3 and sets LISTEN_PID to its own pid, which exec keeps: systemd's way.
ACTIVATE = 'LISTEN_PID=$$ LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$@" 3<&{fd} {fd}<&-'

pytestmark = needs_root("needs root: the configuration directory is root's and the service runs as its own user")


@pytest.fixture
def system(isolated_env, sts_env, local_users):
    """A root-owned configuration directory (profile 'ra': Roles Anywhere, role-a), the fake, the service user."""
    user = local_users[0]
    pki_dir = tempfile.mkdtemp(prefix="imsa-system-pki-")
    os.chmod(pki_dir, 0o711)
    pki = Pki(pki_dir, (user.uid, user.gid))
    fake = FakeRolesAnywhere(pki, sts_env.endpoint, sts_env.users["bob"], [sts_env.roles["role-a"]]).start()
    files = pki.leaf("host", kind="p256", form="fullchain")
    directory = tempfile.mkdtemp(prefix="imsa-system-")
    os.chmod(directory, 0o755)
    config = os.path.join(directory, "config")
    with open(config, "w") as handle:
        handle.write(
            f"[profile ra]\ncredential_process = aws_signing_helper credential-process --certificate "
            f"{files['certificate']} --private-key {files['private_key']} --trust-anchor-arn {TRUST_ANCHOR_ARN} "
            f"--profile-arn {PROFILE_ARN} --role-arn {sts_env.roles['role-a']}\n"
            f"[profile mfa]\ncredential_process = /bin/false\nmfa_serial = arn:aws:iam::123456789012:mfa/x\n"
            f"[profile keys]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = x\n")
    os.chmod(config, 0o644)
    environ = dict(os.environ, AWS_ENDPOINT_URL_ROLESANYWHERE=fake.url, AWS_CA_BUNDLE=pki.ca_bundle)
    yield {"dir": directory, "user": user, "env": environ, "fake": fake, "pki": pki}
    fake.stop()
    shutil.rmtree(pki_dir, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def serve(system, sock, **popen):
    """imsa serve-system as the dedicated user, the socket handed over as systemd does."""
    user = system["user"]
    env = {"PATH": VENV_BIN + os.pathsep + "/usr/bin:/bin", "AWS_CA_BUNDLE": system["pki"].ca_bundle,
           "AWS_ENDPOINT_URL_ROLESANYWHERE": system["fake"].url}
    argv = ["bash", "-c", ACTIVATE.format(fd=sock.fileno()), "bash", "setpriv", f"--reuid={user.uid}",
            f"--regid={user.gid}", "--init-groups", sys.executable, "-I", "-m", "imsa", "serve-system",
            "--config-dir", system["dir"]]
    return subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
                            text=True, **popen)


def test_a_bound_process_gets_the_role_from_the_system_mode_at_boot_with_nobody_present(system, sts_env):
    sock = listener()
    port = sock.getsockname()[1]
    done = run_imsa("bind", "--system", "web", "ra", "--config-dir", system["dir"], "--address",
                    f"127.0.0.1:{port}", env=system["env"])
    assert done.returncode == 0, done.stderr
    env_file = os.path.join(system["dir"], "env", "web")
    info = os.stat(env_file)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    with open(os.path.join(system["dir"], "bindings", "web.json")) as handle:
        kept = json.load(handle)
    values = read_env_file(env_file)
    assert values["AWS_CONTAINER_AUTHORIZATION_TOKEN"] not in json.dumps(kept)  # only its hash is kept
    service = serve(system, sock, stderr=subprocess.PIPE)
    sock.close()
    try:
        if service.poll() is not None:
            pytest.fail(service.communicate()[1][-3000:])
        arn = boto3_arn(service_env(env_file, sts_env), sts_env)
        assert arn.startswith(f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/"), arn
        assert http_get(values["AWS_CONTAINER_CREDENTIALS_FULL_URI"], {"Authorization": "wrong"})[0] == 401
        # The service runs as the dedicated user, not root.
        with open(f"/proc/{service.pid}/status") as handle:
            uids = next(line for line in handle if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(system["user"].uid)}
    finally:
        stop_process(service)
        service.communicate(timeout=30)


@pytest.mark.parametrize("case", ["dir-world-writable", "dir-users", "config-group-writable", "binding-users"])
def test_a_configuration_others_can_change_is_refused(system, case):
    directory, user = system["dir"], system["user"]
    sock = listener()
    done = run_imsa("bind", "--system", "web", "ra", "--config-dir", directory, env=system["env"])
    assert done.returncode == 0, done.stderr
    path, expected = {
        "dir-world-writable": (directory, "group or others may write to it (mode 0777)"),
        "dir-users": (directory, f"it belongs to uid {user.uid}, not root"),
        "config-group-writable": (os.path.join(directory, "config"), "group or others may write to it (mode 0664)"),
        "binding-users": (os.path.join(directory, "bindings", "web.json"), f"it belongs to uid {user.uid}, not root"),
    }[case]
    if case == "dir-world-writable":
        os.chmod(path, 0o777)
    elif case == "config-group-writable":
        os.chmod(path, 0o664)
    else:
        os.chown(path, user.uid, user.gid)
    service = serve(system, sock, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sock.close()
    stdout, stderr = service.communicate(timeout=60)
    line = one_error_line(subprocess.CompletedProcess([], service.returncode, stdout, stderr), 3)
    assert expected in line and path in line, line


def test_bind_system_refuses_profiles_that_need_a_person_or_hold_keys(system):
    done = run_imsa("bind", "--system", "web", "mfa", "--config-dir", system["dir"], env=system["env"])
    line = one_error_line(done, 3)
    assert "needs a person (an MFA code)" in line and "nobody present" in line
    done = run_imsa("bind", "--system", "web", "keys", "--config-dir", system["dir"], env=system["env"])
    line = one_error_line(done, 3)
    assert "not served by the system mode" in line and "never an IAM user's keys" in line
    assert not os.path.exists(os.path.join(system["dir"], "bindings"))


def test_the_service_refuses_to_run_as_root(system):
    sock = listener()
    env = dict(system["env"])
    done = subprocess.run(["bash", "-c", ACTIVATE.format(fd=sock.fileno()), "bash", sys.executable, "-m", "imsa",
                           "serve-system", "--config-dir", system["dir"]], env=env, capture_output=True, text=True,
                          pass_fds=(sock.fileno(),), timeout=60, stdin=subprocess.DEVNULL)
    sock.close()
    assert "never runs as root" in one_error_line(done, 2)


def _script(tmp_path, body):
    path = tmp_path / "process.py"
    path.write_text(f"import json\nprint(json.dumps({body!r}))\n")
    return f"{sys.executable} {path}"


def test_a_credential_process_with_long_term_keys_is_refused_outside_the_service(tmp_path):
    from imsa.sources.process import ProcessFailed
    from imsa.sources.system_process import LONG_TERM, Command, credentials

    keys = _script(tmp_path, {"Version": 1, "AccessKeyId": "AKIAIOSFODNN7EXAMPLE", "SecretAccessKey": "s"})
    with pytest.raises(ProcessFailed) as raised:
        credentials(keys)
    assert str(raised.value) == LONG_TERM
    # The child the service runs it through never passes the keys on: nothing on its stdout.
    child = subprocess.run([sys.executable, "-I", "-m", "imsa.sources.system_process", keys], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (child.returncode, child.stdout, child.stderr.strip()) == (1, "", LONG_TERM)
    session = _script(tmp_path, {"Version": 1, "AccessKeyId": "ASIAIOSFODNN7EXAMPLE", "SecretAccessKey": "s",
                                 "SessionToken": "t", "Expiration": "2999-01-01T00:00:00Z"})
    assert credentials(session).session_token == "t"
    assert Command.from_json(Command(session).to_json()) == Command(session)


def test_install_service_system_writes_its_units_with_this_imsa(tmp_path):
    target = tmp_path / "units"
    done = run_imsa("install-service", "--system", "--unit-dir", str(target))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(target)) == ["imsa-system.service", "imsa-system.socket"]
    service = (target / "imsa-system.service").read_text()
    assert "\nExecStart=" in service and "/usr/local/bin/imsa" not in service
    assert "serve-system --config-dir /etc/imsa/system" in service and "\nUser=imsa\n" in service


def readme_system_units():
    with open(os.path.join(ROOT, "README.md")) as handle:
        section = handle.read().split("### The system-wide mode", 1)[1].split("\n## ", 1)[0]
    units = {}
    for block in section.split("```ini\n")[1:]:
        first, _, rest = block.split("```", 1)[0].partition("\n")
        if first.startswith("# /etc/systemd/system/"):
            units[os.path.basename(first[2:])] = rest
    return units


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_system_units_and_the_readmes_example_pass_systemd_analyze_verify(tmp_path, local_users):
    units = readme_system_units()
    assert sorted(units) == ["api.service"]
    assert "EnvironmentFile=/etc/imsa/system/env/api" in units["api.service"]
    imsa = os.path.join(VENV_BIN, "imsa")
    for name in ("imsa-system.service", "imsa-system.socket"):
        with open(os.path.join(ROOT, name)) as handle:
            units[name] = handle.read()
    for name, text in units.items():
        text = text.replace("/usr/local/bin/imsa", imsa).replace("/usr/local/bin/api-server", shutil.which("sleep"))
        # The unit's user must exist for verify: a real dedicated one made for this run.
        (tmp_path / name).write_text(text.replace("User=imsa", f"User={local_users[0].name}")
                                     .replace("Group=imsa", f"Group={local_users[0].name}"))
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in sorted(units))],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == []
