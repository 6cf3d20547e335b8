"""`imsa start` in the background, `stop`, `status` warnings, and shell completion."""

import json
import os
import subprocess
import sys

import pytest

from conftest import MFA_CODE, one_error_line, run_imsa, service_user_args, write_config
from ptyshell import shell_user  # noqa: F401  (a fixture)
from imsa.commands.common import endpoint_address, endpoint_warnings, shadowing_warnings


def test_background_start_returns_once_serving_and_prints_the_endpoint(isolated_env, sts_env):
    done = run_imsa("start", "--listen", "127.0.0.1:0", *service_user_args())
    assert done.returncode == 0, done.stderr
    try:
        assert done.stdout.startswith("export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:")
        assert done.stdout.strip().endswith("/")
        assert "serving on 127.0.0.1:" in done.stderr
        status = run_imsa("status", "--json")
        data = json.loads(status.stdout)
        assert status.returncode == 1 and data["active"] is None
        write_config(isolated_env, sts_env)
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
        assert run_imsa("status").returncode == 0
        again = run_imsa("start", "--listen", "127.0.0.1:0", *service_user_args())
        if os.geteuid() == 0:  # root never asks the user's socket: the service it starts finds the running one
            line = one_error_line(again, 1)
            assert "already running" in line and "imsa status" in line and "without sudo" in line
        else:
            assert again.returncode == 0 and again.stdout == done.stdout, again.stderr
    finally:
        stopped = run_imsa("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert run_imsa("status").returncode == 5


def test_start_reports_why_the_service_failed(isolated_env):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = run_imsa("start", "--listen", f"127.0.0.1:{port}", *service_user_args())
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert "failed to start" in done.stderr and "already in use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_listen_values_are_usage_errors(isolated_env):
    for value in ("nowhere", "localhost:80", "127.0.0.1:99999", "127.0.0.1"):
        done = run_imsa("start", "--foreground", "--listen", value)
        assert done.returncode == 2, value
        assert "--listen" in done.stderr


def test_port_80_as_a_user_fails_clearly(isolated_env):
    argv = [sys.executable, "-m", "imsa", "start", "--foreground", "--listen", "127.0.0.1:80"]
    if os.geteuid() == 0:  # become an ordinary user first
        argv = ["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    assert done.returncode == 1, done.stderr
    assert "permission denied" in done.stderr and "sudo imsa start" in done.stderr and "--listen 127.0.0.1:PORT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the root path")
def test_root_without_a_target_user_refuses(isolated_env, monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    done = run_imsa("start", "--foreground", "--listen", "127.0.0.1:0")
    assert done.returncode == 2
    assert "refusing to serve credentials as root" in done.stderr


def test_status_warns_about_what_would_shadow_imds(tmp_path):
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = AKIAEXAMPLE\n")
    env = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_PROFILE": "x", "HTTP_PROXY": "http://proxy:3128"}
    warnings = "\n".join(shadowing_warnings(env, home=str(tmp_path)))
    for word in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "[default]", "NO_PROXY=169.254.169.254"):
        assert word in warnings
    assert shadowing_warnings({"HTTP_PROXY": "http://p", "NO_PROXY": "localhost,169.254.169.254"}, home=str(tmp_path / "none")) == []


def test_status_prints_the_warnings_on_stderr(isolated_env, service, sts_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "other")
    done = run_imsa("status")
    assert "warning: AWS_PROFILE is set" in done.stderr
    assert "AWS_PROFILE" not in done.stdout


def test_completion_lists_profile_names(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE="imsa assume ", COMP_POINT="12",
               _ARGCOMPLETE_SUPPRESS_SPACE="0")
    read, write = os.pipe()
    saved = os.dup(8) if _fd_open(8) else None
    os.dup2(write, 8)  # argcomplete writes completions to fd 8
    try:
        done = subprocess.run([sys.executable, "-m", "imsa"], env=env, pass_fds=(8,), capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
        if saved is None:
            os.close(8)
        else:
            os.dup2(saved, 8)
            os.close(saved)
    with os.fdopen(read) as handle:
        names = handle.read().split("\n")
    assert done.returncode == 0
    assert sorted(name for name in names if not name.startswith("-")) == ["a", "b", "base", "c", "d"]


def _fd_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- development mode ---


def test_start_again_prints_the_export_line_for_a_new_shell(shell_user):
    # As the user (not root): the CLI asks its own, verified, service before starting another.
    first = shell_user.imsa("start", "--listen", "127.0.0.1:0")
    assert first.returncode == 0, first.stderr
    port = first.stdout.strip().rsplit(":", 1)[1].rstrip("/")
    for listen in ("127.0.0.1:0", f"127.0.0.1:{port}"):
        again = shell_user.imsa("start", "--listen", listen)
        assert again.returncode == 0, again.stderr
        assert again.stdout == first.stdout  # eval "$(imsa start --listen ...)" works in every new shell
        assert "already running on 127.0.0.1:" in again.stderr
    evaluated = shell_user.run(["bash", "--norc", "-c", f'eval "$({shell_user.env["PATH"].split(":")[0]}/imsa start '
                                f'--listen 127.0.0.1:0)"; echo "$AWS_EC2_METADATA_SERVICE_ENDPOINT"'])
    assert evaluated.stdout == first.stdout.split("=", 1)[1]


@pytest.mark.parametrize("asked, words", [("127.0.0.1:1", "not as asked"), ("::1:0", "not as asked"),
                                          ("169.254.169.254:80", "not as asked")])
def test_start_again_elsewhere_says_where_it_runs(shell_user, asked, words):
    assert shell_user.imsa("start", "--listen", "127.0.0.1:0").returncode == 0
    line = one_error_line(shell_user.imsa("start", "--listen", asked), 1)
    assert words in line and "already running on 127.0.0.1:" in line and "imsa stop" in line


def test_start_again_with_other_token_rules_says_so(shell_user):
    assert shell_user.imsa("start", "--listen", "127.0.0.1:0").returncode == 0
    line = one_error_line(shell_user.imsa("start", "--listen", "127.0.0.1:0", "--allow-imdsv1"), 1)
    assert "tokens required" in line and "not as asked" in line


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "169.254.1.1:80", "192.168.1.10:80"])
def test_listen_on_an_address_other_machines_reach_is_refused(isolated_env, listen):
    done = run_imsa("start", "--listen", listen, *service_user_args())
    line = one_error_line(done, 2)
    assert "loopback" in line and "would serve other machines" in line


def test_status_warns_when_the_endpoint_variable_is_missing_or_points_elsewhere(isolated_env, service, monkeypatch):
    right = service.endpoint + "/"
    done = run_imsa("status")
    assert "AWS_EC2_METADATA_SERVICE_ENDPOINT is not set" in done.stderr and f"export AWS_EC2_METADATA_SERVICE_ENDPOINT={right}" in done.stderr
    for wrong in (f"http://127.0.0.1:{service.port + 1}/", f"http://localhost:{service.port}/", "http://169.254.169.254"):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", wrong)
        done = run_imsa("status")
        assert f"={wrong} is not where the service listens" in done.stderr, done.stderr
        assert json.loads(run_imsa("status", "--json").stdout)["warnings"], wrong
    for same in (right, service.endpoint, f"http://127.0.0.1:{service.port}"):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", same)
        done = run_imsa("status")
        assert "AWS_EC2_METADATA_SERVICE_ENDPOINT" not in done.stderr, (same, done.stderr)


def test_endpoint_warnings_for_the_metadata_address():
    running = {"listen": "169.254.169.254:80", "endpoint": "http://169.254.169.254:80/"}
    assert endpoint_warnings(running, {}) == []
    assert endpoint_warnings(running, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://169.254.169.254/"}) == []
    stale = endpoint_warnings(running, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8080/"})
    assert len(stale) == 1 and "unset AWS_EC2_METADATA_SERVICE_ENDPOINT" in stale[0]
    assert endpoint_address("http://[::1]:8080/") == ("::1", "8080")
    assert endpoint_address("http://[fd00:ec2::254]") == ("fd00:ec2::254", "80")


def test_proxy_warning_covers_the_development_address(tmp_path):
    listen = "127.0.0.1:8080"
    env = {"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "169.254.169.254"}
    warnings = shadowing_warnings(env, home=str(tmp_path), listen=listen)
    assert warnings == ["HTTP_PROXY is set without NO_PROXY=127.0.0.1: IMDS requests would go to the proxy"]
    for no_proxy in ("127.0.0.1", "localhost, 127.0.0.1", "127.0.0.1:8080", "*", ".0.0.1"):
        assert shadowing_warnings({"http_proxy": "http://p", "no_proxy": no_proxy}, home=str(tmp_path), listen=listen) == []
    assert shadowing_warnings({"HTTP_PROXY": "http://p", "NO_PROXY": "27.0.0.1"}, home=str(tmp_path), listen=listen)


class _RecordingProxy:
    """An HTTP proxy on 127.0.0.1 that records the request line it is sent and answers 502 (it forwards nothing)."""

    def __init__(self):
        import http.server
        import threading

        self.lines = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                proxy.lines.append(self.requestline)
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = _refuse

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("no_proxy, proxied", [(None, True), ("127.0.0.1", False)])
def test_the_proxy_warning_is_right_about_what_sdks_do_on_the_development_address(isolated_env, active_service,
                                                                                   monkeypatch, no_proxy, proxied):
    # What botocore itself does with IMDS requests to the service on 127.0.0.1, next to what imsa status says.
    proxy = _RecordingProxy()
    try:
        env = dict(os.environ, HTTP_PROXY=proxy.url, AWS_EC2_METADATA_SERVICE_ENDPOINT=active_service.endpoint + "/")
        if no_proxy:
            env["NO_PROXY"] = no_proxy
        # The endpoint is given to the fetcher itself: it never falls back to 169.254.169.254.
        fetch = ("import sys, botocore.utils; f = botocore.utils.InstanceMetadataFetcher(timeout=2, num_attempts=1, "
                 "config={'ec2_metadata_service_endpoint': sys.argv[1]}); print(bool(f.retrieve_iam_role_credentials()))")
        done = subprocess.run([sys.executable, "-c", fetch, active_service.endpoint + "/"], capture_output=True,
                              text=True, env=env, timeout=60)
        status = run_imsa("status", env=env)
    finally:
        proxy.close()
    assert done.stdout.strip() == str(not proxied), done.stderr
    assert bool(proxy.lines) == proxied, proxy.lines
    assert ("NO_PROXY=127.0.0.1" in status.stderr) == proxied, status.stderr
