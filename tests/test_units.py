"""The systemd units: they verify, they are hardened as documented, and socket activation really works."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import http, service_user_args, stop_process
from imsa.client import Client
from imsa.errors import ServiceNotRunning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMSA = os.path.join(os.path.dirname(sys.executable), "imsa")


def install(tmp_path, user="nobody"):
    env = dict(os.environ, UNIT_DIR=str(tmp_path))
    done = subprocess.run([os.path.join(ROOT, "scripts", "install-service.sh"), user, IMSA], capture_output=True,
                          text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = install(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", str(units / "imsa.socket"), str(units / "imsa.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    problems = [line for line in done.stderr.splitlines() if "Special user nobody" not in line and line.strip()]
    assert problems == []


def test_installed_units_run_the_user_with_no_capabilities(tmp_path):
    units = install(tmp_path)
    service = (units / "imsa.service").read_text()
    assert f"ExecStart={IMSA} start --foreground" in service
    for directive in ("CapabilityBoundingSet=\n", "AmbientCapabilities=\n", "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "ProtectHome=read-only", "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK\n",
                      "LockPersonality=yes", "MemoryDenyWriteExecute=yes", "Restart=on-failure", "RuntimeDirectory=imsa",
                      "Environment=IMSA_CONTROL_SOCKET=/run/imsa/control.sock"):
        assert directive in service, directive
    assert (units / "imsa.service.d" / "user.conf").read_text() == "[Service]\nUser=nobody\nGroup=nogroup\n"
    sock = (units / "imsa.socket").read_text()
    assert "ListenStream=169.254.169.254:80" in sock
    assert "\nBindToDevice=lo\n" in sock
    assert "ip address add 169.254.169.254/32 dev lo" in sock and "ip address del 169.254.169.254/32 dev lo" in sock
    assert not [line for line in sock.splitlines() if "/24" in line and not line.startswith("#")]


def test_install_refuses_root_and_unknown_users(tmp_path):
    for user in ("root", "no-such-user-imsa"):
        done = subprocess.run([os.path.join(ROOT, "scripts", "install-service.sh"), user, IMSA], capture_output=True,
                              text=True, env=dict(os.environ, UNIT_DIR=str(tmp_path)), timeout=30)
        assert done.returncode == 2  # imsa install-service's usage error, passed on by the script
        assert ("refusing to serve credentials as root" if user == "root" else "no such user") in done.stderr


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is not installed")
def test_socket_activation_serves_the_socket_systemd_passes(isolated_env):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    path = os.environ["IMSA_CONTROL_SOCKET"]
    log = open(str(isolated_env / "activate.log"), "w")
    process = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", f"IMSA_CONTROL_SOCKET={path}",
         sys.executable, "-m", "imsa", "-v", "start", "--foreground", *service_user_args()],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                # The first connection makes systemd-socket-activate start imsa with the listening socket as fd 3.
                answer = http("127.0.0.1", port, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
                status = Client(path, timeout=2).status()
                break
            except (ConnectionError, ServiceNotRunning, OSError):
                time.sleep(0.1)
        assert status is not None, open(log.name).read()
        assert answer[0] == 200
        assert status["listen"] == f"127.0.0.1:{port}"
        assert "using the listening socket passed by systemd" in open(log.name).read()
    finally:
        stop_process(process)
        log.close()
