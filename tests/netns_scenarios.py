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
    """[soft, hard] core file size limits of *pid*."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max core file size"):
                return line.split()[4:6]
    return None


def _lo_addresses():
    return subprocess.run(["ip", "-o", "address", "show", "dev", "lo"], capture_output=True, text=True).stdout


def real_address():
    """`sudo imsa start` for an unprivileged user, then SDKs with no endpoint variable, then `imsa stop`."""
    import tempfile
    import time

    import yaml

    from conftest import MFA_SERIAL, MFA_CODE, service_run_dir, start_sts
    from imsa.client import Client

    import shutil

    user = 65534
    setup_lo()
    sts = start_sts()
    home = tempfile.mkdtemp(prefix="imsa-home-")
    run_dir = service_run_dir("imsa-run-")
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
        def root_with_extras():
            # What the drop must undo, set here rather than hoped for: root's extra groups, and core dumps allowed.
            import resource

            os.setgroups([4, 27])
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        started = subprocess.run([sys.executable, "-m", "imsa", "start"], capture_output=True, text=True,
                                 env=dict(env, SUDO_UID=str(user), SUDO_GID=str(user)), timeout=60,
                                 stdin=subprocess.DEVNULL, preexec_fn=root_with_extras)
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
            waiter_groups=_ids(waiter).get("Groups", []), server_no_new_privs=server_ids["NoNewPrivs"],
            server_bounding_set=server_ids["CapBnd"], server_effective=server_ids["CapEff"],
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
        sts.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


CONTAINER_CLIENT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from conftest import http

HERE, IMDS_IP, SECRET, PHASE = sys.argv[1:5]
results = {}


def attempt(name, method, path, headers):
    try:
        status, _, body = http(IMDS_IP, 80, method, path, headers, host_header=IMDS_IP, timeout=3)
        text = body.decode(errors="replace")
        results[name] = [status, text[:200], SECRET in text]
    except OSError as error:
        results[name] = ["no connection", f"{type(error).__name__}: {error}", False]


def spoofed(name, source):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    sock.settimeout(3)
    try:
        sock.bind((source, 0))
        sock.connect((IMDS_IP, 80))
        sock.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: " + IMDS_IP.encode() + b"\r\n"
                     b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        data = sock.recv(65536).decode(errors="replace")
        results[name] = [data.split(" ", 2)[1] if data else "closed", data[:200], SECRET in data]
    except OSError as error:
        results[name] = ["no connection", f"{type(error).__name__}: {error}", False]
    finally:
        sock.close()


if PHASE == "plain":
    attempt("token", "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    attempt("credentials", "GET", "/latest/meta-data/iam/security-credentials/role-a", {})
    attempt("token_as_v1", "GET", "/latest/meta-data/iam/security-credentials/role-a",
            {"X-aws-ec2-metadata-token": "x" * 60})
    from botocore.utils import InstanceMetadataFetcher

    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, config={"ec2_metadata_v1_disabled": False})
    results["botocore"] = sorted(fetcher.retrieve_iam_role_credentials())
    held = []
    for _ in range(600):  # as many idle connections as would fill the service's slots, were they accepted
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect((IMDS_IP, 80))
            held.append(sock)
        except OSError:
            sock.close()
    results["flood_connected"] = len(held)
else:
    spoofed("spoofed_listen_address", IMDS_IP)
    spoofed("spoofed_loopback", "127.0.0.9")
print(json.dumps(results))
"""


def _wait_for_other_netns(pid, timeout=10):
    import time

    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("the container namespace was not created")


def container():
    """A "container": a second network namespace joined to this one by a veth pair and routing 169.254.169.254
    to this side, as Docker's bridge does. The service here serves role-a; the container must get nothing, even
    when (root in its own namespace) it sends from the listen address or a loopback address, which the peer
    filter would let through: the host's kernel drops those martian sources, and no SYN-ACK could reach it."""
    import tempfile

    import yaml

    from conftest import MFA_CODE, MFA_SERIAL, run_imsa, start_service, start_sts, stop_process
    from imdsv2 import service_credentials

    host_side, container_side = "10.200.0.1", "10.200.0.2"
    setup_lo(IMDS_IP)
    sts = start_sts()
    # `unshare -n sleep` keeps its pid: that pid's network namespace is the container's.
    holder = subprocess.Popen(["unshare", "-n", "sleep", "120"], stdin=subprocess.DEVNULL)
    service = None
    try:
        _wait_for_other_netns(holder.pid)
        ns = ["nsenter", "-t", str(holder.pid), "-n"]

        def inside(*argv):
            subprocess.run(ns + list(argv), check=True, capture_output=True)

        ip("link", "add", "imsa-veth0", "type", "veth", "peer", "name", "imsa-veth1", "netns", str(holder.pid))
        ip("address", "add", f"{host_side}/24", "dev", "imsa-veth0")
        ip("link", "set", "imsa-veth0", "up")
        inside("ip", "link", "set", "lo", "up")
        inside("ip", "address", "add", f"{container_side}/24", "dev", "imsa-veth1")
        inside("ip", "link", "set", "imsa-veth1", "up")
        inside("ip", "route", "add", "default", "via", host_side)

        alice = sts.users["alice"]
        with open(os.environ["IMSA_CONFIG"], "w") as handle:
            yaml.safe_dump({
                "base": {"aws_access_key_id": alice["aws_access_key_id"],
                         "aws_secret_access_key": alice["aws_secret_access_key"], "mfa_serial_number": MFA_SERIAL},
                "a": {"extends": "base", "role_arn": sts.roles["role-a"], "role_session_name": "host-a"},
            }, handle)
        os.chmod(os.environ["IMSA_CONFIG"], 0o600)
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(["--listen", f"{IMDS_IP}:80"], env=env)
        assumed = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env)
        if assumed.returncode != 0:
            return {"assume": assumed.stderr}
        role, creds = service_credentials(service)
        secret = creds["SecretAccessKey"]
        client_env = {"PATH": os.environ.get("PATH", ""), "HOME": tempfile.gettempdir(),
                      "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        results = {"host": [role, bool(secret)]}
        for phase in ("plain", "spoof"):
            if phase == "spoof":
                # The listen address on the container's side yet routed out (its local route removed), and
                # loopback sources allowed out of the container: what a hostile root in a container can do.
                inside("ip", "address", "add", f"{IMDS_IP}/32", "dev", "imsa-veth1")
                inside("ip", "route", "del", "local", IMDS_IP, "dev", "imsa-veth1", "table", "local")
                for knob in ("all", "imsa-veth1"):
                    inside("sysctl", "-qw", f"net.ipv4.conf.{knob}.route_localnet=1")
            done = subprocess.run(ns + [sys.executable, "-c", CONTAINER_CLIENT, HERE, IMDS_IP, secret, phase],
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=client_env)
            if done.returncode != 0:
                results["client_failed"] = done.stderr[-2000:]
                return results
            results.update(json.loads(done.stdout.strip().splitlines()[-1]))
        log = service.log()
        results["log_peer"] = container_side in log
        results["log_has_secret"] = secret in log
        return results
    finally:
        if service is not None:
            stop_process(service.process)
        stop_process(holder)
        sts.stop()


def exec_peer_filter():
    """The exec endpoint (127.0.0.1) refuses a client whose source address is another local address."""
    from conftest import http, start_service, stop_process

    setup_lo(OUTSIDER_IP)
    service = start_service()
    try:
        url = service.client.status()["exec_endpoint"]
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        results = {}
        for name, source in (("outsider", OUTSIDER_IP), ("loopback", "127.0.0.1")):
            status, _, body = http("127.0.0.1", port, "GET", "/credentials", source=source)
            results[name] = [status, body.decode(errors="replace")]
        return results
    finally:
        stop_process(service.process)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
