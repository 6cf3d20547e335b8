"""The relative-URI binding modes, which SDKs send to 169.254.170.2:80 (ECS's address): run inside a fresh network
namespace, ``unshare -n python tests/bindings_netns.py NODE`` (tests/test_bindings.py does), so the address exists
on this namespace's lo only. Prints one JSON object: per mode and client, the caller ARN or the error."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ECS_IP = "169.254.170.2"


def main(node):
    from conftest import SERVICE_UID, run_imsa, shared_tmpdir, start_service, start_sts, stop_process
    from roles_anywhere_fake import PROFILE_ARN, TRUST_ANCHOR_ARN, FakeRolesAnywhere, Pki
    from test_bindings import BOTO3_WHOAMI, VENV_BIN, read_env_file
    from jsclient import WHOAMI

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "address", "add", f"{ECS_IP}/32", "dev", "lo"], check=True)
    sts = start_sts()
    owner = (SERVICE_UID, SERVICE_UID) if os.geteuid() == 0 else None
    pki_dir, state = shared_tmpdir("imsa-pki-"), shared_tmpdir("imsa-state-")
    if owner:
        os.chown(state, *owner)
    pki = Pki(pki_dir, owner)
    fake = FakeRolesAnywhere(pki, sts.endpoint, sts.users["bob"], [sts.roles["role-a"]]).start()
    files = pki.leaf("host", kind="rsa", form="separate")
    home = os.environ["HOME"]
    with open(os.path.join(home, ".aws", "config"), "w") as handle:
        handle.write(f"[profile ra]\ncredential_process = imsa credential-process --certificate {files['certificate']} "
                     f"--intermediates {files['intermediates']} --private-key {files['private_key']} "
                     f"--trust-anchor-arn {TRUST_ANCHOR_ARN} --profile-arn {PROFILE_ARN} "
                     f"--role-arn {sts.roles['role-a']}\n")
    cli_env = dict(os.environ, AWS_ENDPOINT_URL_ROLESANYWHERE=fake.url, AWS_CA_BUNDLE=pki.ca_bundle)
    service = start_service(["--bindings-listen", f"{ECS_IP}:80", "--state-dir", state], env=cli_env)
    results = {}
    try:
        for mode in ("ecs-relative", "ecs-relative-query"):
            env_file = os.path.join(state, f"{mode}.env")
            done = run_imsa("bind", mode, "ra", "--mode", mode, "--env-file", env_file, env=cli_env)
            if done.returncode != 0:
                results[mode] = {"bind": done.stderr}
                continue
            unit_home = tempfile.mkdtemp(prefix="imsa-unit-home-")
            env = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), "HOME": unit_home,
                   "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_REGION": "us-east-1", "WHOAMI_STS_ENDPOINT": sts.endpoint, **read_env_file(env_file)}
            clients = {
                "variables": sorted(read_env_file(env_file)),
                "boto3": [sys.executable, "-c", BOTO3_WHOAMI, sts.endpoint],
                "aws": [os.path.join(VENV_BIN, "aws"), "sts", "get-caller-identity", "--endpoint-url", sts.endpoint,
                        "--output", "json"],
                "js": [node, WHOAMI],
            }
            results[mode] = {"variables": clients.pop("variables")}
            for name, argv in clients.items():
                ran = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                                     stdin=subprocess.DEVNULL)
                # The AWS CLI prints indented JSON; whoami.mjs and the boto3 script one line.
                results[mode][name] = (json.loads(ran.stdout)["Arn"] if ran.returncode == 0
                                       else "failed: " + ran.stderr[-500:])
            gone = run_imsa("unbind", mode, env=cli_env)
            ran = subprocess.run(clients["boto3"], capture_output=True, text=True, env=env, timeout=60,
                                 stdin=subprocess.DEVNULL)
            results[mode]["after_unbind"] = [gone.returncode, ran.returncode]
        return results
    finally:
        stop_process(service.process)
        fake.stop()
        sts.stop()
        shutil.rmtree(pki_dir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
