"""Credential bindings for system services (imsa bind / unbind): a "service" is a process started with only the
environment file imsa wrote, and real clients (boto3, the AWS CLI, the AWS SDK for JavaScript v3) get the role
through the service's bindings listener. The profile is a Roles Anywhere one (tests/roles_anywhere_fake.py), the
source a server has with no person present."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import SERVICE_UID, one_error_line, run_imsa, shared_tmpdir, start_service, stop_process
from jsclient import WHOAMI, node, whoami  # noqa: F401 (node is a fixture)
from roles_anywhere_fake import PROFILE_ARN, TRUST_ANCHOR_ARN, FakeRolesAnywhere, Pki

from imsa.server.bound import token_digest

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
FULL_MODES = ("ecs-full", "ecs-full-query")
BOTO3_WHOAMI = ("import boto3, json, sys\n"
                "client = boto3.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1')\n"
                "print(json.dumps({'Arn': client.get_caller_identity()['Arn']}))\n")


def owned_dir(prefix):
    """A directory the service's user owns (it runs as 'nobody' when the tests run as root)."""
    path = shared_tmpdir(prefix)
    if os.geteuid() == 0:
        os.chown(path, SERVICE_UID, SERVICE_UID)
    return path


@pytest.fixture
def ra(isolated_env, sts_env, monkeypatch):
    """A Roles Anywhere profile 'ra' (role-a) in ~/.aws/config, its fake, and the CLI's environment for both."""
    directory = shared_tmpdir("imsa-pki-")
    pki = Pki(directory, (SERVICE_UID, SERVICE_UID) if os.geteuid() == 0 else None)
    fake = FakeRolesAnywhere(pki, sts_env.endpoint, sts_env.users["bob"], [sts_env.roles["role-a"]]).start()
    files = pki.leaf("host", kind="p384", form="fullchain")
    (isolated_env / ".aws" / "config").write_text(
        f"[profile ra]\ncredential_process = aws_signing_helper credential-process --certificate "
        f"{files['certificate']} --private-key {files['private_key']} --trust-anchor-arn {TRUST_ANCHOR_ARN} "
        f"--profile-arn {PROFILE_ARN} --role-arn {sts_env.roles['role-a']}\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", fake.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", pki.ca_bundle)
    yield fake
    fake.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def state_dir():
    path = owned_dir("imsa-state-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bound_service(ra, state_dir):
    """A service with a bindings listener on 127.0.0.1 and its state in *state_dir*."""
    running = start_service(["--bindings-listen", "127.0.0.1:0", "--state-dir", state_dir])
    yield running
    stop_process(running.process)


def read_env_file(path):
    """The variables an EnvironmentFile= gives the unit."""
    with open(path) as handle:
        return dict(line.rstrip("\n").split("=", 1) for line in handle if line.strip())


def service_env(env_file, sts_env, **extra):
    """Only what a systemd unit with EnvironmentFile= would have: no AWS files, IMDS off, the env file's values."""
    home = tempfile.mkdtemp(prefix="imsa-unit-home-")
    env = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "WHOAMI_STS_ENDPOINT": sts_env.endpoint}
    env.update(read_env_file(env_file))
    env.update(extra)
    return env


def boto3_arn(env, sts_env):
    done = subprocess.run([sys.executable, "-c", BOTO3_WHOAMI, sts_env.endpoint], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["Arn"]


def aws_cli_arn(env, sts_env):
    done = subprocess.run([os.path.join(VENV_BIN, "aws"), "sts", "get-caller-identity", "--endpoint-url",
                           sts_env.endpoint, "--output", "json"], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["Arn"]


@pytest.mark.parametrize("mode", FULL_MODES)
def test_a_bound_service_gets_the_role_with_boto3_the_aws_cli_and_js_and_unbind_revokes_it(
        ra, sts_env, bound_service, state_dir, tmp_path, node, mode):
    env_file = str(tmp_path / "units" / "web.env")
    done = run_imsa("bind", "web", "ra", "--mode", mode, "--env-file", env_file)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    values = read_env_file(env_file)
    if mode == "ecs-full":
        assert set(values) == {"AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN"}
        token = values["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    else:
        assert set(values) == {"AWS_CONTAINER_CREDENTIALS_FULL_URI"}
        token = values["AWS_CONTAINER_CREDENTIALS_FULL_URI"].split("?token=")[1]
    # The service keeps only the token's hash.
    with open(os.path.join(state_dir, "bindings", "web.json")) as handle:
        kept = handle.read()
    assert token not in kept and token_digest(token) in kept
    env = service_env(env_file, sts_env)
    role = f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/"
    assert boto3_arn(env, sts_env).startswith(role)
    assert aws_cli_arn(env, sts_env).startswith(role)
    got = whoami([node, WHOAMI], env)
    assert got["Arn"].startswith(role) and got["provider"] != []
    gone = run_imsa("unbind", "web")
    assert gone.returncode == 0, gone.stderr
    assert not os.path.exists(env_file)
    status = subprocess.run([sys.executable, "-c", BOTO3_WHOAMI, sts_env.endpoint], capture_output=True, text=True,
                            env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert status.returncode != 0 and "role-a" not in status.stdout


def http_get(url, headers=None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_token_in_the_other_place_is_refused(ra, sts_env, bound_service, tmp_path):
    header_file, query_file = str(tmp_path / "h.env"), str(tmp_path / "q.env")
    assert run_imsa("bind", "h", "ra", "--env-file", header_file).returncode == 0
    assert run_imsa("bind", "q", "ra", "--mode", "ecs-full-query", "--env-file", query_file).returncode == 0
    h, q = read_env_file(header_file), read_env_file(query_file)
    url, token = h["AWS_CONTAINER_CREDENTIALS_FULL_URI"], h["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    assert http_get(url, {"Authorization": token})[0] == 200
    status, body = http_get(f"{url}?token={token}")
    assert (status, body["Message"]) == (400, "this binding takes its token in Authorization, never in the URL")
    query_url = q["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    assert http_get(query_url)[0] == 200
    bare, query_token = query_url.split("?token=")
    status, body = http_get(bare, {"Authorization": query_token})
    assert (status, body["Message"]) == (400, "this binding takes its token in the URL, not in Authorization")
    assert http_get(url, {"Authorization": query_token})[0] == 401  # one binding's token opens no other
    assert http_get(url)[0] == 401


def test_bindings_persist_across_a_restart_and_rebinding_keeps_the_env_files_owner_and_mode(
        ra, sts_env, state_dir, tmp_path):
    env_file = str(tmp_path / "web.env")
    first = start_service(["--bindings-listen", "127.0.0.1:0", "--state-dir", state_dir])
    try:
        assert run_imsa("bind", "web", "ra", "--env-file", env_file).returncode == 0
    finally:
        stop_process(first.process)
    old = read_env_file(env_file)
    port = old["AWS_CONTAINER_CREDENTIALS_FULL_URI"].split(":")[2].split("/")[0]
    # A new service process, on the same port, with no CLI run since: the binding and its Roles Anywhere session
    # come back from the state directory, and the unit's token still works.
    second = start_service(["--bindings-listen", f"127.0.0.1:{port}", "--state-dir", state_dir])
    try:
        env = service_env(env_file, sts_env)
        assert boto3_arn(env, sts_env).startswith(f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/")
        assert [b["name"] for b in second.client.status()["service_bindings"]] == ["web"]
        # Given to the unit's user on purpose: a new bind rotates the token and keeps that.
        os.chmod(env_file, 0o640)
        owner = (SERVICE_UID, SERVICE_UID) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        os.chown(env_file, *owner)
        assert run_imsa("bind", "web", "ra", "--env-file", env_file).returncode == 0
        info = os.stat(env_file)
        assert stat.S_IMODE(info.st_mode) == 0o640 and (info.st_uid, info.st_gid) == owner
        new = read_env_file(env_file)
        assert new["AWS_CONTAINER_AUTHORIZATION_TOKEN"] != old["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        assert http_get(old["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                        {"Authorization": old["AWS_CONTAINER_AUTHORIZATION_TOKEN"]})[0] == 401
    finally:
        stop_process(second.process)


def test_bind_says_which_listener_a_mode_needs(ra, sts_env, bound_service, tmp_path):
    done = run_imsa("bind", "web", "ra", "--mode", "ecs-relative", "--env-file", str(tmp_path / "x.env"))
    assert one_error_line(done, 1) == ("imsa: error: mode ecs-relative needs the service to serve bindings on "
                                       "169.254.170.2:80 (SDKs send relative URIs there); start it with "
                                       "--bindings-listen 169.254.170.2:80, or use --mode ecs-full")
    assert not os.path.exists(tmp_path / "x.env")


def _can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare(1) and ip(8) to make a network namespace")
def test_relative_modes_on_169_254_170_2_serve_boto3_the_aws_cli_and_js_in_a_network_namespace(isolated_env, node):
    done = subprocess.run(["unshare", "-n", sys.executable, os.path.join(HERE, "bindings_netns.py"),
                           node], capture_output=True, text=True, timeout=300, env=dict(os.environ),
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["ecs-relative"]["variables"] == ["AWS_CONTAINER_AUTHORIZATION_TOKEN",
                                                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    assert results["ecs-relative-query"]["variables"] == ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    for mode in ("ecs-relative", "ecs-relative-query"):
        for client in ("boto3", "aws", "js"):
            assert ":assumed-role/role-a/" in results[mode][client], (mode, client, results[mode][client])
        assert results[mode]["after_unbind"][0] == 0 and results[mode]["after_unbind"][1] != 0, results[mode]


def readme_units():
    """The example units of README's "Bindings for system services": {file name: text}."""
    with open(os.path.join(os.path.dirname(HERE), "README.md")) as handle:
        text = handle.read()
    section = text.split("### Bindings for system services", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    units = {}
    for block in section.split("```ini\n")[1:]:
        body = block.split("```", 1)[0]
        first, _, rest = body.partition("\n")
        if first.startswith("# /etc/systemd/system/"):
            units[os.path.basename(first[2:])] = rest
    return units



@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_readmes_example_units_pass_systemd_analyze_verify(tmp_path):
    units = readme_units()
    assert sorted(units) == ["imsa-bind-web.service", "web.service"]
    assert "Before=web.service" in units["imsa-bind-web.service"] and "PartOf=web.service" in units["imsa-bind-web.service"]
    assert "EnvironmentFile=/srv/web/aws.env" in units["web.service"]
    imsa = os.path.join(VENV_BIN, "imsa")
    for name, text in units.items():
        # The programs must exist for verify: this install's imsa, and a stand-in for the web server; the user too.
        text = text.replace("/usr/local/bin/imsa", imsa).replace("/usr/local/bin/web-server", shutil.which("sleep"))
        (tmp_path / name).write_text(text.replace("User=alice", "User=nobody"))
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in sorted(units))],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    problems = [line for line in done.stderr.splitlines() if line.strip() and "Special user nobody" not in line]
    assert problems == []


def test_a_binding_whose_role_cannot_be_had_is_not_kept(ra, sts_env, bound_service, state_dir, tmp_path):
    # role-b is not in the fake's Roles Anywhere profile: CreateSession is refused, and nothing is bound.
    config = os.path.join(os.environ["HOME"], ".aws", "config")
    with open(config) as handle:
        text = handle.read()
    with open(config, "w") as handle:
        handle.write(text.replace(sts_env.roles["role-a"], sts_env.roles["role-b"]))
    env_file = tmp_path / "web.env"
    done = run_imsa("bind", "web", "ra", "--env-file", str(env_file))
    assert done.returncode == 4 and done.stdout == ""
    assert done.stderr.splitlines()[-1].endswith("(403): the profile does not list this role")
    assert not env_file.exists()
    assert bound_service.client.status()["service_bindings"] == []
    assert not os.path.exists(os.path.join(state_dir, "bindings", "web.json"))
