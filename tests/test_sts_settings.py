"""How imsa reaches STS: the CLI's settings go to the service with the session; proxies, CA bundles, a hung STS,
AWS_PROFILE and a broken ~/.aws/config. Real processes, real sockets; every peer is on 127.0.0.1 (or inside a
network namespace the test makes)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import (
    HERE, MFA_CODE, SERVICE_UID, needs_root, one_error_line, run_imsa, service_user_args, shared_tmpdir,
    start_service, start_sts, stop_process, write_config,
)
from imsa import client, sts, sts_settings
from imsa.client import Client
from imsa.errors import ConfigError, ServiceNotRunning
from imsa.sts_settings import SettingsError, StsSettings
from sts_network import Decoy, ForwardProxy, Hung, StsFront, make_certificate


def _can_unshare(flag):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", flag, "true"], capture_output=True).returncode == 0


@pytest.fixture
def decoy():
    """Where the service's own environment points: it must never be used."""
    listener = Decoy()
    yield listener
    listener.close()


def decoyed_environment(decoy):
    """The service's environment: its STS variables and proxies all lead to *decoy* (the CLI's lead elsewhere)."""
    return dict(os.environ, AWS_ENDPOINT_URL_STS=decoy.url, HTTPS_PROXY=decoy.url, HTTP_PROXY=decoy.url,
                AWS_CA_BUNDLE=os.devnull)


@pytest.fixture
def own_service(decoy):
    """Start a service whose environment names *decoy* for STS; stopped after the test."""
    started = []

    def start(env=None):
        service = start_service(env=env or decoyed_environment(decoy))
        started.append(service)
        return service

    yield start
    for service in started:
        stop_process(service.process)
        os.unlink(service.log_path)


@pytest.fixture(scope="module")
def certificate():
    """A self-signed certificate for 127.0.0.1 in a directory the service's user may read: (cert, key)."""
    directory = shared_tmpdir("imsa-cert-")
    yield make_certificate(directory)
    shutil.rmtree(directory, ignore_errors=True)


def status_json():
    """What ``imsa status --json`` prints."""
    return json.loads(run_imsa("status", "--json").stdout)


def wait_until_serving(process, log_path, timeout=30):
    """Poll the control socket until the service started as *process* answers (fails if it exits first)."""
    waiting = Client(timeout=2)
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, open(log_path).read()
        assert time.monotonic() < deadline, open(log_path).read()
        try:
            if waiting.status()["pid"] == process.pid:
                return
        except ServiceNotRunning:
            pass
        time.sleep(0.05)


# --- the settings travel with the session ---


def test_the_service_reaches_the_sts_the_cli_used_not_the_one_its_environment_names(isolated_env, sts_server, decoy,
                                                                                     own_service):
    own_service()
    write_config(isolated_env, sts_server)
    cli = dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint)
    mark = sts_server.mark()
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=cli)
    assert done.returncode == 0, done.stderr
    again = run_imsa("assume", "b", env=dict(os.environ))  # a shell without the variable: the session's settings
    assert again.returncode == 0, again.stderr
    assert sts_server.actions(mark) == ["GetSessionToken", "AssumeRole", "AssumeRole"]
    assert decoy.seen() == []
    data = status_json()
    session = data["sessions"][0]["sts"]
    assert session["endpoint_url"] == session["endpoint"] == sts_server.endpoint
    assert session["region"] == "us-east-1" and session["proxy"] is None and session["ca_bundle"] is None
    assert data["active"]["sts"]["endpoint"] == sts_server.endpoint


@needs_root("needs root: a real sudo for a real user, inside a network namespace")
@pytest.mark.skipif(not _can_unshare("-n") or not shutil.which("sudo"), reason="needs unshare(1) and sudo(8)")
def test_sudo_start_drops_the_sts_variables_and_the_service_still_reaches_the_clis_sts(isolated_env, local_users):
    env = dict(os.environ, IMSA_TEST_OWNER=local_users[0].name)
    done = subprocess.run(["unshare", "-n", sys.executable, os.path.join(HERE, "sts_scenarios.py"),
                           "sudo_bare_environment"], capture_output=True, text=True, timeout=180, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["start"][0] == 0, result["start"]
    assert "AWS_ENDPOINT_URL_STS" not in result["service_environment"], "the precondition: sudo dropped it"
    assert result["assume_a"][0] == 0, result["assume_a"]
    assert result["assume_b"][0] == 0, result["assume_b"]
    assert result["sts_actions"] == ["GetSessionToken", "AssumeRole", "AssumeRole"]
    data = json.loads(result["status"][1])
    assert data["active"]["sts"]["endpoint"].startswith("http://127.0.0.1:")
    assert result["stop"][0] == 0, result["stop"]


def test_status_shows_the_settings_without_a_proxy_password_or_the_bundle(isolated_env, sts_server, certificate,
                                                                            decoy, own_service):
    front = StsFront(sts_server.endpoint, certificate)
    proxy = ForwardProxy()
    try:
        own_service()
        write_config(isolated_env, sts_server)
        proxy_url = f"http://alice:proxy-secret@127.0.0.1:{proxy.port}"
        cli = dict(os.environ, AWS_ENDPOINT_URL_STS=front.endpoint, AWS_CA_BUNDLE=certificate[0],
                   HTTPS_PROXY=proxy_url, NO_PROXY="example.com", AWS_STS_REGIONAL_ENDPOINTS="regional")
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=cli)
        assert done.returncode == 0, done.stderr
        raw = run_imsa("status", "--json").stdout
        settings = json.loads(raw)["sessions"][0]["sts"]
        masked = f"http://***:***@127.0.0.1:{proxy.port}"
        assert settings["https_proxy"] == settings["proxy"] == masked
        assert settings["no_proxy"] == "example.com" and settings["sts_regional_endpoints"] == "regional"
        assert settings["endpoint"] == front.endpoint
        with open(certificate[0]) as handle:
            pem = handle.read()
        assert settings["ca_bundle"] == {"path": certificate[0], "sha256": hashlib.sha256(pem.encode()).hexdigest(),
                                         "certificates": 1}
        assert "proxy-secret" not in raw and "BEGIN CERTIFICATE" not in raw
        assert decoy.seen() == []
    finally:
        proxy.close()
        front.close()


# --- proxies ---


def test_https_goes_through_the_clis_proxy_with_connect_also_for_the_services_refreshes(isolated_env, certificate,
                                                                                       decoy, own_service):
    # Role credentials that live 8 s: the service rotates them after ~4 s, through the proxy the CLI used.
    import certifi

    sts_server = start_sts(extra_args=["--role-lifetime", "8"])
    front = StsFront(sts_server.endpoint, certificate)
    proxy = ForwardProxy()
    # A corporate bundle: the public CAs and the company's own, over 100 certificates to carry to the service.
    bundle = isolated_env / "corporate-ca.pem"
    with open(certifi.where()) as public, open(certificate[0]) as own:
        bundle.write_text(public.read() + own.read())
    try:
        own_service()
        write_config(isolated_env, sts_server)
        cli = dict(os.environ, AWS_ENDPOINT_URL_STS=front.endpoint, AWS_CA_BUNDLE=str(bundle), HTTPS_PROXY=proxy.url)
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=cli)
        assert done.returncode == 0, done.stderr
        target = f"127.0.0.1:{front.port}"
        assert proxy.connects() == [target, target]  # the CLI's GetSessionToken, the service's AssumeRole
        assert front.actions() == ["GetSessionToken", "AssumeRole"]
        deadline = time.monotonic() + 60
        while front.actions().count("AssumeRole") < 2:  # the refresher's rotation
            assert time.monotonic() < deadline, (front.seen(), proxy.seen())
            time.sleep(0.1)
        assert proxy.connects() == [target] * len(front.actions())
        assert status_json()["sessions"][0]["sts"]["ca_bundle"]["certificates"] > 100
        assert decoy.seen() == []
    finally:
        proxy.close()
        front.close()
        sts_server.stop()


def test_http_goes_through_the_proxy_as_an_absolute_uri_and_no_proxy_bypasses_it(isolated_env, sts_server, decoy,
                                                                                 own_service):
    proxy = ForwardProxy()
    try:
        own_service()
        bob = sts_server.users["bob"]
        write_config(isolated_env, sts_server, extra={
            "bob": {"aws_access_key_id": bob["aws_access_key_id"], "aws_secret_access_key": bob["aws_secret_access_key"],
                    "mfa_serial_number": "arn:aws:iam::123456789012:mfa/bob", "role_arn": sts_server.roles["role-b"], "role_session_name": "tester-bob"},
        })
        url = sts_server.endpoint + "/"
        cli = dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint, HTTP_PROXY=proxy.url)
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=cli)
        assert done.returncode == 0, done.stderr
        assert proxy.seen() == [("POST", url, "GetSessionToken"), ("POST", url, "AssumeRole")]
        # Another source (bob's keys): a new session, made with NO_PROXY naming the STS host: nothing goes through.
        bypass = dict(cli, NO_PROXY="localhost,127.0.0.1")
        done = run_imsa("assume", "bob", "--mfa-token", MFA_CODE, env=bypass)
        assert done.returncode == 0, done.stderr
        assert len(proxy.seen()) == 2
        by_fingerprint = {session["fingerprint"]: session["sts"] for session in status_json()["sessions"]}
        proxies = sorted((settings["proxy"] or "") for settings in by_fingerprint.values())
        assert proxies == ["", proxy.url]
        assert decoy.seen() == []
    finally:
        proxy.close()


def test_a_proxy_that_is_not_a_url_is_a_configuration_error(isolated_env, sts_server):
    write_config(isolated_env, sts_server)
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE,
                    env=dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint, HTTPS_PROXY="ftp://proxy:21"))
    line = one_error_line(done, 3)
    assert "HTTPS_PROXY" in line and "http://" in line


# --- the interpreter the service's user cannot read ---


@needs_root("needs root: the service drops to another user")
@pytest.mark.skipif(not _can_unshare("-m"), reason="needs unshare(1) to make a private mount namespace")
def test_the_service_makes_https_calls_after_the_drop_from_an_interpreter_its_user_cannot_read(
        isolated_env, sts_server, certificate):
    # The interpreter, its standard library and every package are seen through a directory only root can enter
    # (a bind mount of / in a private mount namespace), as with a pyenv under /root: after the drop the service
    # cannot import or read anything more from there. STS is reached over TLS with botocore's default CA bundle,
    # as for real AWS: in the service's namespace and the CLI's, that bundle is the test CA (bound over it).
    import certifi

    default_bundle = certifi.where()
    hidden = tempfile.mkdtemp(prefix="imsa-hidden-")
    os.chmod(hidden, 0o700)
    root = os.path.join(hidden, "root")
    os.mkdir(root)
    front = StsFront(sts_server.endpoint, certificate)
    service = None
    try:
        python = root + os.path.realpath(sys.executable)
        imsa_root = os.path.dirname(os.path.dirname(os.path.abspath(sts.__file__)))
        packages = os.path.dirname(os.path.dirname(os.path.abspath(pytest.__file__)))
        # The service's own environment leads to the same STS (as it did when this failed): only the unreadable
        # interpreter stands in the way.
        env = dict(os.environ, PYTHONPATH=f"{root}{imsa_root}:{root}{packages}", AWS_ENDPOINT_URL_STS=front.endpoint)
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --rbind / "$1" && mount --bind "$2" "$1$3" && shift 3 && exec "$@"',
                "sh", root, certificate[0], default_bundle,
                python, "-m", "imsa", "--verbose", "start", "--foreground", "--listen", "127.0.0.1:0",
                *service_user_args()]
        log = tempfile.NamedTemporaryFile(prefix="imsa-hidden-service-", suffix=".log", delete=False)
        process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd="/")
        service = (process, log.name)
        wait_until_serving(process, log.name)
        with open(f"/proc/{process.pid}/maps") as handle:
            assert root in handle.read(), "the precondition: the service runs the interpreter under the hidden path"
        unreadable = subprocess.run(["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups",
                                     "test", "-r", python], capture_output=True)
        assert unreadable.returncode != 0, "the precondition: the service's user cannot read the interpreter"
        write_config(isolated_env, sts_server)
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
             "sh", certificate[0], default_bundle, sys.executable, "-m", "imsa", "assume", "a", "--mfa-token", MFA_CODE],
            capture_output=True, text=True, env=dict(os.environ, AWS_ENDPOINT_URL_STS=front.endpoint), timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr + open(log.name).read()[-3000:]
        assert front.actions() == ["GetSessionToken", "AssumeRole"]
        assert status_json()["sessions"][0]["sts"]["ca_bundle"] is None  # the service used its own default bundle
    finally:
        front.close()
        if service is not None:
            stop_process(service[0])
            os.unlink(service[1])
        os.rmdir(root)  # the mounts existed in the service's namespace only
        os.rmdir(hidden)


# --- a hung STS ---


def test_sts_budget_is_well_inside_the_time_the_cli_waits_for_the_service():
    assert client.TIMEOUT == 30
    assert sts.STS_BUDGET == 2 * (3 + 6) + 1
    assert sts.STS_BUDGET + 10 <= client.TIMEOUT  # room for the service's own work around the call


def test_a_hung_sts_is_reported_by_the_cli_as_sts_not_answering(isolated_env, sts_server):
    hung = Hung()
    try:
        write_config(isolated_env, sts_server)
        done = run_imsa("export", "a", "--mfa-token", MFA_CODE, env=dict(os.environ, AWS_ENDPOINT_URL_STS=hung.endpoint))
        assert done.returncode == 4, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("imsa: error: STS did not answer within ") and hung.endpoint in last, done.stderr
        assert hung.seen() == ["accepted"] * sts.STS_ATTEMPTS
    finally:
        hung.close()


def test_a_hung_assume_role_in_the_service_is_an_sts_error_before_the_cli_gives_up(isolated_env, sts_server,
                                                                                  own_service):
    front = StsFront(sts_server.endpoint, hang={"AssumeRole"})
    try:
        # The service's own environment names the same STS, as in the report: only the budget decides the answer.
        own_service(env=dict(os.environ, AWS_ENDPOINT_URL_STS=front.endpoint))
        write_config(isolated_env, sts_server)
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE,
                        env=dict(os.environ, AWS_ENDPOINT_URL_STS=front.endpoint))
        line = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 4, done.stderr  # 5 would be the CLI's own timeout: the service did not answer
        assert line.startswith("imsa: error: STS did not answer within ") and "AssumeRole" in line, done.stderr
        assert front.seen()[1:] == [("AssumeRole", "hung")] * sts.STS_ATTEMPTS
    finally:
        front.close()


# --- AWS_PROFILE and ~/.aws/config ---


def test_a_stray_aws_profile_or_a_broken_credentials_file_changes_nothing_for_export(isolated_env, sts_server):
    write_config(isolated_env, sts_server)
    (isolated_env / ".aws" / "credentials").write_text("[default\naws_access_key_id = AKIA\n")  # imsa never reads it
    stray = dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint, AWS_PROFILE="no-such-profile",
                 AWS_DEFAULT_PROFILE="no-such-profile")
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE, env=stray)
    assert done.returncode == 0, done.stderr
    assert "export AWS_ACCESS_KEY_ID=" in done.stdout


@pytest.mark.parametrize("setting", ["stray AWS_PROFILE", "broken AWS config file"])
def test_a_service_started_with_a_stray_aws_profile_or_a_broken_config_file_serves(isolated_env, sts_server, setting):
    # Not as root (root clears AWS_PROFILE and names no config file): the service runs as its user from the start,
    # as under systemd, with the user's environment.
    directory = shared_tmpdir("imsa-aws-config-")
    broken = os.path.join(directory, "config")
    with open(broken, "w") as handle:
        handle.write("region = us-east-1\n[default\n")
    os.chmod(broken, 0o644)  # readable by the service's user: it must not matter
    if setting == "stray AWS_PROFILE":
        env = dict(os.environ, AWS_PROFILE="no-such-profile")
    else:
        env = dict(os.environ, AWS_CONFIG_FILE=broken)
    argv = [sys.executable, "-m", "imsa", "start", "--foreground", "--listen", "127.0.0.1:0"]
    if os.geteuid() == 0:
        argv = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups", *argv]
    log = tempfile.NamedTemporaryFile(prefix="imsa-stray-", suffix=".log", delete=False)
    process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd="/")
    try:
        wait_until_serving(process, log.name)
        write_config(isolated_env, sts_server)
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE,
                        env=dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint, AWS_PROFILE="no-such-profile"))
        assert done.returncode == 0, done.stderr
    finally:
        stop_process(process)
        os.unlink(log.name)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("text", ["region = us-east-1\n[default]\n", "[default\nregion = us-east-1\n",
                                  "[default]\nregion\n"])
def test_a_broken_aws_config_file_is_a_configuration_error_naming_it(isolated_env, sts_server, text):
    write_config(isolated_env, sts_server)
    (isolated_env / ".aws" / "config").write_text(text)
    done = run_imsa("export", "a", "--mfa-token", MFA_CODE, env=dict(os.environ, AWS_ENDPOINT_URL_STS=sts_server.endpoint))
    line = one_error_line(done, 3)
    assert str(isolated_env / ".aws" / "config") in line and "cannot be parsed" in line


def test_the_default_section_of_the_aws_config_file_applies(isolated_env, sts_server, certificate, decoy, own_service):
    front = StsFront(sts_server.endpoint, certificate)
    try:
        own_service()
        write_config(isolated_env, sts_server)
        (isolated_env / ".aws" / "config").write_text(
            f"[default]\nca_bundle = {certificate[0]}\nsts_regional_endpoints = legacy\nservices = local\n\n"
            f"[services local]\nsts =\n  endpoint_url = {front.endpoint}\n\n"
            f"[profile elsewhere]\nendpoint_url = http://127.0.0.1:9\n"
        )
        done = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=dict(os.environ, AWS_PROFILE="elsewhere"))
        assert done.returncode == 0, done.stderr
        assert front.actions() == ["GetSessionToken", "AssumeRole"]
        settings = status_json()["sessions"][0]["sts"]
        assert settings["endpoint_url"] == front.endpoint and settings["sts_regional_endpoints"] == "legacy"
        assert settings["ca_bundle"]["path"] == certificate[0]
    finally:
        front.close()


# --- the value itself ---


def test_resolve_reads_the_environment_before_the_default_section(tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-1\nendpoint_url = https://sts.example.test\n"
                      "[profile other]\nregion = ap-south-1\n")
    base = {"AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "other"}
    assert sts_settings.resolve(base) == StsSettings(region="eu-west-1", endpoint_url="https://sts.example.test")
    env = dict(base, AWS_REGION="us-west-2", AWS_DEFAULT_REGION="ca-central-1", AWS_ENDPOINT_URL="http://127.0.0.1:1",
               AWS_ENDPOINT_URL_STS="http://127.0.0.1:2", https_proxy="127.0.0.1:3", HTTPS_PROXY="http://ignored:4",
               no_proxy="internal", AWS_USE_FIPS_ENDPOINT="true")
    assert sts_settings.resolve(env) == StsSettings(
        region="us-west-2", endpoint_url="http://127.0.0.1:2", https_proxy="http://127.0.0.1:3", no_proxy="internal",
        use_fips_endpoint=True,
    )
    assert sts_settings.resolve(dict(env, AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="true")).endpoint_url is None


@pytest.mark.parametrize("variable, value, named", [
    ("AWS_REGION", "us east", "AWS_REGION"),
    ("AWS_ENDPOINT_URL_STS", "file:///etc/passwd", "AWS_ENDPOINT_URL_STS"),
    ("AWS_STS_REGIONAL_ENDPOINTS", "global", "AWS_STS_REGIONAL_ENDPOINTS"),
    ("AWS_CA_BUNDLE", "/nonexistent/bundle.pem", "/nonexistent/bundle.pem"),
    ("AWS_CA_BUNDLE", "/etc/hostname", "has no PEM certificates"),
])
def test_a_bad_setting_is_a_configuration_error_naming_its_source(tmp_path, variable, value, named):
    with pytest.raises(ConfigError) as raised:
        sts_settings.resolve({"AWS_CONFIG_FILE": str(tmp_path / "none"), variable: value})
    assert named in str(raised.value)


@pytest.mark.parametrize("field, value", [
    ("region", "us east 1"), ("region", 5), ("endpoint_url", "file:///x"), ("endpoint_url", "http://"),
    ("endpoint_url", "http://h:99999"), ("endpoint_url", "http://h/\r\nx"), ("https_proxy", "socks5://h:1"),
    ("sts_regional_endpoints", "global"), ("use_fips_endpoint", "true"), ("no_proxy", "a\nb"),
    ("ca_bundle", "not a certificate"), ("ca_bundle", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    ("ca_bundle", "x" * (sts_settings.MAX_CA_BUNDLE + 1)), ("ca_bundle_path", "x" * 5000), ("surprise", 1),
])
def test_the_control_side_refuses_malformed_settings(field, value):
    with pytest.raises(SettingsError):
        StsSettings.from_json(dict(StsSettings().to_json(), **{field: value}))


def test_settings_survive_the_trip_to_the_service(certificate):
    pem = sts_settings.read_bundle(certificate[0], "a test")
    settings = StsSettings(region="eu-west-1", endpoint_url="https://127.0.0.1:1", sts_regional_endpoints="legacy",
                           use_dualstack_endpoint=True, http_proxy="http://u:p@127.0.0.1:2", no_proxy="a,b",
                           ca_bundle=pem, ca_bundle_path=certificate[0])
    assert StsSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    assert "u:p" not in repr(settings) and "BEGIN" not in repr(settings)


def test_no_proxy_is_matched_against_the_endpoint_as_botocore_does():
    settings = StsSettings(https_proxy="http://proxy:3128", http_proxy="http://plain:3128", no_proxy=".internal,10.1.2.3")
    assert settings.proxy_for("https://sts.us-east-1.amazonaws.com") == "http://proxy:3128"
    assert settings.proxy_for("http://sts.us-east-1.amazonaws.com") == "http://plain:3128"
    assert settings.proxy_for("https://sts.corp.internal:8443") is None
    assert settings.proxy_for("https://10.1.2.3") is None


def test_a_client_built_from_settings_ignores_this_processs_environment(monkeypatch, tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:7\n")
    for name, value in (("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:8"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
                        ("HTTPS_PROXY", "http://127.0.0.1:10"), ("AWS_PROFILE", "no-such-profile"),
                        ("AWS_CONFIG_FILE", str(config)), ("AWS_STS_REGIONAL_ENDPOINTS", "legacy"),
                        ("AWS_USE_FIPS_ENDPOINT", "true"), ("AWS_CA_BUNDLE", "/nonexistent")):
        monkeypatch.setenv(name, value)
    made = sts.sts_client("AKIAEXAMPLE000000000", "secret", None, StsSettings(region="eu-west-1"))
    assert made.meta.endpoint_url == "https://sts.eu-west-1.amazonaws.com"
    assert made.meta.config.proxies == {}
    proxied = sts.sts_client("AKIAEXAMPLE000000000", "secret", None,
                             StsSettings(region="eu-west-1", https_proxy="http://127.0.0.1:11"))
    assert proxied.meta.config.proxies == {"https": "http://127.0.0.1:11"}
