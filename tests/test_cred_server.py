"""Credential-vending servers (mairu's API) as a source, end to end: imsa's OAuth logins against a strict fake
server (tests/cred_server_fake.py), a live service minting with POST /assume-role, real clients in each delivery
mode, the 401 that asks for a new login, NoCache, and GET /roles with and without the optional API.

The fake runs in this process on 127.0.0.1; every imsa command and client is a separate process that reaches it over
loopback. Role credentials come from moto's AssumeRole, so they authenticate against the fake STS.
"""

import json
import os
import pathlib
import select
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from imsa.errors import ConfigError

from conftest import one_error_line, run_imsa, run_without_terminal
from cred_server_fake import CLIENT_ID, FakeCredServer
from test_aws_config import role_of
from test_aws_profiles import AWS, BOTO3, caller, imds_fetch, run_client

IMSA = [sys.executable, "-m", "imsa"]


def server_roles(sts):
    """What the fake server grants: a role ARN, a plain name, and mairu's ACCOUNT/NAME form."""
    return {sts.roles["role-a"]: "role-a", "ReadOnly": "role-b", "123456789012/Admin": "role-c"}


def write_definition(directory, fake, name="corp.json", **definition):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(fake.definition(**definition)))


def write_profiles(home, sts, server="corp"):
    """~/.imsa: dev, ro and admin on the server; ~/.aws/config: use-ro, a credential_process of imsa's."""
    (home / ".imsa").write_text(textwrap.dedent(f"""
        corp:
          server: {server}
          region: us-east-1
        dev:
          extends: corp
          server_role: {sts.roles['role-a']}
        ro:
          extends: corp
          server_role: ReadOnly
        admin:
          extends: corp
          server_role: 123456789012/Admin
    """))
    os.chmod(home / ".imsa", 0o600)
    (home / ".aws" / "config").write_text(textwrap.dedent(f"""
        [profile use-ro]
        credential_process = {sys.executable} -m imsa credential-process ro
    """))


def start_fake(isolated_env, sts, monkeypatch, grants=("code_grant",), **knobs):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_env / ".config"))
    fake = FakeCredServer(sts, server_roles(sts), **knobs).start()
    write_definition(isolated_env / ".config" / "imsa" / "servers.d", fake, grants=grants)
    write_profiles(isolated_env, sts)
    return fake


@pytest.fixture
def corp(isolated_env, sts_env, monkeypatch, tmp_path):
    """The fake server (code grant), its definition in the user's servers.d, profiles on it, and a browser."""
    fake = start_fake(isolated_env, sts_env, monkeypatch)
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    yield fake
    fake.stop()


def browser(tmp_path, script=""):
    """An executable that stands in for a browser (BROWSER): it GETs the URL it is given and follows the redirect
    to imsa's listener; *script* may change the URL first (``url = …``)."""
    path = tmp_path / "browser"
    path.write_text(f"#!{sys.executable}\nimport sys, urllib.request\nurl = sys.argv[1]\n{script}\n"
                    "urllib.request.urlopen(url, timeout=30).read()\n")
    path.chmod(0o755)
    return str(path)


def login(*names):
    for name in names:
        done = run_without_terminal("login", name)
        assert done.returncode == 0, done.stderr


# --- Done when: one login, three roles, through IMDS, exec and credential-process ---


def test_one_login_serves_three_roles_through_imds_exec_and_credential_process(corp, service, sts_env):
    done = run_without_terminal("login", "dev")
    assert done.returncode == 0, done.stderr
    assert "/oauth/authorize?" in done.stderr and "the service holds the token of the credential server corp" \
        in done.stderr
    assert corp.grants() == 1 and corp.count("/oauth/token", grant_type="authorization_code") == 1

    done = run_without_terminal("assume", "dev")
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-a"
    env = dict(os.environ, AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint)
    aws = [AWS, "sts", "get-caller-identity", "--endpoint-url", sts_env.endpoint, "--region", "us-east-1",
           "--query", "Arn", "--output", "text"]
    for argv in ([sys.executable, "-c", BOTO3], aws):
        assert role_of(run_client(argv, env).strip()) == "assumed-role/role-a"

    closed = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    for argv in ([sys.executable, "-c", BOTO3], aws):
        out = run_client(IMSA + ["exec", "admin", "--"] + argv, closed)
        assert role_of(out.strip()) == "assumed-role/role-c"
        out = run_client(argv, dict(closed, AWS_PROFILE="use-ro"))
        assert role_of(out.strip()) == "assumed-role/role-b"

    assert corp.grants() == 1, "one token served every role and delivery"
    assert {call["role"] for call in corp.calls if call["name"] == "/assume-role"} == set(server_roles(sts_env))
    status = service.client.status()
    assert [held["kind"] for held in status["sessions"]] == ["cred_server"]
    assert "credential server corp" in status["active"]["source"] and status["active"]["role_name"] == "role-a"
    rows = {row["name"]: row for row in json.loads(run_imsa("list", "--json").stdout)}
    assert rows["ro"]["kind"] == "cred_server" and rows["ro"]["session"] is not None


def test_export_and_the_console_work_from_the_held_token(corp, service, sts_env):
    from test_console import FakeSignin, caller_arn, signin_env

    login("ro")
    done = run_without_terminal("export", "admin", "--format", "json")
    assert done.returncode == 0, done.stderr
    exported = json.loads(done.stdout)
    creds = {"access_key": exported["AccessKeyId"], "secret_key": exported["SecretAccessKey"],
             "token": exported["SessionToken"]}
    assert role_of(caller(creds, sts_env)) == "assumed-role/role-c"
    with FakeSignin() as signin:
        done = run_imsa("console", "ro", "--print", env=signin_env(signin))
    assert done.returncode == 0, done.stderr
    assert not signin.problems and len(signin.sessions) == 1
    assert role_of(caller_arn(signin.sessions[0], sts_env)) == "assumed-role/role-b"
    assert corp.grants() == 1


def test_the_first_use_logs_in_when_the_service_holds_no_token(corp, service, sts_env):
    done = run_without_terminal("assume", "ro")
    assert done.returncode == 0, done.stderr
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-b"
    assert corp.grants() == 1


def test_a_fixed_local_port_is_the_redirects(isolated_env, sts_env, monkeypatch, tmp_path, service):
    import socket

    with socket.socket() as probe:  # a port free now, as an administrator would pick one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = start_fake(isolated_env, sts_env, monkeypatch, local_port=port)
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    try:
        done = run_without_terminal("login", "dev")
        assert done.returncode == 0, done.stderr
        assert urllib.parse.quote(f"http://127.0.0.1:{port}/oauth/callback", safe="") in done.stderr
        assert fake.grants() == 1
    finally:
        fake.stop()


# --- the device grant ---


def read_user_code(process, timeout=30):
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


def test_the_device_grant_polls_politely_and_gives_one_token(isolated_env, sts_env, monkeypatch, service):
    # The server asks for 1 s between polls but enforces 2: imsa's second poll is answered slow_down.
    fake = start_fake(isolated_env, sts_env, monkeypatch, grants=("device_grant",), interval=2,
                      advertised_interval=1)
    process = subprocess.Popen(IMSA + ["login", "dev", "--no-browser"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code, said = read_user_code(process)
        assert fake.url + "device" in said
        deadline = time.monotonic() + 30
        while not any(device["slowed"] for device in fake.devices.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(device["slowed"] for device in fake.devices.values()), "a poll came faster than allowed"
        fake.approve(code)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert stdout == ""
        assert fake.grants() == 1 and fake.count("/oauth/token", grant_type="authorization_code") == 0
        polls = fake.count("/oauth/token")
        assert 3 <= polls <= 6, "pending, slow_down, then 5 s more between polls, not a hammering"
        assert run_without_terminal("credential-process", "admin").returncode == 0
        assert fake.grants() == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        fake.stop()


def test_a_denied_device_code_is_one_error_line(isolated_env, sts_env, monkeypatch, service):
    fake = start_fake(isolated_env, sts_env, monkeypatch, grants=("device_grant",))
    process = subprocess.Popen(IMSA + ["login", "dev"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code, _ = read_user_code(process)
        fake.approve(code, state="denied")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        fake.stop()
    assert process.returncode == 4 and stdout == ""
    assert stderr.splitlines()[-1] == "imsa: error: the sign-in to the credential server corp was denied"
    assert stderr.count("imsa: error:") == 1 and "Traceback" not in stderr


# --- 401: log in again ---


def test_a_revoked_token_is_a_clear_line_naming_the_login_and_the_login_brings_it_back(corp, service, sts_env):
    login("dev")
    corp.revoke_all()
    line = one_error_line(run_without_terminal("credential-process", "ro"), 4)
    assert "the credential server corp refused the sign-in token" in line and "401" in line
    assert line.endswith("run: imsa login ro")
    line = one_error_line(run_without_terminal("export", "admin"), 4)
    assert line.endswith("run: imsa login admin")
    login("ro")
    assert corp.grants() == 2
    done = run_without_terminal("credential-process", "ro")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Version"] == 1


def test_a_redirect_is_an_error_and_the_bearer_does_not_follow_it(corp, service):
    import http.server
    import threading

    seen = []

    class Catcher(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    catcher = http.server.HTTPServer(("127.0.0.1", 0), Catcher)
    thread = threading.Thread(target=catcher.serve_forever, daemon=True)
    thread.start()
    try:
        login("dev")
        corp.redirect_to = f"http://127.0.0.1:{catcher.server_address[1]}/assume-role"
        line = one_error_line(run_without_terminal("export", "ro"), 4)
        assert "refused POST assume-role: 303" in line
        assert seen == [], "nothing followed the redirect, the bearer least of all"
    finally:
        catcher.shutdown()
        catcher.server_close()


# --- NoCache ---


def test_nocache_credentials_are_asked_for_anew_on_each_delivery(isolated_env, sts_env, monkeypatch, tmp_path,
                                                                  service):
    fake = start_fake(isolated_env, sts_env, monkeypatch, no_cache={"ReadOnly"})
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    try:
        login("ro")
        keys = set()
        for _ in range(3):
            for name in ("ro", "dev"):
                done = run_without_terminal("credential-process", name)
                assert done.returncode == 0, done.stderr
                if name == "ro":
                    keys.add(json.loads(done.stdout)["AccessKeyId"])
        assert fake.count("/assume-role", role="ReadOnly") == 3 and len(keys) == 3, "NoCache: each asks the server"
        assert fake.count("/assume-role", role=sts_env.roles["role-a"]) == 1, "cached as usual"
        assert fake.grants() == 1
    finally:
        fake.stop()


# --- GET /roles ---


def test_list_server_gives_the_roles_the_server_offers(corp, service):
    done = run_without_terminal("list", "--server", "corp")  # no token held yet: a login first
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ROLE", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == sorted(corp.roles)
    done = run_without_terminal("list", "--server", corp.url, "--json")
    assert done.returncode == 0, done.stderr
    assert [role["name"] for role in json.loads(done.stdout)] == sorted(corp.roles)
    assert corp.grants() == 1 and corp.count("/roles") == 2


@pytest.mark.parametrize("status", [404, 405])
def test_list_server_says_plainly_when_the_optional_api_is_missing(isolated_env, sts_env, monkeypatch, tmp_path,
                                                                   service, status):
    fake = start_fake(isolated_env, sts_env, monkeypatch, roles_api=False, roles_api_status=status)
    monkeypatch.setenv("BROWSER", browser(tmp_path))
    try:
        login("dev")
        done = run_without_terminal("list", "--server", "corp")
        assert done.returncode == 0 and done.stdout == "", done.stderr
        assert "imsa: the credential server corp does not list roles" in done.stderr
        assert "the listing is optional in its API" in done.stderr and "Traceback" not in done.stderr
        assert fake.count("/roles") == 1
    finally:
        fake.stop()


def test_list_server_works_without_the_service(corp):
    done = run_without_terminal("list", "--server", "corp", "--json")
    assert done.returncode == 0, done.stderr
    assert "the service is not running" in done.stderr
    assert len(json.loads(done.stdout)) == 3


# --- server definitions ---


def test_the_users_definition_wins_over_the_organisations_and_a_broken_one_is_named(corp, isolated_env,
                                                                                    monkeypatch, tmp_path):
    system = pathlib.Path(os.environ["IMSA_SYSTEM_CONFIG_DIR"]) / "servers.d"
    write_definition(system, corp, name="corp.json", grants=("code_grant",), client_id="someone-else")
    done = run_without_terminal("list", "--server", "corp", "--json")
    assert done.returncode == 0, done.stderr  # the user's client id, not the organisation's, signed in
    from imsa.sources import cred_server

    assert cred_server.find("corp").client_id == CLIENT_ID
    (isolated_env / ".config" / "imsa" / "servers.d" / "corp.json").unlink()
    found = cred_server.find("corp")
    assert found.client_id == "someone-else" and found.path == str(system / "corp.json"), "the organisation's, now"
    (system / "broken.json").write_text("{not json")
    line = one_error_line(run_without_terminal("export", "dev"), 3)
    assert str(system / "broken.json") in line and "not valid JSON" in line


@pytest.mark.parametrize("definition, message", [
    ({"url": "http://corp.example.com/", "oauth": {"client_id": "x", "code_grant": {}}}, "'url' must be https://"),
    ({"url": "https://corp.example.com/", "oauth": {"client_id": "x"}}, "needs code_grant or device_grant"),
    ({"url": "https://corp.example.com/", "oauth": {"client_id": "x", "code_grant": {},
                                                     "default_grant_type": "device_code"}}, "default_grant_type"),
    ({"url": "https://corp.example.com/", "oauth": {"client_id": "x", "code_grant": {"local_port": 70000}}},
     "local_port"),
])
def test_a_bad_definition_is_one_line_naming_the_file_and_field(isolated_env, sts_env, monkeypatch, definition,
                                                                message):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(isolated_env / ".config"))
    directory = isolated_env / ".config" / "imsa" / "servers.d"
    directory.mkdir(parents=True)
    (directory / "corp.json").write_text(json.dumps(dict(definition, id="corp")))
    write_profiles(isolated_env, sts_env)
    line = one_error_line(run_without_terminal("export", "dev"), 3)
    assert str(directory / "corp.json") in line and message in line


def test_a_profile_naming_an_unknown_server_or_no_role_is_one_line(corp, isolated_env):
    with open(isolated_env / ".imsa", "a") as handle:
        handle.write("elsewhere:\n  server: nowhere\n  server_role: x\nnorole:\n  extends: corp\n")
    line = one_error_line(run_without_terminal("export", "elsewhere"), 3)
    assert "no credential server 'nowhere'" in line and "servers: corp" in line and "key 'server'" in line
    line = one_error_line(run_without_terminal("export", "norole"), 3)
    assert "missing 'server_role'" in line and "imsa list --server corp" in line


# --- the fake is strict, and imsa's listener with it ---


def test_the_fake_refuses_what_a_careful_server_refuses(corp):
    from imsa.sources.oauth import pkce_pair

    verifier, challenge = pkce_pair()
    redirect = "http://127.0.0.1:9/oauth/callback"

    def authorize(**changes):
        query = dict(dict(response_type="code", client_id=CLIENT_ID, redirect_uri=redirect, state="s",
                          code_challenge=challenge, code_challenge_method="S256"), **changes)
        status, location = corp.authorize(query)
        return status, dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location or "").query))

    def token(**form):
        body = urllib.parse.urlencode(dict(client_id=CLIENT_ID, **form)).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(corp.url + "oauth/token", body), timeout=10) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    assert authorize(code_challenge_method="plain")[1]["error"] == "invalid_request"
    assert authorize(redirect_uri="http://attacker.example/oauth/callback")[0] == 400
    _, given = authorize()
    assert token(grant_type="authorization_code", code=given["code"], redirect_uri=redirect + "x",
                 code_verifier=verifier)[1]["error"] == "invalid_grant"
    _, given = authorize()
    assert token(grant_type="authorization_code", code=given["code"], redirect_uri=redirect,
                 code_verifier=pkce_pair()[0])[1]["error"] == "invalid_grant", "the wrong verifier"
    _, given = authorize()
    status, answer = token(grant_type="authorization_code", code=given["code"], redirect_uri=redirect,
                           code_verifier=verifier)
    assert status == 200 and answer["token_type"] == "Bearer"
    assert token(grant_type="authorization_code", code=given["code"], redirect_uri=redirect,
                 code_verifier=verifier)[1]["error"] == "invalid_grant", "a code is single-use"
    request = urllib.request.Request(corp.url + "assume-role", json.dumps({"Role": "ReadOnly"}).encode(),
                                     {"Content-Type": "application/json", "Authorization": "Bearer forged"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_a_forged_redirect_without_the_logins_state_is_ignored(corp, tmp_path, monkeypatch):
    # Another local process races the browser to imsa's listener with a code of its own: no state, then a wrong one.
    script = textwrap.dedent("""
        import urllib.error, urllib.parse
        redirect = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
        for forged in ("?code=forged", "?code=forged&state=guess"):
            try:
                urllib.request.urlopen(redirect + forged, timeout=30).read()
            except urllib.error.HTTPError as answer:
                assert answer.code == 400, answer.code
            else:
                raise SystemExit("a forged redirect was accepted")
    """)
    monkeypatch.setenv("BROWSER", browser(tmp_path, script))
    done = run_without_terminal("list", "--server", "corp")
    assert done.returncode == 0, done.stderr
    assert corp.grants() == 1 and "forged" not in done.stderr


@pytest.mark.parametrize("where", ["user", "system"])
def test_a_definition_others_could_rewrite_is_refused(corp, isolated_env, where):
    """A definition says where the sign-in and the token go: one writable by others is an error naming it."""
    if where == "user":
        directory = isolated_env / ".config" / "imsa" / "servers.d"
    else:
        directory = pathlib.Path(os.environ["IMSA_SYSTEM_CONFIG_DIR"]) / "servers.d"
    write_definition(directory, corp, name="corp.json", grants=("code_grant",))
    path = directory / "corp.json"
    path.chmod(0o666)
    from imsa.sources import cred_server

    with pytest.raises(ConfigError) as refused:
        cred_server.find("corp")
    assert str(path) in str(refused.value) and "writable" in str(refused.value)
    path.chmod(0o644)
    if where == "system" and os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # nobody's: not the organisation's
        with pytest.raises(ConfigError, match="must belong to root"):
            cred_server.find("corp")
        os.chown(path, 0, 0)
    found = cred_server.find("corp")  # the user's own definition wins over the organisation's of the same id
    assert found.path == str(isolated_env / ".config" / "imsa" / "servers.d" / "corp.json")
