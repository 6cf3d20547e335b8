"""imsa end to end on loopback: a fake STS (moto), the service, one MFA code, three roles.

Run by scripts/demo. Everything runs on 127.0.0.1 and is stopped (by PID) at the end.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DEMO_MFA_CODE = "123456"


def show(argv, env, shell=False):
    """Print a command like a terminal would, run it, and print what it prints."""
    shown = argv if shell else " ".join(argv)
    print(f"\n$ {shown}", flush=True)
    done = subprocess.run(argv, env=env, shell=shell, text=True, capture_output=True, stdin=subprocess.DEVNULL,
                          executable="/bin/bash" if shell else None)
    for stream in (done.stdout, done.stderr):
        if stream.strip():
            print(stream.rstrip(), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: '{shown}' failed with exit code {done.returncode}")
    return done.stdout


def recorded_actions(path):
    """The Action of every request moto recorded."""
    import base64
    import urllib.parse

    actions = []
    with open(path) as handle:
        for line in handle:
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            actions.append(urllib.parse.parse_qs(body).get("Action", [None])[0])
    return actions


def main():
    workdir = tempfile.mkdtemp(prefix="imsa-demo-")
    os.chmod(workdir, 0o711)
    run_dir = os.path.join(workdir, "service")
    os.mkdir(run_dir, 0o700)
    if os.geteuid() == 0:
        os.chown(run_dir, 65534, 65534)
    home = os.path.join(workdir, "home")
    os.makedirs(home)
    recording = os.path.join(workdir, "sts-requests.jsonl")
    sts = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "sts_server.py"), "--mfa-code", DEMO_MFA_CODE],
        stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL,
        env=dict(os.environ, MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=recording),
    )
    service_started = False
    env = {}
    try:
        info = json.loads(sts.stdout.readline())
        print(f"demo: fake STS (moto, signatures and policies checked) on {info['endpoint']}")
        alice = info["users"]["alice"]
        config = os.path.join(home, ".imsa")
        with open(config, "w") as handle:
            handle.write(
                "work:\n"
                f"  aws_access_key_id: {alice['aws_access_key_id']}\n"
                f"  aws_secret_access_key: {alice['aws_secret_access_key']}\n"
                "  mfa_serial_number: arn:aws:iam::123456789012:mfa/alice\n"
                "admin:\n  extends: work\n"
                f"  role_arn: {info['roles']['role-a']}\n  role_session_name: alice-admin\n"
                "readonly:\n  extends: work\n"
                f"  role_arn: {info['roles']['role-b']}\n  role_session_name: alice-readonly\n"
                "deploy:\n  extends: work\n"
                f"  role_arn: {info['roles']['role-c']}\n  role_session_name: alice-deploy\n"
            )
        os.chmod(config, 0o600)
        env = {
            "PATH": BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "IMSA_CONFIG": config,
            "IMSA_CONTROL_SOCKET": os.path.join(run_dir, "run", "control.sock"),
            "AWS_ENDPOINT_URL_STS": info["endpoint"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
        }
        user = []
        if os.geteuid() == 0:  # imsa never serves root: the demo's service serves 'nobody', which makes its own run
            user = ["--user", "nobody"]  # directory (in one it owns) once root is dropped
            env["IMSA_SERVICE_USER"] = "nobody"
        print("demo: ~/.imsa has profiles work (keys + MFA device), admin, readonly and deploy (roles)")
        exports = show(["imsa", "start", "--listen", "127.0.0.1:0", *user], env)
        service_started = True
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = exports.strip().split("=", 1)[1]
        show(["imsa", "assume", "admin", "--mfa-token", DEMO_MFA_CODE], env)
        show(["aws", "sts", "get-caller-identity"], env)
        show(["imsa", "assume", "readonly"], env)
        show(["aws", "sts", "get-caller-identity", "--query", "Arn", "--output", "text"], env)
        show('eval "$(imsa export deploy)" && aws sts get-caller-identity --query Arn --output text', env, shell=True)
        show(["imsa", "status"], env)
        actions = [action for action in recorded_actions(recording) if action == "GetSessionToken"]
        print(f"\ndemo: STS saw {len(actions)} GetSessionToken call(s) for three roles: one MFA code in all.")
    finally:
        if service_started:
            subprocess.run([os.path.join(BIN, "imsa"), "stop"], env=env, capture_output=True)
        if sts.poll() is None:
            sts.send_signal(signal.SIGTERM)
            sts.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
