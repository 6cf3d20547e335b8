"""An OIDC provider as a source (web identity), end to end: imsa's sign-in against a strict fake provider
(tests/oidc_fake.py), the service minting with AssumeRoleWithWebIdentity through a strict STS front before moto,
and real clients in each delivery mode.

The fakes run in this process on 127.0.0.1; every imsa command and client is a separate process that reaches them
over loopback. The browser is a small script (BROWSER) that follows the provider's redirect to imsa's listener.
"""

import json
import os
import subprocess
import sys
import time

import boto3
import pytest
import yaml
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import answer_on_terminal, one_error_line, run_imsa, run_without_terminal
from oidc_fake import FakeOidc, StrictSts
from test_aws_config import role_of
from test_aws_profiles import AWS, BOTO3, caller, imds_fetch, run_client
from test_sso import browser, error_line

IMSA = [sys.executable, "-m", "imsa"]


class Provider:
    """The fake provider, the strict STS front, and the roles: ``a`` trusts alice and allows 1 hour (the duration
    fallback), ``b`` trusts alice and allows 12 hours, ``c`` trusts someone else."""

    def __init__(self, sts, home):
        self.sts = sts
        self.home = home
        self.roles = {name: sts.roles[f"role-{name}"] for name in "abc"}
        self.fake = FakeOidc(roles=[self.roles["a"], self.roles["b"]], aliases={sts.account: ["sandbox"]}).start()
        alice = (self.fake.issuer, self.fake.user["sub"])
        self.front = StrictSts(sts, [self.fake], trust={self.roles["a"]: {alice}, self.roles["b"]: {alice},
                                                        self.roles["c"]: {(self.fake.issuer, "ad|mallory")}},
                               max_duration={self.roles["b"]: 12 * 3600}).start()

    def stop(self):
        self.front.stop()
        self.fake.stop()

    def profiles(self, **extra):
        """~/.imsa: the provider ``corp`` and a profile per role on it (``pick``: no role, the roles API's)."""
        profiles = {"corp": {"oidc_discovery_url": self.fake.discovery_url, "oidc_client_id": "imsa-cli",
                             "oidc_scopes": "openid email", "oidc_roles_url": self.fake.issuer + "/roles",
                             "region": "us-east-1"},
                    "pick": {"extends": "corp"}}
        for name, arn in self.roles.items():
            profiles[f"web-{name}"] = {"extends": "corp", "role_arn": arn}
        for name, keys in extra.items():
            profiles.setdefault(name, {}).update(keys)
        path = self.home / ".imsa"
        path.write_text(yaml.safe_dump(profiles))
        path.chmod(0o600)


@pytest.fixture
def provider(isolated_env, sts_env, monkeypatch, tmp_path):
    """The fake provider and STS front, ~/.imsa with profiles on it, STS reached through the front, a browser."""
    found = Provider(sts_env, isolated_env)
    found.profiles()
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", found.front.endpoint)
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    yield found
    found.stop()


def nothing_served(service, provider):
    """Assert the service holds no session and serves no role, and no token reached STS."""
    status = service.client.status()
    assert status["sessions"] == [] and not status.get("active"), status
    assert provider.front.calls == []


def test_one_sign_in_serves_roles_over_imds_to_boto3_and_the_aws_cli(provider, service, sts_env, isolated_env):
    done = run_without_terminal("assume", "web-a")
    assert done.returncode == 0, done.stderr
    assert "/authorize?" in done.stderr and "signed in to " + provider.fake.issuer + " as alice@example.com" in done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"
    env = dict(os.environ, AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint)
    assert role_of(run_client([sys.executable, "-c", BOTO3], env).strip()) == "assumed-role/role-a"
    arn = run_client([AWS, "sts", "get-caller-identity", "--endpoint-url", sts_env.endpoint, "--region", "us-east-1",
                      "--query", "Arn", "--output", "text"], env)
    assert role_of(arn.strip()) == "assumed-role/role-a"
    # The duration fallback, as the Mozilla AWS CLI does it: 12 hours asked, the role allows 1, asked again.
    assert provider.front.outcomes()[:2] == [(provider.roles["a"], 43200, "ValidationError"),
                                             (provider.roles["a"], 3600, "ok")]
    # Another role on the same provider: no second sign-in, the service mints from the ID token it holds.
    done = run_without_terminal("assume", "web-b")
    assert done.returncode == 0, done.stderr
    assert "/authorize?" not in done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-b"
    assert provider.fake.count("/token") == 1
    assert (provider.roles["b"], 43200, "ok") in provider.front.outcomes()
    status = service.client.status()
    assert [held["kind"] for held in status["sessions"]] == ["web_identity"]
    assert provider.fake.issuer in status["active"]["source"]
    # Neither the ID token nor the provider's refresh token is written anywhere under HOME.
    issued = provider.fake.issued
    for root, _, names in os.walk(isolated_env):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                data = handle.read()
            assert not any(secret.encode() in data for secret in issued), os.path.join(root, name)


def test_a_role_that_does_not_trust_the_person_is_refused_by_sts_and_nothing_is_served(provider, service):
    done = run_without_terminal("assume", "web-c")
    line = error_line(done, 4)
    assert "AssumeRoleWithWebIdentity failed: AccessDenied" in line
    assert provider.front.outcomes()[-1] == (provider.roles["c"], 43200, "AccessDenied")
    assert not service.client.status().get("active")


def replay_script(provider):
    """A browser that spends the code at the token endpoint first (as someone who caught the redirect would), then
    hands it on to imsa."""
    return f"""
import urllib.parse, urllib.request, urllib.error
class Stop(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None
opener = urllib.request.build_opener(Stop)
try:
    opener.open(url, timeout=30)
except urllib.error.HTTPError as redirect:
    url = redirect.headers["Location"]
code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["code"]
try:
    urllib.request.urlopen("{provider.fake.issuer}/token",
                           urllib.parse.urlencode({{"grant_type": "authorization_code", "code": code}}).encode())
except urllib.error.HTTPError:
    pass
"""


@pytest.mark.parametrize("case, expected", [
    ("wrong-audience", "the provider's ID token is not for this client: its audience is not 'imsa-cli'"),
    ("expired", "the provider's ID token has already expired"),
    ("foreign-key", "the provider's ID token has a signature that does not verify with the provider's key 'k1'"),
    ("replayed-code", "failed: HTTP 400: invalid_grant: the code is unknown, used or expired"),
])
def test_a_token_that_is_not_the_persons_fails_with_one_line_and_nothing_is_served(provider, service, tmp_path,
                                                                                    monkeypatch, case, expected):
    now = int(time.time())
    if case == "wrong-audience":
        provider.fake.next_token = {"aud": "another-client"}
    elif case == "expired":
        provider.fake.next_token = {"iat": now - 7200, "exp": now - 3600}
    elif case == "foreign-key":
        provider.fake.next_token = {"sign_with": "foreign"}
    else:
        monkeypatch.setenv("BROWSER", browser(tmp_path, replay_script(provider)))
    done = run_without_terminal("assume", "web-a")
    line = error_line(done, 4)
    assert expected in line, line
    nothing_served(service, provider)


@pytest.mark.parametrize("case, code", [
    ("wrong-audience", "InvalidIdentityToken"), ("expired", "ExpiredTokenException"),
    ("foreign-key", "InvalidIdentityToken"), ("another-person", "AccessDenied"), ("not-a-jwt", "InvalidIdentityToken"),
])
def test_the_sts_front_refuses_what_sts_refuses(provider, case, code):
    """The front is what makes the tests above mean something: moto alone mints for any string."""
    now = int(time.time())
    tokens = {
        "wrong-audience": lambda: provider.fake.id_token(aud="another-client"),
        "expired": lambda: provider.fake.id_token(iat=now - 7200, exp=now - 3600),
        "foreign-key": lambda: provider.fake.id_token(sign_with="foreign"),
        "another-person": lambda: provider.fake.id_token(sub="ad|mallory"),
        "not-a-jwt": lambda: "not-a-jwt-at-all",
    }
    client = boto3.client("sts", endpoint_url=provider.front.endpoint, region_name="us-east-1",
                          config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))
    with pytest.raises(ClientError) as refused:
        client.assume_role_with_web_identity(RoleArn=provider.roles["a"], RoleSessionName="alice",
                                             WebIdentityToken=tokens[case]())
    assert refused.value.response["Error"]["Code"] == code
    answer = client.assume_role_with_web_identity(RoleArn=provider.roles["a"], RoleSessionName="alice",
                                                  WebIdentityToken=provider.fake.id_token())
    assert answer["SubjectFromWebIdentityToken"] == "ad|alice" and answer["Audience"] == "imsa-cli"


def test_the_fake_provider_refuses_what_a_provider_refuses(provider):
    import urllib.error
    import urllib.parse
    import urllib.request

    def authorize(**changes):
        query = {"response_type": "code", "client_id": "imsa-cli", "redirect_uri": "http://127.0.0.1:9/cb",
                 "scope": "openid", "state": "s", "nonce": "n", "code_challenge": "x" * 43,
                 "code_challenge_method": "S256"}
        query.update(changes)
        query = {name: value for name, value in query.items() if value is not None}

        class Stop(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args):
                return None
        try:
            urllib.request.build_opener(Stop).open(f"{provider.fake.issuer}/authorize?{urllib.parse.urlencode(query)}")
        except urllib.error.HTTPError as answer:
            return answer.code, answer.headers.get("Location")
        raise AssertionError("no redirect")

    assert authorize()[0] == 302
    assert authorize(redirect_uri="http://evil.example/cb")[0] == 400
    assert authorize(code_challenge_method="plain")[0] == 400
    assert authorize(code_challenge=None)[0] == 400
    assert authorize(client_id="other")[0] == 400
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize()[1]).query))["code"]
    try:  # no verifier: refused, and the code is spent
        urllib.request.urlopen(f"{provider.fake.issuer}/token", urllib.parse.urlencode({
            "grant_type": "authorization_code", "code": code, "client_id": "imsa-cli",
            "redirect_uri": "http://127.0.0.1:9/cb"}).encode())
        raise AssertionError("a code without its verifier was accepted")
    except urllib.error.HTTPError as refused:
        assert refused.code == 400 and json.loads(refused.read())["error"] == "invalid_grant"


def test_a_role_whose_maximum_is_twelve_hours_gets_twelve_hours(provider):
    done = run_imsa("export", "web-b", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert provider.front.outcomes() == [(provider.roles["b"], 43200, "ok")]


def test_export_exec_and_credential_process_deliver_the_role(provider, service, sts_env, isolated_env):
    assert run_without_terminal("assume", "web-a").returncode == 0
    closed = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    arn = run_client(IMSA + ["exec", "web-b", "--", sys.executable, "-c", BOTO3], closed)
    assert role_of(arn.strip()) == "assumed-role/role-b"
    with open(isolated_env / ".aws" / "config", "a") as handle:
        handle.write(f"[profile use-b]\ncredential_process = {sys.executable} -m imsa credential-process web-b\n")
    arn = run_client([sys.executable, "-c", BOTO3], dict(closed, AWS_PROFILE="use-b"))
    assert role_of(arn.strip()) == "assumed-role/role-b"
    done = run_imsa("export", "web-a")
    assert done.returncode == 0, done.stderr
    script = done.stdout + f"\nexec {sys.executable} -c \"{BOTO3}\"\n"
    arn = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=closed, timeout=60).stdout
    assert role_of(arn.strip()) == "assumed-role/role-a"
    assert provider.fake.count("/token") == 1, "one sign-in served every delivery"


def test_the_console_signs_in_with_a_web_identity_role(provider, service, sts_env):
    from test_console import FakeSignin, caller_arn, signin_env

    assert run_without_terminal("assume", "web-a").returncode == 0
    with FakeSignin() as fake:
        done = run_imsa("console", "web-a", "--print", env=signin_env(fake))
    assert done.returncode == 0, done.stderr
    assert not fake.problems and len(fake.sessions) == 1
    assert role_of(caller_arn(fake.sessions[0], sts_env)) == "assumed-role/role-a"


def test_without_a_role_the_person_picks_one_from_the_roles_api_on_the_terminal(provider, service, sts_env):
    process, prompts, _, stderr = answer_on_terminal(["assume", "pick"], ["2"], until=b"> ")
    assert process.returncode == 0, stderr
    assert "1) " + provider.roles["a"] + "  (sandbox)" in prompts[0] and "2) " + provider.roles["b"] in prompts[0]
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-b"
    assert provider.fake.count("/token") == 1 and provider.fake.count("/roles") == 1


def test_without_a_role_and_without_a_terminal_the_error_lists_the_roles(provider, service):
    done = run_without_terminal("assume", "pick")
    line = error_line(done, 2)
    assert "no role was picked: set role_arn" in line and provider.roles["a"] in line and provider.roles["b"] in line


@pytest.mark.parametrize("keys, message", [
    ({"oidc_client_id": None}, "missing 'oidc_client_id'"),
    ({"oidc_discovery_url": "http://idp.example/.well-known/openid-configuration"}, "must be an https:// URL"),
    ({"oidc_roles_url": None}, "needs role_arn, or oidc_roles_url"),
    ({"oidc_duration_seconds": 50000}, "must be between 900 and 43200"),
    ({"aws_access_key_id": "AKIAEXAMPLE000000000"}, "signs in at its provider instead"),
])
def test_oidc_profile_errors_name_file_profile_and_key(provider, keys, message):
    provider.profiles(corp=keys)
    path = provider.home / ".imsa"
    data = yaml.safe_load(path.read_text())
    data["corp"] = {name: value for name, value in data["corp"].items() if value is not None}
    path.write_text(yaml.safe_dump(data))
    line = one_error_line(run_without_terminal("assume", "pick"), 3)
    assert message in line and str(path) in line, line


def test_logout_of_a_profile_without_a_role_forgets_the_session_without_a_sign_in(provider, service):
    assert run_without_terminal("assume", "web-a").returncode == 0
    done = run_without_terminal("logout", "pick")
    assert done.returncode == 0, done.stderr
    assert "/authorize?" not in done.stderr and provider.fake.count("/token") == 1
    assert service.client.status()["sessions"] == []
