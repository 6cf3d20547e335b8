"""imsa exec: the container-credentials endpoint over real sockets, its bindings, and real clients as the child."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import boto3
import pytest
from botocore.utils import ContainerMetadataFetcher

from conftest import MFA_CODE, http, run_imsa, stop_process, write_config
from conftest import control_post as conftest_control_post
from imsa.container import BindingError, BindingTable
from imsa.store import RoleSpec

AWS = os.path.join(os.path.dirname(sys.executable), "aws")
STAMP = "%Y-%m-%dT%H:%M:%SZ"

# A child that reports its environment and who its credentials (through the default chain) belong to.
DUMP = r"""
import json, os, sys
import boto3
session = boto3.Session()
creds = session.get_credentials()
keys = ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CREDENTIAL_EXPIRATION", "IMSA_PROFILE",
        "IMSA_PROFILE_EXPIRATION", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_REGION")
out = {"env": {k: os.environ.get(k) for k in keys}, "method": creds.method if creds else None}
if creds:
    out["arn"] = session.client("sts").get_caller_identity()["Arn"]
print(json.dumps(out))
"""

# A child that prints its endpoint and token, then waits for a line on stdin (or a signal) and exits with it.
WAIT = r"""
import json, os, signal, sys
def caught(signum, _frame):
    print(json.dumps({"signal": signum}), flush=True)
    sys.exit(40 + signum)
signal.signal(signal.SIGTERM, caught)
signal.signal(signal.SIGINT, caught)
print(json.dumps({"url": os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                  "token": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"], "pid": os.getpid()}), flush=True)
line = sys.stdin.readline()
sys.exit(int(line) if line.strip() else 0)
"""


def child_env(**extra):
    env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1")
    env.update(extra)
    return env


def dump(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_line(stream, timeout=30):
    """One line from a child's stdout, waiting at most *timeout* seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the child printed nothing in time"
    line = stream.readline()
    assert line, "the child closed its stdout"
    return json.loads(line)


class LiveExec:
    """``imsa exec PROFILE -- python -c WAIT`` running in its own session (no terminal), with its endpoint and token."""

    def __init__(self, profile="b", env=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imsa", "exec", profile, "--", sys.executable, "-c", WAIT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env or child_env(), start_new_session=True,
        )
        try:
            info = read_line(self.process.stdout)
        except AssertionError:
            self.stop()
            raise AssertionError("imsa exec failed: " + self.process.stderr.read())
        self.url, self.token, self.child_pid = info["url"], info["token"], info["pid"]
        host_port = self.url.split("/")[2]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.path = "/" + self.url.split("/", 3)[3]

    def get(self, token=None, path=None, **kwargs):
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = token
        return http(self.host, self.port, "GET", path or self.path, headers, **kwargs)

    def finish(self, code=0, timeout=30):
        """Let the child exit with *code*; returns imsa exec's exit status."""
        self.process.stdin.write(f"{code}\n")
        self.process.stdin.flush()
        return self.process.wait(timeout=timeout)

    def stop(self):
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()  # the child's readline ends, so it exits even when imsa exec is gone
        stop_process(self.process)
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()


@pytest.fixture
def live_exec(active_service):
    running = LiveExec()
    yield running
    running.stop()


def wait_for(predicate, timeout=10.0, step=0.05):
    """Poll *predicate* until it is true or *timeout* passes; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(step)
        value = predicate()
    return value


# --- the acceptance scenario: every delivery mode at once, one MFA session ---


def test_imds_exec_credential_process_and_console_share_one_mfa_session(isolated_env, service, sts_env, tmp_path):
    from test_console import FakeSignin

    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
    env = child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint + "/", AWS_EC2_METADATA_V1_DISABLED="true")

    # IMDS: role A for everything on the machine.
    done = subprocess.run([AWS, "sts", "get-caller-identity", "--query", "Arn", "--output", "text"], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(":assumed-role/role-a/tester-a")

    # exec: role B for one command, through the container endpoint (it wins over IMDS in the chain).
    done = run_imsa("exec", "b", "--", AWS, "sts", "get-caller-identity", "--query", "Arn", "--output", "text", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(":assumed-role/role-b/tester-b")
    got = dump(run_imsa("exec", "b", "--", sys.executable, "-c", DUMP, env=env))
    assert got["method"] == "container-role"
    assert got["arn"].endswith(":assumed-role/role-b/tester-b")

    # credential_process: role C for a profile of ~/.aws/config (botocore splits the line without a shell).
    (isolated_env / ".aws" / "config").write_text(
        f"[profile c]\ncredential_process = {sys.executable} -m imsa credential-process c\nregion = us-east-1\n"
    )
    session = boto3.Session(profile_name="c")
    assert session.get_credentials().method == "custom-process"
    assert session.client("sts").get_caller_identity()["Arn"].endswith(":assumed-role/role-c/tester-c")
    done = subprocess.run([AWS, "sts", "get-caller-identity", "--profile", "c", "--query", "Arn", "--output", "text"],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(":assumed-role/role-c/tester-c")

    # console: role D in a browser (a fake sign-in endpoint on 127.0.0.1).
    with FakeSignin() as signin:
        done = run_imsa("console", "d", "--print", env=dict(os.environ, IMSA_SIGNIN_URL=signin.url))
        assert done.returncode == 0, done.stderr
        assert signin.sessions and signin.sessions[0]["sessionId"].startswith("ASIA")

    # IMDS still serves A, and everything came from one GetSessionToken.
    done = subprocess.run([AWS, "sts", "get-caller-identity", "--query", "Arn", "--output", "text"], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.stdout.strip().endswith(":assumed-role/role-a/tester-a")
    assert sts_env.calls("GetSessionToken", before) == 1
    assert service.client.status()["bindings"] == []


# --- the endpoint's answer, as clients read it ---


def test_the_endpoint_serves_the_container_credentials_contract(live_exec, sts_env):
    status, headers, body = live_exec.get(live_exec.token)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert set(data) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn", "AccountId"}
    assert data["RoleArn"] == sts_env.roles["role-b"] and data["AccountId"] == sts_env.account
    import datetime

    expiration = datetime.datetime.strptime(data["Expiration"], STAMP).replace(tzinfo=datetime.timezone.utc)
    assert expiration - datetime.datetime.now(datetime.timezone.utc) >= datetime.timedelta(minutes=25)
    assert live_exec.url.startswith("http://127.0.0.1:") and live_exec.url.endswith("/credentials")
    assert len(live_exec.token) >= 43  # 32 random bytes, URL-safe base64

    fetched = ContainerMetadataFetcher().retrieve_full_uri(live_exec.url, headers={"Authorization": live_exec.token})
    assert fetched["AccessKeyId"] == data["AccessKeyId"]
    arn = boto3.client("sts", endpoint_url=sts_env.endpoint, region_name="us-east-1",
                       aws_access_key_id=data["AccessKeyId"], aws_secret_access_key=data["SecretAccessKey"],
                       aws_session_token=data["Token"]).get_caller_identity()["Arn"]
    assert arn.endswith(":assumed-role/role-b/tester-b")
    assert live_exec.finish(0) == 0


def test_missing_wrong_or_query_string_tokens_are_refused(live_exec):
    token = live_exec.token
    for wrong in (None, "", token[:-1], token + "x", token[:-1] + ("A" if token[-1] != "A" else "B"), "A" * len(token),
                  "Bearer " + token, token.upper() if token.upper() != token else token.lower()):
        status, headers, body = live_exec.get(wrong)
        assert status == 401, wrong
        assert headers["Content-Type"] == "application/json"
        assert set(json.loads(body)) == {"Code", "Message"}
    # In the query string, the token is refused whether or not the header also carries it.
    for path, header in ((f"{live_exec.path}?token={token}", None), (f"{live_exec.path}?token={token}", token),
                         (f"{live_exec.path}?Authorization={token}", token), (f"{live_exec.path}?x=1", token)):
        status, _, body = live_exec.get(header, path=path)
        assert status == 400, path
        assert "Authorization header" in json.loads(body)["Message"]
    assert live_exec.get(token)[0] == 200


def test_foreign_hosts_browsers_and_other_methods_are_refused(live_exec):
    token, port = live_exec.token, live_exec.port
    for host in (f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"evil.example:{port}", "169.254.170.2"):
        status, headers, _ = live_exec.get(token, host_header=host)
        assert status == 403, host
        assert headers["Content-Type"] == "application/json"
    assert live_exec.get(token, host_header=False)[0] == 403
    assert live_exec.get(token, headers={"Origin": "http://evil.example"})[0] == 403
    assert live_exec.get(token, headers={"Referer": "http://evil.example/"})[0] == 403
    assert http(live_exec.host, port, "POST", live_exec.path, {"Authorization": token})[0] == 405
    assert live_exec.get(token, path="/latest/meta-data/iam/security-credentials/")[0] == 404
    assert live_exec.get(token, path="/v2/credentials/x")[0] == 404
    assert live_exec.get(token)[0] == 200


# --- the binding's lifetime ---


def test_the_binding_ends_when_the_child_exits_and_its_status_is_imsas(live_exec, active_service):
    bindings = active_service.client.status()["bindings"]
    assert [(b["profile"], b["pid"]) for b in bindings] == [("b", live_exec.process.pid)]
    assert "token" not in json.dumps(bindings)
    shown = run_imsa("status").stdout
    assert f"exec:       {live_exec.url} (1 running: b)" in shown and live_exec.token not in shown
    assert live_exec.get(live_exec.token)[0] == 200
    assert live_exec.finish(3) == 3
    assert live_exec.get(live_exec.token)[0] == 401
    assert active_service.client.status()["bindings"] == []
    time.sleep(0.2)
    assert live_exec.token not in active_service.log()


def test_a_sigkilled_imsa_exec_leaves_no_usable_token(live_exec, active_service):
    assert live_exec.get(live_exec.token)[0] == 200
    live_exec.process.kill()  # no finally, no revoke: the service must notice the owner is gone
    live_exec.process.wait(timeout=10)
    assert live_exec.get(live_exec.token)[0] == 401  # checked on use
    assert wait_for(lambda: active_service.client.status()["bindings"] == [])


def test_the_reaper_ends_a_dead_owners_binding_without_any_request(live_exec, active_service):
    live_exec.process.kill()
    live_exec.process.wait(timeout=10)
    assert wait_for(lambda: active_service.client.status()["bindings"] == [], timeout=10)
    assert "is gone" in active_service.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_are_forwarded_to_the_child(live_exec, active_service, signum):
    live_exec.process.send_signal(signum)
    assert read_line(live_exec.process.stdout) == {"signal": signum}
    assert live_exec.process.wait(timeout=30) == 40 + signum
    assert live_exec.get(live_exec.token)[0] == 401
    assert active_service.client.status()["bindings"] == []


COUNT_SIGINTS = r"""
import os, select, signal, time
# The wakeup fd gets one byte per delivery, even when Python runs the handler once for several.
read_end, write_end = os.pipe()
os.set_blocking(write_end, False)
signal.signal(signal.SIGINT, lambda signum, _frame: None)
signal.set_wakeup_fd(write_end)
print("ready", flush=True)
select.select([read_end], [], [], 20)
time.sleep(1.0)  # a forwarded duplicate would arrive within this
print(os.read(read_end, 64).count(bytes([signal.SIGINT])), flush=True)
"""


def test_ctrl_c_in_a_terminal_reaches_the_child_once(active_service):
    import fcntl
    import termios

    master, slave = os.openpty()

    def take_terminal():  # imsa exec leads a new session whose foreground group is its own, as in a shell
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "imsa", "exec", "b", "--", sys.executable, "-c", COUNT_SIGINTS],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        preexec_fn=take_terminal, pass_fds=(slave,),
    )
    os.close(slave)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready and process.stdout.readline().strip() == "ready", process.stderr.read()
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals the whole foreground process group
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready
        assert process.stdout.readline().strip() == "1"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
        os.close(master)
    assert active_service.client.status()["bindings"] == []


def test_exit_statuses_pass_through(active_service):
    assert run_imsa("exec", "b", "--", sys.executable, "-c", "raise SystemExit(42)", env=child_env()).returncode == 42
    killed = run_imsa("exec", "b", "--", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)", env=child_env())
    assert killed.returncode == 128 + 9
    done = run_imsa("exec", "b", "--", "/nonexistent/command", env=child_env())
    assert done.returncode == 127
    assert done.stderr.strip().splitlines() == ["imsa: error: command not found: /nonexistent/command"]
    assert active_service.client.status()["bindings"] == []


# --- the child's environment ---


def test_shadowing_variables_are_removed_and_the_profile_is_named(active_service):
    env = child_env(AWS_ACCESS_KEY_ID="AKIAOUTER00000000000", AWS_SECRET_ACCESS_KEY="outer", AWS_SESSION_TOKEN="outer",
                    AWS_PROFILE="nope", AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/v2/credentials/x",
                    AWS_CREDENTIAL_EXPIRATION="2001-01-01T00:00:00Z")
    got = dump(run_imsa("exec", "r", "--", sys.executable, "-c", DUMP, env=env))
    assert got["env"]["AWS_CONTAINER_CREDENTIALS_FULL_URI"].startswith("http://127.0.0.1:")
    assert got["env"]["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CREDENTIAL_EXPIRATION", "IMSA_PROFILE_EXPIRATION"):
        assert got["env"][name] is None, name
    assert got["env"]["IMSA_PROFILE"] == "r"
    assert got["env"]["AWS_REGION"] == "us-west-2"
    assert got["method"] == "container-role"
    assert got["arn"].endswith(":assumed-role/role-d/tester-r")


def test_a_nested_exec_says_the_inner_profile_wins(active_service, sts_env):
    before = sts_env.mark()
    done = run_imsa("exec", "b", "--", sys.executable, "-m", "imsa", "exec", "c", "--", sys.executable, "-c", DUMP,
                    env=child_env())
    got = dump(done)
    assert "nested exec: c (inner) wins over b (outer)" in done.stderr
    assert got["env"]["IMSA_PROFILE"] == "c"
    assert got["arn"].endswith(":assumed-role/role-c/tester-c")
    assert sts_env.calls("GetSessionToken", before) == 0
    assert active_service.client.status()["bindings"] == []


def test_static_mode_hands_plain_variables_and_says_they_are_not_refreshed(active_service, sts_env):
    before = sts_env.mark()
    done = run_imsa("exec", "b", "--mode", "static", "--", sys.executable, "-c", DUMP, env=child_env())
    got = dump(done)
    assert "not refreshed" in done.stderr
    assert got["method"] == "env"
    assert got["env"]["AWS_CONTAINER_CREDENTIALS_FULL_URI"] is None
    assert got["env"]["AWS_CREDENTIAL_EXPIRATION"] == got["env"]["IMSA_PROFILE_EXPIRATION"]
    assert got["env"]["IMSA_PROFILE"] == "b"
    assert got["arn"].endswith(":assumed-role/role-b/tester-b")
    assert sts_env.calls("GetSessionToken", before) == 0
    # Options may also come between PROFILE and --.
    assert dump(run_imsa("exec", "--mode", "static", "b", "--", sys.executable, "-c", DUMP, env=child_env()))["method"] == "env"


def test_without_the_service_ecs_mode_exits_5_and_static_mode_still_works(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("exec", "b", "--", sys.executable, "-c", "print('ran')", env=child_env())
    assert done.returncode == 5 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mode static" in lines[0] and "imsa start" in lines[0]
    got = dump(run_imsa("exec", "b", "--mode", "static", "--mfa-token", MFA_CODE, "--", sys.executable, "-c", DUMP,
                        env=child_env()))
    assert got["arn"].endswith(":assumed-role/role-b/tester-b")


def test_usage_errors_exit_2(active_service):
    for args in (["exec", "b"], ["exec", "b", "--"], ["exec", "b", "--mode", "static", "echo"]):
        done = run_imsa(*args, env=child_env())
        assert done.returncode == 2, (args, done.stderr)


# --- the control routes ---


def control_post(service, route, body):
    status, answer = conftest_control_post(service.socket, route, body)
    return status, json.loads(answer)


def test_binding_routes_validate_and_tie_the_binding_to_the_callers_pid(active_service, sts_env):
    spec = {"profile": "b", "fingerprint": "0" * 32, "role_arn": sts_env.roles["role-b"], "role_session_name": "t-b"}
    status, body = control_post(active_service, "/bindings", spec)
    assert status == 502 and "imsa assume b" in body["error"]  # no session for that fingerprint
    assert control_post(active_service, "/bindings", {"profile": "b"})[0] == 400
    assert control_post(active_service, "/bindings", dict(spec, pid=1))[0] == 400  # the pid is never taken from the body
    assert control_post(active_service, "/bindings/revoke", {"id": "nope"})[0] == 404
    assert control_post(active_service, "/bindings/revoke", {})[0] == 400
    status = active_service.client.status()
    assert status["exec_endpoint"].startswith("http://127.0.0.1:") and status["bindings"] == []

    # A binding made by this (short-lived) connection's process: ours, the test process, so it stays.
    from imsa import config

    good = config.load().get("b").role_spec()
    status, body = control_post(active_service, "/bindings", good)
    assert status == 200 and set(body) >= {"id", "token", "url", "expiration"}
    assert [b["pid"] for b in active_service.client.status()["bindings"]] == [os.getpid()]
    assert control_post(active_service, "/bindings/revoke", {"id": body["id"]}) == (200, {"revoked": body["id"]})
    assert active_service.client.status()["bindings"] == []


# --- the binding table on its own ---


class FakeStore:
    def __init__(self):
        self.pins = {}

    def pin(self, spec):
        self.pins[spec] = self.pins.get(spec, 0) + 1

    def unpin(self, spec):
        self.pins[spec] -= 1
        if not self.pins[spec]:
            del self.pins[spec]


SPEC = RoleSpec(profile="b", fingerprint="f" * 32, role_arn="arn:aws:iam::123456789012:role/role-b")


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    stop_process(process)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "kill0"])
def test_a_binding_lives_as_long_as_its_owner_and_pins_meanwhile(sleeper, monkeypatch, pidfd):
    if not pidfd:
        monkeypatch.setattr("imsa.container._open_pidfd", lambda pid: None)
    store = FakeStore()
    table = BindingTable(store)
    binding_id, token = table.create(SPEC, sleeper.pid)
    assert store.pins == {SPEC: 1}
    assert table.lookup(token).id == binding_id
    assert table.lookup(token + "x") is None and table.lookup("") is None and table.lookup(None) is None
    assert table.reap() == 0
    sleeper.kill()
    sleeper.wait()
    assert table.lookup(token) is None
    assert len(table) == 0 and store.pins == {}
    assert table.revoke(binding_id) is False


def test_the_table_is_bounded_and_only_the_digest_is_kept(sleeper):
    store = FakeStore()
    table = BindingTable(store, limit=2)
    tokens = [table.create(SPEC, sleeper.pid)[1] for _ in range(2)]
    with pytest.raises(BindingError, match="too many"):
        table.create(SPEC, sleeper.pid)
    assert store.pins == {SPEC: 2}
    assert len(set(tokens)) == 2
    for binding in table._bindings.values():
        kept = [getattr(binding, name) for name in binding.__slots__]
        assert not any(token in kept or token.encode() in kept for token in tokens)
        assert len(binding.digest) == 32
    with pytest.raises(BindingError):
        table.create(SPEC, 0)


def test_the_reaper_thread_ends_bindings_of_dead_owners(sleeper):
    store = FakeStore()
    table = BindingTable(store, reap_every=0.05)
    table.start()
    try:
        table.create(SPEC, sleeper.pid)
        sleeper.kill()
        sleeper.wait()
        assert wait_for(lambda: len(table) == 0, timeout=5)
        assert store.pins == {}
    finally:
        table.stop()


# --- a peer outside loopback (needs a network namespace) ---


def test_peers_outside_loopback_are_refused_by_the_exec_endpoint(isolated_env):
    from test_netns import _can_unshare, run_scenario

    if not _can_unshare():
        pytest.skip("needs root, unshare(1) and ip(8) to make a network namespace")
    results = run_scenario("exec_peer_filter")
    status, body = results["outsider"]
    assert status == 403 and "peer" in body
    assert results["loopback"][0] == 401  # past the peer filter: only the token is missing
