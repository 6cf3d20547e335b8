"""Scenarios that need real non-loopback addresses; each runs inside a fresh network namespace.

Run as ``unshare -n python tests/netns_scenarios.py NAME`` (tests/test_netns.py does this): lo is brought up
and addresses are added inside that namespace only, so nothing leaves it. Prints one JSON object.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

IMDS_IP = "169.254.169.254"
OUTSIDER_IP = "10.9.9.9"


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_lo(*addresses):
    ip("link", "set", "lo", "up")
    for address in addresses:
        ip("address", "add", f"{address}/32", "dev", "lo")


def peer_filter():
    """A client whose source address is not loopback (nor the listen address) is refused."""
    from conftest import http, start_service, stop_process

    setup_lo(IMDS_IP, OUTSIDER_IP)
    service = start_service(["--listen", f"{IMDS_IP}:80"])
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    try:
        results = {}
        for name, source in (("outsider", OUTSIDER_IP), ("loopback", "127.0.0.1"), ("listen", IMDS_IP)):
            status, _, body = http(IMDS_IP, 80, "PUT", "/latest/api/token", ttl, host_header=IMDS_IP, source=source)
            results[name] = [status, body.decode(errors="replace")]
        return results
    finally:
        stop_process(service.process)


def _as_user(uid, argv, env, timeout=90):
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/",
    )


def _ids(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return fields


def _socket_fds(pid):
    found = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                found += 1
        except OSError:
            continue
    return found


def _core_limit(pid):
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max core file size"):
                return line.split()[4]
    return None


def _lo_addresses():
    return subprocess.run(["ip", "-o", "address", "show", "dev", "lo"], capture_output=True, text=True).stdout


def real_address():
    """`sudo imsa start` for an unprivileged user, then SDKs with no endpoint variable, then `imsa stop`."""
    import tempfile
    import time

    import yaml

    from conftest import MFA_SERIAL, MFA_CODE, shared_tmpdir, start_sts, stop_process
    from imsa.client import Client

    import shutil

    user = 65534
    setup_lo()
    sts = start_sts()
    home = tempfile.mkdtemp(prefix="imsa-home-")
    run_dir = shared_tmpdir("imsa-run-")
    try:
        os.chown(home, user, user)
        alice = sts.users["alice"]
        profiles = {
            "base": {"aws_access_key_id": alice["aws_access_key_id"],
                     "aws_secret_access_key": alice["aws_secret_access_key"], "mfa_serial_number": MFA_SERIAL},
            "a": {"extends": "base", "role_arn": sts.roles["role-a"], "role_session_name": "netns-a"},
        }
        config = os.path.join(home, ".imsa")
        with open(config, "w") as handle:
            yaml.safe_dump(profiles, handle)
        os.chmod(config, 0o600)
        os.chown(config, user, user)
        socket_path = os.path.join(run_dir, "run", "control.sock")
        env = {
            "PATH": os.path.dirname(sys.executable) + ":/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home, "IMSA_CONFIG": config, "IMSA_CONTROL_SOCKET": socket_path,
            "AWS_ENDPOINT_URL_STS": sts.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.path.join(home, "no-config"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "no-creds"),
        }
        result = {"alias_before": IMDS_IP in _lo_addresses()}
        started = subprocess.run([sys.executable, "-m", "imsa", "start"], capture_output=True, text=True,
                                 env=dict(env, SUDO_UID=str(user), SUDO_GID=str(user)), timeout=60,
                                 stdin=subprocess.DEVNULL)
        result["start"] = [started.returncode, started.stdout, started.stderr]
        if started.returncode != 0:
            return result
        status = Client(socket_path).status()
        pid = status["pid"]
        server_ids = _ids(pid)
        waiter = int(server_ids["PPid"][0])
        result.update(
            listen=status["listen"], alias_added=status["alias_added"], alias_up=IMDS_IP in _lo_addresses(),
            server_uids=[int(x) for x in server_ids["Uid"]], server_gids=[int(x) for x in server_ids["Gid"]],
            server_groups=server_ids.get("Groups", []), waiter_uid=int(_ids(waiter)["Uid"][0]),
            waiter_sockets=_socket_fds(waiter), server_core_limit=_core_limit(pid),
        )
        assume = _as_user(user, [sys.executable, "-m", "imsa", "assume", "a", "--mfa-token", MFA_CODE], env)
        result["assume"] = [assume.returncode, assume.stderr]
        aws = _as_user(user, [os.path.join(os.path.dirname(sys.executable), "aws"), "sts", "get-caller-identity",
                              "--query", "Arn", "--output", "text"], env)
        result["aws"] = [aws.returncode, aws.stdout.strip(), aws.stderr[-500:]]
        script = "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])"
        boto = _as_user(user, [sys.executable, "-c", script], env)
        result["boto3"] = [boto.returncode, boto.stdout.strip(), boto.stderr[-500:]]
        stopped = _as_user(user, [sys.executable, "-m", "imsa", "stop"], env)
        result["stop"] = [stopped.returncode, stopped.stderr]
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{waiter}") and time.monotonic() < deadline:
            time.sleep(0.05)
        result["waiter_gone"] = not os.path.exists(f"/proc/{waiter}")
        result["alias_after"] = IMDS_IP in _lo_addresses()
        return result
    finally:
        stop_process(sts.process)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
