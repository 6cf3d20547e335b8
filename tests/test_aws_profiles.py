"""~/.aws/config profiles end to end: the CLI, a live service, the strict fake STS and real clients.

A three-hop chain (keys -> role A with mfa_serial -> role B) costs one MFA code and one GetSessionToken; every
other chain on the same keys and device, in either file, reuses that session.
"""

import json
import os
import subprocess
import sys
import textwrap

import boto3
import pytest
from botocore.utils import InstanceMetadataFetcher

from conftest import MFA_CODE, MFA_SERIAL, answer_on_terminal, one_error_line, run_imsa, run_without_terminal

from jsclient import node  # noqa: F401 (a fixture)
from test_aws_config import role_of, signers


# The command under imsa exec: who its SDK's default chain (the container endpoint imsa exec serves) says it is.
WHOAMI = "import boto3; print(boto3.client('sts', region_name='us-east-1').get_caller_identity()['Arn'])"


def write_aws_config(home, sts):
    """~/.aws/credentials with alice's keys under [alice]; ~/.aws/config with A (MFA) -> B, and C on the same
    keys and device."""
    alice = sts.users["alice"]
    directory = home / ".aws"
    directory.mkdir(exist_ok=True)
    (directory / "credentials").write_text(
        f"[alice]\naws_access_key_id = {alice['aws_access_key_id']}\n"
        f"aws_secret_access_key = {alice['aws_secret_access_key']}\n")
    (directory / "config").write_text(textwrap.dedent(f"""
        [profile A]
        role_arn = {sts.roles['role-a']}
        source_profile = alice
        mfa_serial = {MFA_SERIAL}
        role_session_name = alice-a
        [profile B]
        role_arn = {sts.roles['role-b']}
        source_profile = A
        region = eu-west-1
        [profile C]
        role_arn = {sts.roles['role-c']}
        source_profile = alice
        mfa_serial = {MFA_SERIAL}
    """))
    for name in ("credentials", "config"):
        os.chmod(directory / name, 0o600)


@pytest.fixture
def aws_home(isolated_env, service, sts_env):
    write_aws_config(isolated_env, sts_env)
    return isolated_env


def caller(creds_or_fetched, sts):
    """The ARN STS names for credentials (Credentials-like dict with access_key/secret_key/token)."""
    client = boto3.client("sts", endpoint_url=sts.endpoint, region_name="us-east-1",
                          aws_access_key_id=creds_or_fetched["access_key"],
                          aws_secret_access_key=creds_or_fetched["secret_key"],
                          aws_session_token=creds_or_fetched["token"])
    return client.get_caller_identity()["Arn"]


def imds_fetch(service):
    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, env={}, config={
        "ec2_metadata_service_endpoint": service.endpoint, "ec2_metadata_v1_disabled": True,
    })
    return fetcher.retrieve_iam_role_credentials()


def test_one_mfa_code_for_a_three_hop_chain_and_none_for_the_next_chains(aws_home, service, sts_env):
    alice = sts_env.users["alice"]["aws_access_key_id"]
    mark = sts_env.mark()
    process, prompts, _, stderr = answer_on_terminal(["assume", "B"], [MFA_CODE])
    assert process.returncode == 0, stderr
    assert len(prompts) == 1 and MFA_SERIAL in prompts[0]
    calls = signers(sts_env, mark)
    assert [action for action, _, _ in calls] == ["GetSessionToken", "AssumeRole", "AssumeRole"]
    (_, gst_key, gst), (_, a_key, a_params), (_, b_key, b_params) = calls
    assert gst_key == alice and (gst["SerialNumber"], gst["TokenCode"]) == (MFA_SERIAL, MFA_CODE)
    assert a_key.startswith("ASIA") and a_params["RoleArn"] == sts_env.roles["role-a"]
    assert a_params["RoleSessionName"] == "alice-a"
    assert b_key not in (alice, a_key) and b_params["RoleArn"] == sts_env.roles["role-b"]
    assert not any("SerialNumber" in params or "TokenCode" in params for _, _, params in calls[1:])
    assert role_of(caller(imds_fetch(service), sts_env)) == "assumed-role/role-b"

    status = service.client.status()
    assert status["active"]["origin"] == str(aws_home / ".aws" / "config")
    assert status["active"]["via"] == [sts_env.roles["role-a"]]
    assert status["active"]["source"].startswith("keys ****") and MFA_SERIAL in status["active"]["source"]
    text = run_imsa("status")
    assert "~/.aws/config" in text.stdout or str(aws_home / ".aws" / "config") in text.stdout, text.stdout

    # A, and then C (another chain on the same keys and device), without a terminal: no code can be asked.
    mark = sts_env.mark()
    done = run_without_terminal("assume", "A")
    assert done.returncode == 0, done.stderr
    done = run_without_terminal("exec", "C", "--", sys.executable, "-c", WHOAMI)
    assert done.returncode == 0, done.stderr
    assert role_of(done.stdout.strip()) == "assumed-role/role-c"
    assert "GetSessionToken" not in [action for action, _, _ in signers(sts_env, mark)]


def test_the_imsa_file_wins_and_list_shows_what_it_shadows(aws_home, sts_env):
    from conftest import write_config

    write_config(aws_home, sts_env, extra={"C": {"extends": "base", "role_arn": sts_env.roles["role-d"]}})
    done = run_imsa("list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["C"]["origin"] == str(aws_home / ".imsa") and rows["C"]["role_arn"] == sts_env.roles["role-d"]
    assert rows["C"]["shadows"] == str(aws_home / ".aws" / "config")
    assert rows["B"]["origin"] == str(aws_home / ".aws" / "config") and rows["B"]["via"] == [sts_env.roles["role-a"]]
    assert rows["B"]["region"] == "eu-west-1" and rows["B"]["session"] is None
    assert rows["A"]["source"] == rows["B"]["source"] and MFA_SERIAL in rows["A"]["source"]
    assert sts_env.users["alice"]["aws_secret_access_key"] not in done.stdout
    assert sts_env.users["alice"]["aws_access_key_id"] not in done.stdout

    run = run_imsa("assume", "B", "--mfa-token", MFA_CODE)
    assert run.returncode == 0, run.stderr
    rows = {row["name"]: row for row in json.loads(run_imsa("list", "--json").stdout)}
    assert rows["A"]["session"] is not None and rows["B"]["session"] == rows["A"]["session"]
    table = run_imsa("list")
    assert table.returncode == 0 and "B " in table.stdout and "held (" in table.stdout
    assert "C in ~/.aws/config is shadowed by ~/.imsa" in table.stderr


def test_a_broken_aws_profile_is_one_line_naming_file_section_and_key(aws_home, sts_env):
    with open(aws_home / ".aws" / "config", "a") as handle:
        handle.write("[profile loop1]\nrole_arn = arn:aws:iam::123456789012:role/x\nsource_profile = loop2\n"
                     "[profile loop2]\nrole_arn = arn:aws:iam::123456789012:role/y\nsource_profile = loop1\n")
    line = one_error_line(run_imsa("assume", "loop1"), 3)
    assert ".aws/config: [profile loop2], key 'source_profile': infinite loop" in line
    listed = run_imsa("list", "--json")  # one bad profile does not hide the others
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert "infinite loop" in rows["loop1"]["error"] and rows["B"].get("error") is None


def test_credential_process_of_an_aws_profile_serves_sdks_and_refuses_to_call_itself(aws_home, sts_env):
    imsa = f"{sys.executable} -m imsa"
    with open(aws_home / ".aws" / "config", "a") as handle:
        handle.write(f"[profile use-b]\ncredential_process = {imsa} credential-process B\n"
                     f"[profile self-loop]\ncredential_process = {imsa} credential-process self-loop\n")
    assert run_imsa("assume", "A", "--mfa-token", MFA_CODE).returncode == 0
    session = boto3.Session(profile_name="use-b")
    arn = session.client("sts", endpoint_url=sts_env.endpoint, region_name="us-east-1").get_caller_identity()["Arn"]
    assert role_of(arn) == "assumed-role/role-b"

    line = one_error_line(run_without_terminal("credential-process", "self-loop"), 4)
    assert "self-loop" in line and "would run one again" in line and "(a loop)" in line


# --- real clients, each delivery mode, a ~/.aws/config chain ---

AWS = os.path.join(os.path.dirname(sys.executable), "aws")
BOTO3 = "import boto3; print(boto3.client('sts', region_name='us-east-1').get_caller_identity()['Arn'])"


def clients(sts, node):
    """(name, argv, how its output gives the ARN) of boto3, the aws CLI and the JS SDK v3, each calling
    GetCallerIdentity at the fake STS with the credentials its default chain finds."""
    from jsclient import WHOAMI

    return [
        ("boto3", [sys.executable, "-c", BOTO3], str.strip),
        ("aws", [AWS, "sts", "get-caller-identity", "--endpoint-url", sts.endpoint, "--region", "us-east-1",
                 "--query", "Arn", "--output", "text"], str.strip),
        ("js", [node, WHOAMI], lambda out: json.loads(out)["Arn"]),
    ]


def run_client(argv, env):
    """Run one client (no terminal: nothing can prompt); its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          start_new_session=True, timeout=90)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


@pytest.mark.parametrize("delivery", ["imds", "exec", "credential_process"])
def test_boto3_the_aws_cli_and_the_js_sdk_get_a_chained_role_in_each_delivery_mode(aws_home, service, sts_env, node,
                                                                                      delivery):
    # Every client's chain is closed off from the real 169.254.169.254: IMDS is either the loopback service
    # (AWS_EC2_METADATA_SERVICE_ENDPOINT) or disabled.
    env = dict(os.environ, WHOAMI_STS_ENDPOINT=sts_env.endpoint, AWS_EC2_METADATA_DISABLED="true")
    prefix = []
    if delivery == "imds":
        assert run_imsa("assume", "B", "--mfa-token", MFA_CODE).returncode == 0
        env.update(AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint)
        del env["AWS_EC2_METADATA_DISABLED"]
    else:
        assert run_imsa("assume", "C", "--mfa-token", MFA_CODE).returncode == 0  # the session, another role active
        if delivery == "exec":
            prefix = [sys.executable, "-m", "imsa", "exec", "B", "--"]
        else:
            with open(aws_home / ".aws" / "config", "a") as handle:
                handle.write(f"[profile use-b]\ncredential_process = {sys.executable} -m imsa credential-process B\n")
            env["AWS_PROFILE"] = "use-b"
    mark = sts_env.mark()
    for name, argv, arn_of in clients(sts_env, node):
        arn = arn_of(run_client(prefix + argv, env))
        assert role_of(arn) == "assumed-role/role-b", (name, arn)
    assert "GetSessionToken" not in sts_env.actions(mark), "every client used the session the service holds"
