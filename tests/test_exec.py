"""imsa exec: its container-credentials endpoint over real sockets, the service's bindings, and real clients as the
child."""

import datetime
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import boto3
import pytest
from botocore.utils import ContainerMetadataFetcher, MetadataRetrievalError

from conftest import MFA_CODE, http, run_imsa, stop_process, write_config
from conftest import control_post as conftest_control_post
from imsa.server import container
from imsa.credentials import Credentials, utcnow
from imsa.server.execs import BindingError, BindingTable
from imsa.server.store import RoleSpec

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another uid needs root")
# A uid that is neither this suite's, nor the service's ('nobody' when the suite runs as root: conftest).
OTHER_UID = 65533

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

# A child that prints its endpoint and token, then reads lines on stdin: "fetch" GETs its credentials as an SDK
# does and prints the answer, "sdk" loads them with botocore's ContainerProvider, a number (or EOF) ends it.
WAIT = r"""
import json, os, signal, sys
def caught(signum, _frame):
    print(json.dumps({"signal": signum}), flush=True)
    sys.exit(40 + signum)
signal.signal(signal.SIGTERM, caught)
signal.signal(signal.SIGINT, caught)
url, token = os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"], os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
print(json.dumps({"url": url, "token": token, "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    if line.strip() == "fetch":
        import http.client
        connection = http.client.HTTPConnection(url.split("/")[2], timeout=3)
        try:
            connection.request("GET", "/" + url.split("/", 3)[3], headers={"Authorization": token})
            answer = connection.getresponse()
            print(json.dumps({"status": answer.status, "body": answer.read().decode()}), flush=True)
        except OSError as error:
            print(json.dumps({"error": type(error).__name__}), flush=True)
        finally:
            connection.close()
    elif line.strip() == "sdk":
        from botocore.credentials import ContainerProvider
        from botocore.utils import ContainerMetadataFetcher
        ContainerMetadataFetcher.RETRY_ATTEMPTS = 1
        try:
            creds = ContainerProvider().load()
            print(json.dumps({"access_key": creds.access_key if creds else None}), flush=True)
        except Exception as error:
            print(json.dumps({"error": type(error).__name__, "message": str(error)}), flush=True)
    else:
        sys.exit(int(line) if line.strip() else 0)
sys.exit(0)
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

    def __init__(self, profile="b", env=None, verbose=False):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imsa", *(["--verbose"] if verbose else []), "exec", profile, "--", sys.executable,
             "-c", WAIT],
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

    def child(self, request):
        """Ask the child to "fetch" or "sdk" (see WAIT); its answer."""
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return read_line(self.process.stdout)

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


def refused(host, port):
    """True when nothing listens on host:port any more."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


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


# --- the endpoint's lifetime: the command's ---


def test_the_binding_ends_when_the_child_exits_and_its_status_is_imsas(live_exec, active_service):
    bindings = active_service.client.status()["bindings"]
    assert [(b["profile"], b["pid"]) for b in bindings] == [("b", live_exec.process.pid)]
    assert "token" not in json.dumps(bindings)
    shown = run_imsa("status").stdout
    assert "exec:       1 running: b" in shown and live_exec.token not in shown
    assert live_exec.get(live_exec.token)[0] == 200
    assert live_exec.finish(3) == 3
    # The port closed with the command: the endpoint, the token and the binding are gone together.
    assert refused(live_exec.host, live_exec.port)
    assert active_service.client.status()["bindings"] == []
    time.sleep(0.2)
    assert live_exec.token not in active_service.log()


def squat(port):
    """As another uid, try to bind 127.0.0.1:*port* (plain, SO_REUSEADDR, SO_REUSEPORT) and 0.0.0.0:*port*;
    the errno name of each attempt, or "bound"."""
    script = (
        "import errno, json, socket, sys\n"
        "port, results = int(sys.argv[1]), {}\n"
        "for name, host, option in (('plain', '127.0.0.1', None), ('reuseaddr', '127.0.0.1', socket.SO_REUSEADDR),\n"
        "                           ('reuseport', '127.0.0.1', socket.SO_REUSEPORT),\n"
        "                           ('any', '0.0.0.0', socket.SO_REUSEADDR)):\n"
        "    sock = socket.socket()\n"
        "    try:\n"
        "        if option: sock.setsockopt(socket.SOL_SOCKET, option, 1)\n"
        "        sock.bind((host, port)); sock.listen(); results[name] = 'bound'\n"
        "    except OSError as error:\n"
        "        results[name] = errno.errorcode.get(error.errno, str(error.errno))\n"
        "    finally:\n"
        "        sock.close()\n"
        "print(json.dumps(results))\n"
    )
    done = as_uid(OTHER_UID, [sys.executable, "-I", "-c", script, str(port)])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_uid(uid, argv):
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)


NOT_BINDABLE = {"plain": "EADDRINUSE", "reuseaddr": "EADDRINUSE", "reuseport": "EADDRINUSE", "any": "EADDRINUSE"}


def listener_held_by(port, pid):
    """True when process *pid* holds the socket listening on 127.0.0.1:*port* (/proc/net/tcp, /proc/PID/fd).

    The squat attempts alone could pass for another reason: a connection the endpoint closed leaves its port in
    TIME_WAIT for a minute, which blocks other binds too; a LISTEN socket in the command's hands is the rule itself.
    """
    local = f"{int.from_bytes(socket.inet_aton('127.0.0.1'), sys.byteorder):08X}:{port:04X}"
    with open("/proc/net/tcp") as handle:
        inodes = {fields[9] for fields in (line.split() for line in list(handle)[1:])
                  if fields[1] == local and fields[3] == "0A"}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return any(f"socket:[{inode}]" in held for inode in inodes)


def stop_the_service(service):
    done = run_imsa("stop")
    assert done.returncode == 0, done.stderr
    service.process.wait(timeout=30)


@needs_root
def test_regression_after_imsa_stop_another_user_could_take_the_commands_endpoint(active_service):
    # The endpoint was the service's: after `imsa stop` (or a restart on another port) its port was free, another
    # user bound it, and a command still running took that user's credentials and sent it its token. Now the port
    # is the command's own: it stays bound as long as the command lives, and answers 503 with no service.
    running = LiveExec()
    try:
        assert running.child("fetch")["status"] == 200
        assert listener_held_by(running.port, running.child_pid)
        stop_the_service(active_service)
        assert listener_held_by(running.port, running.child_pid)
        assert squat(running.port) == NOT_BINDABLE
        answer = running.child("fetch")
        assert answer["status"] == 503, answer
        body = json.loads(answer["body"])
        assert body["Code"] == "CredentialsUnavailable" and "imsa start" in body["Message"]
        assert "AccessKeyId" not in answer["body"]
        sdk = running.child("sdk")
        assert sdk.get("access_key") is None and "503" in sdk["message"], sdk
        assert running.finish(0) == 0
    finally:
        running.stop()


@needs_root
def test_regression_a_sigkilled_imsa_exec_leaves_its_port_to_no_one(active_service):
    running = LiveExec()
    try:
        assert running.child("fetch")["status"] == 200
        running.process.kill()  # no finally, no revoke: the command lives on, with its URL and token
        running.process.wait(timeout=10)
        assert listener_held_by(running.port, running.child_pid)
        assert squat(running.port) == NOT_BINDABLE
        # Nobody answers on the port any more; above all, nothing hands out credentials there.
        assert running.child("fetch") == {"error": "TimeoutError"}
        assert wait_for(lambda: active_service.client.status()["bindings"] == [])  # the service saw it go
        stop_the_service(active_service)
        assert listener_held_by(running.port, running.child_pid)  # the service's end changes nothing
        assert squat(running.port) == NOT_BINDABLE
        assert running.child("fetch") == {"error": "TimeoutError"}
        assert running.child("sdk").get("access_key") is None
    finally:
        running.stop()


@needs_root
def test_regression_another_users_process_with_the_token_is_refused(live_exec):
    # The endpoint checked only the token; any local user that learnt it (from a log, a core dump, a shared
    # terminal) read the command's credentials. Now the peer must also be this user's process, as for IMDS.
    with open(f"/proc/{live_exec.child_pid}/environ", "rb") as handle:
        environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    token = environ[b"AWS_CONTAINER_AUTHORIZATION_TOKEN"].decode()
    assert token == live_exec.token
    script = (
        "import http.client, json, sys\n"
        "host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
        "connection = http.client.HTTPConnection(host, port, timeout=10)\n"
        "connection.request('GET', '/credentials', headers={'Authorization': token})\n"
        "answer = connection.getresponse()\n"
        "print(json.dumps([answer.status, answer.read().decode()]))\n"
    )
    done = as_uid(OTHER_UID, [sys.executable, "-I", "-c", script, live_exec.host, str(live_exec.port), token])
    assert done.returncode == 0, done.stderr
    status, body = json.loads(done.stdout)
    assert status == 403 and f"another user's process (uid {OTHER_UID})" in body, (status, body)
    assert "AccessKeyId" not in body and "SecretAccessKey" not in body
    assert live_exec.get(token)[0] == 200  # the same request from the command's user
    assert live_exec.finish(0) == 0


def test_a_sigkilled_imsa_exec_hands_out_nothing_and_its_binding_is_reaped(live_exec, active_service):
    assert live_exec.get(live_exec.token)[0] == 200
    live_exec.process.kill()  # no finally, no revoke: the service must notice the owner is gone
    live_exec.process.wait(timeout=10)
    with pytest.raises(socket.timeout):  # the command keeps the port; nobody answers on it
        live_exec.get(live_exec.token, timeout=2)
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
    assert refused(live_exec.host, live_exec.port)
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


# Every variable imsa exec takes out of the command's environment (or replaces): each would make an SDK use other
# credentials than imsa's. Written out here, not imported, so that dropping one from the code fails this test.
REMOVED = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "IMSA_PROFILE_EXPIRATION",
}
# Look-alikes that must pass through untouched.
KEPT = {"AWS_DEFAULT_OUTPUT", "AWS_PAGER", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_SDK_LOAD_CONFIG", "IMSA_NOTE"}

ENV_DUMP = "import json, os; print(json.dumps(dict(os.environ)))"


@pytest.mark.parametrize("mode", ["ecs", "static"])
def test_exactly_the_shadowing_variables_are_removed_or_replaced(active_service, mode):
    env = child_env(**{name: f"outer-{name.lower()}" for name in REMOVED | KEPT})
    done = run_imsa("exec", "b", "--mode", mode, "--", sys.executable, "-c", ENV_DUMP, env=env)
    assert done.returncode == 0, done.stderr
    inner = json.loads(done.stdout)
    ours = {name for name in env if name.startswith(("AWS_", "IMSA_"))}
    assert {name for name in ours if inner.get(name) != env[name]} == REMOVED
    assert {name for name in inner if name.startswith(("AWS_", "IMSA_"))} - ours == {"IMSA_PROFILE"}
    if mode == "ecs":
        assert set(inner) & REMOVED == {"AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN"}
    else:
        assert set(inner) & REMOVED == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                        "AWS_CREDENTIAL_EXPIRATION", "IMSA_PROFILE_EXPIRATION"}


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
    # Without a command imsa exec starts $SHELL (tests/test_shell.py); a command after options needs its --.
    for args in (["exec", "b", "--mode", "static", "echo"], ["exec", "b", "--mode", "nope", "--", "true"]):
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
    assert "exec_endpoint" not in status and status["bindings"] == []

    # A binding made by this (short-lived) connection's process: ours, the test process, so it stays.
    from imsa import config

    good = config.load().get("b").role_spec()
    status, body = control_post(active_service, "/bindings", good)
    assert status == 200 and set(body) == {"id", "profile", "role_arn", "expiration"}  # no token, no URL
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
        monkeypatch.setattr("imsa.server.execs._open_pidfd", lambda pid: None)
    store = FakeStore()
    table = BindingTable(store)
    binding_id = table.create(SPEC, sleeper.pid)
    assert store.pins == {SPEC: 1}
    assert [(b["id"], b["pid"]) for b in table.status()] == [(binding_id, sleeper.pid)]
    assert table.reap() == 0
    sleeper.kill()
    sleeper.wait()
    assert table.reap() == 1
    assert len(table) == 0 and store.pins == {}
    assert table.revoke(binding_id) is False


def test_the_table_is_bounded_and_needs_a_real_pid(sleeper):
    store = FakeStore()
    table = BindingTable(store, limit=2)
    ids = [table.create(SPEC, sleeper.pid) for _ in range(2)]
    with pytest.raises(BindingError, match="too many"):
        table.create(SPEC, sleeper.pid)
    assert store.pins == {SPEC: 2} and len(set(ids)) == 2
    assert table.revoke(ids[0]) is True and store.pins == {SPEC: 1}
    for pid in (0, -1, None):
        with pytest.raises(BindingError):
            table.create(SPEC, pid)


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


# --- the endpoint on its own, in this process (real sockets, a stand-in for the service) ---


ROLE_ARN = "arn:aws:iam::123456789012:role/role-b"


def creds_until(expiration):
    return Credentials("ASIAENDPOINTTEST0001", "endpoint-secret", "endpoint-token", expiration)


class FakeClient:
    """The control-socket client as ServiceCredentials uses it, answering what the test sets."""

    def __init__(self, answer):
        self.answer = answer
        self.bindings = []

    def create_binding(self, spec):
        self.bindings.append(spec["profile"])
        return {"id": f"binding-{len(self.bindings)}"}

    def revoke_binding(self, binding_id):
        return {"revoked": binding_id}

    def credentials(self, spec, **_delivery):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer.to_json()


@pytest.fixture
def endpoint_of():
    """endpoint_of(client): a serving container.Endpoint whose credentials come from *client* (ServiceCredentials)."""
    from imsa.commands.exec import ServiceCredentials

    started = []

    def make(client):
        endpoint = container.Endpoint(ServiceCredentials(client, {"profile": "b", "role_arn": ROLE_ARN}), "b",
                                      role_arn=ROLE_ARN)
        endpoint.start()
        started.append(endpoint)
        return endpoint

    yield make
    for endpoint in started:
        endpoint.close()


def get(endpoint, token=None, **kwargs):
    headers = {"Authorization": endpoint.token if token is None else token}
    return http(container.EXEC_HOST, endpoint.port, "GET", "/credentials", headers, **kwargs)


def test_the_endpoint_never_serves_expired_credentials(endpoint_of):
    # The service answers with credentials that have expired (a clock or a bug on its side): 503, never the keys.
    client = FakeClient(creds_until(utcnow() - datetime.timedelta(seconds=1)))
    endpoint = endpoint_of(client)
    status, headers, body = get(endpoint)
    assert status == 503 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert answer["Code"] == "CredentialsUnavailable" and "imsa assume b" in answer["Message"]
    assert b"endpoint-secret" not in body and b"ASIAENDPOINTTEST0001" not in body
    with pytest.raises(MetadataRetrievalError):
        ContainerMetadataFetcher(sleep=lambda _seconds: None).retrieve_full_uri(
            endpoint.url, headers={"Authorization": endpoint.token})
    # The same endpoint serves credentials that are valid.
    client.answer = creds_until(utcnow() + datetime.timedelta(hours=1))
    fetched = ContainerMetadataFetcher().retrieve_full_uri(endpoint.url, headers={"Authorization": endpoint.token})
    assert fetched["AccessKeyId"] == "ASIAENDPOINTTEST0001" and fetched["RoleArn"] == ROLE_ARN


def test_no_service_or_no_session_is_a_503_naming_the_command_to_run(endpoint_of):
    from imsa.errors import ServiceNotRunning, StsError

    client = FakeClient(ServiceNotRunning("the imsa service is not running"))
    endpoint = endpoint_of(client)
    status, _, body = get(endpoint)
    assert status == 503 and "run: imsa start, then imsa assume b" in json.loads(body)["Message"]
    # A service that answers again (here: without a session) gets a new binding, so that it keeps the role rotated
    # and shows the exec again: the one before it stopped knew of the exec, a new one does not.
    client.answer = StsError("no valid MFA session for profile 'b'; run: imsa assume b")
    status, _, body = get(endpoint)
    assert status == 503 and json.loads(body)["Message"] == "no valid MFA session for profile 'b'; run: imsa assume b"
    assert client.bindings == ["b", "b"]
    client.answer = creds_until(utcnow() + datetime.timedelta(hours=1))
    assert get(endpoint)[0] == 200
    assert client.bindings == ["b", "b"]


@pytest.mark.parametrize("lookup", ["unknown", "crash", "stranger"])
def test_a_peer_whose_user_is_unknown_or_not_ours_is_refused(endpoint_of, monkeypatch, lookup):
    endpoint = endpoint_of(FakeClient(creds_until(utcnow() + datetime.timedelta(hours=1))))
    assert get(endpoint)[0] == 200

    def tcp_peer_uid(_sock):
        if lookup == "crash":
            raise RuntimeError("netlink answered nonsense")
        return None if lookup == "unknown" else os.geteuid() + 1

    monkeypatch.setattr(container, "tcp_peer_uid", tcp_peer_uid)
    status, _, body = get(endpoint)
    assert status == 403 and b"SecretAccessKey" not in body
    assert get(endpoint)[0] == 403  # and the endpoint still serves (refuses) after a failed lookup


def test_malformed_requests_are_refused_in_json(endpoint_of):
    endpoint = endpoint_of(FakeClient(creds_until(utcnow() + datetime.timedelta(hours=1))))
    host = f"127.0.0.1:{endpoint.port}"

    def raw(data, timeout=10):
        with socket.create_connection((container.EXEC_HOST, endpoint.port), timeout=timeout) as sock:
            sock.sendall(data)
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer
                answer += chunk

    auth = f"Authorization: {endpoint.token}\r\n".encode()
    good = b"GET /credentials HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + auth + b"\r\n"
    assert raw(good).startswith(b"HTTP/1.1 200 ")
    for bad, status in (
        (b"GET /credentials\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /credentials HTTP/2.0\r\nHost: " + host.encode() + b"\r\n" + auth + b"\r\n", 400),
        (good.replace(b"Host:", b"Host :"), 400),
        (good.replace(b"\r\nHost:", b"\r\n Host:"), 400),
        (good.replace(auth, auth + b"Host: " + host.encode() + b"\r\n"), 403),  # two Host headers
        (good.replace(auth, auth + auth), 401),  # two tokens
        (b"GET /credentials HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (good.replace(b"\r\n\r\n", b"\r\n" + b"X: y\r\n" * 101 + b"\r\n"), 431),
    ):
        answer = raw(bad)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (bad[:80], answer[:80])
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head and set(json.loads(body)) == {"Code", "Message"}
        assert b"endpoint-secret" not in body


def test_a_silent_client_is_cut_at_the_deadline_and_does_not_block_others(endpoint_of, monkeypatch):
    monkeypatch.setattr(container, "REQUEST_DEADLINE", 1)
    endpoint = endpoint_of(FakeClient(creds_until(utcnow() + datetime.timedelta(hours=1))))
    silent = socket.create_connection((container.EXEC_HOST, endpoint.port), timeout=30)
    try:
        assert get(endpoint)[0] == 200  # answered while the silent one waits
        silent.sendall(b"GET /credentials HTTP/1.1\r\n")  # never finished
        answer = silent.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        silent.close()


def test_refusals_are_logged_escaped_and_cut_and_never_with_the_token(active_service):
    running = LiveExec(verbose=True)
    try:
        token = running.token
        assert running.get(token, path=f"/credentials?token={token}")[0] == 400
        assert running.get(token, path="/a\rimsa:forged\x1b[31m")[0] == 404
        assert running.get(token, path="/" + "a" * 5000)[0] == 404
        assert running.get(token, path="/" + token)[0] == 404
        assert running.get(token + "x")[0] == 401
        assert running.finish(0) == 0
        log = running.process.stderr.read()
    finally:
        running.stop()
    refusals = [line for line in log.splitlines() if "exec endpoint refused" in line]
    assert len(refusals) == 5, log
    assert token not in log
    assert "'/a\\rimsa:forged\\x1b[31m'" in log and "\x1b" not in log and "\r" not in log
    assert all(len(line) < 400 for line in log.splitlines())


# --- a peer outside loopback (needs a network namespace) ---


def test_peers_outside_loopback_are_refused_by_the_exec_endpoint(isolated_env):
    from test_netns import _can_unshare, run_scenario

    if not _can_unshare():
        pytest.skip("needs root, unshare(1) and ip(8) to make a network namespace")
    results = run_scenario("exec_peer_filter")
    status, body, has_secret = results["outsider"]
    assert status == 403 and "peer" in body and not has_secret  # even with the command's token
    assert results["loopback"][0] == 200 and results["loopback"][2]  # the same request from 127.0.0.1
