"""imsa console: the federation sign-in flow against a fake sign-in endpoint on 127.0.0.1, and its refusals."""

import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

from conftest import MFA_CODE, one_error_line, run_imsa, write_config

SIGNIN_TOKEN = "fake-signin-token-" + "x" * 40


class FakeSignin:
    """A tiny federation endpoint: checks getSigninToken's Session JSON and answers with a SigninToken.

    ``status`` forces an error answer; ``sessions`` and ``durations`` record what arrived.
    """

    def __init__(self, status=200):
        self.status = status
        self.sessions = []
        self.durations = []
        self.problems = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
                problem = fake.check(parsed.path, query)
                if problem:
                    fake.problems.append(problem)
                    return self.answer(400, {"error": problem})
                if fake.status != 200:
                    return self.answer(fake.status, {"error": "forced"})
                return self.answer(200, {"SigninToken": SIGNIN_TOKEN})

            def answer(self, status, body):
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/federation"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def check(self, path, query):
        """What is wrong with a getSigninToken request, or None."""
        if path != "/federation":
            return f"path {path}"
        if query.get("Action") != ["getSigninToken"]:
            return f"Action {query.get('Action')}"
        if set(query) - {"Action", "Session", "SessionDuration"}:
            return f"unexpected parameters {sorted(query)}"
        try:
            session = json.loads(query["Session"][0])
        except (KeyError, ValueError):
            return "Session is not JSON"
        if set(session) != {"sessionId", "sessionKey", "sessionToken"} or not all(
            isinstance(value, str) and value for value in session.values()
        ):
            return f"Session has keys {sorted(session)}"
        self.sessions.append(session)
        self.durations.append(query.get("SessionDuration", [None])[0])
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def signin_env(fake, **extra):
    env = dict(os.environ, IMSA_SIGNIN_URL=fake.url)
    env.update(extra)
    return env


def caller_arn(session, sts_server):
    client = boto3.client("sts", endpoint_url=sts_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=session["sessionId"], aws_secret_access_key=session["sessionKey"],
                          aws_session_token=session["sessionToken"])
    return client.get_caller_identity()["Arn"]


def test_print_builds_the_login_url_from_the_roles_credentials(active_service, sts_env):
    with FakeSignin() as fake:
        done = run_imsa("console", "c", "--print", env=signin_env(fake))
    assert done.returncode == 0, done.stderr
    assert not fake.problems
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    url = urllib.parse.urlsplit(lines[0])
    assert f"{url.scheme}://{url.netloc}{url.path}" == fake.url
    assert urllib.parse.parse_qs(url.query) == {
        "Action": ["login"], "Issuer": ["imsa"], "Destination": ["https://console.aws.amazon.com/"],
        "SigninToken": [SIGNIN_TOKEN],
    }
    assert len(fake.sessions) == 1 and fake.durations == [None]
    # The Session JSON carried real credentials of the profile's role.
    assert caller_arn(fake.sessions[0], sts_env).endswith(":assumed-role/role-c/tester-c")
    # The URL and the secret are on stdout only: not on stderr, not in the service's log.
    assert SIGNIN_TOKEN not in done.stderr and fake.sessions[0]["sessionKey"] not in done.stderr
    log = active_service.log()
    assert SIGNIN_TOKEN not in log and fake.sessions[0]["sessionKey"] not in log


def test_duration_destination_and_region(active_service):
    with FakeSignin() as fake:
        done = run_imsa("console", "r", "--print", "--duration", "3600", env=signin_env(fake))
        assert done.returncode == 0, done.stderr
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(done.stdout.strip()).query)
        assert query["Destination"] == ["https://console.aws.amazon.com/console/home?region=us-west-2"]
        done = run_imsa("console", "c", "--print", "--destination", "https://console.aws.amazon.com/s3/home",
                        env=signin_env(fake))
        assert done.returncode == 0, done.stderr
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(done.stdout.strip()).query)
        assert query["Destination"] == ["https://console.aws.amazon.com/s3/home"]
    assert fake.durations == ["3600", None]
    assert not fake.problems


def test_without_print_the_url_goes_to_the_browser_not_stdout(active_service, tmp_path):
    seen = tmp_path / "browser.txt"
    script = tmp_path / "browser.py"
    # webbrowser runs $BROWSER as one program with the URL as its argument.
    script.write_text(f"#!{sys.executable}\nimport sys\nopen({str(seen)!r}, 'w').write(sys.argv[1])\n")
    script.chmod(0o755)
    with FakeSignin() as fake:
        done = run_imsa("console", "c", env=signin_env(fake, BROWSER=str(script)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "opened the AWS console for c" in done.stderr and SIGNIN_TOKEN not in done.stderr
    assert f"SigninToken={SIGNIN_TOKEN}" in seen.read_text()


def test_a_bad_duration_or_destination_is_a_usage_error(active_service, sts_env):
    before = sts_env.mark()
    for args in (["--duration", "899"], ["--duration", "43201"], ["--destination", "javascript:alert(1)"]):
        line = one_error_line(run_imsa("console", "c", "--print", *args), 2)
        assert "--duration" in line or "--destination" in line
    assert sts_env.actions(before) == []


def test_a_profile_without_a_role_is_refused_before_any_sts_call(active_service, sts_env):
    before = sts_env.mark()
    line = one_error_line(run_imsa("console", "base", "--print"), 2)
    assert "role_arn" in line and "session" in line
    assert sts_env.actions(before) == []


def test_a_refusal_by_the_signin_endpoint_exits_4_without_leaking_secrets(active_service):
    with FakeSignin(status=400) as fake:
        done = run_imsa("console", "c", "--print", "--duration", "43200", env=signin_env(fake))
    line = one_error_line(done, 4)
    assert "HTTP 400" in line and "--duration" in line
    assert "sessionKey" not in line and fake.sessions and fake.sessions[0]["sessionKey"] not in line


def test_an_unreachable_signin_endpoint_exits_4(active_service):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_imsa("console", "c", "--print", env=dict(os.environ, IMSA_SIGNIN_URL=f"http://127.0.0.1:{port}/federation"))
    line = one_error_line(done, 4)
    assert "cannot reach the sign-in endpoint 127.0.0.1" in line


def test_without_the_service_console_asks_sts_directly(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    with FakeSignin() as fake:
        done = run_imsa("console", "c", "--print", "--mfa-token", MFA_CODE, env=signin_env(fake))
    assert done.returncode == 0, done.stderr
    assert "not running" in done.stderr
    assert caller_arn(fake.sessions[0], sts_env).endswith(":assumed-role/role-c/tester-c")
