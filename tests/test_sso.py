"""IAM Identity Center (AWS SSO) as a source, end to end: imsa's logins against a strict fake of sso-oidc and the
portal (tests/sso_fake.py), a live service minting with GetRoleCredentials, real clients in each delivery mode, and
the token cache shared with botocore and the AWS CLI.

The fake runs in this process on 127.0.0.1; every imsa command and client is a separate process that reaches it over
loopback (AWS_ENDPOINT_URL_SSO / AWS_ENDPOINT_URL_SSO_OIDC). Role credentials come from moto's AssumeRole, so they
authenticate against the fake STS.
"""

import datetime
import hashlib
import json
import os
import select
import stat
import subprocess
import sys
import textwrap
import time

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from conftest import one_error_line, run_imsa, run_without_terminal
from jsclient import node  # noqa: F401 (a fixture)
from sso_fake import FakeSso
from test_aws_config import role_of
from test_aws_profiles import clients, imds_fetch, caller, run_client

START_URL = "https://corp.awsapps.com/start"
LEGACY_URL = "https://legacy.awsapps.com/start"
IMSA = [sys.executable, "-m", "imsa"]


def write_sso_config(home, sts):
    """~/.aws/config: sso-session corp; dev, ro (account 1) and prod (account 2) on it; chained (a role assumed from
    dev's); legacy (the start URL on the profile)."""
    (home / ".aws" / "config").write_text(textwrap.dedent(f"""
        [sso-session corp]
        sso_start_url = {START_URL}
        sso_region = us-east-1
        sso_registration_scopes = sso:account:access
        [profile dev]
        sso_session = corp
        sso_account_id = 111111111111
        sso_role_name = Developer
        region = us-east-1
        [profile ro]
        sso_session = corp
        sso_account_id = 111111111111
        sso_role_name = ReadOnly
        [profile prod]
        sso_session = corp
        sso_account_id = 222222222222
        sso_role_name = Admin
        [profile chained]
        role_arn = {sts.roles['role-d']}
        source_profile = dev
        role_session_name = chained
        [profile legacy]
        sso_start_url = {LEGACY_URL}
        sso_region = us-east-1
        sso_account_id = 222222222222
        sso_role_name = Admin
        [profile use-ro]
        credential_process = {sys.executable} -m imsa credential-process ro
    """))


def start_fake(sts, monkeypatch, **knobs):
    fake = FakeSso(sts, **knobs).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSO", fake.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSO_OIDC", fake.endpoint)
    return fake


@pytest.fixture
def sso(isolated_env, sts_env, monkeypatch):
    """The fake IAM Identity Center, and a ~/.aws/config with SSO profiles on it."""
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch)
    yield fake
    fake.stop()


def cache_file(home, key="corp"):
    return home / ".aws" / "sso" / "cache" / (hashlib.sha1(key.encode()).hexdigest() + ".json")


def stamp(seconds):
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- logins ---


def start_imsa(*args, env=None):
    """Start the CLI with no terminal (stderr a pipe the test reads, as a person reads the screen)."""
    return subprocess.Popen(IMSA + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env or dict(os.environ))


def user_code(process, timeout=30):
    """The user code imsa shows on stderr ('… enter the code XXXX-XXXX'), and what it said up to there."""
    seen = ""
    deadline = time.monotonic() + timeout
    while "enter the code " not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        line = process.stderr.readline()
        if not line:
            break
        seen += line
    assert "enter the code " in seen, seen
    return seen.split("enter the code ", 1)[1].split()[0], seen


def error_line(done, code):
    """Assert the CLI failed with *code*, nothing on stdout, and one ``imsa: error:`` line, the last one (a login
    says what to open first); return it."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("imsa: error: ") and done.stderr.count("imsa: error:") == 1, done.stderr
    return lines[-1]


def finish(process, timeout=60):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def device_login(fake, *args, approve=True):
    """Run ``imsa ARGS`` through a device login; approve (or deny) the code it shows. (status, stdout, stderr)."""
    process = start_imsa(*args)
    try:
        code, said = user_code(process)
        (fake.approve if approve else fake.deny)(code)
        status, stdout, stderr = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, stdout, said + stderr


def browser(tmp_path, script=""):
    """An executable that stands in for a browser (BROWSER): it GETs the URL it is given and follows the redirect
    to imsa's listener; *script* may change the URL first (``url = …``)."""
    path = tmp_path / "browser"
    path.write_text(f"#!{sys.executable}\nimport sys, urllib.request\nurl = sys.argv[1]\n{script}\n"
                    "urllib.request.urlopen(url, timeout=30).read()\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("flow", ["device", "pkce"])
def test_one_login_serves_three_roles_in_two_accounts_to_every_client_and_delivery(sso, service, sts_env, node,
                                                                                     tmp_path, monkeypatch, flow):
    if flow == "device":
        status, _, said = device_login(sso, "login", "dev", "--no-browser")
        assert status == 0, said
        assert "http" in said and sso.count("create_token", grantType="urn:ietf:params:oauth:grant-type:device_code") == 1
        assert run_without_terminal("assume", "dev").returncode == 0
    else:
        monkeypatch.setenv("BROWSER", browser(tmp_path))
        done = run_without_terminal("assume", "dev")  # the login happens on first use
        assert done.returncode == 0, done.stderr
        assert "/authorize?" in done.stderr and sso.count("create_token", grantType="authorization_code") == 1
    logins = sso.count("create_token")
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"

    env = dict(os.environ, WHOAMI_STS_ENDPOINT=sts_env.endpoint)
    imds = dict(env, AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint)
    closed = dict(env, AWS_EC2_METADATA_DISABLED="true")
    for delivery, prefix, client_env, role in [
        ("imds", [], imds, "role-a"),
        ("exec", IMSA + ["exec", "prod", "--"], closed, "role-c"),
        ("credential_process", [], dict(closed, AWS_PROFILE="use-ro"), "role-b"),
    ]:
        for name, argv, arn_of in clients(sts_env, node):
            arn = arn_of(run_client(prefix + argv, client_env))
            assert role_of(arn) == f"assumed-role/{role}", (delivery, name, arn)
    assert sso.count("create_token") == logins, "one login served every role"
    assert sso.count("register_client") == 1
    assert {(call["account_id"], call["role_name"]) for call in sso.calls if call["name"] == "/federation/credentials"} \
        == {("111111111111", "Developer"), ("111111111111", "ReadOnly"), ("222222222222", "Admin")}
    status = service.client.status()
    assert status["active"]["role_name"] == "Developer"
    assert [held["kind"] for held in status["sessions"]] == ["sso"]
    assert START_URL in status["active"]["source"]


def test_a_chain_from_an_sso_profile_assumes_its_role_from_the_portal_credentials(sso, service, sts_env):
    status, _, said = device_login(sso, "login", "dev", "--no-browser")
    assert status == 0, said
    done = run_without_terminal("assume", "chained")
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-d"
    assert service.client.status()["active"]["via"] == ["arn:aws:iam::111111111111:role/Developer"]
    assert "sign-in behind" not in run_imsa("status").stderr, "8 hours left: no warning yet"
    rows = {row["name"]: row for row in json.loads(run_imsa("list", "--json").stdout)}
    assert rows["dev"]["kind"] == rows["chained"]["kind"] == "sso" and START_URL in rows["dev"]["source"]
    assert rows["dev"]["role_arn"] == "arn:aws:iam::111111111111:role/Developer"
    assert rows["chained"]["via"] == ["arn:aws:iam::111111111111:role/Developer"]
    assert rows["dev"]["session"] is not None and rows["dev"]["session"] == rows["prod"]["session"]


def test_the_console_signs_in_with_a_portal_role(sso, service, sts_env):
    from test_console import FakeSignin, caller_arn, signin_env

    status, _, said = device_login(sso, "login", "prod")
    assert status == 0, said
    with FakeSignin() as fake:
        done = run_imsa("console", "prod", "--print", env=signin_env(fake))
    assert done.returncode == 0, done.stderr
    assert not fake.problems and len(fake.sessions) == 1
    assert role_of(caller_arn(fake.sessions[0], sts_env)) == "assumed-role/role-c"


def test_status_warns_within_the_last_hour_of_the_sign_in(isolated_env, sts_env, monkeypatch, service):
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch, token_lifetime=1800)
    try:
        status, _, said = device_login(fake, "assume", "dev")
        assert status == 0, said
        text = run_imsa("status")
        assert text.returncode == 0, text.stderr
        assert "imsa: warning: the IAM Identity Center sign-in behind dev ends at" in text.stderr
        assert "sign in again now with imsa login dev" in text.stderr
    finally:
        fake.stop()


def test_the_device_code_and_url_go_to_stderr_and_export_prints_only_exports(sso, sts_env):
    status, stdout, said = device_login(sso, "export", "dev")  # no service, no browser: a device login
    assert status == 0, said
    assert stdout.startswith("export AWS_ACCESS_KEY_ID=") and "enter the code" not in stdout
    assert "enter the code" in said


def test_slow_down_makes_imsa_poll_less_often(sts_env):
    from imsa.sources import sso as source_module, sso_login

    fake = FakeSso(sts_env, advertised_interval=0).start()  # asks to be polled at once, then refuses it
    try:
        oidc = source_module.client("sso-oidc", "us-east-1", fake.endpoint, None)
        registration = oidc.register_client(clientName="t", clientType="public", scopes=["sso:account:access"])
        shown, waits = [], []

        def sleep(seconds):  # the person approves while imsa waits after slow_down
            waits.append(seconds)
            if seconds:
                fake.approve(shown[0].split("enter the code ")[1].split()[0])
                time.sleep(fake.interval + 0.1)  # what the fake needs between polls (imsa waits longer)

        source = source_module.Sso(START_URL, "us-east-1", "corp", ("sso:account:access",))
        answer = sso_login.device_login(source, oidc, registration["clientId"], registration["clientSecret"],
                                        shown.append, sleep=sleep)
        assert answer["accessToken"]
        assert waits == [0, 0, sso_login.SLOW_DOWN_STEP], "pending, slow_down, then 5 s more between polls"
    finally:
        fake.stop()


def test_a_denied_approval_is_one_error_line(sso):
    status, stdout, said = device_login(sso, "login", "dev", approve=False)
    assert status == 4 and stdout == ""
    assert said.splitlines()[-1].startswith("imsa: error: the sign-in to https://corp.awsapps.com/start was denied")


def test_an_expired_device_code_is_one_error_line(isolated_env, sts_env, monkeypatch):
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch, device_lifetime=2)
    try:
        done = run_without_terminal("login", "dev")  # nobody approves
        assert done.returncode == 4, done.stderr
        assert "imsa: error: the sign-in code" in done.stderr and "expired before it was approved" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        fake.stop()


def test_a_refusal_in_the_browser_is_error_line(sso, tmp_path, monkeypatch):
    sso.deny_authorization = True
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    line = error_line(run_without_terminal("login", "dev"), 4)
    assert "was refused in the browser: access_denied" in line


def test_a_forged_redirect_without_the_logins_state_is_ignored(sso, tmp_path, monkeypatch):
    # Another local process races the browser to imsa's listener with a code of its own: no state, then a wrong one.
    script = textwrap.dedent("""
        redirect = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
        for forged in ("?code=forged", "?code=forged&state=guess"):
            try:
                urllib.request.urlopen(redirect + forged, timeout=30).read()
            except urllib.error.HTTPError as answer:
                assert answer.code == 400, answer.code
            else:
                raise SystemExit("a forged redirect was accepted")
    """)
    monkeypatch.setenv("BROWSER", browser(tmp_path, "import urllib.parse\n" + script))
    done = run_without_terminal("login", "dev")
    assert done.returncode == 0, done.stderr
    assert sso.count("create_token", grantType="authorization_code") == 1
    assert "forged" not in done.stderr


def test_a_code_replayed_after_someone_spent_it_is_refused(sso, tmp_path, monkeypatch):
    # A "browser" that redeems the code first, with the registration it read from the cache (the same user's
    # files) but without the verifier, then hands it on: imsa's use of the code is a replay.
    script = textwrap.dedent("""
        import glob, json, os, urllib.parse, urllib.request
        class Stop(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args):
                return None
        opener = urllib.request.build_opener(Stop)
        try:
            opener.open(url)
        except urllib.error.HTTPError as answer:
            url = answer.headers["Location"]
        code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["code"]
        base = sys.argv[1].split("/authorize")[0]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(sys.argv[1]).query))
        cached = [json.load(open(path)) for path in glob.glob(os.path.expanduser("~/.aws/sso/cache/*.json"))]
        secret = next(entry["clientSecret"] for entry in cached if entry.get("clientId") == query["client_id"])
        body = json.dumps({"clientId": query["client_id"], "clientSecret": secret, "grantType": "authorization_code",
                           "code": code, "codeVerifier": "x" * 43, "redirectUri": query["redirect_uri"]}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(base + "/token", body, {"Content-Type": "application/json"}))
        except urllib.error.HTTPError:
            pass
    """)
    monkeypatch.setenv("BROWSER", browser(tmp_path, script))
    done = run_without_terminal("login", "dev")
    # The thief's attempt failed at the verifier, but it spent the code: imsa's own use of it is refused.
    line = error_line(done, 4)
    assert "CreateToken failed: InvalidGrantException" in line


def test_a_challenge_swapped_on_the_way_fails_at_the_verifier(sso, tmp_path, monkeypatch):
    script = "url = url.replace('code_challenge=', 'code_challenge=A')"
    monkeypatch.setenv("BROWSER", browser(tmp_path, script))
    line = error_line(run_without_terminal("login", "dev"), 4)
    assert "InvalidGrantException" in line and "verifier" in line


def test_the_fake_refuses_what_the_real_service_refuses(sso):
    oidc = boto3.client("sso-oidc", endpoint_url=sso.endpoint, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED))
    client = oidc.register_client(clientName="t", clientType="public", scopes=["sso:account:access"],
                                  grantTypes=["authorization_code", "refresh_token"],
                                  redirectUris=["http://127.0.0.1/oauth/callback"], issuerUrl=START_URL)
    ids = {"clientId": client["clientId"], "clientSecret": client["clientSecret"]}
    with pytest.raises(oidc.exceptions.InvalidClientException):
        oidc.create_token(grantType="refresh_token", refreshToken="x", clientId=ids["clientId"], clientSecret="wrong")
    status, location = sso.authorize({"client_id": ids["clientId"], "redirect_uri": "http://127.0.0.1:9/elsewhere",
                                      "response_type": "code", "code_challenge_method": "S256",
                                      "code_challenge": "c", "state": "s"})
    assert (status, location) == (400, None), "never redirects to an unregistered URI"
    from imsa.sources.sso_login import pkce_pair

    verifier, challenge = pkce_pair()
    redirect = "http://127.0.0.1:9/oauth/callback"
    status, location = sso.authorize({"client_id": ids["clientId"], "redirect_uri": redirect, "response_type": "code",
                                      "code_challenge_method": "plain", "code_challenge": verifier, "state": "s"})
    assert "error=invalid_request" in location, "S256 only"
    _, location = sso.authorize({"client_id": ids["clientId"], "redirect_uri": redirect, "response_type": "code",
                                 "code_challenge_method": "S256", "code_challenge": challenge, "state": "s"})
    code = location.split("code=")[1].split("&")[0]
    with pytest.raises(oidc.exceptions.InvalidGrantException):  # the wrong verifier spends the code
        oidc.create_token(grantType="authorization_code", code=code, codeVerifier="v" * 43, redirectUri=redirect, **ids)
    with pytest.raises(oidc.exceptions.InvalidGrantException):
        oidc.create_token(grantType="authorization_code", code=code, codeVerifier=verifier, redirectUri=redirect, **ids)
    _, location = sso.authorize({"client_id": ids["clientId"], "redirect_uri": redirect, "response_type": "code",
                                 "code_challenge_method": "S256", "code_challenge": challenge, "state": "s"})
    code = location.split("code=")[1].split("&")[0]
    token = oidc.create_token(grantType="authorization_code", code=code, codeVerifier=verifier, redirectUri=redirect,
                              **ids)
    with pytest.raises(oidc.exceptions.InvalidGrantException):  # replayed
        oidc.create_token(grantType="authorization_code", code=code, codeVerifier=verifier, redirectUri=redirect, **ids)
    fresh = oidc.create_token(grantType="refresh_token", refreshToken=token["refreshToken"], **ids)
    with pytest.raises(oidc.exceptions.InvalidGrantException):  # a refresh token is single-use
        oidc.create_token(grantType="refresh_token", refreshToken=token["refreshToken"], **ids)
    portal = boto3.client("sso", endpoint_url=sso.endpoint, region_name="us-east-1",
                          config=Config(signature_version=UNSIGNED))
    assert portal.list_accounts(accessToken=fresh["accessToken"])["accountList"]
    with pytest.raises(portal.exceptions.UnauthorizedException):
        portal.list_accounts(accessToken="bogus")


# --- the token cache, shared with botocore and the AWS CLI ---


def test_the_token_imsa_wrote_serves_boto3_with_no_login(sso, sts_env, isolated_env):
    status, _, said = device_login(sso, "login", "dev")
    assert status == 0, said
    path = cache_file(isolated_env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert {"startUrl", "region", "accessToken", "expiresAt", "clientId", "clientSecret", "registrationExpiresAt",
            "refreshToken"} <= set(data) and data["startUrl"] == START_URL
    logins = sso.count("create_token")
    # botocore fixes the cache directory from HOME when it is imported: a process of its own, with this HOME.
    script = ("import boto3, sys; s = boto3.Session(profile_name='dev'); "
              "print(s.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1').get_caller_identity()['Arn'])")
    done = subprocess.run([sys.executable, "-c", script, sts_env.endpoint], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)
    assert done.returncode == 0, done.stderr
    assert role_of(done.stdout.strip()) == "assumed-role/role-a"
    assert sso.count("create_token") == logins


@pytest.mark.parametrize("profile,key,role", [("dev", "corp", "role-a"), ("legacy", LEGACY_URL, "role-c")])
def test_a_token_the_aws_cli_wrote_serves_imsa_with_no_login(sso, isolated_env, sts_env, profile, key, role):
    given = sso.signed_in(scopes=() if profile == "legacy" else ("sso:account:access",))
    path = cache_file(isolated_env, key)
    path.parent.mkdir(parents=True)
    start_url = LEGACY_URL if profile == "legacy" else START_URL
    path.write_text(json.dumps({"startUrl": start_url, "region": "us-east-1", "accessToken": given["accessToken"],
                                "expiresAt": stamp(3600)}))
    calls = len(sso.calls)
    done = run_without_terminal("export", profile, "--format", "json")
    assert done.returncode == 0, done.stderr
    creds = json.loads(done.stdout)
    assert role_of(caller({"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"],
                           "token": creds["SessionToken"]}, sts_env)) == f"assumed-role/{role}"
    assert [call["name"] for call in sso.calls[calls:]] == ["/federation/credentials"], "no login, no refresh"


def test_two_processes_refreshing_at_once_leave_one_valid_token(isolated_env, sts_env, monkeypatch):
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch, refresh_delay=1, device_lifetime=5)
    try:
        given = fake.signed_in()
        path = cache_file(isolated_env)
        path.parent.mkdir(parents=True)
        expires = datetime.datetime.fromtimestamp(given["clientSecretExpiresAt"], datetime.timezone.utc)
        path.write_text(json.dumps({
            "startUrl": START_URL, "region": "us-east-1", "accessToken": given["accessToken"],
            "expiresAt": stamp(300),  # inside the 15-min window: both refresh
            "clientId": given["clientId"], "clientSecret": given["clientSecret"],
            "registrationExpiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "refreshToken": given["refreshToken"],
        }))
        processes = [start_imsa("export", name) for name in ("dev", "prod")]
        results = [finish(process, timeout=90) for process in processes]
        for status, stdout, stderr in results:
            assert status == 0, stderr
            assert stdout.startswith("export AWS_ACCESS_KEY_ID=")
        assert fake.count("create_token", grantType="refresh_token") == 1
        assert fake.count("start_device_authorization") == 0
        data = json.loads(path.read_text())
        assert fake.token_valid(data["accessToken"]) and fake.refresh_valid(data["refreshToken"])
        assert data["accessToken"] != given["accessToken"]
    finally:
        fake.stop()


# --- the service: the token ends, is revoked, the portal refuses ---


def test_a_revoked_token_stops_the_role_at_its_expiry_and_names_the_command(isolated_env, sts_env, monkeypatch,
                                                                             service):
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch, role_lifetime=20)
    try:
        status, _, said = device_login(fake, "assume", "dev")
        assert status == 0, said
        served = imds_fetch(service)
        assert role_of(caller(served, sts_env)) == "assumed-role/role-a"
        fake.revoke_all()
        service.wait_for_log("rotation failed", timeout=30)
        assert "UnauthorizedException" in service.log() and "run: imsa login dev" in service.log()
        from conftest import http

        deadline = time.monotonic() + 40
        while True:
            _, _, body = http(service.host, service.port, "GET", "/latest/meta-data/iam/security-credentials/Developer",
                              headers={"X-aws-ec2-metadata-token": imds_token(service)})
            answer = json.loads(body)
            if answer["Code"] != "Success" or time.monotonic() > deadline:
                break
            assert answer["AccessKeyId"] == served["access_key"], "nothing new was minted with the revoked token"
            time.sleep(0.5)
        assert answer["Code"] == "CredentialsExpired" and "run: imsa" in answer["Message"]
        text = run_imsa("status")
        assert "imsa login dev" in text.stdout
    finally:
        fake.stop()


def test_an_ended_token_stops_the_role_at_its_expiry_and_imsa_assume_brings_it_back(isolated_env, sts_env,
                                                                                    monkeypatch, service):
    write_sso_config(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch, role_lifetime=20, token_lifetime=12)
    try:
        status, _, said = device_login(fake, "assume", "dev")
        assert status == 0, said
        service.wait_for_log("no valid session for profile 'dev'", timeout=40)
        deadline = time.monotonic() + 40
        while True:
            _, _, body = http_get(service, "/latest/meta-data/iam/security-credentials/Developer")
            answer = json.loads(body)
            if answer["Code"] != "Success" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answer["Code"] == "CredentialsExpired" and "run: imsa assume dev" in answer["Message"]
        logins = fake.count("start_device_authorization")
        done = run_without_terminal("assume", "dev")  # the refresh token in the shared cache: no person needed
        assert done.returncode == 0, done.stderr
        assert fake.count("start_device_authorization") == logins and fake.count("create_token",
                                                                                 grantType="refresh_token") == 1
        assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"
    finally:
        fake.stop()


def http_get(service, path):
    from conftest import http

    return http(service.host, service.port, "GET", path, headers={"X-aws-ec2-metadata-token": imds_token(service)})


def imds_token(service):
    from conftest import http

    _, _, token = http(service.host, service.port, "PUT", "/latest/api/token",
                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    return token.decode()


def test_a_bogus_token_gets_the_portals_401_as_one_line_naming_the_login(sso, isolated_env):
    path = cache_file(isolated_env)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"startUrl": START_URL, "region": "us-east-1", "accessToken": "bogus",
                                "expiresAt": stamp(3600)}))
    line = one_error_line(run_without_terminal("list", "--sso", "dev"), 4)
    assert "UnauthorizedException" in line and "run: imsa login" in line
    line = error_line(run_without_terminal("export", "dev"), 4)
    assert "GetRoleCredentials failed: UnauthorizedException" in line and "run: imsa login dev" in line


def test_throttling_is_retried_once_then_one_error_line(sso, isolated_env):
    given = sso.signed_in()
    path = cache_file(isolated_env)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"startUrl": START_URL, "region": "us-east-1", "accessToken": given["accessToken"],
                                "expiresAt": stamp(3600)}))
    sso.throttle = 1
    assert run_without_terminal("export", "dev").returncode == 0
    sso.throttle = 10
    line = error_line(run_without_terminal("export", "dev"), 4)
    assert "TooManyRequestsException" in line


# --- the role picker ---


def test_list_sso_gives_every_account_and_role_across_pages(sso, isolated_env):
    status, _, said = device_login(sso, "list", "--sso", "dev", "--json")
    assert status == 0, said
    listed = subprocess.run(IMSA + ["list", "--sso", "dev", "--json"], capture_output=True, text=True, timeout=60)
    accounts = json.loads(listed.stdout)
    assert [(account["accountId"], account["roles"]) for account in accounts] == [
        ("111111111111", ["Developer", "ReadOnly"]), ("222222222222", ["Admin"])]
    table = run_imsa("list", "--sso", "prod")
    assert table.returncode == 0 and "222222222222  prod  Admin" in table.stdout
    line = one_error_line(run_imsa("list", "--sso", "use-ro"), 2)
    assert "does not sign in to IAM Identity Center" in line


# --- IAM Identity Center profiles of ~/.imsa ---


def write_imsa_sso(home, sts):
    from conftest import write_profiles

    return write_profiles(home / ".imsa", {
        "corp": {"sso_start_url": START_URL, "sso_region": "us-east-1", "sso_account_id": "111111111111",
                 "sso_role_name": "Developer", "region": "us-east-1"},
        "dev": {"extends": "corp"},
        "prod": {"extends": "corp", "sso_account_id": "222222222222", "sso_role_name": "Admin"},
        "chained": {"extends": "corp", "role_arn": sts.roles["role-d"], "role_session_name": "chained"},
        "shared": {"extends": "corp", "sso_session": "corp", "sso_cache": "aws"},
    })


def tokens_in_cache(home):
    """The cache files under ~/.aws/sso/cache that hold an access token."""
    directory = home / ".aws" / "sso" / "cache"
    if not directory.exists():
        return []
    return [path.name for path in directory.glob("*.json") if "accessToken" in json.loads(path.read_text())]


def test_imsa_profiles_extend_one_sign_in_that_only_the_service_holds(isolated_env, sts_env, monkeypatch, service):
    write_imsa_sso(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch)
    try:
        status, _, said = device_login(fake, "assume", "dev")
        assert status == 0, said
        assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"
        whoami = [sys.executable, "-c", "import boto3; print(boto3.client('sts', region_name='us-east-1', "
                  f"endpoint_url='{sts_env.endpoint}').get_caller_identity()['Arn'])"]
        for name, role in (("prod", "role-c"), ("chained", "role-d")):
            done = run_without_terminal("exec", name, "--", *whoami)
            assert done.returncode == 0, done.stderr
            assert role_of(done.stdout.strip()) == f"assumed-role/{role}"
        assert fake.count("create_token") == 1, "one sign-in for every profile that extends it"
        assert tokens_in_cache(isolated_env) == [], "sso_cache imsa (the default): no token in a file"
    finally:
        fake.stop()


def test_sso_cache_aws_shares_the_token_with_the_aws_cli(isolated_env, sts_env, monkeypatch):
    write_imsa_sso(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch)
    try:
        status, _, said = device_login(fake, "login", "shared")
        assert status == 0, said
        assert tokens_in_cache(isolated_env) == [cache_file(isolated_env).name]
        done = run_without_terminal("export", "shared")  # the cached token: no second sign-in
        assert done.returncode == 0, done.stderr
        assert fake.count("create_token") == 1
    finally:
        fake.stop()


def test_a_sign_in_only_the_service_would_hold_needs_the_service(isolated_env, sts_env, monkeypatch):
    write_imsa_sso(isolated_env, sts_env)
    fake = start_fake(sts_env, monkeypatch)
    try:
        status, stdout, said = device_login(fake, "login", "dev")
        assert status == 5 and stdout == "", said
        assert said.splitlines()[-1].startswith("imsa: error: the service is not running, and this profile's token "
                                                "is kept only by the service")
        assert tokens_in_cache(isolated_env) == []
    finally:
        fake.stop()


@pytest.mark.parametrize("extra,message", [
    ({"dev": {"extends": "corp", "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE"}},
     r"profile 'dev', key 'aws_access_key_id': an IAM Identity Center profile .* signs in instead"),
    ({"corp": {"sso_start_url": START_URL, "sso_region": "us-east-1", "sso_account_id": "111111111111"}},
     r"profile 'dev': missing 'sso_role_name'"),
    ({"dev": {"extends": "corp", "sso_cache": "disk"}}, r"profile 'dev', key 'sso_cache': must be aws .* or imsa"),
    ({"dev": {"extends": "corp", "sso_account_id": "1234"}},
     r"profile 'dev', key 'sso_account_id': '1234' is not a 12-digit account id"),
    ({"corp": {"sso_start_url": "corp", "sso_region": "us-east-1", "sso_account_id": "111111111111",
               "sso_role_name": "Developer"}}, r"profile 'corp', key 'sso_start_url': must be an http"),
])
def test_imsa_sso_profile_errors_name_file_line_profile_and_key(isolated_env, sts_env, extra, message):
    from conftest import write_profiles

    profiles = {"corp": {"sso_start_url": START_URL, "sso_region": "us-east-1", "sso_account_id": "111111111111",
                         "sso_role_name": "Developer"}, "dev": {"extends": "corp"}}
    profiles.update(extra)
    write_profiles(isolated_env / ".imsa", profiles)
    line = one_error_line(run_imsa("export", "dev"), 3)
    assert str(isolated_env / ".imsa") in line
    import re

    assert re.search(message, line), line


# --- a portal role named without a profile ---


def test_a_role_named_without_a_profile_uses_the_sign_in_it_names(sso, service, sts_env):
    status, _, said = device_login(sso, "login", "dev")
    assert status == 0, said
    whoami = [sys.executable, "-c", "import boto3; print(boto3.client('sts', region_name='us-east-1', "
              f"endpoint_url='{sts_env.endpoint}').get_caller_identity()['Arn'])"]
    done = run_without_terminal("exec", "sso:corp:222222222222:Admin", "--", *whoami)
    assert done.returncode == 0, done.stderr
    assert role_of(done.stdout.strip()) == "assumed-role/role-c"
    done = run_without_terminal("assume", "sso:dev:111111111111:ReadOnly")  # a profile's sign-in serves too
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-b"
    assert sso.count("create_token") == 1, "the sign-in of corp, held by the service, served both"
    # corp and legacy are two start URLs: the short form must say which.
    line = one_error_line(run_without_terminal("assume", "sso:111111111111:ReadOnly"), 3)
    assert "2 IAM Identity Center start URLs, so name the sign-in" in line and "corp" in line
    line = one_error_line(run_without_terminal("assume", "sso:nowhere:111111111111:ReadOnly"), 3)
    assert "no sign-in 'nowhere'" in line
    line = one_error_line(run_without_terminal("assume", "sso:corp:1111:ReadOnly"), 3)
    assert "'1111' is not a 12-digit account id" in line


def test_the_short_form_needs_one_start_url(isolated_env, sts_env, monkeypatch, service):
    write_imsa_sso(isolated_env, sts_env)  # ~/.imsa only: one start URL
    fake = start_fake(sts_env, monkeypatch)
    try:
        status, _, said = device_login(fake, "assume", "sso:222222222222:Admin")
        assert status == 0, said
        assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-c"
        assert service.client.status()["active"]["profile"] == "sso:222222222222:Admin"
    finally:
        fake.stop()
