"""End to end: the CLI, the service and real AWS clients against moto's strict STS, over real sockets."""

import json
import os
import subprocess
import sys

import boto3
from botocore.utils import InstanceMetadataFetcher

from conftest import MFA_CODE, answer_on_terminal, run_imsa, write_config


def caller_arn(creds, sts_server):
    """GetCallerIdentity against the fake STS with *creds* (a dict of the three AWS fields)."""
    client = boto3.client("sts", endpoint_url=sts_server.endpoint, region_name="us-east-1", **creds)
    return client.get_caller_identity()["Arn"]


def imds_env(service, **extra):
    """An environment where only IMDS (the test's service) can provide credentials."""
    env = dict(os.environ, AWS_EC2_METADATA_SERVICE_ENDPOINT=service.endpoint + "/", AWS_EC2_METADATA_V1_DISABLED="true",
               AWS_DEFAULT_REGION="us-east-1")
    env.update(extra)
    return env


def test_botocore_fetcher_and_boto3_chain_get_the_assumed_role(isolated_env, service, sts_env, monkeypatch):
    write_config(isolated_env, sts_env)
    done = run_imsa("assume", "a", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr
    assert "role-a" in done.stderr and done.stdout == ""

    fetcher = InstanceMetadataFetcher(timeout=1, num_attempts=1, env={}, config={
        "ec2_metadata_service_endpoint": service.endpoint,
        "ec2_metadata_v1_disabled": True,
    })
    fetched = fetcher.retrieve_iam_role_credentials()
    assert fetched["role_name"] == "role-a"
    assert fetched["access_key"].startswith("ASIA")
    arn = caller_arn({
        "aws_access_key_id": fetched["access_key"],
        "aws_secret_access_key": fetched["secret_key"],
        "aws_session_token": fetched["token"],
    }, sts_env)
    assert arn == f"arn:aws:sts::{sts_env.account}:assumed-role/role-a/tester-a"

    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", service.endpoint + "/")
    monkeypatch.setenv("AWS_EC2_METADATA_V1_DISABLED", "true")
    creds = boto3.Session().get_credentials()
    assert creds.method == "iam-role"
    frozen = creds.get_frozen_credentials()
    assert frozen.access_key == fetched["access_key"]
    assert caller_arn({
        "aws_access_key_id": frozen.access_key,
        "aws_secret_access_key": frozen.secret_key,
        "aws_session_token": frozen.token,
    }, sts_env) == arn


def aws_cli_arn(env):
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "aws"), "sts", "get-caller-identity", "--output", "json"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["Arn"]


def test_one_mfa_session_switches_roles_and_export_gives_another(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    before = sts_env.mark()
    assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
    env = imds_env(service)
    assert aws_cli_arn(env).endswith(":assumed-role/role-a/tester-a")

    # Same source: no MFA code given, none needed.
    done = run_imsa("assume", "b")
    assert done.returncode == 0, done.stderr
    assert aws_cli_arn(env).endswith(":assumed-role/role-b/tester-b")

    script = f'eval "$({sys.executable} -m imsa export c)" && aws sts get-caller-identity --query Arn --output text'
    shell = dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=shell, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(":assumed-role/role-c/tester-c")
    assert aws_cli_arn(env).endswith(":assumed-role/role-b/tester-b")

    assert sts_env.calls("GetSessionToken", before) == 1
    assert sts_env.calls("AssumeRole", before) == 3


def test_status_shows_the_active_profile_and_masks_the_key(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    done = run_imsa("status")
    assert done.returncode == 1
    assert "none" in done.stdout
    assert run_imsa("assume", "a", "--mfa-token", MFA_CODE).returncode == 0
    done = run_imsa("status", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["active"]["profile"] == "a"
    assert data["active"]["role_arn"] == sts_env.roles["role-a"]
    assert data["active"]["access_key_id"].startswith("****") and len(data["active"]["access_key_id"]) == 8
    assert data["active"]["session_expiration"]
    assert "secret" not in done.stdout.lower()


def test_regression_mfa_prompt_is_asked_on_the_terminal_and_retyped(isolated_env, service, sts_env):
    # /dev/tty was opened in text "r+" mode, which cannot work (a terminal cannot seek): the prompt never came.
    write_config(isolated_env, sts_env)
    process, prompts, stdout, stderr = answer_on_terminal(["assume", "a"], ["12", MFA_CODE])
    assert process.returncode == 0, stderr
    assert "MFA code for arn:aws:iam::123456789012:mfa/alice" in prompts[0]
    assert "6 digits" in prompts[1]
    assert "MFA code" not in stdout + stderr


def test_export_prompts_on_the_terminal_and_keeps_stdout_for_eval(isolated_env, service, sts_env):
    write_config(isolated_env, sts_env)
    process, prompts, stdout, stderr = answer_on_terminal(["export", "c"], [MFA_CODE])
    assert process.returncode == 0, stderr
    assert "MFA code for" in prompts[0]
    lines = stdout.strip().splitlines()
    assert all(line.startswith(("export ", "unset ")) for line in lines), stdout
    assert any(line.startswith("export AWS_SESSION_TOKEN=") for line in lines)
