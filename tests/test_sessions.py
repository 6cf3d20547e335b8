"""Which MFA session serves which profile, end to end (the CLI, a live service, the fake STS): a session is reused
while it has at least 10 minutes left and renewed with MFA below that; a session made without MFA never serves a
profile that needs MFA; and a role whose ARN has an IAM path is listed by IMDS under its name, as on EC2."""

import os

import boto3
import pytest
from botocore.utils import InstanceMetadataFetcher

from conftest import MFA_CODE, MFA_SERIAL, run_imsa, run_without_terminal, start_service, start_sts, stop_process, write_config


def new_sessions(sts, since):
    """The parameters of every GetSessionToken the fake STS received after *since*."""
    return [params for params in sts.requests(since) if params.get("Action") == "GetSessionToken"]


def test_a_role_arn_with_a_path_is_listed_by_its_last_segment(isolated_env, service, sts_env):
    arn = sts_env.roles["path-role"]
    assert arn == f"arn:aws:iam::{sts_env.account}:role/service-role/path-role"
    write_config(isolated_env, sts_env, extra={
        "p": {"extends": "base", "role_arn": arn, "role_session_name": "tester-p"},
    })
    done = run_imsa("assume", "p", "--mfa-token", MFA_CODE)
    assert done.returncode == 0, done.stderr

    # botocore lists the role name, then asks for /security-credentials/<name>: one segment, like EC2's.
    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=1, env={}, config={
        "ec2_metadata_service_endpoint": service.endpoint, "ec2_metadata_v1_disabled": True,
    })
    fetched = fetcher.retrieve_iam_role_credentials()
    assert fetched["role_name"] == "path-role"
    client = boto3.client("sts", endpoint_url=sts_env.endpoint, region_name="us-east-1",
                          aws_access_key_id=fetched["access_key"], aws_secret_access_key=fetched["secret_key"],
                          aws_session_token=fetched["token"])
    assert client.get_caller_identity()["Arn"] == f"arn:aws:sts::{sts_env.account}:assumed-role/path-role/tester-p"


@pytest.mark.parametrize("minutes_left,renewed", [(11, False), (9, True)], ids=["11-min-reused", "9-min-renewed"])
def test_a_session_is_reused_with_10_minutes_left_and_renewed_with_mfa_below(isolated_env, minutes_left, renewed):
    # The fake STS makes every MFA session last minutes_left; the second profile shares it (same keys, same device).
    sts = start_sts(extra_args=["--session-lifetime", str(minutes_left * 60)])
    service = None
    try:
        write_config(isolated_env, sts)
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(env=env)
        first = run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env)
        assert first.returncode == 0 and "new MFA session" in first.stderr, first.stderr
        mark = sts.mark()
        # No terminal and no --mfa-token: this succeeds only if no MFA code is needed.
        second = run_without_terminal("assume", "b", env=env)
        if not renewed:
            assert second.returncode == 0, second.stderr
            assert "new MFA session" not in second.stderr
            assert sts.actions(mark) == ["AssumeRole"], "the held session was used, no GetSessionToken"
            return
        assert second.returncode == 4 and "an MFA code is needed" in second.stderr, second.stderr
        assert sts.actions(mark) == [], "nothing is sent to STS without a code"
        third = run_imsa("assume", "b", "--mfa-token", MFA_CODE, env=env)
        assert third.returncode == 0 and "new MFA session" in third.stderr, third.stderr
        renewal = new_sessions(sts, mark)
        assert len(renewal) == 1
        assert (renewal[0].get("SerialNumber"), renewal[0].get("TokenCode")) == (MFA_SERIAL, MFA_CODE)
    finally:
        if service is not None:
            stop_process(service.process)
        sts.stop()


def test_a_session_made_without_mfa_never_serves_a_profile_that_needs_mfa(isolated_env):
    # Same access key, with and without an MFA device: two sources, two sessions. Sharing one would hand the
    # profile that demands MFA credentials nobody typed a code for.
    sts = start_sts(mfa_code=None)  # GetSessionToken without a code is allowed, as AWS allows it for IAM users
    service = None
    try:
        alice = sts.users["alice"]
        keys = {"aws_access_key_id": alice["aws_access_key_id"], "aws_secret_access_key": alice["aws_secret_access_key"]}
        write_config(isolated_env, sts, extra={
            "plain": dict(keys, role_arn=sts.roles["role-a"]),
            "strict": dict(keys, mfa_serial_number=MFA_SERIAL, role_arn=sts.roles["role-b"]),
        })
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(env=env)
        mark = sts.mark()
        plain = run_without_terminal("assume", "plain", env=env)
        assert plain.returncode == 0, plain.stderr
        made = new_sessions(sts, mark)
        assert len(made) == 1 and "SerialNumber" not in made[0] and "TokenCode" not in made[0]

        mark = sts.mark()
        strict = run_without_terminal("assume", "strict", env=env)
        assert strict.returncode == 4 and "an MFA code is needed" in strict.stderr, strict.stderr
        assert sts.actions(mark) == [], "the session made without MFA was not used for the MFA profile"
        assert service.client.status()["active"]["profile"] == "plain"

        strict = run_imsa("assume", "strict", "--mfa-token", MFA_CODE, env=env)
        assert strict.returncode == 0, strict.stderr
        made = new_sessions(sts, mark)
        assert len(made) == 1 and (made[0].get("SerialNumber"), made[0].get("TokenCode")) == (MFA_SERIAL, MFA_CODE)
        assert len(service.client.status()["sessions"]) == 2
    finally:
        if service is not None:
            stop_process(service.process)
        sts.stop()
